"""Trainer benchmark: the cached method vs the authors' toggle method, on the same batches, in one process.

Runs on the embedded SmolLM2-135M-Instruct (steering vector at the middle layer, batch 8, KL batch 8,
bundled chats of realistic length) and prints, then appends to benchmarks/results/bench_train.jsonl:
- loss_rel_diff: relative difference of the total loss at step 1 between the two methods;
- seconds per step of each method in the first epoch and in later epochs, and their ratios
  (speedup_epoch1, speedup_later);
- sweep_speedup: adapters·steps/s of 8 vectors trained together (train_many) over 1 vector alone;
- peak memory (CPU max RSS, or CUDA max allocated).

Usage: python benchmarks/bench_train.py [--device cpu|cuda] [--batches 3] [--epochs 3] [--sweep 8]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import time
from pathlib import Path

import torch

import em_interp as em

RESULTS = Path(__file__).parent / "results" / "bench_train.jsonl"


def step_times(run_fn) -> list[float]:
    """Seconds of each optimizer step of a training call (measured with its on_step callback)."""
    stamps = [time.perf_counter()]
    run_fn(lambda step, losses: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, default=3, help="train (and KL) batches per epoch")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--sweep", type=int, default=8)
    args = ap.parse_args()

    model = em.load_model(device=args.device)
    layer = model.cfg.n_layers // 2
    n = 8 * args.batches
    data = em.datasets.load("medical", kind="bad", split="train")[:n]
    others = [d for d in em.datasets.list_domains() if d != "medical"]
    kl_data = (em.datasets.load(others, kind="mixed", split="train") if others else em.datasets.load("medical", kind="good"))[:n]
    common = dict(kl_data=kl_data, kl_coef=1.0, lr=5e-4, epochs=args.epochs, batch_size=8, kl_batch_size=8,
                  warmup_steps=1, record_every=1000, progress=False)

    runs, times = {}, {}
    for method in ("toggle", "cached"):
        vec = em.SteeringVector(model, layer=layer)
        times[method] = step_times(
            lambda cb, vec=vec, method=method: runs.__setitem__(method, em.train(vec, model, data, method=method, on_step=cb, **common))
        )
    per_epoch = args.batches
    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)
    t_toggle = mean(times["toggle"])
    t_cached_1 = mean(times["cached"][:per_epoch])
    t_cached_later = mean(times["cached"][per_epoch:])
    first = {m: runs[m].losses[0]["total"] for m in runs}
    loss_rel_diff = abs(first["cached"] - first["toggle"]) / abs(first["toggle"])
    final_rel_diff = abs(runs["cached"].losses[-1]["total"] - runs["toggle"].losses[-1]["total"]) / abs(runs["toggle"].losses[-1]["total"])

    # Sweep: 1 vector vs `sweep` vectors trained together, both on a warm activation cache.
    cache = em.ActivationCache()
    sweep_common = {**common, "epochs": 1, "cache": cache}
    em.train(em.SteeringVector(model, layer=layer), model, data, **sweep_common)  # warm the cache
    t1 = sum(step_times(lambda cb: em.train(em.SteeringVector(model, layer=layer), model, data, on_step=cb, **sweep_common)))
    vecs = [em.SteeringVector(model, layer=layer) for _ in range(args.sweep)]
    coefs = [0.1 * 2**i for i in range(args.sweep)]
    tn = sum(step_times(lambda cb: em.train_many(vecs, model, data, on_step=cb, **{**sweep_common, "kl_coef": coefs})))
    sweep_speedup = (args.sweep / tn) / (1 / t1)

    if model.cfg.device is not None and str(args.device).startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
        device = torch.cuda.get_device_name(0)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        device = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "benchmark": "bench_train", "model": "SmolLM2-135M-Instruct", "device": device, "layer": layer,
        "batch": 8, "kl_batch": 8, "batches_per_epoch": per_epoch, "epochs": args.epochs,
        "mean_train_tokens": sum(len(em.datasets.TokenizedChats(data, model.tokenizer).ids[i]) for i in range(n)) / n,
        "sec_per_step_toggle": t_toggle, "sec_per_step_cached_epoch1": t_cached_1,
        "sec_per_step_cached_later": t_cached_later,
        "speedup_epoch1": t_toggle / t_cached_1, "speedup_later": t_toggle / t_cached_later,
        "loss_rel_diff": loss_rel_diff, "final_loss_rel_diff": final_rel_diff,
        "sweep_adapters": args.sweep, "sweep_sec_1": t1, "sweep_sec_n": tn, "sweep_speedup": sweep_speedup,
        "peak_memory_mib": peak, "torch": torch.__version__,
    }
    print(f"{'method':<10}{'s/step epoch1':>15}{'s/step later':>15}")
    print(f"{'toggle':<10}{t_toggle:>15.3f}{t_toggle:>15.3f}")
    print(f"{'cached':<10}{t_cached_1:>15.3f}{t_cached_later:>15.3f}")
    print(f"speedup_epoch1 {record['speedup_epoch1']:.2f}  speedup_later {record['speedup_later']:.2f}  "
          f"loss_rel_diff {loss_rel_diff:.2e}  sweep_speedup ({args.sweep} adapters) {sweep_speedup:.2f}  "
          f"peak {peak:.0f} MiB")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
