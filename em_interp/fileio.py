"""Atomic, non-destructive writes (each file appears whole or not at all, and nothing we did not write is removed),
and the matching read of a saved `.json` + `.safetensors` pair.

Every writer in em_interp goes through these helpers:

- `atomic_file(path)`: yields a temporary path beside `path`; on success it is renamed onto `path`.
- `write_text(path, text)` / `write_json(path, obj)`: `atomic_file` for text.
- `atomic_directory(directory)`: yields a fresh temporary folder; on success its entries are moved into
  `directory` (created if missing). Files already in `directory` under other names are kept: saving an
  adapter into a folder holding `data/train.jsonl` leaves that file alone and only (re)places
  `adapter.json` and `adapter.safetensors`.

`read_saved(folder, stem, ...)` reads back what `Direction.save` and `Adapter.save` write: it checks that
`stem.json` and `stem.safetensors` exist, parses the metadata, refuses a newer `format_version` and reads the
tensors (safetensors, never pickle), raising the caller's error class with the file and the problem named.

Files and folders get the user's umask (0644 / 0755 by default), not the 0600 / 0700 of `tempfile`
or of writers such as safetensors' `save_file`. On error the temporary file or folder is removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from em_interp.errors import EmInterpError, OutputPathError

if TYPE_CHECKING:
    from torch import Tensor

_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process umask (read from /proc where possible, so it is never changed even briefly)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:
        old = os.umask(0o022)
        os.umask(old)
    return old


def _set_modes(root: Path) -> None:
    """Give `root` and everything under it the modes a plain create would: 0666/0777 masked by the umask."""
    mask = umask()
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for p in paths:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _tmp_name(folder: Path, name: str) -> Path:
    return folder / f".{name}.{secrets.token_hex(4)}.tmp"


def _parent_dir(path: Path) -> None:
    """Create `path`'s parent folders (umask permissions) or say which component is not a folder."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            raise OutputPathError(f"cannot write {path}: {parent} exists and is a file, not a folder.")
    path.parent.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder (an empty file, umask permissions); on success rename it onto `path`.

    Raises:
        OutputPathError: `path` is an existing folder (name a file inside it instead).

    >>> with atomic_file("out/vec.gguf") as tmp:  # doctest: +SKIP
    ...     writer = gguf.GGUFWriter(str(tmp), "controlvector")
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{path} is a folder; expected a file path (e.g. {path / 'out'}{path.suffix or ''}).")
    _parent_dir(path)
    tmp = _tmp_name(path.parent, path.name)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # reserve the name
    try:
        yield tmp
        _set_modes(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_json(path: str | os.PathLike[str], obj: Any, **kwargs: Any) -> Path:
    """Write `json.dumps(obj, **kwargs)` to `path` atomically (indent=1 unless given); returns the path."""
    kwargs.setdefault("indent", 1)
    return write_text(path, json.dumps(obj, **kwargs))


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `directory`; on success move its entries into `directory`.

    If `directory` does not exist the temporary folder is renamed onto it (one atomic step). If it
    exists, each entry written is moved in by name, replacing only an entry of that name (a sub-folder
    we wrote is merged the same way); every other file in `directory` is kept. Metadata (`.json`) files
    are moved last, so a reader never sees new metadata beside old tensors.

    Raises:
        OutputPathError: `directory` exists and is a file.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputPathError(f"{directory} is a file; expected a folder to save into (e.g. {directory.with_suffix('')}_dir).")
    _parent_dir(directory)
    tmp = _tmp_name(directory.parent, directory.name)
    tmp.mkdir()
    try:
        yield tmp
        _set_modes(tmp)
        if directory.exists():
            _check_merge(tmp, directory)
            _merge(tmp, directory)
        else:
            os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_merge(src: Path, dst: Path) -> None:
    """Refuse (before moving anything) where a file we wrote would replace a folder or the reverse."""
    for entry in src.iterdir():
        target = dst / entry.name
        if not target.exists():
            continue
        if entry.is_dir() != target.is_dir():
            kind = "folder" if target.is_dir() else "file"
            raise OutputPathError(f"cannot save into {dst}: {target} is a {kind} that this save would replace; "
                                  "move it away or save into another folder.")
        if entry.is_dir():
            _check_merge(entry, target)


def _merge(src: Path, dst: Path) -> None:
    """Move `src`'s entries into the existing folder `dst`, replacing same-named entries only (.json last)."""
    for entry in sorted(src.iterdir(), key=lambda p: (p.suffix == ".json", p.name)):
        target = dst / entry.name
        if entry.is_dir() and target.is_dir():
            _merge(entry, target)
        else:
            os.replace(entry, target)


def read_saved(
    folder: str | os.PathLike[str],
    stem: str,
    *,
    writer: str,
    version: int,
    error: type[EmInterpError],
    required: tuple[str, ...] = (),
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read `folder/stem.json` (metadata) and `folder/stem.safetensors` (tensors) as written by `writer`.

    Args:
        folder: the folder `writer` saved into.
        stem: the file names' stem, e.g. "adapter" for `adapter.json` + `adapter.safetensors`.
        writer: what writes this pair, named in the error when a file is missing (e.g. "Adapter.save").
        version: the newest `format_version` this library reads (a file without one counts as 1).
        error: the exception class to raise (e.g. `AdapterError`).
        required: metadata keys that must be present.

    Returns:
        The metadata (a dict) and the tensors by name (CPU).

    Raises:
        EmInterpError: (as `error`) a file is missing, the metadata is not a JSON object with the `required`
            keys and a `format_version` (an integer) of at most `version`, or the tensors are not a readable
            safetensors file; the message names the file.
    """
    from safetensors.torch import load_file  # here, so the writers above do not import torch

    folder = Path(folder)
    meta_path, tensor_path = folder / f"{stem}.json", folder / f"{stem}.safetensors"
    if not meta_path.is_file() or not tensor_path.is_file():
        raise error(f"{folder}: expected {meta_path.name} and {tensor_path.name} (written by {writer}).")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:  # invalid JSON or UTF-8
        raise error(f"{meta_path}: unreadable {stem} metadata ({exc}).") from None
    if not isinstance(meta, dict):
        raise error(f"{meta_path}: unreadable {stem} metadata (a JSON {type(meta).__name__}, expected an object).")
    missing = [key for key in required if key not in meta]
    if missing:
        raise error(f"{meta_path}: unreadable {stem} metadata (missing {', '.join(map(repr, missing))}).")
    try:
        found = int(meta.get("format_version", 1))
    except (TypeError, ValueError):
        raise error(f"{meta_path}: format_version {meta['format_version']!r} is not an integer.") from None
    if found > version:
        raise error(f"{meta_path}: format_version {meta['format_version']} is newer than this library's.")
    try:
        tensors = load_file(str(tensor_path))
    except Exception as exc:  # safetensors raises its own SafetensorError on truncated or corrupt files
        raise error(
            f"{tensor_path}: not a readable safetensors file ({exc}); it may be truncated — save the {stem} again."
        ) from None
    return meta, tensors


__all__ = ["atomic_directory", "atomic_file", "read_saved", "umask", "write_json", "write_text"]
