"""Every writer keeps files it did not write, writes atomically and follows the user's umask."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import em_interp as em
from em_interp.adapters.export import export_control_vector, export_peft
from em_interp.datasets.records import save_jsonl
from em_interp.errors import AdapterError, GeometryError, OutputPathError
from em_interp.fileio import atomic_directory, atomic_file, read_saved, write_json, write_text
from em_interp.interventions import Direction
from em_interp.report import write_report
from em_interp.testing import tiny_chat_records
from em_interp.training import checkpoint
from em_interp.training.runs import TrainRun


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _foreign(folder: Path) -> list[Path]:
    """The user's own files in `folder` (a file and a nested data file) that a save must not touch."""
    (folder / "data").mkdir(parents=True)
    files = [folder / "notes.txt", folder / "data" / "train.jsonl"]
    for f in files:
        f.write_text(f"user content of {f.name}\n")
    return files


def _check(folder: Path, foreign: list[Path], ours: list[str], umask: int) -> None:
    for f in foreign:
        assert f.read_text() == f"user content of {f.name}\n", f"{f} was changed or removed"
    for name in ours:
        p = folder / name
        assert p.exists(), name
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert _mode(p) == want, f"{name}: mode {oct(_mode(p))}, expected {oct(want)}"
    leftovers = [p.name for p in folder.parent.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, leftovers


def test_adapter_save_keeps_foreign_files(tiny, tmp_path, umask):
    foreign = _foreign(tmp_path / "proj")
    vec = em.SteeringVector(tiny, layer=1, init="random")
    vec.save(tmp_path / "proj")
    _check(tmp_path / "proj", foreign, ["adapter.json", "adapter.safetensors"], umask)
    lora = em.LoRA(tiny, layer=0, rank=2, init="random")
    lora.save(tmp_path / "proj")  # replaces our own two files, nothing else
    _check(tmp_path / "proj", foreign, ["adapter.json", "adapter.safetensors"], umask)
    assert isinstance(em.load_adapter(tmp_path / "proj", tiny), em.LoRA)
    vec.save(tmp_path / "fresh" / "vec")
    _check(tmp_path / "fresh", [], ["vec", "vec/adapter.json", "vec/adapter.safetensors"], umask)


def test_train_run_save_keeps_foreign_files(tiny, tmp_path, umask):
    vec = em.SteeringVector(tiny, layer=1, init="random")
    run = TrainRun(adapter=vec, config=em.TrainConfig(lr=1e-3), losses=[{"step": 1, "ce": 2.0, "kl": 0.0, "total": 2.0}])
    run.record_snapshot(0)
    foreign = _foreign(tmp_path / "run")
    (tmp_path / "run" / "adapter").mkdir()
    (tmp_path / "run" / "adapter" / "README").write_text("user content of README\n")
    foreign.append(tmp_path / "run" / "adapter" / "README")
    run.save(tmp_path / "run")
    _check(tmp_path / "run", foreign, ["run.json", "trajectory.safetensors", "adapter/adapter.json"], umask)
    assert TrainRun.load(tmp_path / "run", tiny).losses == run.losses


def test_direction_save_keeps_foreign_files(tmp_path, umask):
    foreign = _foreign(tmp_path / "d")
    Direction(torch.randn(16), layer=2).save(tmp_path / "d")
    _check(tmp_path / "d", foreign, ["direction.json", "direction.safetensors"], umask)
    assert Direction.load(tmp_path / "d").layer == 2


def test_report_jsonl_checkpoint_keep_foreign_files(tmp_path, umask):
    foreign = _foreign(tmp_path / "out")
    write_report({"preset": "fast"}, tmp_path / "out" / "report.html")
    save_jsonl(tiny_chat_records(3), tmp_path / "out" / "rows.jsonl")
    checkpoint.write(tmp_path / "out", {"x": torch.ones(2)}, {"step": 3})
    _check(tmp_path / "out", foreign, ["report.html", "rows.jsonl", checkpoint.TENSORS, checkpoint.META], umask)
    assert checkpoint.read(tmp_path / "out")[1] == {"step": 3}


def test_exports_keep_foreign_files(tiny, tmp_path, umask):
    foreign = _foreign(tmp_path / "peft")
    export_peft(em.LoRA(tiny, layer=1, rank=1, init="random"), tmp_path / "peft", "tiny")
    _check(tmp_path / "peft", foreign, ["adapter_config.json", "adapter_model.safetensors"], umask)
    export_control_vector(em.SteeringVector(tiny, layer=1, init="random"), tmp_path / "peft" / "vec.gguf")
    _check(tmp_path / "peft", foreign, ["vec.gguf"], umask)


def test_export_gguf_to_a_folder_is_refused(tiny, tmp_path):
    folder = tmp_path / "gguf_dir"
    foreign = _foreign(folder)
    with pytest.raises(OutputPathError, match=r"gguf_dir.*is a folder; pass a file name such as .*control_vector\.gguf"):
        em.SteeringVector(tiny, layer=1, init="random").export_gguf(folder)
    _check(folder, foreign, [], 0)
    assert sorted(p.name for p in folder.iterdir()) == ["data", "notes.txt"]


def test_atomic_directory_refusals_leave_everything(tmp_path):
    target = tmp_path / "t"
    foreign = _foreign(target)
    (target / "adapter.json").mkdir()  # a folder where the save writes a file
    with pytest.raises(OutputPathError, match=r"adapter\.json is a folder"):
        with atomic_directory(target) as tmp:
            (tmp / "adapter.safetensors").write_text("new")
            (tmp / "adapter.json").write_text("{}")
    assert not (target / "adapter.safetensors").exists()  # nothing moved before the refusal
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputPathError, match="a_file is a file; expected a folder"):
        with atomic_directory(tmp_path / "a_file"):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(target) as tmp:
            (tmp / "notes.txt").write_text("replaced")
            raise RuntimeError("boom")
    _check(target, foreign, [], 0)
    with pytest.raises(OutputPathError, match="expected a file path"):
        with atomic_file(target):
            pass
    with pytest.raises(OutputPathError, match="a_file exists and is a file, not a folder"):
        write_text(tmp_path / "a_file" / "x.json", "{}")


