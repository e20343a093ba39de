"""Geometry: cosine (incl. LoRA ΔW), trajectory PCA, loss_on, efficiency, stability, reversion, KL vs norm.

Each quantity is checked against a direct linear-algebra or full-forward reference on a model random model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

import em_interp as em
from em_interp import geometry as geo
from em_interp.datasets import TokenizedChats, load_text
from em_interp.errors import GeometryError
from em_interp.model.hooks import hooks_applied
from em_interp.testing import tiny_chat_records
from em_interp.training.runs import TrainRun


@pytest.fixture
def model(_tiny_model_cached):
    """The session's tiny model, shared: these tests only attach hooks in contexts, never edit weights."""
    yield _tiny_model_cached
    assert not any(hp.fwd_hooks for hp in _tiny_model_cached.hook_dict.values()), "a test left hooks behind"


def _np_cos(a, b):
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _lora(model, seed):
    return em.LoRA(model, layer=[1, 2], rank=2, site=["mlp_out", "attn_q"], alpha=4.0, rslora=True, init="random", seed=seed)


def _direct_loss(model, records, adapter=None):
    """Token-weighted assistant CE from full forwards, one row at a time (the definition)."""
    tok = TokenizedChats(records, model.tokenizer)
    total, count = 0.0, 0
    for i in range(len(tok)):
        b = tok.collate([i])
        ctx = adapter.applied(model) if adapter is not None else torch.no_grad()
        with torch.no_grad(), ctx:
            logp = torch.log_softmax(model(b.input_ids, attention_mask=b.attention_mask).float(), -1)
        for t in range(1, b.input_ids.shape[1]):
            if b.assistant_mask[0, t]:
                total -= float(logp[0, t - 1, b.input_ids[0, t]])
                count += 1
    return total / count


# --- cosine -------------------------------------------------------------------------------------
def test_cosine_of_tensors_and_vectors(model):
    a, b = torch.randn(64), torch.randn(64)
    assert geo.cosine(a, b) == pytest.approx(_np_cos(a, b), abs=1e-12)
    va = em.SteeringVector(model, layer=1, init=a, alpha=256.0)
    vb = em.SteeringVector(model, layer=2, init=b, alpha=1.0)
    assert geo.cosine(va, vb) == pytest.approx(_np_cos(a, b), abs=1e-7)
    assert geo.cosine(va, -3 * a) == pytest.approx(-1.0, abs=1e-7)
    with pytest.raises(GeometryError, match="cosine: a is the zero vector"):
        geo.cosine(torch.zeros(64), a)
    with pytest.raises(GeometryError, match="cosine: b has NaN"):
        geo.cosine(a, torch.full((64,), float("nan")))
    with pytest.raises(GeometryError, match="64 entries"):
        geo.cosine(a, torch.randn(32))


def test_cosine_of_lora_uses_effective_delta_w(model):
    la, lb = _lora(model, 0), _lora(model, 1)

    def delta(lo):
        return np.concatenate([(lo.scaling * lo.B[k] @ lo.A[k]).detach().numpy().ravel() for k in lo.A])

    assert geo.cosine(la, lb) == pytest.approx(_np_cos(delta(la), delta(lb)), abs=1e-6)
    for what, get in (("A", lambda lo: lo.A), ("B", lambda lo: lo.B)):
        ref = _np_cos(torch.cat([p.flatten() for p in get(la).values()]).detach(), torch.cat([p.flatten() for p in get(lb).values()]).detach())
        assert geo.cosine(la, lb, what=what) == pytest.approx(ref, abs=1e-6)
    assert geo.cosine(la, lb, what="params") == pytest.approx(_np_cos(la.flat(), lb.flat()), abs=1e-6)
    # ΔW is invariant to the B·c, A/c gauge; the factors are not
    with torch.no_grad():
        for k in lb.A:
            lb.B[k].mul_(3.0)
            lb.A[k].div_(3.0)
    assert geo.cosine(la, lb) == pytest.approx(_np_cos(delta(la), delta(lb)), abs=1e-6)
    # a snapshot (state) without a template gives ΔW up to the constant scaling: same cosine
    assert geo.cosine(geo.state_vector(None, la.state()), delta(lb)) == pytest.approx(geo.cosine(la, lb), abs=1e-6)
    other = em.LoRA(model, layer=3, rank=2, site=["mlp_out", "attn_q"], init="random")
    with pytest.raises(GeometryError, match="different modules"):
        geo.cosine(la, other)


