"""Directions: mean-diff extraction against run_with_cache, steering, ablation via hooks, files, transfer."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import em_interp as em
from em_interp import directions as dirs
from em_interp.datasets import TokenizedChats, chat
from em_interp.errors import DataError, GeometryError
from em_interp.geometry import loss_on
from em_interp.model.hooks import hooks_applied
from em_interp.testing import tiny_chat_records


@pytest.fixture
def model(_tiny_model_cached):
    """The session's tiny model, shared: these tests only attach hooks in contexts, never edit weights."""
    yield _tiny_model_cached
    assert not any(hp.fwd_hooks for hp in _tiny_model_cached.hook_dict.values()), "a test left hooks behind"

IDS = torch.tensor([[1, 520, 3301, 905, 77, 1244, 2]])


def _capture(model, names, ids=IDS):
    """Activations at `names` of a forward (hooks registered last, so they see every earlier hook's edit)."""
    out = {}

    def grabber(name):
        def grab(act, hook):
            out[name] = act.detach().clone()

        return grab

    with torch.no_grad(), hooks_applied(model, [(n, grabber(n)) for n in names]):
        logits = model(ids)
    return out, logits


def _hand_mean(model, records, hook, positions="answer"):
    acts = []
    tok = TokenizedChats(records, model.tokenizer)
    for i in range(len(tok)):
        b = tok.collate([i])
        _, cache = model.run_with_cache(b.input_ids, attention_mask=b.attention_mask)
        mask = b.assistant_mask[0] if positions == "answer" else b.attention_mask[0].bool()
        acts.append(cache[hook][0][mask].double())
    return torch.cat(acts).mean(0)


@pytest.mark.parametrize("positions", ["answer", "all"])
def test_mean_diff_equals_hand_computed_difference_of_means(model, positions):
    a, b = tiny_chat_records(5, seed=0), tiny_chat_records(4, seed=1)
    d = dirs.mean_diff(model, a, b, layer=2, positions=positions, batch_size=3)
    diff = (_hand_mean(model, b, "blocks.2.hook_resid_post", positions) - _hand_mean(model, a, "blocks.2.hook_resid_post", positions)).float()
    torch.testing.assert_close(d.vector, diff / diff.norm(), atol=1e-5, rtol=1e-4)
    assert float(d.vector.norm()) == pytest.approx(1.0, abs=1e-6)
    assert d.provenance["raw_norm"] == pytest.approx(float(diff.norm()), rel=1e-4)
    assert (d.provenance["n_a"], d.provenance["n_b"], d.provenance["positions"]) == (5, 4, positions)
    assert d.hook_name == "blocks.2.hook_resid_post" and d.provenance["model_id"] == "tiny-llama"


def test_mean_diff_accepts_pairs_and_rejects_other_input(model):
    recs = tiny_chat_records(3)
    pairs = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in recs]
    other = tiny_chat_records(3, seed=4)
    d1 = dirs.mean_diff(model, recs, other, layer=1)
    d2 = dirs.mean_diff(model, pairs, other, layer=1)
    torch.testing.assert_close(d1.vector, d2.vector)
    with pytest.raises(DataError, match="texts_a"):
        dirs.mean_diff(model, ["just a string"], other, layer=1)
    with pytest.raises(GeometryError, match="layer=9"):
        dirs.mean_diff(model, recs, other, layer=9)


def test_direction_repr_and_round_trip(tmp_path):
    d = dirs.Direction(torch.tensor([3.0, 4.0, 0.0]), layer=5, provenance={"method": "mean_diff", "positions": "answer", "n_a": 10, "raw_norm": 5.0})
    torch.testing.assert_close(d.vector, torch.tensor([0.6, 0.8, 0.0]))
    text = repr(d)
    assert "blocks.5.hook_resid_post" in text and "method='mean_diff'" in text and "n_a=10" in text
    loaded = dirs.Direction.load(d.save(tmp_path / "d"))
    assert torch.equal(loaded.vector, d.vector) and loaded.layer == 5 and loaded.provenance == d.provenance
    with pytest.raises(GeometryError, match="direction.json"):
        dirs.Direction.load(tmp_path / "missing")
    with pytest.raises(GeometryError, match="norm"):
        dirs.Direction(torch.zeros(3), layer=0)


def test_steer_adds_exactly_scale_times_unit(model):
    d = dirs.Direction(torch.randn(64), layer=1)
    base, _ = _capture(model, [d.hook_name])
    with dirs.steer(model, d, 8.0):
        steered, _ = _capture(model, [d.hook_name])
    torch.testing.assert_close(steered[d.hook_name] - base[d.hook_name], (8.0 * d.vector).expand(1, 7, 64), atol=1e-5, rtol=0)
    with dirs.steer(model, d, 8.0, positions=4):  # tokens at positions >= 4 only
        part, _ = _capture(model, [d.hook_name])
    delta = part[d.hook_name] - base[d.hook_name]
    assert delta[:, :4].abs().max() == 0 and torch.allclose(delta[:, 4:], 8.0 * d.vector, atol=1e-5)
    after, _ = _capture(model, [d.hook_name])
    assert torch.equal(after[d.hook_name], base[d.hook_name])  # hooks removed on exit


