"""`loss_on_each`: many adapters scored in stacked forwards give the numbers of separate `loss_on` calls."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import em_interp as em
from em_interp.errors import AdapterError, GeometryError
from em_interp.geometry import curves
from em_interp.geometry.loss import STACK_TOKENS, loss_on, loss_on_each


def _random_adapters(model, kind: str, n: int = 5) -> list:
    out = []
    for s in range(n):
        a = em.SteeringVector(model, 1, alpha=1.0) if kind == "vector" else \
            em.LoRA(model, 1, rank=1, site="mlp_out", seed=s)
        g = torch.Generator().manual_seed(s)
        a.load_state({k: torch.randn(v.shape, generator=g) for k, v in a.state().items()})
        a.scale = 0.5 + s
        out.append(a)
    return out


@pytest.mark.parametrize("kind", ["vector", "lora"])
def test_each_equals_separate_calls(tiny, records, kind):
    adapters = _random_adapters(tiny, kind)
    separate = [loss_on(tiny, records, a, batch_size=4) for a in adapters]
    assert len(set(np.round(separate, 6))) == len(adapters)  # the adapters really differ
    np.testing.assert_allclose(loss_on_each(tiny, records, adapters, batch_size=4), separate, rtol=1e-5)


def test_each_in_small_stacks_matches_one_stack(tiny, records, monkeypatch):
    adapters = _random_adapters(tiny, "vector")
    one = loss_on_each(tiny, records, adapters, batch_size=4)
    monkeypatch.setitem(STACK_TOKENS, "cpu", 1)  # one adapter per forward
    em.geometry.clear_loss_cache(tiny)
    np.testing.assert_allclose(loss_on_each(tiny, records, adapters, batch_size=4), one, rtol=1e-5)


def test_each_with_caller_hooks_applies_them(tiny, records):
    a, b = _random_adapters(tiny, "vector", 2)
    with a.applied(tiny):
        got = loss_on_each(tiny, records, [b], batch_size=4)
        want = loss_on(tiny, records, b, batch_size=4)
    assert got == pytest.approx([want], rel=1e-6)
    assert got[0] != pytest.approx(loss_on(tiny, records, b, batch_size=4), rel=1e-4)


def test_each_rejects_empty_and_mixed(tiny, records):
    with pytest.raises(GeometryError, match="no adapters"):
        loss_on_each(tiny, records, [])
    with pytest.raises(AdapterError, match=r"adapters\[1\]"):
        loss_on_each(tiny, records, [_random_adapters(tiny, "vector", 1)[0], _random_adapters(tiny, "lora", 1)[0]])


def test_curves_leave_the_adapter_unchanged(tiny, records):
    vec = _random_adapters(tiny, "vector", 1)[0]
    before = copy.deepcopy(vec.state()), vec.scale
    curves.efficiency_curve(vec, tiny, records, scales=[0.0, 1.0, 2.0])
    curves.stability_curve(vec, tiny, records, eps=(0.5,), seeds=2)
    assert vec.scale == before[1]
    for k, v in vec.state().items():
        assert torch.equal(v, before[0][k])


def _manual_kl(model, texts, adapter, scale: float, max_tokens: int = 20) -> float:
    """Mean per-token KL(chat ‖ chat with adapter applied at `scale` × its own), one text at a time, full forwards."""
    total, count = 0.0, 0
    for t in texts:
        ids = torch.tensor([model.tokenizer(t, truncation=True, max_length=max_tokens)["input_ids"]])
        with torch.no_grad():
            ref = torch.log_softmax(model(ids).float(), -1)
            with adapter.applied(model, scale=scale):
                new = torch.log_softmax(model(ids).float(), -1)
        total += float((ref.exp() * (ref - new)).sum())
        count += ids.shape[1]
    return total / count


def test_kl_vs_norm_of_a_lora_rescales_it_to_each_norm(tiny):
    lora = _random_adapters(tiny, "lora", 1)[0]
    texts = [" ".join(["word"] * (3 + i)) + " end" for i in range(3)]
    unit = curves.effective_norm(lora, 1.0)
    curve = em.geometry.kl_vs_norm(lora, tiny, texts, layer=None, norms=[0.0, unit, 3 * unit], n_random=2,
                                   max_tokens=20, batch_size=1)
    assert curve.kl[0] == pytest.approx(0.0, abs=1e-7)
    for j, s in ((1, 1.0), (2, 3.0)):
        assert curve.kl[j] == pytest.approx(_manual_kl(tiny, texts, lora, s), rel=1e-3)  # scale multiplies
    assert curve.kl_random.shape == (2, 3) and np.all(curve.kl_random[:, 1:] > 0)
    assert curve.kl_random[0, 1] != pytest.approx(curve.kl_random[1, 1], rel=1e-3)  # two different random LoRAs


def test_kl_vs_norm_of_a_lora_rejects_a_layer(tiny):
    lora = _random_adapters(tiny, "lora", 1)[0]
    with pytest.raises(GeometryError, match="layer=1 given for a LoRA"):
        em.geometry.kl_vs_norm(lora, tiny, ["some text here"], layer=1, norms=[1.0])


@pytest.mark.parametrize("kind", ["vector", "lora"])
def test_kl_vs_norm_each_equals_separate_calls_and_shares_one_baseline(tiny, kind):
    loras = _random_adapters(tiny, kind, 2)
    texts = [" ".join(["word"] * (3 + i)) + " end" for i in range(3)]
    unit = curves.effective_norm(loras[0], 1.0)
    norms = [0.0, unit, 2 * unit]
    kw = dict(layer=1 if kind == "vector" else None, norms=norms, n_random=2, seed=3, max_tokens=20, batch_size=2)
    each = em.geometry.kl_vs_norm_each(loras, tiny, texts, **kw)
    assert len(each) == 2
    for lora, curve in zip(loras, each, strict=True):
        alone = em.geometry.kl_vs_norm(lora, tiny, texts, **kw)
        np.testing.assert_allclose(curve.kl, alone.kl, rtol=1e-5, atol=1e-9)
    # the baseline is drawn for the first adapter and carried by every curve
    first = em.geometry.kl_vs_norm(loras[0], tiny, texts, **kw)
    for curve in each:
        np.testing.assert_allclose(curve.kl_random, first.kl_random, rtol=1e-5, atol=1e-9)
    assert each[0].kl[1] != pytest.approx(each[1].kl[1], rel=1e-3)  # two different adapters, two curves


def test_kl_vs_norm_each_rejects_mixed_kinds_and_shapes(tiny):
    lora = _random_adapters(tiny, "lora", 1)[0]
    vec = _random_adapters(tiny, "vector", 1)[0]
    with pytest.raises(GeometryError, match="mix of steering directions and other adapters"):
        em.geometry.kl_vs_norm_each([lora, vec], tiny, ["some text here"], layer=None, norms=[1.0])
    wide = em.LoRA(tiny, layer=1, rank=2, site="mlp_out")
    with pytest.raises(GeometryError, match="adapter 1 .* differs from adapter 0"):
        em.geometry.kl_vs_norm_each([lora, wide], tiny, ["some text here"], layer=None, norms=[1.0])
    with pytest.raises(GeometryError, match="no directions given"):
        em.geometry.kl_vs_norm_each([], tiny, ["some text here"], layer=1, norms=[1.0])
