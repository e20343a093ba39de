"""GPU trainer benchmark on a Qwen2.5-14B-shaped model: the cached trainer vs the toggle method, against the FLOP floor.

Builds a model of Qwen2.5-14B-Instruct's shape (Qwen2Config: hidden 5120, MLP 13824, 48 layers, 40 heads, 8 KV
heads, vocab 152064, rope_theta 1e6, untied embeddings) with random bf16 weights directly on the GPU (meta-device
init, `to_empty`, normal(0, 0.02); no host copy, no download, no tokenizer), bridges it with
`em_interp.model.wrap_hf_model(model, None)`, and trains on synthetic chat-shaped batches (batch 8 × 256 tokens,
KL batch 8 × 256, last 40% of each row assistant tokens) with both methods in one process, on the same batches:
- a steering vector at layer 24 (hook_resid_post) with the KL term, and a rank-1 LoRA at layer 24 (mlp_out,
  alpha 512, rsLoRA), each with method="toggle" and the cached trainer (epoch 1 = cache misses, later = hits);
- a batched sweep of 16 steering vectors with `train_many` (8 KL coefficients × 2 seeds) against one run, on a
  random model of SmolLM2-135M's shape (LlamaConfig: 576 hidden, 30 layers, 9 heads, 3 KV heads, MLP 1536,
  vocab 49152): the embedded SmolLM2 GGUF is larger than the device machine's upload limit.
Also measured: the bf16 matmul ceiling (8192³ GEMM, median of CUDA events), plain HF forward (before bridging),
bridge forward, and the fast-path forward (`em_interp.fastpath`), and a torch.profiler breakdown of the steps.

Necessary FLOPs of one optimized step (written out in `step_flops`), per batch of B rows × T tokens, N = B·T:
  per block: P = d·(d_q + 2·d_kv) + d_q·d + 3·d·d_ff weights; forward 2·P·N + attention 2·B·T²·d_q (causal half of
  QKᵀ and PV); activation-only backward 2·P·N + 2·(attention forward) (no weight gradients: the model is frozen);
  unembedding 2·d·V per loss position, forward and backward;
  later epochs: for the train and the KL batch, forward of blocks L..47, backward of blocks L+1..47 (above the
  adapter's hook), unembedding forward + backward at the loss positions only;
  epoch 1 adds blocks 0..L-1 on both batches (no grad) and the reference: blocks L..47 on the KL batch plus the
  unembedding at its KL positions.
floor_fraction = necessary FLOPs / measured step time / measured matmul rate (the JSON records the epoch-1 and
later values). When the steps run at the card's power limit, as the 14B shape's do, the matmul rate is the card's
*sustained* rate: 8192³ products back to back for 4 s, the median of 20-product windows after the first second. An
H200 holds its 700 W limit by lowering the SM clock (1980 MHz idle to about 1500 MHz) within a second of full load,
during such training steps as during those products; a short burst of products (`matmul_tflops`, the earlier
definition, still recorded with `floor_fraction_*_burst`) runs before the limit bites and reads 10–15% higher. Steps
that do not reach the limit (a small model), or a run without `nvidia-smi`, are held to the burst rate
(`floor_ceiling` names the one used). `gpu_clocks` in each record gives the median SM clock, power and share of
samples held at the power limit during the burst, the sustained products and the interleaved steps (`nvidia-smi`).

Usage: python benchmarks/bench_gpu.py [--shape qwen14b|tiny] [--device cuda] [--out DIR] [--skip lora,sweep,...]
       python benchmarks/bench_gpu.py --tiny --out DIR   (CPU smoke run of every code path, seconds)
Appends JSON records (one per case) to benchmarks/results/bench_gpu.jsonl (or --results).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import em_interp as em
from em_interp.datasets import TokenizedChats
from em_interp.model import fastpath
from em_interp.model.forward import lower_forward, resume_forward, unembed
from em_interp.model.load import wrap_hf_model

sys.path.insert(0, str(Path(__file__).parent))
from common import BASELINES, GpuMonitor, Stepper, interleaved, spread, versions  # noqa: E402
from trace_summary import kernel_kind  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "bench_gpu.jsonl"
SHAPES = {
    "qwen14b": dict(family="qwen2", hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                    num_key_value_heads=8, vocab_size=152064, rope_theta=1e6, tie_word_embeddings=False, layer=24),
    "smollm2": dict(family="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, rope_theta=1e5, tie_word_embeddings=True, layer=15),
    "tiny": dict(family="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, rope_theta=1e6, tie_word_embeddings=False, layer=2),
}


# --- model and data ----------------------------------------------------------------------------------
def build_hf(shape: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """Random-weight HF model built on `device` directly: meta init, to_empty, normal(0, 0.02), fresh rotary."""
    import transformers as tf

    cfg_cls, model_cls = (tf.Qwen2Config, tf.Qwen2ForCausalLM) if shape["family"] == "qwen2" else (tf.LlamaConfig, tf.LlamaForCausalLM)
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "rope_theta", "tie_word_embeddings")
    config = cfg_cls(**{k: shape[k] for k in keys}, max_position_embeddings=4096, architectures=[model_cls.__name__],
                     attn_implementation="sdpa")
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are made in bf16 on the meta device: no float32 copy anywhere
    try:
        with torch.device("meta"):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(old)
    fill_random_(model, device, seed)
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    inv_freq = 1.0 / (shape["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "inv_freq"):  # rotary buffers are not parameters: to_empty left them unset
                m.inv_freq = inv_freq.clone()
                m.original_inv_freq = inv_freq.clone()
                m.attention_scaling = 1.0
    if shape["tie_word_embeddings"]:
        model.tie_weights()
    return model.eval()


def fill_random_(module: torch.nn.Module, device: str, seed: int = 0) -> None:
    """Materialize a meta-device module on `device` with random weights: normal(0, 0.02), norms 1, biases 0."""
    module.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0) if "norm" in name else p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=g)


class SyntheticChats(TokenizedChats):
    """Token ids drawn at random, every row `length` long, the last `assistant` fraction marked as targets."""

    def __init__(self, n: int, length: int, vocab: int, seed: int, assistant: float = 0.4):
        g = torch.Generator().manual_seed(seed)
        self.tokenizer, self.max_length, self.pad_id = None, length, 0
        self.ids = [torch.randint(1, vocab, (length,), generator=g).tolist() for _ in range(n)]
        first = int(round(length * (1 - assistant)))
        self.masks = [[t >= first for t in range(length)] for _ in range(n)]
        self.records = [{"messages": []}] * n


# where files go, not what runs (torch sets TORCHINDUCTOR_CACHE_DIR itself once it has compiled something)
LOCATION_VARIABLES = ("EM_INTERP_CACHE", "TORCHINDUCTOR_CACHE_DIR")


def settings_env() -> dict[str, str]:
    """The environment variables set that change what runs: ours (EM_INTERP_*) and torch.compile's (TORCHINDUCTOR_*)."""
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith(("EM_INTERP_", "TORCHINDUCTOR_")) and k not in LOCATION_VARIABLES}


