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