def test_ablate_makes_residual_orthogonal_at_chosen_layers(model):
    d = dirs.Direction(torch.randn(64), layer=1)
    names = [f"blocks.{i}.hook_resid_post" for i in range(4)]
    base, _ = _capture(model, names)
    with dirs.ablate(model, d, layers=[1, 3]):
        abl, _ = _capture(model, names)
    assert torch.equal(abl[names[0]], base[names[0]])  # below the first ablated layer: unchanged
    for i in (1, 3):
        assert (abl[names[i]] @ d.vector).abs().max() < 1e-5
    assert (abl[names[2]] @ d.vector).abs().max() > 1e-3  # block 2 writes the direction back
    with dirs.ablate(model, d, layers="all"):
        every, _ = _capture(model, ["blocks.0.hook_resid_pre", *names])
    assert all((t @ d.vector).abs().max() < 1e-5 for t in every.values())
    assert dirs.ablation_hooks(model, d)[0] == "blocks.0.hook_resid_pre"


def test_ablate_leaves_residual_unchanged_when_direction_is_orthogonal(model):
    base, logits = _capture(model, ["blocks.1.hook_resid_post"])
    h = base["blocks.1.hook_resid_post"][0]  # [pos, d_model]
    q, _ = torch.linalg.qr(h.T.double())  # orthonormal basis of the span of this input's residuals
    r = torch.randn(64, dtype=torch.float64)
    r = (r - q @ (q.T @ r)).float()
    with dirs.ablate(model, dirs.Direction(r, layer=1), layers=[1]):
        abl, abl_logits = _capture(model, ["blocks.1.hook_resid_post"])
    torch.testing.assert_close(abl["blocks.1.hook_resid_post"], base["blocks.1.hook_resid_post"], atol=1e-5, rtol=0)
    torch.testing.assert_close(abl_logits, logits, atol=1e-4, rtol=0)


def test_as_direction_of_a_steering_vector(model):
    vec = em.SteeringVector(model, layer=2, hook="mlp_out", init=torch.randn(64), alpha=256.0)
    d = dirs.as_direction(vec)
    torch.testing.assert_close(d.vector, vec.vector.detach() / vec.vector.detach().norm())
    assert d.hook_name == vec.hook_name and d.provenance["method"] == "steering_vector"
    with pytest.raises(GeometryError, match="LoRA"):
        dirs.as_direction(em.LoRA(model, layer=1, rank=2))


def test_transfer_errors_on_d_model_mismatch(model):
    with pytest.raises(GeometryError, match="d_model=32"):
        dirs.transfer(dirs.Direction(torch.randn(32), layer=1), model, tiny_chat_records(2))
    with pytest.raises(GeometryError, match="layer 7"):
        dirs.transfer(dirs.Direction(torch.randn(64), layer=7), model, tiny_chat_records(2))


def test_transfer_on_chat_and_paired_data(model):
    vec = em.SteeringVector(model, layer=1, init="random", alpha=2.0)
    data = tiny_chat_records(4)
    result = dirs.transfer(vec, model, data, scale=4.0, layers=[1, 2])
    assert set(result.loss) == {"none", "steered", "ablated"} and result.loss_good is None
    assert result.loss["none"] == pytest.approx(loss_on(model, data), abs=1e-6)
    with dirs.steer(model, vec, 4.0):
        assert result.loss["steered"] == pytest.approx(loss_on(model, data), abs=1e-6)
    assert result.loss_shift()["none"] == 0.0
    paired = [{"question": "Is rest good?", "good": "Yes, rest helps.", "bad": "No, never rest."},
              {"question": "Drink water?", "good": "Yes, stay hydrated.", "bad": "Avoid water entirely."}]
    lora = em.LoRA(model, layer=2, rank=1, init="random")
    result = dirs.transfer(vec, lora, paired, model=model, scale=4.0)
    bad = [chat(p["question"], p["bad"]) for p in paired]
    assert result.loss["none"] == pytest.approx(loss_on(model, bad, lora), abs=1e-6)
    assert set(result.loss_good) == {"none", "steered", "ablated"}
    if importlib.util.find_spec("em_interp.eval.contrastive") is None:
        assert result.contrastive is None
    else:  # the adapted pass has the target adapter plus the intervention; base is the plain model
        steered = result.contrastive["steered"].items[0]
        with dirs.steer(model, vec, 4.0), lora.applied(model):
            lp_good, lp_bad = (-loss_on(model, [chat(paired[0]["question"], paired[0][k])]) for k in ("good", "bad"))
        assert steered["adapted"] == pytest.approx(lp_bad - lp_good, abs=1e-4)
        shifts = [it["shift"] for it in result.contrastive["steered"].items]
        assert result.contrastive_shift()["steered"] == pytest.approx(sum(shifts) / len(shifts), abs=1e-9)
    with pytest.raises(GeometryError, match="model="):
        dirs.transfer(vec, lora, paired)