# --- timing ------------------------------------------------------------------------------------------
class Clock:
    """CUDA events on a GPU (host clock on CPU); `mark()` records, `intervals()` gives seconds between marks."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


def timed(fn, device: str, reps: int, warmup: int = 2) -> float:
    """Median seconds of fn() over reps (after warm-up), each bracketed by events."""
    for _ in range(warmup):
        fn()
    clock = Clock(device)
    times = []
    for _ in range(reps):
        clock.marks = []
        clock.mark()
        fn()
        clock.mark()
        times.append(clock.intervals()[0])
    return statistics.median(times)


def gemm_inputs(device: str, n: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three pairs of random n × n matrices, rotated so that timed products do not reuse cached inputs."""
    return [(torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)) for _ in range(3)]


def matmul_rate(device: str, n: int = 8192) -> float:
    """bf16 GEMM FLOP/s (median), rotating three input sets of random data."""
    dt = torch.bfloat16 if device.startswith("cuda") else torch.float32
    n = n if device.startswith("cuda") else 512
    sets = gemm_inputs(device, n, dt)
    it = iter(range(10**9))
    t = timed(lambda: torch.mm(*sets[next(it) % 3]), device, reps=30, warmup=5)
    return 2 * n**3 / t


def sustained_matmul_rate(device: str, seconds: float = 4.0, n: int = 8192, window: int = 20) -> tuple[float, list[float]]:
    """bf16 GEMM FLOP/s with the card at its power limit: n³ products back to back for `seconds`, timed in windows of
    `window` products by CUDA events; the median of the windows after the first second, and every window's TFLOP/s."""
    sets = gemm_inputs(device, n, torch.bfloat16)
    rates, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for i in range(window):
            torch.mm(*sets[i % 3])
        b.record()
        b.synchronize()
        rates.append((time.perf_counter() - start, window * 2 * n**3 / (a.elapsed_time(b) / 1e3)))
    settled = [r for t, r in rates if t > 1.0] or [r for _, r in rates]
    return statistics.median(settled), [r / 1e12 for _, r in rates]


