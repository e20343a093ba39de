"""Every supported family (Llama, Qwen2, Gemma2, Gemma3) loads from a local directory and works with adapters.

Each family's tiny random model is saved with `save_tiny_model`, loaded with `load_model(dir)` and compared
with the plain HF model read from the same directory. `resume_forward` / `unembed` (what the trainer calls
to resume a forward from a cached residual) must reproduce the full forward's logits exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from em_interp.adapters import LoRA, SteeringVector
from em_interp.errors import ModelLoadError
from em_interp.model.load import hf_model_of, load_model, resume_forward, unembed, upper_layers
from em_interp.testing import save_tiny_model

FAMILIES = ["llama", "qwen2", "gemma2", "gemma3"]
SEQ = 10  # longer than the tiny Gemma sliding window (8), so sliding and full masks differ


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and spinning thread pools crawl on a busy CPU."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request, tmp_path_factory):
    """(family, bridge, plain HF model) for a tiny model saved to and loaded from a directory."""
    from transformers import AutoModelForCausalLM

    folder = save_tiny_model(tmp_path_factory.mktemp(request.param), request.param, seed=0)
    model = load_model(str(folder), device="cpu")
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return request.param, model, reference


@pytest.fixture
def tokens():
    return torch.randint(5, 1000, (2, SEQ), generator=torch.Generator().manual_seed(1))


def _masks() -> dict[str, torch.Tensor | None]:
    left = torch.ones(2, SEQ, dtype=torch.long)
    left[1, :4] = 0
    right = torch.ones(2, SEQ, dtype=torch.long)
    right[0, -3:] = 0
    return {"none": None, "left": left, "right": right}


def _logits(model, tokens, attention_mask=None):
    with torch.no_grad():
        return model(tokens, attention_mask=attention_mask)


# --- loading -------------------------------------------------------------------------------------
def test_logits_match_hf(loaded, tokens):
    family, model, reference = loaded
    assert family in model.em_model_id  # the directory name (made by tmp_path_factory from the family)
    with torch.no_grad():
        expected = reference(tokens).logits
    torch.testing.assert_close(_logits(model, tokens), expected, atol=1e-4, rtol=0)


def test_hook_lands_where_named(loaded, tokens):
    _, model, reference = loaded
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_post", "blocks.1.hook_resid_pre"])
        hidden = reference(tokens, output_hidden_states=True).hidden_states  # [embeddings, block 0, block 1, ...]
    seen = cache["blocks.1.hook_resid_post"]
    assert tuple(seen.shape) == (2, SEQ, model.cfg.d_model)
    torch.testing.assert_close(seen, hidden[2], atol=1e-5, rtol=0)
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre"], hidden[1], atol=1e-5, rtol=0)


# --- adapters ------------------------------------------------------------------------------------
def _assert_changes_from(model, adapter, tokens, k):
    """Applied from position k: logits before k unchanged, at and after k changed; removal restores."""
    base = _logits(model, tokens)
    with adapter.applied(model, scale=1.0, positions=k):
        steered = _logits(model, tokens)
    torch.testing.assert_close(steered[:, :k], base[:, :k], atol=1e-5, rtol=0)
    assert (steered[:, k:] - base[:, k:]).abs().amax(dim=-1).min() > 1e-4, "every later position must change"
    torch.testing.assert_close(_logits(model, tokens), base, atol=0, rtol=0)


def test_steering_vector_changes_logits_at_and_after_hook(loaded, tokens):
    _, model, _ = loaded
    vec = SteeringVector(model, layer=1, init="random", alpha=4.0)
    _assert_changes_from(model, vec, tokens, k=5)
    with torch.no_grad(), vec.applied(model):
        _, cache = model.run_with_cache(tokens)
    _, clean = model.run_with_cache(tokens)
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre"], clean["blocks.1.hook_resid_pre"], atol=0, rtol=0)
    expected = clean["blocks.1.hook_resid_post"] + vec.delta(1.0).detach()
    torch.testing.assert_close(cache["blocks.1.hook_resid_post"], expected, atol=1e-5, rtol=0)
    assert not torch.allclose(cache["blocks.2.hook_resid_post"], clean["blocks.2.hook_resid_post"])


@pytest.mark.parametrize("site", ["mlp_out", "attn_q"])
def test_lora_changes_logits_at_and_after_hook(loaded, tokens, site):
    _, model, _ = loaded
    lora = LoRA(model, layer=1, rank=2, site=site, alpha=4.0, init="random")
    _assert_changes_from(model, lora, tokens, k=5)


@pytest.mark.parametrize("site", ["mlp_out", "attn_q"])
def test_lora_equals_weight_edit(loaded, tokens, site):
    """The hooks land on the named HF linear map: same logits as editing its weight by ΔW."""
    from em_interp.adapters.lora import LORA_SITES

    _, model, _ = loaded
    lora = LoRA(model, layer=2, rank=2, site=site, rslora=True, alpha=8.0, init="random")
    with lora.applied(model):
        hooked = _logits(model, tokens)
    linear = hf_model_of(model).model.layers[2].get_submodule(LORA_SITES[site][1])
    weight = getattr(linear, "original_component", linear).weight
    original = weight.detach().clone()
    try:
        with torch.no_grad():
            weight += lora.delta_weight(2, site)
        edited = _logits(model, tokens)
    finally:
        with torch.no_grad():
            weight.copy_(original)
    torch.testing.assert_close(hooked, edited, atol=1e-4, rtol=0)


def test_one_optimizer_step_lowers_ce(loaded, tokens):
    _, model, _ = loaded
    vec = SteeringVector(model, layer=2, alpha=1.0)  # zeros, as the authors initialise
    opt = torch.optim.Adam(vec.parameters(), lr=1e-3)

    def loss_fn():
        with vec.applied(model):
            logits = model(tokens)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())

    before = loss_fn()
    before.backward()
    assert vec.vector.grad is not None and vec.vector.grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        after = loss_fn()
    assert after < before.detach()


# --- resuming from a cached residual ---------------------------------------------------------------
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_resume_forward_equals_full_forward(loaded, tokens, padding):
    _, model, _ = loaded
    mask = _masks()[padding]
    n_layers = model.cfg.n_layers
    with torch.no_grad():
        full, cache = model.run_with_cache(tokens, attention_mask=mask)
        for start in range(n_layers + 1):
            name = f"blocks.{start}.hook_resid_pre" if start < n_layers else f"blocks.{n_layers - 1}.hook_resid_post"
            hidden = resume_forward(model, cache[name], start, mask)
            assert tuple(hidden.shape) == (2, SEQ, model.cfg.d_model)
            torch.testing.assert_close(unembed(model, hidden), full, atol=1e-5, rtol=0, msg=f"start={start}")
        fast = resume_forward(model, cache["blocks.1.hook_resid_pre"], 1, mask, fast=True)  # plain-HF fast path
        torch.testing.assert_close(unembed(model, fast), full, atol=1e-5, rtol=0)
        # The raw context manager with HF's default positions (RoPE makes them equivalent up to rounding).
        # Start 1 is odd: slicing the stack would give Gemma2's block 1 the sliding mask of block 0.
        base_layers = hf_model_of(model).model.layers
        with upper_layers(model, 1) as base:
            h = base(inputs_embeds=cache["blocks.1.hook_resid_pre"], attention_mask=mask).last_hidden_state
        assert hf_model_of(model).model.layers is base_layers
    valid = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(unembed(model, h)[valid], full[valid], atol=1e-4, rtol=0)
    with pytest.raises(ModelLoadError, match="start=9"), upper_layers(model, 9):
        pass


def test_resume_forward_runs_adapter_hooks_with_gradient(loaded, tokens):
    _, model, _ = loaded
    mask = _masks()["left"]
    lora = LoRA(model, layer=[1, 2], rank=1, site=["mlp_out", "attn_q"], alpha=2.0, init="random")
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask)
    with lora.applied(model):
        full = model(tokens, attention_mask=mask)
        resumed = unembed(model, resume_forward(model, cache["blocks.1.hook_resid_pre"], 1, mask))
    torch.testing.assert_close(resumed, full, atol=1e-5, rtol=0)
    resumed.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.B.values())


# --- load_model errors -----------------------------------------------------------------------------
def test_load_model_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path), device="cpu")


def test_load_model_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=32, architectures=["GPT2LMHeadModel"])
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel") as info:
        load_model(str(tmp_path), device="cpu")
    assert str(tmp_path) in str(info.value) and "LlamaForCausalLM" in str(info.value)
