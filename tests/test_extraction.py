"""mean_diff's read positions (last / index / mask), several layers at once, and the aggregators (mean, PCA as
repeng, logistic regression), each against a reference computed directly (one row per forward, numpy / sklearn)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression

from em_interp import directions as dirs
from em_interp.datasets import TokenizedChats
from em_interp.errors import DataError, GeometryError
from em_interp.testing import tiny_chat_records

HOOK = "blocks.{}.hook_resid_post"


@pytest.fixture
def model(_tiny_model_cached):
    yield _tiny_model_cached
    assert not any(hp.fwd_hooks for hp in _tiny_model_cached.hook_dict.values()), "a test left hooks behind"


@pytest.fixture(scope="module")
def sides():
    return tiny_chat_records(8, seed=0), tiny_chat_records(8, seed=1)


def _rows(model, records, layer, select):
    """Per-row activations [rows, d_model] float64, each row alone (no padding); `select(ids, assistant) -> mask`."""
    tok = TokenizedChats(records, model.tokenizer)
    out = []
    for i in range(len(tok)):
        b = tok.collate([i])
        _, cache = model.run_with_cache(b.input_ids)
        mask = select(b.input_ids[0], b.assistant_mask[0])
        out.append(cache[HOOK.format(layer)][0][mask].double().mean(0))
    return torch.stack(out).detach().numpy()


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _cos(d, ref):
    return float(np.dot(d.vector.double().numpy(), _unit(ref)))


def _one_hot(n, index):
    m = torch.zeros(n, dtype=torch.bool)
    m[index] = True
    return m


def _first_varying_index(model, a, b):
    """The first token index whose tokens differ between the sides (earlier: the fixed system prompt, and
    question numbers that both sides share)."""
    ids_a, ids_b = (TokenizedChats(x, model.tokenizer).ids for x in (a, b))
    n = min(map(len, ids_a + ids_b))
    return next(k for k in range(n) if sorted(r[k] for r in ids_a) != sorted(r[k] for r in ids_b))


@pytest.mark.parametrize("positions", ["last", "first_varying", -2])
def test_positions_last_and_index_match_reference(model, sides, positions):
    a, b = sides
    if positions == "first_varying":
        positions = _first_varying_index(model, a, b)
        assert positions > 10  # a positive index past the system prompt
    index = -1 if positions == "last" else positions

    def select(ids, am):
        return _one_hot(len(ids), index)

    d = dirs.mean_diff(model, a, b, layer=2, positions=positions, batch_size=3)  # batches of mixed lengths
    ref = _rows(model, b, 2, select).mean(0) - _rows(model, a, 2, select).mean(0)
    assert _cos(d, ref) == pytest.approx(1.0, abs=1e-6)
    assert d.provenance["positions"] == positions and d.provenance["n_tokens_a"] == len(a)
    assert d.provenance["raw_norm"] == pytest.approx(float(np.linalg.norm(ref)), rel=1e-4)


def test_position_mask_function(model, sides):
    a, b = sides
    newline = 198  # "\n" in the SmolLM2 vocabulary: read every newline token of the chat template
    d = dirs.mean_diff(model, a, b, layer=1, positions=lambda batch: batch.input_ids == newline)
    tok_a, tok_b = (TokenizedChats(x, model.tokenizer) for x in (a, b))
    counts = [sum(ids.count(newline) for ids in t.ids) for t in (tok_a, tok_b)]

    def pooled(records, count):  # token-pooled mean = Σ over rows of (row mean × row count) / total
        rows = _rows(model, records, 1, lambda ids, am: ids == newline)
        per_row = np.array([ids.count(newline) for ids in TokenizedChats(records, model.tokenizer).ids])
        return (rows * per_row[:, None]).sum(0) / count

    assert _cos(d, pooled(b, counts[1]) - pooled(a, counts[0])) == pytest.approx(1.0, abs=1e-6)
    assert d.provenance["positions"] == "mask" and d.provenance["n_tokens_a"] == counts[0]


def test_several_layers_in_one_call_equal_single_calls(model, sides):
    a, b = sides
    many = dirs.mean_diff(model, a, b, layer=[3, 0, -3], positions="last")
    assert sorted(many) == [0, 1, 3]
    for layer, d in many.items():
        single = dirs.mean_diff(model, a, b, layer=layer, positions="last")
        torch.testing.assert_close(d.vector, single.vector, atol=1e-6, rtol=0)
        assert d.layer == layer and d.hook_name == HOOK.format(layer)


@pytest.mark.parametrize("method", ["pca_diff", "pca_center"])
def test_pca_methods_match_repeng_computation(model, sides, method):
    a, b = sides
    d = dirs.mean_diff(model, a, b, layer=2, positions="last", method=method)
    last = lambda ids, am: _one_hot(len(ids), -1)  # noqa: E731
    ha, hb = _rows(model, a, 2, last), _rows(model, b, 2, last)
    # repeng.extract.read_representations: h interleaves [positive, negative] rows; here positive = b
    h = np.empty((2 * len(a), ha.shape[1]))
    h[::2], h[1::2] = hb, ha
    if method == "pca_diff":
        train = h[::2] - h[1::2]
    else:
        center = (h[::2] + h[1::2]) / 2
        train = h.copy()
        train[::2] -= center
        train[1::2] -= center
    pca = PCA(n_components=1, whiten=False).fit(train)
    ref = pca.components_[0]
    projected = h @ ref
    if np.mean(projected[::2] < projected[1::2]) > np.mean(projected[::2] > projected[1::2]):
        ref = -ref
    assert _cos(d, ref) == pytest.approx(1.0, abs=1e-5)
    assert d.provenance["method"] == method
    assert d.provenance["explained_variance_ratio"] == pytest.approx(float(pca.explained_variance_ratio_[0]), rel=1e-4)
    assert np.mean(hb @ d.vector.double().numpy() > ha @ d.vector.double().numpy()) >= 0.5


def test_logistic_matches_sklearn(model, sides):
    a, b = sides
    d = dirs.mean_diff(model, a, b, layer=3, positions="answer", method="logistic")
    answer = lambda ids, am: am  # noqa: E731 -- per-row mean of the answer tokens
    x = np.concatenate([_rows(model, a, 3, answer), _rows(model, b, 3, answer)])
    y = np.r_[np.zeros(len(a)), np.ones(len(b))]
    clf = LogisticRegression(max_iter=1000).fit(x, y)
    assert _cos(d, clf.coef_[0]) == pytest.approx(1.0, abs=1e-4)
    assert d.provenance["train_accuracy"] == pytest.approx(clf.score(x, y))
    assert d.provenance["method"] == "logistic"


def test_bad_positions_and_methods(model, sides):
    a, b = sides
    with pytest.raises(GeometryError, match="positions='first'"):
        dirs.mean_diff(model, a, b, layer=1, positions="first")
    with pytest.raises(GeometryError, match="method='median'"):
        dirs.mean_diff(model, a, b, layer=1, method="median")
    with pytest.raises(DataError, match=r"positions=500 is outside texts_a\[\d+\]"):
        dirs.mean_diff(model, a, b, layer=1, positions=500)
    with pytest.raises(GeometryError, match="expected a Bool tensor of shape"):
        dirs.mean_diff(model, a, b, layer=1, positions=lambda batch: batch.input_ids)
    with pytest.raises(DataError, match="pairs a\\[i\\] with b\\[i\\]; got 8 rows in texts_a and 5"):
        dirs.mean_diff(model, a, b[:5], layer=1, method="pca_diff")
    def first_row_only(batch):
        mask = torch.zeros_like(batch.input_ids, dtype=torch.bool)
        mask[0, 0] = True
        return mask

    with pytest.raises(DataError, match=r"texts_a: kept row \d+ has no 'mask' tokens; method='logistic' needs one vector"):
        dirs.mean_diff(model, a, b, layer=1, method="logistic", positions=first_row_only, batch_size=8)
    with pytest.raises(GeometryError, match="layer=9"):
        dirs.mean_diff(model, a, b, layer=[1, 9])