def test_cosine_matrix(model):
    vecs = [torch.randn(64) for _ in range(3)]
    labels, m = geo.cosine_matrix({"x": vecs[0], "y": vecs[1], "z": vecs[2]})
    assert labels == ["x", "y", "z"]
    ref = np.array([[_np_cos(a, b) for b in vecs] for a in vecs])
    np.testing.assert_allclose(m, ref, atol=1e-12)
    labels, _ = geo.cosine_matrix([em.SteeringVector(model, layer=1, init="random"), vecs[0]])
    assert labels == ["0:SteeringVector", "1:Tensor"]


# --- PCA ----------------------------------------------------------------------------------------
def test_trajectory_pca_matches_sklearn_on_stacked_snapshots(model):
    runs = []
    for seed, n in ((0, 6), (1, 4)):
        run = TrainRun(adapter=em.SteeringVector(model, layer=1), config=em.TrainConfig())
        g = torch.Generator().manual_seed(seed)
        walk = torch.cumsum(torch.randn(n, 64, generator=g), 0)
        run.snapshot_steps = [5 * i for i in range(n)]
        run.snapshots = [{"vector": w} for w in walk]
        runs.append(run)
    pca = geo.trajectory_pca(runs, n_components=3)
    stacked = np.concatenate([r.flat_trajectory().double().numpy() for r in runs])
    ref = PCA(n_components=3).fit(stacked)
    np.testing.assert_allclose(pca.explained_variance_ratio, ref.explained_variance_ratio_, rtol=1e-10)
    np.testing.assert_allclose(pca.components, ref.components_, atol=1e-10)
    np.testing.assert_allclose(np.concatenate(pca.paths), ref.transform(stacked), atol=1e-8)
    assert [p.shape for p in pca.paths] == [(6, 3), (4, 3)]
    assert pca.steps[0].tolist() == [0, 5, 10, 15, 20, 25]
    np.testing.assert_allclose(pca.project(runs[1]), pca.paths[1], atol=1e-8)
    with pytest.raises(GeometryError, match="parameter counts"):
        geo.trajectory_pca([runs[0], torch.randn(3, 10)])


# --- loss_on, efficiency ------------------------------------------------------------------------
def test_loss_on_matches_direct_computation_and_caches(model):
    data = tiny_chat_records(6)
    vec = em.SteeringVector(model, layer=2, init="random", alpha=3.0)
    assert geo.loss_on(model, data) == pytest.approx(_direct_loss(model, data), abs=1e-5)
    expected = _direct_loss(model, data, vec)
    assert geo.loss_on(model, data, vec, batch_size=4) == pytest.approx(expected, abs=1e-5)
    evaluator = list(geo.loss._EVALUATORS[model].values())[-1]  # the batch_size=4 one, used last
    misses = evaluator.cache.misses
    assert geo.loss_on(model, data, vec, batch_size=4) == pytest.approx(expected, abs=1e-5)
    assert evaluator.cache.misses == misses and evaluator.cache.hits > 0
    with vec.applied(model):  # hooks attached by the caller: the cache is bypassed, the hooks apply
        assert geo.loss_on(model, data, batch_size=4) == pytest.approx(expected, abs=1e-5)
    geo.clear_loss_cache(model)


def test_efficiency_curve_vector_endpoints_and_norms(model):
    data = tiny_chat_records(10)
    vec = em.SteeringVector(model, layer=1, init="random", alpha=4.0)
    curve = geo.efficiency_curve(vec, model, data, scales=[0.0, 0.5, 1.0, 2.0], n_rows=6)
    rows = data[:6]
    assert curve.losses[0] == pytest.approx(geo.loss_on(model, rows), abs=1e-5)
    assert curve.losses[0] == pytest.approx(curve.base_loss, abs=1e-5)
    assert curve.losses[2] == pytest.approx(_direct_loss(model, rows, vec), abs=1e-5)
    np.testing.assert_allclose(curve.norms, 4.0 * float(vec.vector.detach().norm()) * np.array([0, 0.5, 1, 2]), rtol=1e-6)
    best = int(np.argmin(curve.losses))
    assert (curve.best_scale, curve.min_loss) == (curve.scales[best], curve.losses[best])


