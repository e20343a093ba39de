"""Profile a study-like batched training step: `train_many` with N rank-1 LoRAs (λ 0 / λ 20 pairs) on a random
SmolLM2-135M-shaped model, chat-shaped synthetic rows, and summarize where the device time goes.

    BENCH_TRACE=1 python benchmarks/profile_sweep.py --device cuda --adapters 16 --steps 6
    python benchmarks/profile_sweep.py --tiny            (CPU smoke run)

Prints the mean step time without the profiler, then `trace_summary.summarize` of `--steps` profiled steps (after
two warm-up steps), and writes the trace to OUT (gzipped) when BENCH_TRACE is set.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import time
from pathlib import Path

import torch

import em_interp as em
from em_interp.model.load import wrap_hf_model

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu import SHAPES, SyntheticChats, build_hf  # noqa: E402
from trace_summary import load, summarize  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rows", type=int, default=208)
    p.add_argument("--length", type=int, default=160)
    p.add_argument("--kl-batch", type=int, default=8, help="KL rows per step (the full study preset's: 32)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on the tiny shape")
    p.add_argument("--out", default=os.environ.get("OUT") or "/tmp")
    a = p.parse_args()
    shape = SHAPES["tiny" if a.tiny else "smollm2"]
    dev = "cpu" if a.tiny else a.device
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    model = wrap_hf_model(build_hf(shape, dev, dtype, seed=1), None, model_id="random-smollm2-shape")
    V, layer = shape["vocab_size"], shape["layer"]
    data, kl = SyntheticChats(a.rows, a.length, V, seed=5), SyntheticChats(a.rows, a.length, V, seed=6)
    cache = em.ActivationCache(dev)

    def train(steps: int) -> float:
        loras = [em.LoRA(model, layer, rank=1, site="mlp_out", alpha=512, rslora=True, seed=i) for i in range(a.adapters)]
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        em.train_many(loras, model, data, kl_data=kl, kl_coef=[0.0, 20.0] * (a.adapters // 2) + [0.0] * (a.adapters % 2),
                      seed=[i // 2 for i in range(a.adapters)], lr=2e-4, steps=steps, batch_size=8, kl_batch_size=a.kl_batch,
                      schedule="constant", record_every=1, cache=cache, progress=False)
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    train(2)  # warm-up: the activation cache fills, kernels load
    t_short, t_long = train(2), train(2 + a.steps)
    print(f"{a.adapters} LoRAs, {a.rows} rows × {a.length} tokens: {(t_long - t_short) / a.steps:.4f} s per step "
          f"(difference of a {2 + a.steps}- and a 2-step run)", flush=True)
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        train(a.steps)
    raw = Path(a.out) / "trace_sweep.json"
    prof.export_chrome_trace(str(raw))
    print("\n".join(summarize(load(raw), a.steps)))
    if os.environ.get("BENCH_TRACE"):
        with open(raw, "rb") as src, gzip.open(raw.with_suffix(".json.gz"), "wb") as dst:
            dst.write(src.read())
    raw.unlink()


if __name__ == "__main__":
    main()
