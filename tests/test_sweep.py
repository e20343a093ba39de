"""Sweeps: the grid config, and 2 processes (torch.distributed, gloo on CPU) giving each run's single-run result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import em_interp as em
from em_interp.cli.sweep import load_sweep_config
from em_interp.errors import ConfigError
from em_interp.testing import save_tiny_model
from em_interp.training.runs import TrainRun

CONFIG = """
[model]
name = "model"
device = "cpu"

[adapter.steering]
layer = 1
init = "random"
alpha = 2.0

[adapter.lora]
layer = 1
rank = 1
site = "mlp_out"
init = "random"

[data]
train = { domains = ["medical"], kind = "bad", split = "train", limit = 8 }
kl = { domains = ["medical"], kind = "good", split = "train", limit = 8 }

[train]
lr = 1e-2
epochs = 1
batch_size = 4
kl_batch_size = 4
warmup_steps = 1
out = "out"
progress = false

[grid]
kl_coef = [0.0, 1.0]
seed = [0, 1]
adapter = ["steering", "lora"]
"""


def _write(tmp_path: Path, text: str = CONFIG) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_config_expands_the_grid_in_order(tmp_path):
    spec = load_sweep_config(_write(tmp_path))
    assert [r["name"] for r in spec.grid][:3] == ["steering_kl0_seed0", "steering_kl0_seed1", "steering_kl1_seed0"]
    assert len(spec.grid) == 8 and spec.out == tmp_path / "out"


@pytest.mark.parametrize("edit, message", [
    (("seed = [0, 1]", "seed = [0, 1.5]"), "[grid] seed"),
    (("adapter = [\"steering\", \"lora\"]", "adapter = [\"steering\", \"prefix\"]"), "[grid] adapter"),
    (("[adapter.lora]", "[adapter.lorra]"), "[adapter] unknown key"),
    (("epochs = 1", "epochs = 1\nkl_coef = 2.0"), "[train] unknown key 'kl_coef'"),
])
def test_bad_configs_name_the_key(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_sweep_config(_write(tmp_path, CONFIG.replace(*edit)))


def test_two_processes_give_each_run_its_single_run_result(tmp_path):
    save_tiny_model(tmp_path / "model")
    cfg = _write(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
         "-m", "em_interp.cli.sweep", str(cfg)],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["n_runs"] == 8
    assert {r["rank"] for r in summary["runs"]} == {0, 1}
    assert [r["index"] for r in summary["runs"]] == list(range(8))
    assert all(r["batched_with"] == 2 for r in summary["runs"])  # each rank: 2 runs of each kind, batched

    spec = load_sweep_config(cfg)
    model = em.load_model(str(tmp_path / "model"), device="cpu")
    data, kl = spec.data.load("train"), spec.kl.load("kl")
    for r in summary["runs"]:
        alone = spec.adapters[r["kind"]].build(model, seed=r["seed"])
        kl_args = dict(kl_data=kl, kl_coef=r["kl_coef"]) if r["kl_coef"] > 0 else {}
        run = em.train(alone, model, data, seed=r["seed"], **kl_args, **{**spec.train_kwargs(), "progress": False})
        saved = TrainRun.load(tmp_path / "out" / r["dir"], model)
        for (name, p), q in zip(alone.named_parameters(), saved.adapter.parameters(), strict=True):
            torch.testing.assert_close(q, p.detach(), rtol=1e-5, atol=1e-5, msg=f"{r['name']}: {name}")
        assert r["final"]["total"] == pytest.approx(run.losses[-1]["total"], rel=1e-5)


def test_cli_sweep_in_one_process(tmp_path, capsys):
    from em_interp.cli import main

    save_tiny_model(tmp_path / "model")
    cfg = _write(tmp_path, CONFIG.replace("kl_coef = [0.0, 1.0]", "kl_coef = [1.0]").replace(
        "adapter = [\"steering\", \"lora\"]", "adapter = [\"lora\"]"))
    assert main(["sweep", str(cfg)]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["name"] for r in summary["runs"]] == ["lora_kl1_seed0", "lora_kl1_seed1"]
    assert summary["world_size"] == 1 and (tmp_path / "out" / "config.toml").is_file()
    assert "sweep: 2 runs" in capsys.readouterr().out