def train_steps(adapter, model, data, kl, device, **kw) -> tuple[list[float], object]:
    """Per-step seconds (event to event; the first interval includes the call's set-up) and the run."""
    clock = Clock(device)
    clock.mark()
    run = em.train(adapter, model, data, kl_data=kl, on_step=lambda step, losses: clock.mark(), progress=False, **kw)
    return clock.intervals(), run


# --- FLOPs ---------------------------------------------------------------------------------------------
def step_flops(shape: dict, layer: int, batch: int, T: int, n_ce: int, n_kl: int, epoch1: bool) -> float:
    """Necessary FLOPs of one cached step (module docstring); n_ce / n_kl: loss positions per batch."""
    d, dff, L, V = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    dq = d
    dkv = d // shape["num_attention_heads"] * shape["num_key_value_heads"]
    P = d * (dq + 2 * dkv) + dq * d + 3 * d * dff
    N = batch * T
    attn = 2 * batch * T * T * dq

    def fwd(blocks: int) -> float:
        return blocks * (2 * P * N + attn)

    def bwd(blocks: int) -> float:
        return blocks * (2 * P * N + 2 * attn)

    unemb = 2 * d * V
    per_batch = fwd(L - layer) + bwd(L - 1 - layer)
    total = 2 * per_batch + 2 * unemb * (n_ce + n_kl)  # unembedding forward + activation backward at loss positions
    if epoch1:
        total += 2 * fwd(layer) + fwd(L - layer) + unemb * n_kl
    return float(total)


def forward_flops(shape: dict, batch: int, T: int) -> float:
    """One full forward with full-vocabulary logits at every position."""
    d, dff, L, V = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    dkv = d // shape["num_attention_heads"] * shape["num_key_value_heads"]
    P = d * (d + 2 * dkv) + d * d + 3 * d * dff
    return float(L * (2 * P * batch * T + 2 * batch * T * T * d) + 2 * d * V * batch * T)


def toggle_flops(shape: dict, layer: int, batch: int, T: int) -> float:
    """What the toggle step computes: 3 full forwards with full-vocabulary logits, 2 backwards down to the hook."""
    d, dff, L, V = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    dkv = d // shape["num_attention_heads"] * shape["num_key_value_heads"]
    P = d * (d + 2 * dkv) + d * d + 3 * d * dff
    N, attn = batch * T, 2 * batch * T * T * d
    full = L * (2 * P * N + attn) + 2 * d * V * N
    back = (L - 1 - layer) * (2 * P * N + 2 * attn) + 2 * d * V * N
    return float(3 * full + 2 * back)


