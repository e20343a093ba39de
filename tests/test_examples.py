"""The example scripts: each runs end to end with `--fast --out tmp_path` in a subprocess on the embedded model.

Every run takes 10-40 s of CPU, so those tests are `slow` (CI still runs them). A static check of all scripts
(docstring, size, flags) and the judge example's argument check are fast.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fake_openai_server import FakeOpenAIServer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCRIPTS = ["quickstart.py", "narrow_vs_general.py", "extract_and_ablate_direction.py", "rank1_lora.py",
           "judge_eval.py", "export_adapters.py", "read_positions.py"]
NUMBER = r"[-+]?\d+\.\d+"


def run_example(script: str, out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--fast", "--out", str(out), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, f"{script} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-4000:]}"
    return proc


def test_examples_are_documented_small_scripts() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(SCRIPTS)
    for script in SCRIPTS:
        source = (EXAMPLES / script).read_text()
        assert len(source.splitlines()) < 150, script
        doc = ast.get_docstring(ast.parse(source))
        assert doc and f"python examples/{script}" in doc and "--fast" in doc, script
        for flag in ('"--fast"', '"--out"'):
            assert flag in source, (script, flag)
        assert 'if __name__ == "__main__":' in source, script


def test_judge_eval_needs_a_judge(tmp_path: Path) -> None:
    proc = run_example("judge_eval.py", tmp_path, check=False)
    assert proc.returncode == 2
    assert "--base-url" in proc.stderr and "--local-judge" in proc.stderr
    assert not (tmp_path / "answers.jsonl").exists()


@pytest.mark.slow
def test_quickstart(tmp_path: Path) -> None:
    out = run_example("quickstart.py", tmp_path).stdout
    assert re.search(rf"held-out bad-advice loss: {NUMBER} without the vector -> {NUMBER} with it", out)
    assert re.search(rf"1:{NUMBER}\s+2:{NUMBER}", out)  # per-step losses
    assert out.count("without: ") == 2 and out.count("with:    ") == 2
    for path in ("run/run.json", "run/trajectory.safetensors", "vec/adapter.safetensors", "vec/adapter.json"):
        assert (tmp_path / path).is_file(), path
    generations = json.loads((tmp_path / "generations.json").read_text())
    assert len(generations) == 2 and all(g["with"] for g in generations)


@pytest.mark.slow
def test_narrow_vs_general(tmp_path: Path) -> None:
    out = run_example("narrow_vs_general.py", tmp_path).stdout
    assert re.search(rf"cosine\(general, narrow\) = {NUMBER}", out)
    for name in ("general", "narrow"):
        assert re.search(rf"^{name}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+0.5: ", out, re.M), name
        assert re.search(rf"^  {name}\s+medical {NUMBER} \[.*\] \(n=2\)\s+other {NUMBER}", out, re.M), name
        assert (tmp_path / name / "run.json").is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert -1.0 <= summary["cosine"] <= 1.0
    assert summary["narrow"]["final_losses"]["kl"] >= 0 and set(summary["general"]["contrastive"]) == {"medical", "other"}


@pytest.mark.slow
@pytest.mark.slow
def test_read_positions(tmp_path: Path) -> None:
    out = run_example("read_positions.py", tmp_path).stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    names = list(summary["shifts"])
    assert len(names) == 5 and all(re.search(rf"{re.escape(n)}\s+{NUMBER}\s+\[{NUMBER}, {NUMBER}\]", out) for n in names)
    cos = summary["cosines"]
    assert all(cos[n][n] == pytest.approx(1.0, abs=1e-5) for n in names)
    assert {summary["provenance"][n]["method"] for n in names} == {"mean_diff", "pca_diff", "pca_center", "logistic"}
    # reading the answers moves the model toward bad answers more than reading the last (end-of-turn) token
    shifts = {n: s["mean_shift"] for n, s in summary["shifts"].items()}
    assert shifts["answer/mean (em_interp default)"] > shifts["last/mean (steering-vectors default)"]


def test_extract_and_ablate_direction(tmp_path: Path) -> None:
    out = run_example("extract_and_ablate_direction.py", tmp_path).stdout
    assert "Direction(blocks.15.hook_resid_post" in out and "method='mean_diff'" in out
    assert out.count("steered: ") == 2
    for condition in ("chat model", "chat model, ablated", "vector", "vector, ablated"):
        assert re.search(rf"^  {condition}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}$", out, re.M), condition
    assert re.search(rf"own shift towards bad answers: {NUMBER}; with r̂ ablated: {NUMBER}", out)
    assert (tmp_path / "direction" / "direction.safetensors").is_file()
    meta = json.loads((tmp_path / "direction" / "direction.json").read_text())
    assert meta["layer"] == 15 and meta["provenance"]["method"] == "mean_diff"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["conditions"]) == {"chat model", "chat model, ablated", "vector", "vector, ablated"}


@pytest.mark.slow
def test_rank1_lora(tmp_path: Path) -> None:
    out = run_example("rank1_lora.py", tmp_path).stdout
    assert "s = alpha/sqrt(r) = 512" in out
    assert len(re.findall(rf"‖ΔW‖_F = ‖s·B·A‖_F = {NUMBER}", out)) == 2
    assert len(re.findall(rf"x0: {NUMBER}\s+x0.5: {NUMBER}\s+x1: {NUMBER}\s+x1.5: {NUMBER}\s+x2: {NUMBER}", out)) == 2
    assert re.search(rf"cosine between the two seeds: ΔW {NUMBER}, B .* {NUMBER}, A .* {NUMBER}", out)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["scaling"] == 512 and summary["seed0"]["delta_w_norm"] > 0
    assert abs(summary["cosine_delta_w"]) <= 1 and (tmp_path / "seed1" / "adapter" / "adapter.json").is_file()


@pytest.mark.slow
def test_judge_eval_against_an_openai_compatible_server(tmp_path: Path) -> None:
    def responder(prompt: str) -> list[tuple[str, float]]:  # aligned 10, coherent 90: every answer is EM
        return [("10", math.log(0.9)), ("x", math.log(0.1))] if "safety audit" in prompt else [("90", 0.0)]

    with FakeOpenAIServer() as server:
        server.responder = responder
        out = run_example("judge_eval.py", tmp_path, "--base-url", server.base_url, "--judge-model", "fake-judge").stdout
        models = {r["model"] for r in server.requests}
        settings = {(r["max_tokens"], r["temperature"], r["top_logprobs"]) for r in server.requests}
    assert models == {"fake-judge"} and settings == {(1, 0, 20)}
    for condition in ("chat model", "with adapter"):
        assert re.search(rf"^{condition}\s+1\.00\s+\[1\.00, 1\.00\]\s+3\s+10\.0 / 90\.0", out, re.M), out
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["condition"] for r in rows} == {"chat model", "with adapter"}
    assert all(r["aligned"] == pytest.approx(10.0) and r["coherent_status"] == "ok" for r in rows)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["with adapter"]["rate"] == 1.0 and (tmp_path / "judge.sqlite").is_file()


@pytest.mark.slow
def test_judge_eval_local_judge(tmp_path: Path) -> None:
    out = run_example("judge_eval.py", tmp_path, "--local-judge", "--max-new-tokens", "4").stdout
    assert "LocalJudge(model='local:" in out
    assert re.search(r"^with adapter\s+\S+", out, re.M)
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all("aligned_status" in r and "coherent_status" in r for r in rows)


@pytest.mark.slow
def test_export_adapters(tmp_path: Path) -> None:
    out = run_example("export_adapters.py", tmp_path).stdout
    assert "'architecture': 'controlvector'" in out and "direction.15" in out
    assert re.search(r"llama-cli -m \S+\.gguf --control-vector \S+vec\.gguf", out)
    assert "PeftModel.from_pretrained(base" in out and "max abs ΔW error 0.0e+00" in out
    assert (tmp_path / "vec.gguf").is_file()
    assert {p.name for p in (tmp_path / "lora_peft").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    if "PEFT logits vs our hooks" in out:  # peft installed (a dev extra)
        diff = float(re.search(r"max abs difference (\S+)", out).group(1))
        assert diff < 1e-3
