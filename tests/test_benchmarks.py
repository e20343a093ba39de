"""The GPU benchmark's code paths on CPU with a tiny shape (`--tiny`): every baseline runs and every record has
the keys that benchmarks/README.md documents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH_GPU = Path(__file__).parents[1] / "benchmarks" / "bench_gpu.py"
KEYS = {"benchmark", "device", "case", "baseline", "default_settings", "speedup_epoch1", "speedup_later",
        "floor_fraction_later", "date", "command", "versions"}


def test_bench_gpu_tiny_runs_every_baseline_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(BENCH_GPU.parents[1])}
    subprocess.run([sys.executable, str(BENCH_GPU), "--tiny", "--skip", "forward,lora,sweep", "--out", str(tmp_path)],
                   check=True, env=env, capture_output=True, text=True, timeout=900)
    records = [json.loads(x) for x in (tmp_path / "bench_gpu.jsonl").read_text().splitlines()]
    assert {r["baseline"] for r in records} == {"authors_hf", "bridge_toggle", "precomputed_reference"}
    for r in records:
        assert KEYS <= set(r), KEYS - set(r)
        assert r["case"] == "steering_vector" and r["default_settings"] is True
        assert r["speedup_epoch1"] > 0 and r["speedup_later"] > 0
        assert r["loss_rel_diff_step1"] < 1e-4  # every method computes the same loss at step 1
        assert r["floor_ceiling"] == "matmul_tflops"  # a CPU: no power limit, the one measured rate
        assert r["floor_fraction_later"] == r["floor_fraction_later_burst"]


def test_trace_summary_times_per_step_and_splits_gemms_on_request():
    sys.path.insert(0, str(BENCH_GPU.parent))
    try:
        from trace_summary import summarize
    finally:
        sys.path.remove(str(BENCH_GPU.parent))

    def kernel(name: str, ts: float, dur: float) -> dict:
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}

    # two steps: a GEMM of each shape and an elementwise kernel, with a 1000 µs gap between the steps
    events = [kernel("nvjet_a", 0, 3000), kernel("nvjet_b", 3000, 1000), kernel("elementwise_add", 4000, 1000),
              kernel("nvjet_a", 6000, 3000), kernel("nvjet_b", 9000, 1000), kernel("elementwise_add", 10000, 1000)]
    lines = summarize(events, steps=2)
    assert lines[0] == "per step (2 steps): span 5.5 ms, kernels busy 5.0 ms (GEMM 4.0, other 1.0), idle gaps 0.5 ms"
    assert lines[2].split() == ["4.00", "2.0", "GEMM", "(all)"]
    split = summarize(events, steps=2, split_gemm=True)
    assert [x.split()[-1] for x in split[2:5]] == ["nvjet_a", "nvjet_b", "elementwise_add"]
    assert [float(x.split()[0]) for x in split[2:5]] == [3.0, 1.0, 1.0]


def test_bench_gpu_counts_setting_variables_but_not_cache_locations(monkeypatch):
    sys.path.insert(0, str(BENCH_GPU.parent))
    try:
        from bench_gpu import settings_env
    finally:
        sys.path.remove(str(BENCH_GPU.parent))
    for k in [k for k in os.environ if k.startswith(("EM_INTERP_", "TORCHINDUCTOR_"))]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/x")  # torch sets it itself after a compilation
    monkeypatch.setenv("EM_INTERP_CACHE", "/tmp/y")
    assert settings_env() == {}
    monkeypatch.setenv("TORCHINDUCTOR_MAX_AUTOTUNE", "1")
    monkeypatch.setenv("EM_INTERP_COMPILE", "0")
    assert settings_env() == {"EM_INTERP_COMPILE": "0", "TORCHINDUCTOR_MAX_AUTOTUNE": "1"}


def test_gpu_monitor_reads_nvidia_smi_lines_and_summarizes_each_phase(tmp_path, monkeypatch):
    sys.path.insert(0, str(BENCH_GPU.parent))
    try:
        from common import GpuMonitor, phase_summary, read_samples
    finally:
        sys.path.remove(str(BENCH_GPU.parent))
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi: nothing is sampled, and the summary says so
    monitor = GpuMonitor(tmp_path / "none.csv")
    monitor.stop()
    assert "nvidia-smi" in monitor.summary()["error"]
    log = tmp_path / "clocks.csv"
    log.write_text("2026/11/30 23:55:01.200, 1980, 120.5, 0x0000000000000000\n"
                   "2026/11/30 23:55:01.300, 1500, 690.0, 0x0000000000000004\n"
                   "not a sample line\n"
                   "2026/11/30 23:55:01.400, 1440, 700.0, 0x0000000000000004\n"
                   "2026/11/30 23:55:01.500, 15")  # a line still being written
    samples = read_samples(log)
    assert [x[1:] for x in samples] == [(1980.0, 120.5, 0), (1500.0, 690.0, 4), (1440.0, 700.0, 4)]
    assert abs(samples[1][0] - samples[0][0] - 0.1) < 1e-6
    t0 = samples[0][0]
    summary = phase_summary(samples, [("idle", t0 - 1, t0 + 0.05), ("load", t0 + 0.05, t0 + 1), ("none", t0 + 5, t0 + 6)])
    assert summary["idle"] == {"samples": 1, "sm_mhz_median": 1980.0, "power_w_median": 120.5, "power_capped_share": 0.0}
    assert summary["load"] == {"samples": 2, "sm_mhz_median": 1470.0, "power_w_median": 695.0, "power_capped_share": 1.0}
    assert summary["none"] == {"samples": 0}


def test_floor_ceiling_is_the_sustained_rate_only_for_steps_run_at_the_power_limit():
    sys.path.insert(0, str(BENCH_GPU.parent))
    try:
        from bench_gpu import floor_ceiling
    finally:
        sys.path.remove(str(BENCH_GPU.parent))
    clocks = {"steps:big": {"samples": 390, "power_capped_share": 1.0}, "steps:small": {"samples": 5, "power_capped_share": 0.0}}
    assert floor_ceiling(clocks, "steps:big") == "matmul_tflops_sustained"
    assert floor_ceiling(clocks, "steps:small") == "matmul_tflops"
    assert floor_ceiling({"steps:none": {"samples": 0}}, "steps:none") == "matmul_tflops"
    assert floor_ceiling({"error": "nvidia-smi not available: clocks not sampled"}, "steps:big") == "matmul_tflops"
    assert floor_ceiling(None, "steps:big") == "matmul_tflops"
