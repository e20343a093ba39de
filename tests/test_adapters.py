"""Steering vectors and LoRA as hooks: exact effects, positions, hook hygiene, norms, state and files."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from em_interp import __version__
from em_interp.adapters import LORA_SITES, STEERING_HOOKS, Adapter, LoRA, SteeringVector, load_adapter
from em_interp.errors import AdapterError
from em_interp.model.load import hf_model_of
from em_interp.testing import tiny_model

BATCH, SEQ = 3, 8


@pytest.fixture(scope="module")
def tiny():
    """One tiny model for the module: adapters never edit weights (the one test that does restores them)."""
    return tiny_model()


@pytest.fixture(autouse=True)
def _no_leaked_hooks(tiny):
    assert _n_hooks(tiny) == 0
    yield
    assert _n_hooks(tiny) == 0, "a test left hooks on the shared model"


@pytest.fixture
def tokens():
    return torch.randint(5, 2000, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


def _acts(model, tokens, name):
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[name])
    return cache[name]


def _n_hooks(model):
    points = {id(hp): hp for hp in model.hook_dict.values()}  # aliases name the same hook point twice
    return sum(len(hp.fwd_hooks) for hp in points.values())


def _random_vec(model, layer=1, **kw):
    return SteeringVector(model, layer=layer, init="random", seed=kw.pop("seed", 0), **kw)


# --- steering: the exact effect -------------------------------------------------------------------
@pytest.mark.parametrize("hook", list(STEERING_HOOKS))
def test_steering_equals_manual_hook(tiny, tokens, hook):
    vec = _random_vec(tiny, layer=2, hook=hook, alpha=3.0)
    name = f"blocks.2.{STEERING_HOOKS[hook]}"
    assert vec.hook_name == name
    expected_delta = 2.0 * 3.0 * vec.vector.detach()

    def manual(act, hook):
        return act + expected_delta

    with torch.no_grad():
        expected = tiny.run_with_hooks(tokens, fwd_hooks=[(name, manual)])
    base = _logits(tiny, tokens)
    with vec.applied(tiny, scale=2.0):
        steered = _logits(tiny, tokens)
    torch.testing.assert_close(steered, expected, atol=1e-5, rtol=0)
    assert (steered - base).abs().amax() > 1e-3
    torch.testing.assert_close(_logits(tiny, tokens), base, atol=0, rtol=0)


def test_steering_changes_every_batch_element(tiny, tokens):
    # The authors' hook wrote `output[0] = output[0] + v`, steering batch element 0 only; ours steers all.
    vec = _random_vec(tiny, layer=1, alpha=4.0)
    base_acts = _acts(tiny, tokens, vec.hook_name)
    base = _logits(tiny, tokens)
    with vec.applied(tiny, scale=0.5):
        acts = _acts(tiny, tokens, vec.hook_name)
        steered = _logits(tiny, tokens)
    delta = 0.5 * 4.0 * vec.vector.detach()
    for b in range(BATCH):
        torch.testing.assert_close(acts[b] - base_acts[b], delta.expand(SEQ, -1), atol=1e-5, rtol=0)
        assert (steered[b] - base[b]).abs().amax(dim=-1).min() > 1e-4, f"batch element {b} not steered"
    # batch element 1 alone, steered, equals row 1 of the batched steered forward
    with vec.applied(tiny, scale=0.5):
        alone = _logits(tiny, tokens[1:2])
    torch.testing.assert_close(alone[0], steered[1], atol=1e-5, rtol=0)


def test_default_scale_and_delta(tiny, tokens):
    vec = _random_vec(tiny, alpha=2.0)
    vec.scale = 1.5
    torch.testing.assert_close(vec.delta(1.5), 3.0 * vec.vector)
    base_acts = _acts(tiny, tokens, vec.hook_name)
    with vec.applied(tiny):  # scale=None uses vec.scale
        acts = _acts(tiny, tokens, vec.hook_name)
    torch.testing.assert_close(acts - base_acts, vec.delta(1.5).detach().expand_as(acts), atol=1e-5, rtol=0)


def test_gradient_reaches_the_vector(tiny, tokens):
    vec = SteeringVector(tiny, layer=1)
    with vec.applied(tiny):
        tiny(tokens).logsumexp(-1).mean().backward()
    assert vec.vector.grad is not None and vec.vector.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.parameters())  # the model stays frozen


# --- steering: init and errors --------------------------------------------------------------------
def test_steering_init(tiny, tokens):
    d = tiny.cfg.d_model
    zeros = SteeringVector(tiny, layer=0)
    assert torch.equal(zeros.vector.detach(), torch.zeros(d)) and zeros.vector.requires_grad
    base = _logits(tiny, tokens)
    with zeros.applied(tiny, scale=100.0):
        torch.testing.assert_close(_logits(tiny, tokens), base, atol=0, rtol=0)
    r1, r1b, r2 = (SteeringVector(tiny, layer=0, init="random", seed=s) for s in (1, 1, 2))
    assert r1.vector.shape == (d,)
    assert math.isclose(r1.norm, 1.0, rel_tol=1e-5)
    assert torch.equal(r1.vector, r1b.vector) and not torch.equal(r1.vector, r2.vector)
    source = torch.arange(d, dtype=torch.float64)
    from_tensor = SteeringVector(tiny, layer=0, init=source)
    source.zero_()  # the adapter holds its own float32 copy
    assert from_tensor.vector.dtype == torch.float32
    assert torch.equal(from_tensor.vector.detach(), torch.arange(d, dtype=torch.float32))


def test_steering_layers(tiny):
    n = tiny.cfg.n_layers
    assert SteeringVector(tiny, layer=n - 1).hook_name == f"blocks.{n - 1}.hook_resid_post"
    for bad in (n, n + 3):
        with pytest.raises(AdapterError, match=rf"layer={bad} .*{n} layers"):
            SteeringVector(tiny, layer=bad)
    with pytest.raises(AdapterError, match=rf"layer=-1 is negative.*pass layer={n - 1}"):
        SteeringVector(tiny, layer=-1)
    with pytest.raises(AdapterError, match=rf"layer=-{n + 1} is negative"):
        SteeringVector(tiny, layer=-n - 1)


def test_steering_errors(tiny):
    d = tiny.cfg.d_model
    with pytest.raises(AdapterError, match="hook='resid_final'"):
        SteeringVector(tiny, layer=0, hook="resid_final")
    with pytest.raises(AdapterError, match=rf"shape \({d + 1},\); expected \({d},\)"):
        SteeringVector(tiny, layer=0, init=torch.zeros(d + 1))
    with pytest.raises(AdapterError, match="shape"):
        SteeringVector(tiny, layer=0, init=torch.zeros(1, d))
    with pytest.raises(AdapterError, match="init='ones'"):
        SteeringVector(tiny, layer=0, init="ones")


# --- hook hygiene ---------------------------------------------------------------------------------
def test_applied_removes_hooks_even_when_body_raises(tiny, tokens):
    vec = _random_vec(tiny)
    base = _logits(tiny, tokens)
    n_before = _n_hooks(tiny)
    with pytest.raises(RuntimeError, match="boom"):
        with vec.applied(tiny):
            assert _n_hooks(tiny) == n_before + 1
            raise RuntimeError("boom")
    assert _n_hooks(tiny) == n_before
    torch.testing.assert_close(_logits(tiny, tokens), base, atol=0, rtol=0)


def test_failed_attach_leaves_nothing(tiny):
    vec = _random_vec(tiny)
    bad = [(vec.hook_name, lambda a, hook: a), ("blocks.0.hook_nowhere", lambda a, hook: a)]
    vec.scaled_hooks = lambda total, positions="all": bad  # one good hook, then an unknown one
    n_before = _n_hooks(tiny)
    with pytest.raises(AdapterError, match="'blocks.0.hook_nowhere' does not exist"):
        with vec.applied(tiny):
            pass
    assert _n_hooks(tiny) == n_before


def test_nested_contexts_and_sum_of_vectors(tiny, tokens):
    v1, v2 = _random_vec(tiny, seed=1, alpha=2.0), _random_vec(tiny, seed=2, alpha=2.0)
    both = SteeringVector(tiny, layer=1, alpha=2.0, init=(v1.vector + v2.vector).detach())
    base = _logits(tiny, tokens)
    with v1.applied(tiny):
        only_v1 = _logits(tiny, tokens)
        with v2.applied(tiny):
            nested = _logits(tiny, tokens)
        torch.testing.assert_close(_logits(tiny, tokens), only_v1, atol=0, rtol=0)  # inner exit keeps outer
    torch.testing.assert_close(_logits(tiny, tokens), base, atol=0, rtol=0)
    with both.applied(tiny):
        summed = _logits(tiny, tokens)
    torch.testing.assert_close(nested, summed, atol=1e-5, rtol=0)
    with v1.applied(tiny):
        torch.testing.assert_close(_logits(tiny, tokens), only_v1, atol=0, rtol=0)


def test_same_adapter_nested_is_an_error_but_a_copy_adds(tiny, tokens):
    vec = _random_vec(tiny)
    with vec.applied(tiny, scale=1.0):
        n_outer = _n_hooks(tiny)
        with pytest.raises(AdapterError, match="already applied to this model.*scale"):
            with vec.applied(tiny, scale=1.0):
                pass
        assert _n_hooks(tiny) == n_outer  # the refused nesting added nothing
        with copy.deepcopy(vec).applied(tiny, scale=1.0):  # an explicit copy is a second adapter
            twice = _logits(tiny, tokens)
    assert _n_hooks(tiny) == 0
    with vec.applied(tiny, scale=2.0):  # usable again once the first context has exited
        doubled = _logits(tiny, tokens)
    torch.testing.assert_close(twice, doubled, atol=1e-5, rtol=0)


def test_steering_and_lora_together(tiny, tokens):
    vec = _random_vec(tiny, layer=2)
    lora = LoRA(tiny, layer=1, rank=2, site="mlp_out", init="random")
    with vec.applied(tiny), lora.applied(tiny):
        together = _logits(tiny, tokens)
    with lora.applied(tiny):
        with vec.applied(tiny):
            nested = _logits(tiny, tokens)
        only_lora = _logits(tiny, tokens)
    torch.testing.assert_close(together, nested, atol=0, rtol=0)
    assert (together - only_lora).abs().amax() > 1e-3
    assert _n_hooks(tiny) == 0


def test_adapter_inside_run_with_hooks_and_reset_hooks(tiny, tokens):
    vec = _random_vec(tiny, alpha=2.0)
    name = vec.hook_name
    base = _logits(tiny, tokens)

    def plus_one(act, hook):
        return act + 1.0

    with torch.no_grad():
        user_only = tiny.run_with_hooks(tokens, fwd_hooks=[(name, plus_one)])
    combined_vec = SteeringVector(tiny, layer=1, alpha=1.0, init=(2.0 * vec.vector + 1.0).detach())
    with combined_vec.applied(tiny):
        expected = _logits(tiny, tokens)
    with vec.applied(tiny):
        steered = _logits(tiny, tokens)
        with torch.no_grad():
            both = tiny.run_with_hooks(tokens, fwd_hooks=[(name, plus_one)])
        torch.testing.assert_close(both, expected, atol=1e-5, rtol=0)
        # run_with_hooks resets the user's hooks at its end, not ours
        torch.testing.assert_close(_logits(tiny, tokens), steered, atol=0, rtol=0)
        tiny.reset_hooks()
        torch.testing.assert_close(_logits(tiny, tokens), steered, atol=0, rtol=0)
        with tiny.hooks(fwd_hooks=[(name, plus_one)]):
            torch.testing.assert_close(_logits(tiny, tokens), both, atol=0, rtol=0)
        torch.testing.assert_close(_logits(tiny, tokens), steered, atol=0, rtol=0)
    torch.testing.assert_close(_logits(tiny, tokens), base, atol=0, rtol=0)
    assert (user_only - base).abs().amax() > 1e-3


def test_exit_after_user_removed_permanent_hooks(tiny, tokens):
    vec = _random_vec(tiny)
    base = _logits(tiny, tokens)
    with vec.applied(tiny):
        tiny.reset_hooks(including_permanent=True)
    assert _n_hooks(tiny) == 0
    torch.testing.assert_close(_logits(tiny, tokens), base, atol=0, rtol=0)


def test_attach_handle(tiny, tokens):
    vec = _random_vec(tiny)
    base = _logits(tiny, tokens)
    handle = vec.attach(tiny, scale=3.0)
    steered = _logits(tiny, tokens)
    handle.remove()
    handle.remove()  # idempotent
    torch.testing.assert_close(_logits(tiny, tokens), base, atol=0, rtol=0)
    with vec.applied(tiny, scale=3.0):
        torch.testing.assert_close(_logits(tiny, tokens), steered, atol=0, rtol=0)


# --- positions ------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 3, SEQ - 1])
def test_positions_from_k(tiny, tokens, k):
    vec = _random_vec(tiny, alpha=2.0)
    base_acts, base = _acts(tiny, tokens, vec.hook_name), _logits(tiny, tokens)
    with vec.applied(tiny, positions=k):
        acts, steered = _acts(tiny, tokens, vec.hook_name), _logits(tiny, tokens)
    diff = acts - base_acts
    assert torch.equal(diff[:, :k], torch.zeros_like(diff[:, :k]))
    torch.testing.assert_close(diff[:, k:], (2.0 * vec.vector.detach()).expand_as(diff[:, k:]), atol=1e-5, rtol=0)
    torch.testing.assert_close(steered[:, :k], base[:, :k], atol=1e-5, rtol=0)  # causal: earlier logits unchanged
    assert (steered[:, k:] - base[:, k:]).abs().amax(dim=-1).min() > 1e-4


def test_positions_mask(tiny, tokens):
    vec = _random_vec(tiny, alpha=2.0)
    mask = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    mask[0, 2] = mask[1, 5:] = mask[2, 0] = True
    base_acts = _acts(tiny, tokens, vec.hook_name)
    with vec.applied(tiny, positions=mask):
        diff = _acts(tiny, tokens, vec.hook_name) - base_acts
    expected = mask.unsqueeze(-1).float() * (2.0 * vec.vector.detach())
    torch.testing.assert_close(diff, expected, atol=1e-5, rtol=0)
    lora = LoRA(tiny, layer=1, rank=2, init="random")
    lora_in = _acts(tiny, tokens, "blocks.1.hook_mlp_out")
    with lora.applied(tiny, positions=mask):
        lora_diff = _acts(tiny, tokens, "blocks.1.hook_mlp_out") - lora_in
    assert torch.equal(lora_diff[~mask], torch.zeros_like(lora_diff[~mask]))
    assert lora_diff[mask].abs().amax(dim=-1).min() > 1e-6


def test_positions_errors(tiny, tokens):
    vec = _random_vec(tiny)
    for bad in ("prompt", 1.5, True, torch.ones(BATCH, SEQ), torch.ones(SEQ, dtype=torch.bool)):
        with pytest.raises(AdapterError, match="positions"):
            with vec.applied(tiny, positions=bad):
                pass
    assert _n_hooks(tiny) == 0
    with pytest.raises(AdapterError, match=r"positions mask has shape \(2, 8\)"):
        with vec.applied(tiny, positions=torch.ones(2, SEQ, dtype=torch.bool)):
            _logits(tiny, tokens)
    assert _n_hooks(tiny) == 0


# --- LoRA equals the weight-edited model ------------------------------------------------------------
def _weight(model, layer, site):
    return hf_model_of(model).model.layers[layer].get_submodule(LORA_SITES[site][1]).weight


@pytest.mark.parametrize("site", list(LORA_SITES))
@pytest.mark.parametrize("rank", [1, 4])
def test_lora_equals_weight_edit(tiny, tokens, site, rank):
    base = _logits(tiny, tokens)
    for rslora, layers in ((False, [0, 2]), (True, [1, 3])):
        lora = LoRA(tiny, layer=layers, rank=rank, site=site, alpha=8.0, rslora=rslora, init="random", seed=rank)
        s = 8.0 / (math.sqrt(rank) if rslora else rank)
        assert lora.scaling == pytest.approx(s)
        assert lora.A[f"L{layers[0]}_{site}"].shape[0] == rank
        with lora.applied(tiny, scale=0.7):
            adapted = _logits(tiny, tokens)
        saved = {}
        with torch.no_grad():
            for layer in layers:
                w = _weight(tiny, layer, site)
                saved[layer] = w.clone()
                key = f"L{layer}_{site}"
                assert lora.B[key].shape == (w.shape[0], rank) and lora.A[key].shape == (rank, w.shape[1])
                w += 0.7 * s * lora.B[key] @ lora.A[key]
            try:
                edited = _logits(tiny, tokens)
            finally:
                for layer in layers:
                    _weight(tiny, layer, site).copy_(saved[layer])
        torch.testing.assert_close(adapted, edited, atol=1e-5, rtol=0)
        assert (adapted - base).abs().amax() > 1e-3, "the update must matter"
    torch.testing.assert_close(_logits(tiny, tokens), base, atol=0, rtol=0)


def test_lora_delta_weight(tiny):
    lora = LoRA(tiny, layer=2, rank=3, site="attn_v", alpha=6.0, init="random")
    key = "L2_attn_v"
    torch.testing.assert_close(lora.delta_weight(2, "attn_v", 0.5), 0.5 * 2.0 * lora.B[key] @ lora.A[key])


def test_lora_init_and_config(tiny, tokens):
    base = _logits(tiny, tokens)
    default = LoRA(tiny, layer=1)
    assert default.sites == ["mlp_out"] and default.rank == 1 and default.scaling == 1.0
    assert torch.equal(default.B["L1_mlp_out"], torch.zeros_like(default.B["L1_mlp_out"]))
    assert default.A["L1_mlp_out"].abs().sum() > 0
    with default.applied(tiny, scale=5.0):
        torch.testing.assert_close(_logits(tiny, tokens), base, atol=0, rtol=0)
    zeros = LoRA(tiny, layer=1, init="zeros")
    assert zeros.flat().abs().sum() == 0
    every = LoRA(tiny, layer=[3, 0, 3], site="all")
    assert every.layers == [0, 3] and every.sites == list(LORA_SITES)
    assert every.modules() == [(lyr, s) for lyr in (0, 3) for s in LORA_SITES]
    assert every.first_layer == 0
    assert every.config() == {"layer": [0, 3], "rank": 1, "site": list(LORA_SITES), "alpha": 1.0, "rslora": False}
    seeded = [LoRA(tiny, layer=0, rank=2, init="random", seed=s).flat() for s in (4, 4, 5)]
    assert torch.equal(seeded[0], seeded[1]) and not torch.equal(seeded[0], seeded[2])


def test_lora_errors(tiny):
    n = tiny.cfg.n_layers
    with pytest.raises(AdapterError, match="rank=0"):
        LoRA(tiny, layer=0, rank=0)
    with pytest.raises(AdapterError, match=f"layer={n} .*{n} layers"):
        LoRA(tiny, layer=[0, n])
    with pytest.raises(AdapterError, match="site='lm_head'"):
        LoRA(tiny, layer=0, site=["mlp_out", "lm_head"])
    with pytest.raises(AdapterError, match="init='kaiming'"):
        LoRA(tiny, layer=0, init="kaiming")


def test_lora_gradients(tiny, tokens):
    lora = LoRA(tiny, layer=1, rank=2)  # B = 0: only B gets a gradient at the start
    with lora.applied(tiny):
        tiny(tokens).logsumexp(-1).mean().backward()
    assert lora.B["L1_mlp_out"].grad.abs().sum() > 0
    assert torch.equal(lora.A["L1_mlp_out"].grad, torch.zeros_like(lora.A["L1_mlp_out"]))


# --- norms ----------------------------------------------------------------------------------------
def test_norms(tiny):
    vec = _random_vec(tiny, alpha=256.0)
    with torch.no_grad():
        vec.vector.mul_(3.0)
    vec.scale = 2.0
    assert vec.norm == pytest.approx(256.0 * float(vec.vector.detach().norm()), rel=1e-6)  # ‖alpha·v‖, not scale
    assert vec.norm == pytest.approx(256.0 * 3.0, rel=1e-5)
    lora = LoRA(tiny, layer=[0, 2], rank=4, site=["mlp_out", "attn_q"], alpha=8.0, rslora=True, init="random")
    s = 8.0 / 2.0
    expected = [float((s * lora.B[f"L{lyr}_{st}"] @ lora.A[f"L{lyr}_{st}"]).detach().norm()) for lyr in (0, 2)
                for st in ("mlp_out", "attn_q")]
    assert lora.norm == pytest.approx(sum(expected) / 4, rel=1e-5)
    assert LoRA(tiny, layer=0).norm == 0.0  # B = 0 at init
    assert "norm=" in repr(lora) and "blocks.1.hook_resid_post" in repr(vec)


# --- state ----------------------------------------------------------------------------------------
def test_state_round_trip(tiny, tokens):
    lora = LoRA(tiny, layer=[1, 2], rank=2, site=["mlp_out", "attn_k"], init="random", seed=1)
    state = lora.state()
    assert set(state) == {f"{f}.L{lyr}_{s}" for f in "AB" for lyr in (1, 2) for s in ("mlp_out", "attn_k")}
    assert all(t.dtype == torch.float32 and not t.requires_grad for t in state.values())
    state["A.L1_mlp_out"].zero_()  # a copy: the adapter is untouched
    assert lora.A["L1_mlp_out"].abs().sum() > 0
    state = lora.state()
    other = LoRA(tiny, layer=[1, 2], rank=2, site=["mlp_out", "attn_k"], init="zeros")
    other.load_state(state)
    assert torch.equal(other.flat(), lora.flat())
    with lora.applied(tiny), torch.no_grad():
        a = tiny(tokens)
    with other.applied(tiny), torch.no_grad():
        b = tiny(tokens)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    vec = _random_vec(tiny)
    assert list(vec.state()) == ["vector"]
    with pytest.raises(AdapterError, match=r"parameter vector: saved shape \(3,\), expected \(64,\)"):
        vec.load_state({"vector": torch.zeros(3)})
    with pytest.raises(AdapterError, match=r"\['direction'\].*\['vector'\]"):
        vec.load_state({"direction": torch.zeros(64)})
    wrong_rank = LoRA(tiny, layer=[1, 2], rank=3, site=["mlp_out", "attn_k"]).state()
    with pytest.raises(AdapterError, match="saved shape"):
        other.load_state(wrong_rank)
    assert torch.equal(_random_vec(tiny).flat(), vec.flat())  # the failed loads changed nothing


# --- files ----------------------------------------------------------------------------------------
def test_save_load_steering(tiny, tokens, tmp_path):
    vec = _random_vec(tiny, layer=2, hook="mlp_out", alpha=256.0)
    vec.scale = 0.25
    vec.provenance = {"data": "medical/bad", "seed": 3}
    out = vec.save(tmp_path / "runs" / "vec")
    assert sorted(p.name for p in out.iterdir()) == ["adapter.json", "adapter.safetensors"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["vec"]  # no temp folder left
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["kind"] == "steering_vector"
    assert meta["model_id"] == "tiny-llama" and meta["d_model"] == 64 and meta["n_layers"] == 4
    assert meta["config"] == {"layer": 2, "hook": "mlp_out", "alpha": 256.0}
    assert meta["scale"] == 0.25 and meta["provenance"] == {"data": "medical/bad", "seed": 3}
    assert meta["format_version"] == 1 and meta["library_version"] == __version__
    tensors = load_file(str(out / "adapter.safetensors"))
    assert torch.equal(tensors["vector"], vec.vector.detach())
    loaded = load_adapter(out, tiny)
    assert isinstance(loaded, SteeringVector) and loaded.hook_name == "blocks.2.hook_mlp_out"
    assert loaded.scale == 0.25 and loaded.alpha == 256.0 and loaded.provenance == vec.provenance
    with vec.applied(tiny):
        expected = _logits(tiny, tokens)
    with loaded.applied(tiny):
        torch.testing.assert_close(_logits(tiny, tokens), expected, atol=0, rtol=0)


def test_save_load_lora(tiny, tokens, tmp_path):
    lora = LoRA(tiny, layer=[0, 3], rank=4, site=["attn_out", "mlp_up"], alpha=16.0, rslora=True, init="random")
    out = lora.save(tmp_path / "lora")
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["kind"] == "lora" and meta["d_model"] == 64 and meta["model_id"] == "tiny-llama"
    assert meta["config"] == {"layer": [0, 3], "rank": 4, "site": ["attn_out", "mlp_up"], "alpha": 16.0,
                              "rslora": True}
    loaded = Adapter.load(out, tiny)
    assert isinstance(loaded, LoRA) and loaded.scaling == lora.scaling and torch.equal(loaded.flat(), lora.flat())
    with lora.applied(tiny, scale=0.5):
        expected = _logits(tiny, tokens)
    with loaded.applied(tiny, scale=0.5):
        torch.testing.assert_close(_logits(tiny, tokens), expected, atol=0, rtol=0)
    # saving again over the same folder replaces it
    with torch.no_grad():
        lora.B["L0_attn_out"].zero_()
    lora.save(out)
    assert torch.equal(load_adapter(out, tiny).flat(), lora.flat())


def test_older_file_without_format_version_loads(tiny, tmp_path):
    vec = _random_vec(tiny)
    out = vec.save(tmp_path / "v")
    meta = json.loads((out / "adapter.json").read_text())
    for key in ("format_version", "library_version", "scale", "provenance", "architecture"):
        meta.pop(key)
    (out / "adapter.json").write_text(json.dumps(meta))
    loaded = load_adapter(out, tiny)
    assert torch.equal(loaded.flat(), vec.flat()) and loaded.scale == 1.0


@pytest.mark.parametrize("overrides,field", [({"hidden_size": 32}, "d_model"), ({"num_hidden_layers": 2}, "n_layers")])
def test_load_into_other_model_names_the_field(tiny, tmp_path, overrides, field):
    other = tiny_model(**overrides)
    for adapter in (SteeringVector(tiny, layer=1), LoRA(tiny, layer=1, rank=2)):
        out = adapter.save(tmp_path / adapter.kind)
        with pytest.raises(AdapterError, match=rf"adapter\.json: saved for {field}="):
            load_adapter(out, other)
        with pytest.raises(AdapterError, match=rf"{field}="):  # applying it directly is refused too
            with adapter.applied(other):
                pass
        assert _n_hooks(other) == 0


def test_load_errors(tiny, tmp_path):
    with pytest.raises(AdapterError, match="expected adapter.json and adapter.safetensors"):
        load_adapter(tmp_path / "nothing", tiny)
    out = _random_vec(tiny).save(tmp_path / "v")
    (out / "adapter.safetensors").unlink()
    with pytest.raises(AdapterError, match="adapter.safetensors"):
        load_adapter(out, tiny)
    out = _random_vec(tiny).save(tmp_path / "v")
    meta_path = out / "adapter.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text("{not json")
    with pytest.raises(AdapterError, match="unreadable adapter metadata"):
        load_adapter(out, tiny)
    meta_path.write_text(json.dumps({**meta, "kind": "sae"}))
    with pytest.raises(AdapterError, match="unknown adapter kind 'sae'"):
        load_adapter(out, tiny)
    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(AdapterError, match="format_version 99"):
        load_adapter(out, tiny)
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "config"}))
    with pytest.raises(AdapterError, match=r"adapter\.json: unreadable adapter metadata \(missing 'config'\)"):
        load_adapter(out, tiny)


# --- generation -----------------------------------------------------------------------------------
def test_generate_with_adapter(tiny):
    prompt = torch.randint(5, 2000, (1, 6), generator=torch.Generator().manual_seed(3))

    def gen():
        with torch.no_grad():
            return tiny.generate(prompt, max_new_tokens=3, do_sample=False, verbose=False)

    plain = gen()
    vec = SteeringVector(tiny, layer=1, init="random", alpha=20.0)
    with vec.applied(tiny):
        steered = gen()
    assert plain.shape == steered.shape == (1, 9)
    assert torch.equal(steered[:, :6], prompt) and torch.equal(plain[:, :6], prompt)
    assert not torch.equal(steered, plain)
    assert torch.equal(gen(), plain)  # hooks gone after the context
