"""Trainer benchmark on CPU (or one device): the cached trainer against the authors' code path, in one process.

On the embedded SmolLM2-135M-Instruct (steering vector at the middle layer on the MLP down-projection output, the
authors' placement; batch 8, KL batch 8, KL weight 1, bundled chats), with default settings (no flag, no
environment variable):
1. Warm-up: one step of every method on a throwaway adapter and cache (excluded from the timings; disclosed).
2. Timed: the methods "cached" (ours), "authors_hf", "bridge_toggle" and "precomputed_reference" (see
   benchmarks/common.py) step in turn, one step each per round (interleaved), on the same batch order, for
   `--epochs` epochs of `--batches` batches. Epoch 1 of "cached" fills its activation cache; later epochs
   reuse it. speedup = median step time of the baseline / median step time of "cached", per epoch phase.
3. Memory: each method's peak RSS in its own subprocess (one epoch + 1 step), and an 8-vector `train_many` sweep
   and a single run in their own subprocesses (two epochs; step times of the second): peak_rss_gib_sweep8 and
   sweep_steps_per_s_ratio = (8 · steps / sweep time) / (steps / single-run time). Peaks cover the training
   phase: the peak count is reset after the model is loaded (Linux VmHWM via /proc/self/clear_refs); the model's
   resident memory is included, and the loading peak is recorded beside it (load_peak_rss_gib).
Each (case, baseline) is one JSON line appended to benchmarks/results/bench_train.jsonl.

Usage: python benchmarks/bench_train.py [--device cpu] [--batches 5] [--epochs 2] [--sweep 8] [--note TEXT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import BASELINES, Stepper, command, interleaved, now, spread, versions  # noqa: E402

import em_interp as em  # noqa: E402
from em_interp.datasets import TokenizedChats  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "bench_train.jsonl"
CPU_BASELINES = ("authors_hf", "bridge_toggle", "precomputed_reference")  # compile is not measured on CPU


def load(device: str, dtype: str | None, batches: int):
    model = em.load_model(device=device, dtype=dtype)
    n = 8 * batches
    data = em.datasets.load("medical", kind="bad", split="train")[:n]
    others = [d for d in em.datasets.list_domains() if d != "medical"]
    kl_data = em.datasets.load(others, kind="mixed", split="train")[:n]
    tok = TokenizedChats(data, model.tokenizer, max_length=256, on_too_long="skip")
    kl_tok = TokenizedChats(kl_data, model.tokenizer, max_length=256, on_too_long="skip")
    return model, data, kl_data, tok, kl_tok


def make_adapter(model, case: str):
    layer = model.cfg.n_layers // 2
    if case == "rank1_lora":
        return em.LoRA(model, layer=layer, rank=1, site="mlp_out", alpha=512, rslora=True)
    return em.SteeringVector(model, layer=layer, hook="mlp_out", alpha=1.0)


def sync_fn(device: str):
    return torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)


def _status_gib(field: str) -> float | None:
    """A memory field of /proc/self/status (e.g. VmHWM, the peak RSS) in GiB; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        return None
    return None