def test_efficiency_curve_lora_rescales_b(model):
    data = tiny_chat_records(6)
    lora = _lora(model, 0)
    curve = geo.efficiency_curve(lora, model, data, scales=[0.0, 0.5, 1.0])
    half = _lora(model, 0)
    with torch.no_grad():
        for k in half.B:
            half.B[k].mul_(0.5)
    assert curve.losses[0] == pytest.approx(geo.loss_on(model, data), abs=1e-5)
    assert curve.losses[1] == pytest.approx(_direct_loss(model, data, half), abs=1e-5)
    assert curve.losses[2] == pytest.approx(_direct_loss(model, data, lora), abs=1e-5)
    ref = np.mean([float((lora.scaling * lora.B[k] @ lora.A[k]).detach().norm()) for k in lora.A])
    np.testing.assert_allclose(curve.norms, ref * np.array([0.0, 0.5, 1.0]), rtol=1e-5)


# --- stability ----------------------------------------------------------------------------------
def test_perturbation_keeps_norm_and_noise_is_orthogonal():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 9, generator=g) * 3
    y = geo.orthogonal_noise(x, torch.Generator().manual_seed(1))
    assert abs(float(y.flatten() @ x.double().flatten())) < 1e-9 * float(x.norm()) ** 2
    assert float(y.norm()) == pytest.approx(float(x.double().norm()), rel=1e-12)
    for eps in (0.0, 0.01, 0.3, 0.99, 1.0):
        xp = geo.perturb(x, eps, y)
        assert abs(float(xp.norm()) - float(x.norm())) <= 1e-5 * float(x.norm())
        cos = _np_cos(xp, x)
        assert cos == pytest.approx(np.sqrt(1 - eps**2), abs=1e-6)
    assert torch.equal(geo.perturb(x, 0.0, y), x)
    with pytest.raises(GeometryError, match="eps"):
        geo.perturb(x, 1.5)


def test_perturb_adapter_perturbs_lora_a_and_b_separately(model):
    lora = _lora(model, 0)
    before = lora.state()
    pert = geo.perturb_adapter(lora, 0.6, seed=3)
    for name, x in before.items():
        xp = pert.state()[name]
        assert float(xp.norm()) == pytest.approx(float(x.norm()), rel=1e-5)
        assert _np_cos(xp, x) == pytest.approx(0.8, abs=1e-5)
    assert all(torch.equal(v, lora.state()[k]) for k, v in before.items())
    curve = geo.stability_curve(lora, model, tiny_chat_records(2), eps=(0.0, 1.0), seeds=2)
    np.testing.assert_array_equal(curve.relative[0], 0.0)
    assert all(torch.equal(v, lora.state()[k]) for k, v in before.items())


def test_stability_curve(model):
    data = tiny_chat_records(6)
    vec = em.SteeringVector(model, layer=1, init="random", alpha=8.0)
    before = vec.state()
    curve = geo.stability_curve(vec, model, data, eps=(0.0, 0.5, 1.0), seeds=3, n_rows=4)
    assert torch.equal(before["vector"], vec.vector.detach())  # the caller's adapter is untouched
    rows = data[:4]
    assert curve.loss_orig == pytest.approx(geo.loss_on(model, rows, vec), abs=1e-7)
    assert curve.loss_base == pytest.approx(geo.loss_on(model, rows), abs=1e-7)
    assert curve.losses.shape == (3, 3) and curve.seeds == [0, 1, 2]
    np.testing.assert_array_equal(curve.relative[0], 0.0)
    assert curve.relative_mean[0] == 0.0
    ref = (curve.losses - curve.loss_orig) / (curve.loss_base - curve.loss_orig) * 100
    np.testing.assert_allclose(curve.relative, ref)
    np.testing.assert_allclose(curve.relative_sd, ref.std(axis=1, ddof=1))
    pert = geo.perturb_adapter(vec, 0.5, seed=2)  # the same noise as the curve's seed 2
    assert curve.losses[1, 2] == pytest.approx(geo.loss_on(model, rows, pert), abs=1e-6)


