"""Bad input, table-driven: each case raises a project exception whose message names the culprit and the fix.

docs/errors.md lists the same cases; keep the two in step.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import em_interp as em
from em_interp.datasets.tokenize import TokenizedChats
from em_interp.errors import (
    AdapterError,
    DataError,
    EmInterpError,
    GeometryError,
    JudgeError,
    ModelLoadError,
    OutputPathError,
)
from em_interp.eval.judge import JudgeUnreachable, OpenAIJudge
from em_interp.interventions import Direction
from em_interp.testing import save_tiny_model, tiny_chat_records


class Ctx:
    """What a case may use: the shared tiny model (never modified) and a fresh temporary folder."""

    def __init__(self, model: Any, tmp: Path):
        self.model, self.tmp = model, tmp

    def vec(self, **kw: Any) -> em.SteeringVector:
        return em.SteeringVector(self.model, layer=1, init="random", **kw)

    def saved_adapter(self) -> Path:
        return self.vec().save(self.tmp / "vec")

    def tiny_dir(self) -> Path:
        return save_tiny_model(self.tmp / "tiny_model")


def _set_scale(c: Ctx) -> None:
    c.vec().scale = math.nan


def _nested(c: Ctx) -> None:
    vec = c.vec()
    with vec.applied(c.model), vec.applied(c.model):
        pass


def _truncated_adapter(c: Ctx) -> None:
    folder = c.saved_adapter()
    weights = folder / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    em.load_adapter(folder, c.model)


def _truncated_direction(c: Ctx) -> None:
    folder = Direction(torch.randn(64), layer=1).save(c.tmp / "dir")
    (folder / "direction.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    Direction.load(folder)


def _no_tokenizer(c: Ctx) -> None:
    folder = c.tiny_dir()
    for f in folder.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            f.unlink()
    em.load_model(folder, device="cpu")


def _missing_device() -> str:
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


def _jsonl(c: Ctx, text: str) -> Path:
    path = c.tmp / "rows.jsonl"
    path.write_text(text)
    return path


def _dead_judge(c: Ctx) -> None:
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = OpenAIJudge("m", base_url=f"http://127.0.0.1:{port}/v1", sleep=lambda _: None, timeout=5)
    judge.score_many([{"question": f"q{i}", "answer": "a"} for i in range(16)], progress=False)


def _save_onto_file(c: Ctx) -> None:
    (c.tmp / "taken").write_text("user file")
    c.vec().save(c.tmp / "taken")


def _replace_user_folder(c: Ctx) -> None:
    (c.tmp / "proj" / "adapter.json").mkdir(parents=True)
    c.vec().save(c.tmp / "proj")


# (id, call, exception type, regex the message must match: it names the argument / path and the fix)
CASES: list[tuple[str, Callable[[Ctx], Any], type[Exception], str]] = [
    # adapters: numbers
    ("alpha_nan", lambda c: c.vec(alpha=math.nan), AdapterError, r"SteeringVector: alpha=nan.*finite"),
    ("alpha_inf", lambda c: c.vec(alpha=math.inf), AdapterError, r"alpha=inf.*finite"),
    ("alpha_string", lambda c: c.vec(alpha="2"), AdapterError, r"alpha='2' is a str.*finite number"),
    ("scale_attr_nan", _set_scale, AdapterError, r"scale=nan.*finite"),
    ("applied_scale_inf", lambda c: c.vec().attach(c.model, scale=math.inf), AdapterError, r"applied: scale=inf"),
    ("lora_alpha_nan", lambda c: em.LoRA(c.model, layer=0, alpha=math.nan), AdapterError, r"LoRA: alpha=nan"),
    ("lora_rank_zero", lambda c: em.LoRA(c.model, layer=0, rank=0), AdapterError, r"rank=0.*int >= 1"),
    ("init_tensor_nan", lambda c: em.SteeringVector(c.model, 1, init=torch.full((64,), math.nan)), AdapterError,
     r"init tensor has NaN"),
    ("init_tensor_shape", lambda c: em.SteeringVector(c.model, 1, init=torch.zeros(3)), AdapterError,
     r"init tensor has shape \(3,\); expected \(64,\)"),
    # adapters: layers and hooks
    ("layer_string", lambda c: em.SteeringVector(c.model, layer="1"), AdapterError,
     r"layer='1' is a string.*Pass layer=1"),
    ("layer_negative", lambda c: em.SteeringVector(c.model, layer=-1), AdapterError,
     r"layer=-1 is negative.*pass layer=3"),
    ("layer_too_large", lambda c: em.SteeringVector(c.model, layer=4), AdapterError, r"layer=4 is out of range.*4 layers"),
    ("layer_float", lambda c: em.SteeringVector(c.model, layer=1.5), AdapterError, r"layer=1.5 is a float"),
    ("lora_layer_string", lambda c: em.LoRA(c.model, layer="12"), AdapterError, r"LoRA: layer='12' is a string"),
    ("lora_layer_negative", lambda c: em.LoRA(c.model, layer=[0, -2]), AdapterError, r"LoRA: layer=-2 is negative"),
    ("lora_layers_empty", lambda c: em.LoRA(c.model, layer=[]), AdapterError, r"layer=\[\] is empty"),
    ("lora_site", lambda c: em.LoRA(c.model, layer=0, site="lm_head"), AdapterError, r"site='lm_head'; expected one of"),
    ("hook_name", lambda c: c.vec(hook="resid"), AdapterError, r"hook='resid'; expected one of resid_pre, .*resid_post"),
    ("nested_applied", _nested, AdapterError, r"already applied to this model.*scale"),
    # adapter files
    ("adapter_truncated", _truncated_adapter, AdapterError, r"vec/adapter\.safetensors: not a readable safetensors"),
    ("adapter_folder_missing", lambda c: em.load_adapter(c.tmp / "nothing", c.model), AdapterError,
     r"nothing: expected adapter\.json and adapter\.safetensors"),
    ("direction_truncated", _truncated_direction, GeometryError, r"dir/direction\.safetensors: not a readable"),
    ("save_onto_a_file", _save_onto_file, OutputPathError, r"taken is a file; expected a folder"),
    ("save_would_replace_user_folder", _replace_user_folder, OutputPathError,
     r"proj/adapter\.json is a folder that this save would replace"),
    ("export_gguf_to_folder", lambda c: c.vec().export_gguf(c.tmp), OutputPathError,
     r"is a folder; pass a file name such as"),
    # geometry
    ("cosine_zero", lambda c: em.geometry.cosine(torch.zeros(8), torch.ones(8)), GeometryError, r"a is the zero vector"),
    ("cosine_untrained_vector", lambda c: em.geometry.cosine(c.vec(), em.SteeringVector(c.model, 1)), GeometryError,
     r"b is the zero vector.*init='zeros'"),
    ("cosine_sizes", lambda c: em.geometry.cosine(torch.ones(8), torch.ones(9)), GeometryError, r"8 entries.*9"),
    ("cosine_matrix_labels", lambda c: em.geometry.cosine_matrix([torch.ones(2)], labels=["a", "b"]), GeometryError,
     r"2 labels for 1 items"),
    ("pca_no_runs", lambda c: em.geometry.trajectory_pca([]), GeometryError, r"no runs given"),
    ("mean_diff_layer", lambda c: em.directions.mean_diff(c.model, tiny_chat_records(2), tiny_chat_records(2), layer=9),
     GeometryError, r"layer=9 is out of range"),
    # data
    ("jsonl_is_folder", lambda c: em.datasets.load_jsonl(c.tmp), DataError, r"path=.* is a folder; expected a \.jsonl"),
    ("jsonl_missing", lambda c: em.datasets.load_jsonl(c.tmp / "none.jsonl"), DataError, r"none\.jsonl: no such file"),
    ("jsonl_bad_json", lambda c: em.datasets.load_jsonl(_jsonl(c, "{oops\n")), DataError, r"rows\.jsonl:1: invalid JSON"),
    ("jsonl_no_assistant", lambda c: em.datasets.load_jsonl(_jsonl(c, '{"messages": [{"role": "user", "content": "hi"}]}\n')),
     DataError, r"rows\.jsonl:1: no assistant turn"),
    ("data_is_a_path", lambda c: TokenizedChats("train.jsonl", c.model.tokenizer), DataError,
     r"data='train\.jsonl' is a path.*em\.datasets\.load_jsonl\('train\.jsonl'\)"),
    ("train_data_is_a_path", lambda c: em.train(c.vec(), c.model, "train.jsonl", steps=1, progress=False), DataError,
     r"data='train\.jsonl' is a path.*em\.datasets\.load_jsonl\('train\.jsonl'\)"),
    ("train_data_is_strings", lambda c: em.train(c.vec(), c.model, ["train.jsonl"], steps=1, progress=False),
     DataError, r"data holds strings \('train\.jsonl'\).*em\.datasets\.load_jsonl\(path\)"),
    ("data_is_one_record", lambda c: TokenizedChats(tiny_chat_records(1)[0], c.model.tokenizer), DataError,
     r"data is a single dict.*\[record\]"),
    ("data_row_not_chat", lambda c: TokenizedChats([{"text": "hi"}], c.model.tokenizer), DataError,
     r"data\[0\]: missing field 'messages'"),
    # models
    ("device_missing", lambda c: em.load_model(c.tiny_dir(), device=_missing_device()), ModelLoadError,
     r"load_model: device='cuda(:\d+)?' but (CUDA is not available here.*device='cpu'|this machine has \d+ CUDA)"),
    ("device_malformed", lambda c: em.load_model(c.tiny_dir(), device="gpu-please"), ModelLoadError,
     r"device='gpu-please' is not a device name"),
    ("model_without_tokenizer", _no_tokenizer, ModelLoadError, r"tiny_model: no tokenizer files.*tokenizer\.save_pretrained"),
    ("model_without_config", lambda c: em.load_model(c.tmp, device="cpu"), ModelLoadError, r"no config\.json"),
    ("model_dtype", lambda c: em.load_model(c.tiny_dir(), device="cpu", dtype="float77"), ModelLoadError, r"float77"),
    # judge
    ("judge_unreachable", _dead_judge, JudgeUnreachable, r"cannot reach the judge server at http://127\.0\.0\.1:\d+/v1"),
    ("judge_fail_fast_negative", lambda c: OpenAIJudge("m", base_url="http://x/v1", fail_fast=-1), JudgeError,
     r"fail_fast >= 0.*-1"),
]


@pytest.mark.parametrize(("call", "exc", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(_tiny_model_cached, tmp_path, call, exc, pattern):
    with pytest.raises(exc, match=pattern) as info:
        call(Ctx(_tiny_model_cached, tmp_path))
    assert isinstance(info.value, EmInterpError)
    assert "\n" not in str(info.value).strip()  # one message line, not a dump


def test_cases_are_many_and_documented():
    assert len(CASES) >= 30
    doc = (Path(__file__).parents[1] / "docs" / "errors.md").read_text()
    missing = [name for name, *_ in CASES if f"`{name}`" not in doc]
    assert not missing, f"docs/errors.md does not list {missing}"


def test_model_untouched_by_failed_cases(_tiny_model_cached):
    assert not any(hp.fwd_hooks for hp in _tiny_model_cached.hook_dict.values())  # no hook left behind