def reset_peak_rss() -> float | None:
    """Restart the peak-RSS count (Linux: writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS), so
    that a measurement covers the training phase, not model loading; returns the RSS at the reset (GiB)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_gib("VmRSS")


def peak_rss_gib() -> float:
    """Peak RSS since the last `reset_peak_rss` (VmHWM), or of the whole process where /proc is missing."""
    hwm = _status_gib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure(args) -> dict:
    """Subprocess mode: one method (or the sweep) alone; prints its peak RSS and step times as JSON."""
    model, data, kl_data, tok, kl_tok = load(args.device, args.dtype, args.batches)
    load_peak = peak_rss_gib()
    after_load = reset_peak_rss()
    what = args.measure
    if what.startswith("sweep"):
        n = int(what.removeprefix("sweep"))
        vecs = [make_adapter(model, "steering_vector") for _ in range(n)]
        stamps: list[float] = []
        em.train_many(vecs, model, tok, kl_data=kl_tok, kl_coef=[0.1 * 2**i for i in range(n)], lr=5e-4, epochs=2,
                      batch_size=8, kl_batch_size=8, warmup_steps=1, record_every=1000, progress=False,
                      on_step=lambda step, losses: stamps.append(time.perf_counter()))
        later = [b - a for a, b in zip(stamps[args.batches - 1:], stamps[args.batches:], strict=False)]
        return {"what": what, "peak_rss_gib": peak_rss_gib(), "rss_after_load_gib": after_load,
                "load_peak_rss_gib": load_peak, "adapters": n, "later_step_s": later}
    case, method = what.split(":")
    name_method, mode, _ = BASELINES.get(method, ("cached", "auto", False))
    s = Stepper(model, make_adapter(model, case), tok, kl_tok, method=name_method, mode=mode)
    for _ in range(args.batches + 1):
        s.step()
    return {"what": what, "peak_rss_gib": peak_rss_gib(), "rss_after_load_gib": after_load, "load_peak_rss_gib": load_peak}


def subprocess_measure(args, what: str) -> dict:
    cmd = [sys.executable, __file__, "--measure", what, "--device", args.device, "--batches", str(args.batches)]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="model dtype (default: the library's, float32 on CPU)")
    ap.add_argument("--batches", type=int, default=5, help="train (and KL) batches per epoch (steps per epoch)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--sweep", type=int, default=8)
    ap.add_argument("--cases", default="steering_vector", help="comma list: steering_vector, rank1_lora")
    ap.add_argument("--note", default="", help="free text stored in every record (e.g. machine load)")
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # subprocess mode
    ap.add_argument("--no-write", action="store_true", help="print the records without appending them")
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args)))
        return

    model, data, kl_data, tok, kl_tok = load(args.device, args.dtype, args.batches)
    sync = sync_fn(args.device)
    dtype = str(next(em.model.hf_model_of(model).parameters()).dtype).removeprefix("torch.")
    device = (torch.cuda.get_device_name(0) if args.device.startswith("cuda")
              else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    records = []
    for case in args.cases.split(","):
        methods = {"cached": ("cached", "auto")} | {b: BASELINES[b][:2] for b in CPU_BASELINES}
        # Warm-up: one step of each method on a throwaway adapter and cache (allocator, thread pools, the fast
        # path's plain-module clones); not timed.
        t_warm = time.perf_counter()
        for method, mode in methods.values():
            Stepper(model, make_adapter(model, case), tok, kl_tok, method=method, mode=mode,
                    cache=em.ActivationCache()).step()
        warmup_s = time.perf_counter() - t_warm
        steppers = {m: Stepper(model, make_adapter(model, case), tok, kl_tok, method=method, mode=mode)
                    for m, (method, mode) in methods.items()}
        n_steps = args.batches * args.epochs
        times, losses = interleaved(steppers, n_steps, sync)
        e1, later = slice(0, args.batches), slice(args.batches, None)
        stats = {m: {"epoch1": spread(t[e1]), "later": spread(t[later])} for m, t in times.items()}
        peaks = {m: subprocess_measure(args, f"{case}:{m}")["peak_rss_gib"] for m in methods}
        sweep = {}
        if case == "steering_vector" and args.sweep:
            s8 = subprocess_measure(args, f"sweep{args.sweep}")
            s1 = subprocess_measure(args, "sweep1")
            ratio = (args.sweep / sum(s8["later_step_s"])) / (1 / sum(s1["later_step_s"]))
            sweep = {"peak_rss_gib_sweep8" if args.sweep == 8 else f"peak_rss_gib_sweep{args.sweep}": s8["peak_rss_gib"],
                     "peak_rss_gib_single_run": s1["peak_rss_gib"], "sweep_steps_per_s_ratio": ratio,
                     "rss_after_load_gib": s8["rss_after_load_gib"], "load_peak_rss_gib": s8["load_peak_rss_gib"],
                     "sweep_detail": {"adapters": args.sweep, "steps_timed": len(s8["later_step_s"]),
                                      "sweep_s": sum(s8["later_step_s"]), "single_s": sum(s1["later_step_s"]),
                                      "phase": "epoch 2 of 2 (warm activation cache), each in its own process"}}
        ours = stats["cached"]
        for baseline in CPU_BASELINES:
            base = stats[baseline]
            rel = abs(losses["cached"][0] - losses[baseline][0]) / abs(losses[baseline][0])
            rec = {
                "benchmark": "bench_train", "device": device, "case": case, "baseline": baseline,
                "default_settings": not any(k.startswith("EM_INTERP_") for k in os.environ) and args.dtype is None,
                "speedup_epoch1": base["epoch1"]["median"] / ours["epoch1"]["median"],
                "speedup_later": base["later"]["median"] / ours["later"]["median"],
                "floor_fraction_later": None,
                "floor_fraction_reason": "not computed on CPU: the floor is defined against a GPU's measured matmul rate",
                "date": now(), "command": command(), "versions": versions(),
                "model": "SmolLM2-135M-Instruct (embedded)", "dtype": dtype, "layer": model.cfg.n_layers // 2,
                "hook": "mlp_out (the MLP down-projection output, the authors' placement)",
                "batch": 8, "kl_batch": 8, "steps_per_epoch": args.batches, "epochs": args.epochs,
                "mean_train_tokens": sum(len(x) for x in tok.ids) / len(tok),
                "sec_per_step": {"cached": ours, baseline: base},
                "loss_rel_diff_step1": rel,
                "peak_rss_gib": {"cached": peaks["cached"], baseline: peaks[baseline]},
                "warmup": f"1 step per method on a throwaway adapter and cache, excluded ({warmup_s:.1f} s in all)",
                "timing": "methods interleaved step by step on the same batch order; medians over the steps of each phase",
                "note": args.note,
                **(sweep if baseline == "authors_hf" else {}),
            }
            records.append(rec)
        print(f"\n{case}: s/step median (epoch 1 / later), peak RSS GiB in its own process")
        for m in methods:
            print(f"  {m:<22}{stats[m]['epoch1']['median']:>8.3f}{stats[m]['later']['median']:>8.3f}{peaks[m]:>8.2f}")
        for r in records[-len(CPU_BASELINES):]:
            print(f"  vs {r['baseline']:<22} speedup epoch1 {r['speedup_epoch1']:.2f}  later {r['speedup_later']:.2f}"
                  f"  loss rel diff {r['loss_rel_diff_step1']:.1e}")
        if sweep:
            print(f"  sweep of {args.sweep}: peak RSS {s8['peak_rss_gib']:.2f} GiB (single run {s1['peak_rss_gib']:.2f}),"
                  f" adapter-steps/s ratio {sweep['sweep_steps_per_s_ratio']:.2f}")
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with open(RESULTS, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
