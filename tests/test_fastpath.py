"""The trainer's fast path (hook-free bridge components run as plain HF modules) and device/dtype hygiene.

The fast path is on by default on every device; here it is compared with the bridge path it replaces
(float32: agreement to ~1e-6).
"""

from __future__ import annotations

import pytest
import torch

import em_interp as em
from em_interp.model import fastpath
from em_interp.model.load import hf_model_of, lower_forward, resume_forward, unembed, upper_layers, wrap_hf_model
from em_interp.testing import chat_tokenizer, tiny_chat_records, tiny_hf_model


def _bridged(family: str):
    model = wrap_hf_model(tiny_hf_model(family, vocab_size=1000), None, model_id=f"tiny-{family}")
    model(torch.randint(0, 1000, (1, 4)))  # the first bridge forward wires TransformerBridge's internal hooks
    return model


def _batch():
    ids = torch.randint(0, 1000, (3, 12))
    attn = torch.ones_like(ids)
    attn[1, 9:] = 0  # right padding
    attn[2, :3] = 0  # left padding
    return ids, attn


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gemma3"])
def test_fast_path_equals_bridge_path(family):
    model = _bridged(family)
    ids, attn = _batch()
    real = attn.bool()
    with torch.no_grad():
        full = model(ids, attention_mask=attn)
        for stop in (0, 2):
            slow = model(ids, attention_mask=attn, stop_at_layer=stop)
            fast = lower_forward(model, ids, stop, attn, fast=True)
            torch.testing.assert_close(fast[real], slow[real], rtol=1e-5, atol=1e-5)
        resid = lower_forward(model, ids, 2, attn, fast=False)
        logits = unembed(model, resume_forward(model, resid, 2, attn, fast=True))
    torch.testing.assert_close(logits[real], full[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_unpadded_partial_forwards_skip_hfs_packed_sequence_check(family, monkeypatch):
    """HF's check for packed rows reads a device tensor on the host (a stall per forward); the partial forwards
    know unmasked rows are unpacked, skip it, give the bridge's numbers, and leave HF's function in place."""
    from transformers import masking_utils

    calls = []
    check = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda pos: calls.append(pos) or check(pos))
    spy = masking_utils.find_packed_sequence_indices
    model = _bridged(family)
    ids = torch.randint(0, 1000, (2, 10))
    with torch.no_grad():
        full = model(ids)
        calls.clear()
        resid = lower_forward(model, ids, 2, None, fast=True)
        logits = unembed(model, resume_forward(model, resid, 2, None, fast=True))
        assert calls == []
        assert masking_utils.find_packed_sequence_indices is spy
        resume_forward(model, resid, 2, None, torch.arange(10).repeat(2, 1), fast=True)  # given positions: checked
    assert len(calls) == 1
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)


def test_default_is_fast_on_every_device_and_mode_switches():
    assert fastpath.fast_path_mode()["mode"] == "auto"
    assert fastpath.enabled("cpu") and fastpath.enabled("cuda")  # the CPU default too (issue 14)
    try:
        fastpath.set_fast_path("on")
        assert fastpath.enabled("cpu")
        fastpath.set_fast_path(False)
        assert not fastpath.enabled("cuda") and not fastpath.enabled("cpu")
    finally:
        fastpath.set_fast_path("auto")
    with pytest.raises(ValueError):
        fastpath.set_fast_path("sometimes")


def test_hook_free_blocks_are_plain_and_hooked_ones_keep_their_bridge():
    model = _bridged("qwen2")
    vec = em.SteeringVector(model, layer=1, init="random")
    with vec.applied(model), upper_layers(model, 1) as base, fastpath.plain_modules(base, model):
        kinds = [type(layer).__name__ for layer in base.layers]
        inner_attn = type(base.layers[1].original_component.self_attn).__name__
    assert kinds == ["_SkippedLayer", "BlockBridge", "Qwen2DecoderLayer", "Qwen2DecoderLayer"]
    assert inner_attn == "Qwen2Attention"  # hook-free parts of a hooked block run plain too
    # everything is restored afterwards
    assert type(hf_model_of(model).model.layers[2]).__name__ == "BlockBridge"
    assert type(hf_model_of(model).model.layers[1].original_component.self_attn).__name__ != "Qwen2Attention"


def test_every_attached_hook_still_fires_on_the_fast_path():
    model = _bridged("llama")
    ids, attn = _batch()
    seen = []
    resid = lower_forward(model, ids, 1, attn)
    vec = em.SteeringVector(model, layer=2, init="random", alpha=3.0)
    lora = em.LoRA(model, layer=3, rank=2, site="attn_q", init="random")
    point = model.hook_dict["blocks.2.attn.hook_pattern"]
    handle = point.add_hook(lambda act, hook: seen.append(act.shape))
    try:
        with vec.applied(model), lora.applied(model), torch.no_grad():
            slow = resume_forward(model, resid, 1, attn, fast=False)
            n_slow = len(seen)
            fast = resume_forward(model, resid, 1, attn, fast=True)
    finally:
        handle.hook.remove()
    assert n_slow == 1 and len(seen) == 2  # the pattern hook kept block 2's bridge attention
    torch.testing.assert_close(fast[attn.bool()], slow[attn.bool()], rtol=1e-5, atol=1e-5)


