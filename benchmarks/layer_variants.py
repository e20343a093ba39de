"""Kernel variants of the trainer's later-epoch step on a Qwen2.5-14B-shaped upper stack (an experiment, one GPU).

The work of one cached steering-vector step of `bench_gpu.py` (layer 24, train + KL batch of 8 × 256 each, 816 loss
positions per batch) without the library around it: block 24 runs without gradient on a cached residual, the
vector is added, blocks 25..47 run with gradient, the final norm, the unembedding at the 1,632 loss positions and
a cross-entropy, then the backward to the vector. Each variant changes one thing about how the blocks run:

- eager: the HF decoder layers as they are; compiled: each through `torch.compile(dynamic=True)` (what the
  library does); flash / efficient / math: compiled, with one SDPA backend allowed; cudagraphs: compiled with
  mode="reduce-overhead"; merged: our own layer function with q/k/v and gate/up weights concatenated (one GEMM each,
  forward and input gradient), compiled; coordinate: compiled with inductor's coordinate-descent tuning.

Also the bf16 matmul ceiling two ways: a burst (as `bench_gpu.matmul_rate`: median of 30 products) and sustained
(`bench_gpu.sustained_matmul_rate`), with the SM clock and power sampled by `nvidia-smi` during each measurement
(`common.GpuMonitor`), to see whether a long run holds the clock that a burst reaches.

    python benchmarks/layer_variants.py --variants compiled,merged --out DIR

Prints one JSON line per measurement and appends them to DIR/layer_variants.jsonl. Not part of CI: needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu import SHAPES, Clock, fill_random_, matmul_rate, step_flops, sustained_matmul_rate  # noqa: E402
from common import GpuMonitor, now, versions  # noqa: E402

D, D_FF, HEADS, KV_HEADS, VOCAB, N_UPPER = 5120, 13824, 40, 8, 152064, 24
HEAD_DIM = D // HEADS


def qwen_config():
    import transformers as tf

    return tf.Qwen2Config(hidden_size=D, intermediate_size=D_FF, num_hidden_layers=N_UPPER, num_attention_heads=HEADS,
                          num_key_value_heads=KV_HEADS, vocab_size=VOCAB, rope_theta=1e6, max_position_embeddings=4096,
                          attn_implementation="sdpa", torch_dtype=torch.bfloat16)


def build_layers(cfg, device: str) -> torch.nn.ModuleList:
    """N_UPPER random bf16 Qwen2 decoder layers built on the device (normal(0, 0.02), norms 1, biases 0), frozen."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            layers = torch.nn.ModuleList(Qwen2DecoderLayer(cfg, i) for i in range(N_UPPER))
    finally:
        torch.set_default_dtype(old)
    fill_random_(layers, device)
    return layers.requires_grad_(False).eval()


def rotary(T: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (1e6 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32, device=device) / HEAD_DIM))
    f = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv)
    emb = torch.cat([f, f], -1)[None]
    return emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)


def rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """HF's Qwen2RMSNorm: float32 statistics, the weight applied in the input dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def merged_layer(h, cos, sin, ln1, qkv_w, qkv_b, o_w, ln2, gu_w, down_w):
    """One Qwen2 decoder layer with q/k/v and gate/up as one GEMM each ([B, T, D] → [B, T, D])."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    B, T, _ = h.shape
    qkv = F.linear(rms(h, ln1), qkv_w, qkv_b)
    q, k, v = qkv.split([D, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1)
    q = q.view(B, T, HEADS, HEAD_DIM).transpose(1, 2)
    k = k.view(B, T, KV_HEADS, HEAD_DIM).transpose(1, 2)
    v = v.view(B, T, KV_HEADS, HEAD_DIM).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    h = h + F.linear(a.transpose(1, 2).reshape(B, T, D), o_w)
    gate, up = F.linear(rms(h, ln2), gu_w).chunk(2, -1)
    return h + F.linear(F.silu(gate) * up, down_w)


def merged_weights(layer) -> tuple[torch.Tensor, ...]:
    at, mlp = layer.self_attn, layer.mlp
    return (layer.input_layernorm.weight, torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight]),
            torch.cat([at.q_proj.bias, at.k_proj.bias, at.v_proj.bias]), at.o_proj.weight,
            layer.post_attention_layernorm.weight, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
            mlp.down_proj.weight)


def ce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets)


