"""The `em-interp` command: train from TOML, config errors (exit 2), report re-rendering, demo plumbing."""

from __future__ import annotations

import json
import textwrap

import pytest
from study_results import synthetic_results

from em_interp import TrainRun
from em_interp.cli.command import load_train_config, main
from em_interp.config import AdapterConfig, TrainConfig
from em_interp.datasets import save_jsonl
from em_interp.testing import save_tiny_model, tiny_chat_records

GOOD = """
[model]
name = "tiny"
device = "cpu"
dtype = "float32"

[adapter]
kind = "steering"
layer = 1
hook = "resid_post"
alpha = 4.0

[data]
train = { domains = ["medical"], kind = "bad", split = "train", limit = 4 }
kl = { domains = ["finance"], kind = "mixed", split = "train", limit = 4 }

[train]
lr = 1e-2
epochs = 1
batch_size = 2
kl_batch_size = 2
kl_coef = 1.0
record_every = 1
warmup_steps = 0
progress = false
out = "run"
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def write_config(folder, text: str, tiny_dir=None):
    if tiny_dir is not None:
        text = text.replace('name = "tiny"', f'name = "{tiny_dir}"')
    path = folder / "config.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_train_steering_from_toml(tmp_path, tiny_dir, capsys):
    cfg = write_config(tmp_path, GOOD, tiny_dir)
    assert main(["train", str(cfg)]) == 0
    run_dir = tmp_path / "run"
    assert (run_dir / "run.json").is_file() and (run_dir / "adapter").is_dir()
    assert (run_dir / "trajectory.safetensors").is_file() and (run_dir / "config.toml").read_text() == cfg.read_text()
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["config"]["kl_coef"] == 1.0 and meta["config"]["lr"] == 1e-2 and meta["config"]["batch_size"] == 2
    assert meta["adapter"]["config"]["layer"] == 1
    run = TrainRun.load(run_dir)
    assert len(run.losses) == 2 and all(r["kl"] is not None for r in run.losses)
    assert str(run_dir) in capsys.readouterr().out


def test_train_lora_from_jsonl(tmp_path, tiny_dir):
    save_jsonl(tiny_chat_records(6), tmp_path / "chats.jsonl")
    cfg = write_config(tmp_path, f"""
        [model]
        name = "{tiny_dir}"
        device = "cpu"
        [adapter]
        kind = "lora"
        layer = [1, 2]
        site = "mlp_out"
        rank = 2
        alpha = 4
        [data]
        train = "chats.jsonl"
        [train]
        steps = 2
        batch_size = 3
        progress = false
        out = "lora_run"
    """)
    assert main(["train", str(cfg)]) == 0
    meta = json.loads((tmp_path / "lora_run" / "run.json").read_text())
    assert meta["adapter"]["config"]["rank"] == 2 and len(meta["losses"]) == 2


BAD = [
    ("[wat]\nx = 1\n", "unknown section 'wat'"),
    ("[adapter]\nkind = 'steering'\nlayr = 1\n", "did you mean 'layer'"),
    ("[adapter]\nkind = 'lora'\nlayer = 1\nrnak = 2\n", "unknown key 'rnak' (did you mean 'rank'?)"),
    ("[adapter]\nkind = 'vector'\nlayer = 1\n", "expected \"steering\" or \"lora\""),
    ("[adapter]\nkind = 'steering'\n[data]\ntrain = 'x.jsonl'\n[train]\nout = 'r'\n", "missing the required key 'layer'"),
    ("[adapter]\nlayer = 1\n[data]\ntrain = { domains = 'medical' }\n", "[train] is missing the required key 'out'"),
    ("[adapter]\nlayer = 1\n", "[data] is missing the required key 'train'"),
    ("[adapter]\nlayer = 1\n[data]\ntrain = { domains = 'medical' }\n[train]\nout = 'r'\nlr = 'fast'\n",
     "[train] lr = 'fast' is a str; expected"),
    ("[adapter]\nlayer = 1\n[data]\ntrain = { domains = 'medical' }\n[train]\nout = 'r'\nepochs = 1.5\n",
     "epochs = 1.5 is a float; expected int"),
    ("[adapter]\nlayer = 1\n[data]\ntrain = { domains = 'medical' }\n[train]\nout = 'r'\nkl_coef = 2.0\n",
     "needs KL data"),
    ("[adapter]\nlayer = 1\n[data]\ntrain = { domains = 'medical' }\nkl = { domains = 'finance' }\n[train]\nout = 'r'\n",
     "[data] has `kl` but [train] kl_coef is 0"),
    ("[adapter]\nkind = 'steering'\nlayer = [1, 2]\n[data]\ntrain = 'x.jsonl'\n[train]\nout = 'r'\n",
     "a steering vector has one layer"),
    ("[adapter]\nlayer = 1\n[data]\ntrain = { domains = 'medical' }\n[train]\nout = 'r'\nprogress = 'yes'\n",
     "[train] progress = 'yes' is a str; expected bool"),
    ("[adapter]\nlayer = 1\n[data]\ntrain = { domains = 'medical' }\n[train]\nout = 'r'\nepochs = 0\n",
     "epochs=0"),
    ("[adapter]\nlayer = 1\n[data]\ntrain = { domain = 'medical' }\n[train]\nout = 'r'\n",
     "[data] train: unknown key 'domain' (did you mean 'domains'?)"),
    ("[adapter]\nlayer = 1\n[data]\ntrain = 'missing.jsonl'\n[train]\nout = 'r'\n", "no such JSONL file"),
    ("[adapter]\nlayer = 1\n[data]\ntrain = { kind = 'awful' }\n[train]\nout = 'r'\n", "kind='awful'"),
    ("[adapter\nlayer = 1\n", "invalid TOML"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_config_exits_2_with_a_message(tmp_path, capsys, text, message, monkeypatch):
    import em_interp

    def no_model(*a, **k):
        raise AssertionError("config and data errors must be found before a model is loaded")

    monkeypatch.setattr(em_interp, "load_model", no_model)
    cfg = write_config(tmp_path, text)
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert str(cfg) in err
    assert not (tmp_path / "r").exists()


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.toml")]) == 2
    assert "no such config file" in capsys.readouterr().err


def test_site_alias_and_relative_paths(tmp_path):
    cfg = write_config(tmp_path, "[adapter]\nlayer = 3\nsite = 'mlp_out'\n[data]\ntrain = { domains = 'medical' }\n"
                                 "[train]\nout = 'runs/x'\n")
    spec = load_train_config(cfg)
    assert spec.adapter == AdapterConfig(layer=3, hook="mlp_out") and spec.out == tmp_path / "runs" / "x"
    assert spec.kl is None and spec.train == TrainConfig()


def test_report_rerenders(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps(synthetic_results()))
    assert main(["report", str(tmp_path)]) == 0
    html = (tmp_path / "report.html").read_text()
    assert 'id="fig-efficiency"' in html and ">REFUTED</div>" in html
    assert str(tmp_path / "report.html") in capsys.readouterr().out
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "other.html")]) == 0
    assert (tmp_path / "other.html").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "results.json" in capsys.readouterr().err


def test_demo_prints_report_and_verdicts(tmp_path, capsys, monkeypatch):
    import em_interp.study

    seen = {}

    def fake_run_study(out, *, fast=False, device=None, lora=False, seeds=None, **kw):
        seen.update(out=out, fast=fast, device=device, lora=lora, seeds=seeds, record=kw.get("record"),
                    overrides={k for k in kw if k not in ("record", "dtype", "command")})
        return synthetic_results()

    monkeypatch.setattr(em_interp.study, "run_study", fake_run_study)
    monkeypatch.chdir(tmp_path)  # not a checkout: no default record
    assert main(["demo", "--out", str(tmp_path / "d"), "--fast", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert seen == {"out": str(tmp_path / "d"), "fast": True, "device": "cpu", "lora": False, "seeds": None,
                    "record": None, "overrides": set()}
    assert "report.html" in out and "REFUTED" in out and "UNCLEAR" in out and "total time: 14.0 s" in out
    assert "interval [+0.09, +0.13]" in out and "gate: passed" in out
    assert "medical@1                    narrow/general 0.800, 95% over seeds [0.610, 0.930]" in out
    assert "held-out domains)@2" not in out  # no ratio, no interval: nothing to print
    record = tmp_path / "study.jsonl"
    assert main(["demo", "--out", str(tmp_path / "e"), "--seeds", "8", "--record", str(record)]) == 0
    assert seen["seeds"] == 8 and seen["record"] == str(record)
    assert "kl_coef" not in seen["overrides"]  # the preset's λ unless given


def test_demo_passes_study_settings(tmp_path, monkeypatch):
    import em_interp.study

    seen = {}

    def fake_run_study(out, **kw):
        seen.update(kw)
        return synthetic_results()

    monkeypatch.setattr(em_interp.study, "run_study", fake_run_study)
    monkeypatch.chdir(tmp_path)
    argv = ["demo", "--out", str(tmp_path / "d"), "--fast", "--adapter", "lora", "--kl-coef", "18", "--lora-rank", "2",
            "--kl-tokens", "all", "--layer", "12", "--kl-batch-size", "32", "--seed", "16", "--reversion-steps", "26"]
    assert main(argv) == 0
    assert (seen["adapter"], seen["kl_coef"], seen["lora_rank"], seen["kl_tokens"], seen["layer"]) == ("lora", 18.0, 2, "all", 12)
    assert (seen["kl_batch_size"], seen["seed"], seen["reversion_steps"]) == (32, 16, 26)
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--kl-tokens", "prompt"])
    assert exc.value.code == 2


def test_no_command_and_bad_arguments(capsys):
    assert main([]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["report", "x", "--bogus"])
    assert exc.value.code == 2


def test_bench_passes_arguments(capsys):
    assert main(["bench", "--help"]) == 0
    assert "--device" in capsys.readouterr().out


def test_documented_example_config_is_valid(tmp_path):
    import em_interp.cli.command

    example = em_interp.cli.command.__doc__.split("A `train` config", 1)[1].split("\n\n", 1)[1].split("\n\nErrors")[0]
    spec = load_train_config(write_config(tmp_path, example))
    assert spec.adapter.to_dict() == {"kind": "steering", "layer": 15, "hook": "mlp_out", "alpha": 256}
    assert spec.train == TrainConfig(lr=5e-4, epochs=2, kl_coef=1.0) and spec.kl.limit == 200
