"""Summarize a torch.profiler chrome trace of training steps (as `BENCH_TRACE=1 bench_gpu.py` writes them): where
the device time goes and where the host waited for the device.

    python benchmarks/trace_summary.py trace_steering_vector_compile_cached_later.json.gz --steps 2

Prints, per step: the device timeline's span, kernel busy time, idle gaps, GEMM time against other kernels, the
largest kernels by time, and every host call that blocked on the device (a stream synchronize or a copy that
waited > 0.2 ms) with the operator stack it was called from.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from pathlib import Path
from typing import Any

GEMM = ("nvjet", "gemm", "cutlass", "xmma", "cublas", "gemv", "splitk")
ATTENTION = ("flash", "fmha", "attention")


def kernel_kind(name: str) -> str:
    """"memcpy/memset", "attention", "gemm" or "elementwise/other" for a device kernel's name (attention is
    checked before GEMM: cuDNN's fused attention kernels carry GEMM-like architecture tags in their names)."""
    k = name.lower()
    if "memcpy" in k or "memset" in k:
        return "memcpy/memset"
    if any(s in k for s in ATTENTION):
        return "attention"
    if any(s in k for s in GEMM):
        return "gemm"
    return "elementwise/other"


def load(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def summarize(events: list[dict[str, Any]], steps: int, split_gemm: bool = False, top: int = 15) -> list[str]:
    """The summary's lines; `split_gemm` lists GEMM kernels by name (one name per tile configuration, so roughly per
    shape) instead of as one "GEMM (all)" row."""
    kernels = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                     key=lambda e: e["ts"])
    if not kernels:
        return ["no device kernels in the trace"]
    start, end = kernels[0]["ts"], max(e["ts"] + e["dur"] for e in kernels)
    busy, idle, reach = 0.0, 0.0, start
    for e in kernels:
        idle += max(0.0, e["ts"] - reach)
        busy += e["dur"]
        reach = max(reach, e["ts"] + e["dur"])
    gemm = sum(e["dur"] for e in kernels if kernel_kind(e["name"]) == "gemm")
    ms = 1e3 * steps
    out = [f"per step ({steps} steps): span {(end - start) / ms:.1f} ms, kernels busy {busy / ms:.1f} ms "
           f"(GEMM {gemm / ms:.1f}, other {(busy - gemm) / ms:.1f}), idle gaps {idle / ms:.1f} ms",
           "largest kernels (ms per step, launches per step):"]
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in kernels:
        name = "GEMM (all)" if kernel_kind(e["name"]) == "gemm" and not split_gemm else e["name"][:100]
        by_name[name][0] += e["dur"]
        by_name[name][1] += 1
    for name, (dur, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        out.append(f"  {dur / ms:7.2f}  {n / steps:6.1f}  {name}")
    ops = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"]
    waits = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cuda_runtime"
             and e["name"] in ("cudaStreamSynchronize", "cudaMemcpyAsync", "cudaDeviceSynchronize") and e["dur"] > 200]
    out.append(f"host calls that waited for the device (> 0.2 ms): {len(waits)}")
    for w in sorted(waits, key=lambda e: e["ts"]):
        stack = sorted((o for o in ops if o.get("tid") == w.get("tid") and o["ts"] <= w["ts"] <= o["ts"] + o["dur"]),
                       key=lambda o: -o["dur"])
        out.append(f"  {w['dur'] / 1e3:6.2f} ms {w['name']} in " + " > ".join(o["name"][:40] for o in stack[:6]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace", type=Path)
    p.add_argument("--steps", type=int, default=1, help="steps the trace holds (times are divided by it)")
    p.add_argument("--split-gemm", action="store_true", help="list GEMM kernels by name instead of as one row")
    p.add_argument("--top", type=int, default=15, help="kernel rows to list")
    a = p.parse_args()
    print("\n".join(summarize(load(a.trace), a.steps, a.split_gemm, a.top)))


if __name__ == "__main__":
    main()
