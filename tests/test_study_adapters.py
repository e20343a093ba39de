"""The study with either adapter kind, on a tiny model (fast sizes), and its helpers."""

from __future__ import annotations

import math

import pytest
import torch

import em_interp as em
from em_interp.errors import DataError, GeometryError
from em_interp.study import StudyConfig, output_direction, run_study, same_rows, study_data
from em_interp.training.loop import train_many


def test_full_preset_is_the_gated_lora_setting():
    cfg = StudyConfig.preset("full")
    assert (cfg.adapter, cfg.epochs, cfg.kl_coef, cfg.n_train, cfg.n_kl) == ("lora", 12, 20.0, 208, 204)
    assert (cfg.batch_size, cfg.kl_batch) == (8, 32)
    assert cfg.train_lr == cfg.lora_lr and StudyConfig.preset("default").train_lr == StudyConfig().lr
    assert StudyConfig.preset("default").kl_batch == StudyConfig().batch_size  # None: the CE batch size
    with pytest.raises(DataError, match="adapter='mlp'"):
        StudyConfig.preset("default", adapter="mlp")
    with pytest.raises(DataError, match="kl_batch_size=0"):
        StudyConfig.preset("full", kl_batch_size=0)


def test_same_rows_groups_seeds_with_equal_row_sets():
    all_rows = StudyConfig.preset("fast", n_train=208, n_kl=204)
    full = [study_data(all_rows, s) for s in range(3)]
    assert [r["id"] for r in full[0].train] != [r["id"] for r in full[1].train]  # orders differ
    assert same_rows(full) == [[0, 1, 2]]
    few = [study_data(StudyConfig.preset("fast"), s) for s in range(3)]
    assert same_rows(few) == [[0], [1], [2]]


def test_output_direction(tiny):
    vec = em.SteeringVector(tiny, 1)
    assert output_direction(vec) is vec
    lora = em.LoRA(tiny, 1, rank=1, site="mlp_out", seed=0)
    lora.load_state({k: torch.randn(v.shape) for k, v in lora.state().items()})
    (b,) = lora.B.values()
    assert torch.equal(output_direction(lora), b.detach().flatten())
    with pytest.raises(GeometryError, match="rank-1"):
        output_direction(em.LoRA(tiny, 1, rank=2, site="mlp_out"))


def test_lora_study_runs_every_analysis(tiny, tmp_path, monkeypatch):
    import em_interp.study.study as study_module

    kl_batches = []

    def spy(*args, **kw):
        kl_batches.append(kw["kl_batch_size"])
        return train_many(*args, **kw)

    monkeypatch.setattr(study_module, "train_many", spy)
    results = run_study(tmp_path / "s", fast=True, model=tiny, adapter="lora", seeds=2, n_train=8, n_kl=8, kl_batch_size=4)
    assert kl_batches and set(kl_batches) == {4}  # every training call (pairs, reversion, LoRA pair) uses the KL batch
    assert "errors" not in results, results.get("errors")
    assert results["config"]["adapter"] == "lora" and len(results["per_seed"]) == 2
    assert {v["verdict"] for v in results["verdicts"].values()} == {"PLUMBING CHECK"}
    for p in results["per_seed"]:
        for key in ("efficiency_gap", "stability_relative", "cosine_rise", "influence_log_ratio"):
            assert math.isfinite(p[key]), key
    assert math.isfinite(results["direction"]["cosine_general"])
    gate = results["gate"]
    assert set(gate["intervals"]) == {*gate["other"], "medical@1"}  # each ratio's spread over the 2 seeds
    for key, (lo, hi) in gate["intervals"].items():
        ratio = gate["in_domain"] if key == "medical@1" else gate["other"][key]
        if lo is not None and ratio is not None:
            assert lo - 1e-9 <= ratio <= hi + 1e-9, key
    html = (tmp_path / "s" / "report.html").read_text()
    assert "rank-1 LoRA on the MLP down-projection" in html


def test_study_config_checks_kl_tokens_and_rank():
    from em_interp.errors import DataError
    from em_interp.study import StudyConfig

    assert StudyConfig.preset("default", kl_tokens="all", lora_rank=2).lora_rank == 2
    with pytest.raises(DataError, match="kl_tokens='prompt'"):
        StudyConfig.preset("default", kl_tokens="prompt")
    with pytest.raises(DataError, match="lora_rank=0"):
        StudyConfig.preset("default", lora_rank=0)