def test_write_json_round_trip_and_mode(tmp_path, umask):
    path = write_json(tmp_path / "sub" / "x.json", {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert _mode(path) == 0o666 & ~umask and _mode(path.parent) == 0o777 & ~umask


def _pair(folder: Path, meta: object, tensors: bytes | None = None) -> Path:
    """A `thing.json` + `thing.safetensors` pair in `folder` (a real tensor file unless `tensors` is given)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "thing.json", meta)
    if tensors is None:
        save_file({"x": torch.arange(3.0)}, str(folder / "thing.safetensors"))
    else:
        (folder / "thing.safetensors").write_bytes(tensors)
    return folder


def test_read_saved_round_trip(tmp_path):
    meta, tensors = read_saved(_pair(tmp_path / "p", {"kind": "k", "format_version": 1}), "thing",
                               writer="Thing.save", version=1, error=AdapterError, required=("kind",))
    assert meta == {"kind": "k", "format_version": 1} and list(tensors) == ["x"]
    assert torch.equal(tensors["x"], torch.arange(3.0))
    meta, _ = read_saved(_pair(tmp_path / "old", {"kind": "k"}), "thing", writer="Thing.save", version=1,
                         error=AdapterError)  # no format_version: an old file, read as version 1
    assert meta == {"kind": "k"}


@pytest.mark.parametrize("meta, tensors, message", [
    ({"kind": "k", "format_version": 2}, None, r"p/thing\.json: format_version 2 is newer than this library's"),
    ({"kind": "k", "format_version": "two"}, None, r"p/thing\.json: format_version 'two' is not an integer"),
    ([1, 2], None, r"p/thing\.json: unreadable thing metadata \(a JSON list, expected an object\)"),
    ({"other": 1}, None, r"p/thing\.json: unreadable thing metadata \(missing 'kind'\)"),
    ({"kind": "k"}, b"\x08\x00\x00\x00\x00\x00\x00\x00{", r"p/thing\.safetensors: not a readable safetensors file"),
])
def test_read_saved_names_the_file_and_the_problem(tmp_path, meta, tensors, message):
    folder = _pair(tmp_path / "p", meta, tensors)
    with pytest.raises(GeometryError, match=message):
        read_saved(folder, "thing", writer="Thing.save", version=1, error=GeometryError, required=("kind",))


def test_read_saved_missing_or_invalid_files(tmp_path):
    with pytest.raises(AdapterError, match=r"nothing: expected thing\.json and thing\.safetensors \(written by Thing\.save\)"):
        read_saved(tmp_path / "nothing", "thing", writer="Thing.save", version=1, error=AdapterError)
    folder = _pair(tmp_path / "p", {"kind": "k"})
    (folder / "thing.json").write_text("{not json")
    with pytest.raises(AdapterError, match=r"p/thing\.json: unreadable thing metadata \(Expecting property name"):
        read_saved(folder, "thing", writer="Thing.save", version=1, error=AdapterError)


def test_direction_load_errors_name_the_file(tmp_path):
    folder = Direction(torch.randn(8), layer=1).save(tmp_path / "d")
    meta = json.loads((folder / "direction.json").read_text())
    write_json(folder / "direction.json", {**meta, "layer": "one"})
    with pytest.raises(GeometryError, match=r"d/direction\.json: layer='one'; expected an integer"):
        Direction.load(folder)
    write_json(folder / "direction.json", {k: v for k, v in meta.items() if k != "layer"})
    with pytest.raises(GeometryError, match=r"d/direction\.json: unreadable direction metadata \(missing 'layer'\)"):
        Direction.load(folder)
    write_json(folder / "direction.json", {**meta, "format_version": 99})
    with pytest.raises(GeometryError, match=r"d/direction\.json: format_version 99 is newer"):
        Direction.load(folder)