def test_training_on_the_fast_path_matches_the_bridge_path():
    model = wrap_hf_model(tiny_hf_model("llama", vocab_size=len(chat_tokenizer())), chat_tokenizer(), model_id="t")
    data, kl = tiny_chat_records(8, 0), tiny_chat_records(8, 1)
    settings = dict(kl_data=kl, kl_coef=0.5, lr=1e-2, epochs=2, batch_size=4, kl_batch_size=4, warmup_steps=1, progress=False)
    runs, vecs = {}, {}
    for mode in ("off", "on"):
        fastpath.set_fast_path(mode)
        try:
            vecs[mode] = em.SteeringVector(model, layer=1, init="random")
            runs[mode] = em.train(vecs[mode], model, data, **settings)
        finally:
            fastpath.set_fast_path("auto")
    for a, b in zip(runs["off"].losses, runs["on"].losses, strict=True):
        assert b["total"] == pytest.approx(a["total"], rel=1e-5)
    torch.testing.assert_close(vecs["on"].vector, vecs["off"].vector, rtol=1e-4, atol=1e-6)


def test_fast_path_refuses_bridge_modes_with_other_semantics():
    model = _bridged("llama")
    assert fastpath.supports(model)
    model.cfg.use_split_qkv_input = True
    assert not fastpath.supports(model) and not fastpath.enabled("cuda", True, model)


@pytest.mark.parametrize("kind", ["vector", "lora"])
def test_adapter_hooks_follow_the_activation_dtype_and_device(tiny, kind):
    # A model spread over devices hands each hook activations on its block's device; the hooks move the
    # adapter's float32 parameters to the activation (shown here with the dtype; the device is the same call).
    model = tiny.to(torch.bfloat16)
    adapter = em.SteeringVector(model, layer=1, init="random") if kind == "vector" else em.LoRA(model, layer=1, init="random")
    assert all(p.dtype == torch.float32 for p in adapter.parameters())
    outs = []
    name = "blocks.1.hook_resid_post" if kind == "vector" else "blocks.1.mlp.out.hook_out"
    point = model.hook_dict[name]
    with adapter.applied(model):
        handle = point.add_hook(lambda act, hook: outs.append((act.dtype, act.device)))
        try:
            model(torch.randint(0, 100, (2, 6)))
        finally:
            handle.hook.remove()
    assert outs == [(torch.bfloat16, torch.device("cpu"))]


def test_accelerate_device_hooks_still_run_around_plain_clones():
    # With device_map, accelerate wraps each decoder layer's forward to move its inputs to the layer's device;
    # the plain clone must keep that wrapper, bound to the clone (so the clone's plain children run).
    hooks = pytest.importorskip("accelerate.hooks")
    calls = []

    class Count(hooks.ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(type(module.self_attn).__name__)
            return args, kwargs

    hf = tiny_hf_model("qwen2", vocab_size=1000)
    hooks.add_hook_to_module(hf.model.layers[2], Count())
    model = wrap_hf_model(hf, None, model_id="tiny-qwen2")
    resid = torch.randn(2, 5, 64)
    with torch.no_grad():
        slow = resume_forward(model, resid, 1, fast=False)
        fast = resume_forward(model, resid, 1, fast=True)
    assert calls == ["PositionEmbeddingsAttentionBridge", "Qwen2Attention"]
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_compile_auto_only_on_one_cuda_device():
    assert fastpath.compile_pays("cuda", 1)  # any size: the 135 M study and a 14 B model both gained (study.jsonl, bench_gpu.jsonl)
    assert fastpath.compile_pays("cuda", 0)  # a model with no device_map
    assert not fastpath.compile_pays("cpu", 0)
    assert not fastpath.compile_pays("cuda", 2)  # a device_map split


def test_compile_auto_leaves_a_small_cpu_model_uncompiled():
    model = wrap_hf_model(tiny_hf_model("llama"), chat_tokenizer(), model_id="tiny")
    fastpath.set_fast_path("on", compile="auto")
    try:
        base = hf_model_of(model).model
        with fastpath.plain_modules(base, model):
            assert not any(isinstance(m, fastpath._Compiled) for m in base.layers)
        fastpath.set_fast_path("on", compile=True)  # forced: the plain layers are wrapped (compiled at first call)
        with fastpath.plain_modules(base, model):
            assert all(isinstance(m, fastpath._Compiled) for m in base.layers)
    finally:
        fastpath.set_fast_path("auto", compile="auto")


def test_compiled_layers_serve_every_shape_with_one_graph():
    # Compiled with dynamic shapes from the start: new batch sizes and lengths reuse the first graph (a static first
    # graph compiles a second, dynamic one when a shape first changes: 2 graphs here).
    from torch._dynamo.utils import counters

    model = _bridged("llama")
    torch._dynamo.reset()
    fastpath.set_fast_path("on", compile=True)
    try:
        graphs = counters["stats"]["unique_graphs"]
        with torch.no_grad():
            for batch, length in ((2, 7), (3, 11), (4, 5)):  # (a size of 1 is specialised: its own graph)
                resid = torch.randn(batch, length, 64)
                compiled = resume_forward(model, resid, 1)
                torch.testing.assert_close(compiled, resume_forward(model, resid, 1, fast=False), rtol=1e-4, atol=1e-4)
        assert counters["stats"]["unique_graphs"] - graphs == 1
    finally:
        fastpath.set_fast_path("auto", compile="auto")
        torch._dynamo.reset()
