"""Typed configs: round trips through plain dicts, key and type checks naming the culprit, no cli<->sweep cycle."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys

import pytest

import em_interp as em
from em_interp.config import AdapterConfig, DataSpec, ModelConfig, TrainConfig
from em_interp.errors import ConfigError


@pytest.mark.parametrize("config", [
    TrainConfig(),
    TrainConfig(lr=1e-3, epochs=3, steps=7, kl_coef=2.5, warmup_steps=0, schedule="cosine", seed=4, max_length=64,
                kl_reduction="token_vocab_mean", method="toggle"),
    ModelConfig(),
    ModelConfig(name="Qwen/Qwen2.5-0.5B-Instruct", device="cpu", dtype="bfloat16", device_map={"": 0}),
    AdapterConfig(layer=3),
    AdapterConfig(layer=2, hook="mlp_out", alpha=4.0, init="random", seed=1),
    AdapterConfig(layer=(1, 2), kind="lora", rank=2, site=("mlp_out", "attn_out"), alpha=8, rslora=True),
    DataSpec(domains=("medical", "legal"), kind="mixed", split="test", seed=3, limit=10),
])
def test_from_dict_of_to_dict_is_identity(config):
    plain = config.to_dict()
    assert type(config).from_dict(plain) == config
    assert all(not isinstance(v, tuple) for v in plain.values())  # plain TOML/JSON values


def test_train_config_from_dict_fills_defaults_and_rejects_bad_values():
    assert TrainConfig.from_dict({"lr": 1}) == TrainConfig(lr=1.0)
    with pytest.raises(ConfigError, match=r"unknown key 'kl_coeff' \(did you mean 'kl_coef'\?\)"):
        TrainConfig.from_dict({"kl_coeff": 1.0})
    with pytest.raises(ConfigError, match="epochs = '2' is a str; expected int"):
        TrainConfig.from_dict({"epochs": "2"})
    with pytest.raises(ConfigError, match="steps = True is a bool; expected int"):
        TrainConfig.from_dict({"steps": True})
    with pytest.raises(ConfigError, match="max_length=1"):
        TrainConfig.from_dict({"max_length": 1})


def test_adapter_config_checks_keys_of_its_kind():
    assert AdapterConfig.from_dict({"layer": 1, "site": "mlp_out"}) == AdapterConfig(layer=1, hook="mlp_out")
    with pytest.raises(ConfigError, match=r"\(kind='steering'\) unknown key 'rank'"):
        AdapterConfig.from_dict({"layer": 1, "rank": 2})
    with pytest.raises(ConfigError, match="does not take rank"):
        AdapterConfig(layer=1, rank=2)
    with pytest.raises(ConfigError, match="missing the required key 'layer'"):
        AdapterConfig.from_dict({"kind": "lora"})
    with pytest.raises(ConfigError, match="layer = 'x' is a str; expected int or a list of int"):
        AdapterConfig.from_dict({"kind": "lora", "layer": "x"})


def test_adapter_and_data_configs_build_what_they_say(tiny):
    lora = AdapterConfig(layer=(1, 2), kind="lora", rank=2).build(tiny, seed=5)
    assert isinstance(lora, em.LoRA) and lora.layers == [1, 2] and lora.rank == 2
    vec = AdapterConfig(layer=2, hook="mlp_out", alpha=3.0).build(tiny)
    assert isinstance(vec, em.SteeringVector) and vec.config() == {"layer": 2, "hook": "mlp_out", "alpha": 3.0}
    rows = DataSpec(domains=("medical",), kind="bad", limit=3).load()
    assert rows == em.datasets.load(["medical"], kind="bad")[:3]
    with pytest.raises(ConfigError, match="a JSONL path takes only `limit`; remove kind"):
        DataSpec(path="x.jsonl", kind="bad")


def test_train_signature_lists_every_setting_with_the_config_defaults():
    params = inspect.signature(em.train).parameters
    for f in dataclasses.fields(TrainConfig):
        assert f.name in params, f.name
        assert params[f.name].default == f.default, f.name
        assert params[f.name].kind is inspect.Parameter.KEYWORD_ONLY
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    doc = em.train.__doc__ or ""
    for name in [f.name for f in dataclasses.fields(TrainConfig)] + ["kl_data", "checkpoint_dir", "cache"]:
        assert f"        {name}: " in doc, name  # a Google-style "Args:" entry


def test_sweep_and_config_do_not_import_the_cli():
    import em_interp.cli.sweep
    import em_interp.config

    for module in (em_interp.cli.sweep, em_interp.config):
        source = inspect.getsource(module)
        assert not any(s in source for s in ("from em_interp.cli.command", "import em_interp.cli.command",
                                             "from em_interp.cli import main"))
    code = ("import sys, em_interp.cli.sweep; "
            "assert 'em_interp.cli.command' not in sys.modules, 'sweep imported the em-interp command'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