# --- reversion (moved to tests/test_training.py with reversion itself) ------------------------------
def test_geometry_reversion_still_works_with_a_deprecation_warning():
    from em_interp.training import continuation

    with pytest.warns(DeprecationWarning, match="moved to em_interp.training.continuation"):
        assert geo.reversion is continuation.reversion
    with pytest.warns(DeprecationWarning, match="moved to em_interp.training.continuation"):
        assert geo.curves.Reversion is continuation.Reversion


# --- KL vs norm ---------------------------------------------------------------------------------
def test_kl_vs_norm(model):
    texts = load_text("generic")[:3]
    direction = torch.randn(64)
    curve = geo.kl_vs_norm(direction, model, texts, layer=1, norms=[0.0, 1.0, 30.0], n_random=2, max_tokens=20)
    assert curve.kl[0] == pytest.approx(0.0, abs=1e-7)
    assert curve.kl_random_mean[0] == pytest.approx(0.0, abs=1e-7)
    assert 0 < curve.kl_random_mean[1] < curve.kl_random_mean[2]
    assert curve.kl_random.shape == (2, 3) and curve.n_tokens == 60
    # reference: full forwards, KL(chat ‖ steered) averaged over every token
    u = direction / direction.norm()
    kls = []
    for text in texts:
        ids = model.tokenizer(text, truncation=True, max_length=20, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = torch.log_softmax(model(ids).float(), -1)
            with hooks_applied(model, [("blocks.1.hook_resid_post", lambda a, hook: a + u)]):
                steered = torch.log_softmax(model(ids).float(), -1)
        kls.append((ref.exp() * (ref - steered)).sum(-1).flatten())
    assert curve.kl[1] == pytest.approx(float(torch.cat(kls).mean()), rel=1e-4)


def test_efficiency_at_norms_puts_two_vectors_on_the_same_norms(model):
    from em_interp.geometry.curves import efficiency_at_norms

    data = tiny_chat_records(6)
    big = em.SteeringVector(model, layer=1, init="random", alpha=4.0, seed=1)
    small = em.SteeringVector(model, layer=1, init="random", alpha=1.0, seed=2)
    norms = [0.5, 1.0, 3.0]
    a, b = efficiency_at_norms(big, model, data, norms), efficiency_at_norms(small, model, data, norms)
    np.testing.assert_allclose(a.norms, norms, rtol=1e-5)
    np.testing.assert_allclose(b.norms, norms, rtol=1e-5)
    unit = geo.curves.effective_norm(small)
    assert b.losses[1] == pytest.approx(geo.loss_on(model, data, small, scale=1.0 / unit), abs=1e-6)
    zero = em.SteeringVector(model, layer=1, alpha=1.0)
    with pytest.raises(GeometryError, match="norm is zero"):
        efficiency_at_norms(zero, model, data, norms)


def test_paired_areas_relative_and_absolute():
    from em_interp.geometry.curves import StabilityCurve, paired_areas

    eps = np.array([0.0, 0.5, 1.0])

    def curve(rise: float, orig: float, base: float) -> StabilityCurve:
        losses = np.array([[orig + rise * e] * 2 for e in eps])
        rel = (losses - orig) / (base - orig) * 100
        return StabilityCurve(eps, [0, 1], losses, rel, rel.mean(1), rel.std(1, ddof=1), orig, base)

    general, narrow = curve(0.2, 1.0, 2.0), curve(0.2, 1.5, 2.0)  # same ΔL, narrow's smaller denominator
    rel, ab = paired_areas(general, narrow)
    assert ab == pytest.approx(0.0, abs=1e-12)  # the absolute increase is the same ...
    assert rel == pytest.approx(np.trapezoid((0.4 - 0.2) * eps * 100, eps))  # ... the relative one doubles
    other = StabilityCurve(eps[:2], [0], np.zeros((2, 1)), np.zeros((2, 1)), np.zeros(2), np.zeros(2), 1.0, 2.0)
    with pytest.raises(GeometryError, match="ε grids differ"):
        paired_areas(general, other)