class Step:
    """The upper-stack step for one variant; `__call__` runs one step (no host sync) and returns the loss."""

    def __init__(self, variant: str, layers, cfg, B: int, T: int, n_loss: int, device: str):
        self.layers, self.device = layers, device
        g = torch.Generator(device=device).manual_seed(1)
        self.x0 = torch.randn(B, T, D, device=device, dtype=torch.bfloat16, generator=g)
        self.vector = torch.zeros(D, device=device, dtype=torch.bfloat16, requires_grad=True)
        self.cos, self.sin = rotary(T, device)
        self.pos = torch.arange(T, device=device)[None].expand(B, T)
        self.norm_w = torch.ones(D, device=device, dtype=torch.bfloat16)
        self.unembed = torch.randn(VOCAB, D, device=device, dtype=torch.bfloat16, generator=g) * 0.02
        flat = torch.randperm(B * T, generator=torch.Generator().manual_seed(2))[:n_loss].sort().values
        self.where = flat.to(device)
        self.targets = torch.randint(0, VOCAB, (n_loss,), device=device, generator=g)
        self.loss = torch.compile(ce_loss, dynamic=True) if variant != "eager" else ce_loss
        mode = "reduce-overhead" if variant == "cudagraphs" else None
        if variant == "merged":
            self.weights = [merged_weights(layer) for layer in layers]
            fn = torch.compile(merged_layer, dynamic=True)
            self.blocks = [lambda h, w=w, fn=fn: fn(h, self.cos, self.sin, *w) for w in self.weights]
        else:
            calls = [layer if variant == "eager" else torch.compile(layer, dynamic=True, mode=mode) for layer in layers]
            self.blocks = [lambda h, c=c: self._hf(c, h) for c in calls]

    def _hf(self, call, h):
        out = call(h, attention_mask=None, position_ids=self.pos, position_embeddings=(self.cos, self.sin))
        return out[0] if isinstance(out, tuple) else out

    def __call__(self) -> torch.Tensor:
        self.vector.grad = None
        with torch.no_grad():
            h = self.blocks[0](self.x0)
        h = h + self.vector
        for block in self.blocks[1:]:
            h = block(h)
        h = rms(h, self.norm_w).flatten(0, 1)[self.where]
        loss = self.loss(F.linear(h, self.unembed), self.targets)
        loss.backward()
        return loss.detach()


def timed_steps(step: Step, n: int, warmup: int) -> list[float]:
    """Seconds of n steps run back to back after `warmup`, each timed by CUDA events."""
    for _ in range(warmup):
        step()
    clock = Clock("cuda")
    clock.mark()
    for _ in range(n):
        step()
        clock.mark()
    return clock.intervals()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="compiled,eager,flash,efficient,cudagraphs,merged,coordinate")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sustain", type=float, default=4.0)
    ap.add_argument("--budget", type=float, default=480.0, help="skip the variants left after this many seconds")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    results = a.out / "layer_variants.jsonl"
    t_start = time.time()
    monitor = GpuMonitor(a.out / "gpu_clocks.csv")
    base = {"benchmark": "layer_variants", "device": torch.cuda.get_device_name(), "versions": versions(), "date": now(),
            "command": "python " + " ".join(sys.argv)}

    def emit(rec: dict[str, Any]) -> None:
        clocks = monitor.summary()
        rec = base | rec | {"gpu_clocks": clocks.get(rec["case"], clocks), "t": round(time.time() - t_start, 1)}
        print(json.dumps(rec), flush=True)
        with results.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    with monitor.phase("matmul_burst"):
        burst = matmul_rate("cuda")
    emit({"case": "matmul_burst", "tflops": burst / 1e12})
    with monitor.phase("matmul_sustained"):
        sustained, windows = sustained_matmul_rate("cuda", a.sustain)
    emit({"case": "matmul_sustained", "tflops": sustained / 1e12, "tflops_windows": [round(r, 1) for r in windows]})
    cfg = qwen_config()
    layers = build_layers(cfg, "cuda")
    B, T, n_loss = 16, 256, 1632
    # bench_gpu's necessary FLOPs of the same later step (its train and KL batches are our 16 rows)
    flops = step_flops(SHAPES["qwen14b"], 24, B // 2, T, n_loss // 2, n_loss // 2, epoch1=False)
    for variant in [v for v in a.variants.split(",") if v]:
        if time.time() - t_start > a.budget:
            emit({"case": variant, "skipped": "time budget"})
            continue
        torch._dynamo.reset()
        backends = {"flash": (True, False, False, False), "efficient": (False, True, False, False),
                    "math": (False, False, True, False)}.get(variant, (True, True, True, True))
        torch.backends.cuda.enable_flash_sdp(backends[0])
        torch.backends.cuda.enable_mem_efficient_sdp(backends[1])
        torch.backends.cuda.enable_math_sdp(backends[2])
        torch.backends.cuda.enable_cudnn_sdp(backends[3])
        torch._inductor.config.coordinate_descent_tuning = variant == "coordinate"
        try:
            t0 = time.time()
            step = Step(variant, layers, cfg, B, T, n_loss, "cuda")
            step()
            torch.cuda.synchronize()
            compile_s = time.time() - t0
            with monitor.phase(variant):  # the clock while the timed steps run
                times = timed_steps(step, a.steps, warmup=3)
            ms = statistics.median(times) * 1e3
            emit({"case": variant, "median_ms": ms, "steps_ms": [round(t * 1e3, 2) for t in times],
                  "first_call_s": compile_s, "loss": float(step()), "tflop": flops / 1e12,
                  "fraction_of_burst": flops / (ms / 1e3) / burst,
                  "fraction_of_sustained": flops / (ms / 1e3) / sustained,
                  "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
            del step
        except Exception as exc:  # one variant failing must not lose the others
            emit({"case": variant, "error": repr(exc)[:500]})
        torch.cuda.empty_cache()
    with monitor.phase("matmul_burst_end"):
        end_burst = matmul_rate("cuda")
    emit({"case": "matmul_burst_end", "tflops": end_burst / 1e12})
    monitor.stop()


if __name__ == "__main__":
    main()