# --- profile -------------------------------------------------------------------------------------------
def profile_steps(fn, out: Path, tag: str) -> dict:
    """Profile fn() (CPU + CUDA); write the top-kernel table and a gzipped trace; return a category summary."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    from torch.autograd import DeviceType

    cats = {"gemm": 0.0, "attention": 0.0, "elementwise/other": 0.0, "memcpy/memset": 0.0}
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != DeviceType.CUDA:
            continue  # host-side ops; their kernels are listed as device events of their own
        cats[kernel_kind(e.key)] += e.self_device_time_total
    busy = sum(cats.values()) / 1e6
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total", row_limit=35)
    (out / f"profile_{tag}.txt").write_text(table)
    if os.environ.get("BENCH_TRACE"):  # gzipped chrome trace (a few MB) for a look at the device timeline
        import gzip

        raw = out / f"trace_{tag}.json"
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(out / f"trace_{tag}.json.gz", "wb") as dst:
            dst.write(src.read())
        raw.unlink()
    summary = {"wall_s": wall, "gpu_busy_s": busy, **{f"{k}_s": v / 1e6 for k, v in cats.items()}}
    print(f"profile {tag}: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
    return summary


# --- cases ---------------------------------------------------------------------------------------------
def loss_positions(data: TokenizedChats, batch: int) -> int:
    """Prediction positions per batch (targets whose logits are read), from the first batch of the plan."""
    return int(data.collate(data.batch_plan(batch)[0]).assistant_mask[:, 1:].sum())


def run_case(name, make, model, shape, a, rates, out, compile_layers: bool = False, monitor=None) -> list[dict]:
    """The cached trainer against every baseline (benchmarks/common.py), interleaved step by step on the same
    batches; returns one record per baseline. `rates`: matmul FLOP/s by record key ("matmul_tflops" the burst,
    "matmul_tflops_sustained"); `monitor`: a
    GpuMonitor, which samples the clock during the steps. The floor fractions use the sustained rate when the steps
    ran at the power limit (in most samples), the burst otherwise (`floor_ceiling` in the record)."""
    B, T, nb, E, dev, V = a.batch, a.length, a.batches, a.epochs, a.device, shape["vocab_size"]
    data, kl = SyntheticChats(B * nb, T, V, seed=1), SyntheticChats(B * nb, T, V, seed=2)
    warm, warm_kl = SyntheticChats(B * 2, T, V, seed=3), SyntheticChats(B * 2, T, V, seed=4)
    cuda = dev.startswith("cuda")
    baselines = [b for b in BASELINES if b not in a.skip_baselines.split(",")]
    methods = {"cached": ("cached", "auto", compile_layers)} | {b: BASELINES[b] for b in baselines}
    kw = dict(batch_size=B, kl_coef=1.0, lr=1e-4)
    t0 = time.perf_counter()
    for method, mode, comp in methods.values():  # warm-up (compilation included), throwaway adapters and caches
        s = Stepper(model, make(), warm, warm_kl, method=method, mode=mode, compile_layers=comp, cache=em.ActivationCache(dev), **kw)
        for _ in range(2):
            s.step()
    warmup_s = time.perf_counter() - t0
    cache = em.ActivationCache(dev)
    steppers = {m: Stepper(model, make(), data, kl, method=method, mode=mode, compile_layers=comp,
                           cache=cache if m == "cached" else em.ActivationCache(dev), **kw)
                for m, (method, mode, comp) in methods.items()}
    peaks: dict[str, float] | None = {} if cuda else None
    with monitor.phase(f"steps:{name}") if monitor else contextlib.nullcontext():
        times, losses = interleaved(steppers, nb * E, torch.cuda.synchronize if cuda else (lambda: None), peaks,
                                    block=nb, cuda=cuda)
    med = {m: (statistics.median(t[:nb]), statistics.median(t[nb:])) for m, t in times.items()}
    clocks = monitor.summary() if monitor else None
    ceiling = floor_ceiling(clocks, f"steps:{name}")
    rate, burst = rates[ceiling], rates["matmul_tflops"]
    n_ce, n_kl = loss_positions(data, B), loss_positions(kl, B)
    f_e1 = step_flops(shape, a.layer, B, T, n_ce, n_kl, epoch1=True)
    f_later = step_flops(shape, a.layer, B, T, n_ce, n_kl, epoch1=False)
    t_e1, t_later = med["cached"]
    # default settings: compile "auto" (on for one CUDA device, off on CPU) and no variable that changes settings
    default = compile_layers == cuda and not settings_env()
    records = []
    for b in baselines:
        base_e1, base_later = med[b]
        records.append({
            "case": name, "baseline": b, "default_settings": default, "compile_ours": compile_layers,
            "speedup_epoch1": base_e1 / t_e1, "speedup_later": base_later / t_later,
            "floor_fraction_epoch1": f_e1 / t_e1 / rate, "floor_fraction_later": f_later / t_later / rate,
            "floor_fraction_epoch1_burst": f_e1 / t_e1 / burst, "floor_fraction_later_burst": f_later / t_later / burst,
            "sec_per_step": {"cached": spread(times["cached"][:nb]) | {"later": spread(times["cached"][nb:])},
                             b: spread(times[b][:nb]) | {"later": spread(times[b][nb:])}},
            "steps_cached": times["cached"], f"steps_{b}": times[b],
            "necessary_tflop_epoch1": f_e1 / 1e12, "necessary_tflop_later": f_later / 1e12,
            "baseline_matmul_fraction": toggle_flops(shape, a.layer, B, T) / base_later / rate if b != "precomputed_reference" else None,
            "loss_rel_diff_step1": abs(losses["cached"][0] - losses[b][0]) / abs(losses[b][0]),
            "loss_positions_train": n_ce, "loss_positions_kl": n_kl,
            "peak_memory_gib": {"cached": peaks["cached"], b: peaks[b]} if peaks is not None else None,
            "cache_gib": cache.nbytes() / 2**30, "warmup": f"2 steps per method on throwaway adapters/caches, excluded ({warmup_s:.1f} s)",
            "gpu_clocks": clocks, "floor_ceiling": ceiling,
            "timing": ("methods interleaved epoch by epoch on the same batches; within an epoch steps run back to back "
                       "as in the trainer (no host sync), each timed by CUDA events on the device timeline; medians "
                       "(epoch 1 / later epochs)"),
        })
        print(f"{name} vs {b}: {base_e1:.4f}/{base_later:.4f}s  cached {t_e1:.4f}/{t_later:.4f}s  speedup "
              f"{records[-1]['speedup_epoch1']:.2f}/{records[-1]['speedup_later']:.2f}  floor "
              f"{records[-1]['floor_fraction_epoch1']:.3f}/{records[-1]['floor_fraction_later']:.3f} (burst ceiling "
              f"{records[-1]['floor_fraction_later_burst']:.3f} later)", flush=True)
    rec = records[0]
    variants = [v for v in a.variants.split(",") if v] if name == "steering_vector" and not compile_layers else []
    train_kw = dict(kl_coef=1.0, lr=1e-4, batch_size=B, kl_batch_size=B, warmup_steps=1, record_every=10**6)
    for v in variants:
        try:
            rec[f"variant_{v}"] = run_variant(v, make, model, data, kl, a, train_kw)
        except Exception as exc:  # a variant must not lose the main numbers
            rec[f"variant_{v}"] = {"error": repr(exc)[:300]}
        print(f"  variant {v}: {rec[f'variant_{v}']}", flush=True)
    if cuda:  # disclosure: the same later-epoch steps with a host sync after each (as a loop logging loss.item())
        rec["cached_later_sync_each_step_s"] = synced_step_time(steppers["cached"], nb)
        print(f"  cached later, host sync after every step: {rec['cached_later_sync_each_step_s']:.4f}s", flush=True)
    if a.profile and name.split("+")[0] in a.profile.split(","):
        tag = name.replace("+", "_")
        steps = max(1, a.profile_steps)
        cached = steppers["cached"]  # warm: its cache holds every batch, so these are later-epoch steps
        rec["profile_cached_later"] = profile_steps(lambda: [cached.step() for _ in range(steps)], out, f"{tag}_cached_later")
        rec["profile_cached_later"]["steps"] = steps
        if "authors_hf" in steppers:
            base = steppers["authors_hf"]
            rec["profile_authors_hf"] = profile_steps(lambda: base.step(), out, f"{tag}_authors_hf")
    return records


def floor_ceiling(clocks: dict | None, phase: str) -> str:
    """The record key of the matmul ceiling for the floor: "matmul_tflops_sustained" when most clock samples of
    `phase` were taken at the power limit (GpuMonitor.summary), "matmul_tflops" (the burst) otherwise or unsampled."""
    return "matmul_tflops_sustained" if (clocks or {}).get(phase, {}).get("power_capped_share", 0.0) >= 0.5 else "matmul_tflops"


def synced_step_time(stepper: Stepper, n: int) -> float:
    """Median seconds of n steps, each followed by copying its loss to the host."""
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        float(stepper.step())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_variant(v: str, make, model, data, kl, a, kw) -> dict:
    """The cached trainer under another setting: fastoff (bridge everywhere), hostcache (default CPU cache)."""
    nb, dev = a.batches, a.device
    cache = em.ActivationCache("cpu") if v == "hostcache" else em.ActivationCache(dev)
    old = fastpath.fast_path_mode()
    try:
        if v == "fastoff":
            fastpath.set_fast_path("off")
        steps, _ = train_steps(make(), model, data, kl, dev, method="cached", epochs=2, cache=cache, **kw)
    finally:
        fastpath.set_fast_path(old["mode"], compile=old["compile"])
    out = {"sec_per_step_epoch1": statistics.median(steps[1:nb]), "sec_per_step_later": statistics.median(steps[nb:])}
    return out


def run_sweep(a, dev_dtype) -> dict:
    """16 steering vectors with train_many vs one run, each from a cold activation cache."""
    shape = SHAPES["tiny" if a.shape == "tiny" else "smollm2"]
    dev, dtype = dev_dtype
    model = wrap_hf_model(build_hf(shape, dev, dtype, seed=1), None, model_id="random-smollm2-shape")
    B, T, V, nb, n = a.batch, a.length, shape["vocab_size"], a.batches, a.sweep
    layer = shape["layer"]
    data, kl = SyntheticChats(B * nb, T, V, seed=5), SyntheticChats(B * nb, T, V, seed=6)
    warm, warm_kl = SyntheticChats(B * nb, T, V, seed=7), SyntheticChats(B * nb, T, V, seed=8)
    kw = dict(lr=5e-4, batch_size=B, kl_batch_size=B, warmup_steps=1, record_every=10**6, epochs=a.epochs, progress=False)
    coefs = [0.1 * 2**i for i in range(max(1, n // 2))] * 2
    seeds = [0] * (n // 2) + [1] * (n - n // 2)
    coefs = coefs[:n]

    def one(d, k, cache):
        return em.train(em.SteeringVector(model, layer=layer), model, d, kl_data=k, kl_coef=1.0, cache=cache, **kw)

    def many(d, k, cache):
        vecs = [em.SteeringVector(model, layer=layer) for _ in range(n)]
        return em.train_many(vecs, model, d, kl_data=k, kl_coef=coefs, seed=seeds, cache=cache, **kw)

    def wall(fn) -> float:
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    one(warm, warm_kl, em.ActivationCache(dev))
    many(warm, warm_kl, em.ActivationCache(dev))
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    w1 = statistics.median([wall(lambda: one(data, kl, em.ActivationCache(dev))) for _ in range(3)])
    wn = wall(lambda: many(data, kl, em.ActivationCache(dev)))
    steps = a.epochs * nb
    rec = {"case": f"sweep{n}", "model": "random SmolLM2-135M-shaped Llama (embedded GGUF too large to carry)",
           "adapters": n, "steps_per_run": steps, "wall_s_one_run": w1, f"wall_s_{n}_batched": wn,
           "wall_ratio": wn / w1, "goal_wall_ratio_max": 2.0, "sweep_speedup": n * w1 / wn,
           "adapter_steps_per_s_one": steps / w1, "adapter_steps_per_s_batched": n * steps / wn,
           "tokens_per_s_batched": n * steps * 2 * B * T / wn,
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.startswith("cuda") else None}
    print(f"sweep: one run {w1:.3f}s, {n} batched {wn:.3f}s, ratio {wn / w1:.2f} (goal <= 2)", flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen14b", choices=["qwen14b", "tiny"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", type=int, default=6, help="train (and KL) batches per epoch")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--sweep", type=int, default=16)
    ap.add_argument("--skip", default="", help="comma list of: forward,vector,lora,sweep")
    ap.add_argument("--variants", default="fastoff,hostcache", help="comma list of: fastoff,hostcache")
    ap.add_argument("--compile", default="both", choices=["off", "on", "both"], help="fastpath compile setting(s) to run")
    ap.add_argument("--profile", default="steering_vector", help="cases to profile (comma list; empty: none)")
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--out", default=os.environ.get("OUT") or str(RESULTS.parent))
    ap.add_argument("--results", default=None, help="JSONL file to append to (default OUT/bench_gpu.jsonl)")
    ap.add_argument("--skip-baselines", default="", help="comma list of baselines not to run (e.g. authors_hf_compiled)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shape, 2x2 steps, no compile/profile/variants")
    a = ap.parse_args()
    if a.tiny:
        a.shape, a.device, a.batches, a.epochs, a.batch, a.length, a.sweep = "tiny", "cpu", 2, 2, 2, 32, 2
        a.compile, a.profile, a.variants, a.skip = "off", "", "", ",".join(x for x in (a.skip, "forward") if x)
        a.skip_baselines = ",".join(x for x in (a.skip_baselines, "authors_hf_compiled") if x)
    shape = SHAPES[a.shape]
    a.layer = shape["layer"]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = Path(a.results) if a.results else out / "bench_gpu.jsonl"
    cuda = a.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    skip = set(a.skip.split(","))
    import transformers

    env = settings_env()
    base = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "benchmark": "bench_gpu",
            "device": device_name, "model_shape": a.shape, "dtype": str(dtype), "batch": a.batch, "kl_batch": a.batch,
            "length": a.length, "batches_per_epoch": a.batches, "epochs": a.epochs, "layer": a.layer,
            "torch": torch.__version__, "transformers": transformers.__version__, "versions": versions(),
            "fast_path": fastpath.fast_path_mode(), "floor_fraction_note": "floor fractions are of the cached method (ours)",
            "environment": env,
            "command": "".join(f"{k}={v} " for k, v in env.items()) + "python benchmarks/bench_gpu.py " + " ".join(
                f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k not in ("out", "results", "layer"))}

    def emit(rec: dict) -> None:
        rec = {**base, **rec}
        with open(results, "a") as f:
            f.write(json.dumps(rec) + "\n")

    monitor = GpuMonitor(out / "gpu_clocks.csv") if cuda else None
    if monitor:
        with monitor.phase("matmul_burst"):
            burst = matmul_rate(a.device)
        with monitor.phase("matmul_sustained"):
            rate, windows = sustained_matmul_rate(a.device)
        base["matmul_sustained_windows_tflops"] = [round(w, 1) for w in windows]
    else:  # a CPU: no power limit to hold, one ceiling
        burst = rate = matmul_rate(a.device)
    rates = {"matmul_tflops": burst, "matmul_tflops_sustained": rate}
    print(f"device {device_name}; matmul {burst / 1e12:.1f} TFLOP/s burst, {rate / 1e12:.1f} sustained", flush=True)
    base["matmul_tflops"], base["matmul_tflops_sustained"] = burst / 1e12, rate / 1e12
    fwd = {}
    if not ({"vector", "lora"} <= skip and "forward" in skip):
        hf = build_hf(shape, a.device, dtype)
        B, T = a.batch, a.length
        ids = torch.randint(1, shape["vocab_size"], (B, T), device=a.device)
        attn = torch.ones_like(ids)
        fflops = forward_flops(shape, B, T)
        with torch.no_grad():
            if "forward" not in skip:
                fwd["hf_forward_s"] = timed(lambda: hf(input_ids=ids, attention_mask=attn).logits, a.device, reps=10)
        model = wrap_hf_model(hf, None, model_id=f"random-{a.shape}")
        with torch.no_grad():
            if "forward" not in skip:
                fwd["bridge_forward_s"] = timed(lambda: model(ids, attention_mask=attn), a.device, reps=10)
                fwd["fast_forward_s"] = timed(lambda: unembed(model, resume_forward(
                    model, lower_forward(model, ids, 0, attn, fast=True), 0, attn, fast=True)), a.device, reps=10)
                fwd["fast_forward_nomask_s"] = timed(lambda: unembed(model, resume_forward(
                    model, lower_forward(model, ids, 0, None, fast=True), 0, None, fast=True)), a.device, reps=10)
                if a.profile:
                    profile_steps(lambda: unembed(model, resume_forward(
                        model, lower_forward(model, ids, 0, None, fast=True), 0, None, fast=True)), out, "fast_forward")
                for k in list(fwd):
                    fwd[k.replace("_s", "_matmul_fraction")] = fflops / fwd[k] / burst  # short runs: the burst ceiling
                print("forward: " + ", ".join(f"{k} {v:.4f}" for k, v in fwd.items()), flush=True)
        base.update(fwd)
        if cuda:
            base["model_memory_gib"] = torch.cuda.memory_allocated() / 2**30
        cases = []
        if "vector" not in skip:
            cases.append(("steering_vector", lambda: em.SteeringVector(model, layer=a.layer)))
        if "lora" not in skip:
            cases.append(("lora_r1_mlp_out", lambda: em.LoRA(model, layer=a.layer, rank=1, site="mlp_out", alpha=512, rslora=True)))
        modes = [False, True] if a.compile == "both" else [a.compile == "on"]
        for compile_layers in modes:
            for name, make in cases:
                tag = name + ("+compile" if compile_layers else "")
                for rec in run_case(tag, make, model, shape, a, rates, out, compile_layers, monitor):
                    emit(rec)
        fastpath.set_fast_path(fastpath.fast_path_mode()["mode"], compile=False)
        del model, hf
        import gc

        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    if "sweep" not in skip:
        emit(run_sweep(a, (a.device, dtype)))
    if monitor:
        monitor.stop()
    print_table(results, base["date"])


def print_table(results: Path, date: str) -> None:
    rows = [json.loads(x) for x in results.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r.get("date") == date]
    print(f"\n{'case':<24}{'baseline':<24}{'base s':>9}{'e1 s':>9}{'later s':>9}{'spd e1':>8}{'spd later':>10}{'floor lt':>9}")
    for r in rows:
        if "baseline" in r:
            b, c = r["sec_per_step"][r["baseline"]], r["sec_per_step"]["cached"]
            print(f"{r['case']:<24}{r['baseline']:<24}{b['later']['median']:>9.4f}{c['median']:>9.4f}"
                  f"{c['later']['median']:>9.4f}{r['speedup_epoch1']:>8.2f}{r['speedup_later']:>10.2f}"
                  f"{r['floor_fraction_later']:>9.3f}")
        else:
            print(f"{r['case']:<24} one run {r['wall_s_one_run']:.3f}s, batched {r['wall_ratio']:.2f}x that wall time")


if __name__ == "__main__":
    main()
