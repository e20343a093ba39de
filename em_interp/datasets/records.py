"""Chat records in the JSONL format of the public EM datasets, with line-by-line validation.

A record is a dict `{"messages": [{"role": ..., "content": ...}, ...], ...}`; extra keys (e.g. `domain`,
`id`) are kept as metadata. Every problem is reported with the file and line it came from.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from em_interp.errors import DataError
from em_interp.fileio import write_text

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
Record = dict[str, Any]


def validate_record(record: Any, where: str) -> Record:
    """Check one chat record and return it; raise `DataError` naming `where` (e.g. "file.jsonl:12")."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with a 'messages' list, got {type(record).__name__}.")
    messages = record.get("messages")
    if messages is None:
        raise DataError(f"{where}: missing field 'messages' (expected a list of {{role, content}} objects).")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list.")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'.")
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: messages[{i}].role is {role!r}; expected one of {', '.join(ROLES)}.")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{where}: messages[{i}].content ({role}) is empty or not a string.")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn; a training record needs at least one.")
    return record


def check_records(records: Any, name: str = "data") -> list[Record]:
    """`records` as a list of validated chat records; `DataError` naming `name` for anything else.

    Catches the common slips: a file path (`data="train.jsonl"`; load it with `em.datasets.load_jsonl`),
    a single record instead of a list, or rows that are not chat records (message names `name[i]`).
    """
    if isinstance(records, (str, bytes, os.PathLike)):
        raise DataError(f"{name}={str(records)!r} is a path, not records; load it first: "
                        f"{name}=em.datasets.load_jsonl({str(records)!r}).")
    if isinstance(records, Mapping):
        raise DataError(f"{name} is a single dict; expected a list of chat records (wrap it: [record]).")
    try:
        rows = list(records)
    except TypeError:
        raise DataError(f"{name} is a {type(records).__name__}; expected a list of chat records.") from None
    if rows and all(isinstance(r, str) for r in rows):  # e.g. a path that was split into characters by list()
        text = "".join(rows) if all(len(r) == 1 for r in rows) else rows[0]
        raise DataError(f"{name} holds strings ({text[:60]!r}), not chat records; for a JSONL file pass "
                        f"{name}=em.datasets.load_jsonl(path), for question/answer text em.datasets.chat(q, a).")
    for i, record in enumerate(rows):
        validate_record(record, f"{name}[{i}]")
    return rows


def load_jsonl(
    path: str | os.PathLike[str],
    *,
    on_error: str = "raise",
    tokenizer: Any = None,
    max_length: int | None = None,
) -> list[Record]:
    """Read and validate a JSONL file of chat records.

    Args:
        path: the file (one JSON object per line; blank lines are skipped).
        on_error: "raise" (default) or "skip" (log a warning naming file and line, drop the line).
        tokenizer: with `max_length`, also reject examples longer than `max_length` tokens after the
            chat template is applied.
        max_length: the token limit checked when a tokenizer is given.

    Returns:
        The list of valid records, in file order.

    Raises:
        DataError: naming the file, line and problem (bad JSON, missing `messages`, unknown role,
            no assistant turn, empty content, too long).

    >>> load_jsonl("bad_medical_advice.jsonl")[0]["messages"][0]["role"]  # doctest: +SKIP
    'user'
    """
    if on_error not in ("raise", "skip"):
        raise DataError(f"on_error={on_error!r}; expected 'raise' or 'skip'.")
    path = Path(path)
    if path.is_dir():
        jsonl = sorted(p.name for p in path.glob("*.jsonl"))[:5]
        hint = f" It holds {', '.join(jsonl)}; pass one of them." if jsonl else ""
        raise DataError(f"load_jsonl: path={str(path)!r} is a folder; expected a .jsonl file.{hint}")
    if not path.is_file():
        raise DataError(f"{path}: no such file.")
    records: list[Record] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno}).") from None
                record = validate_record(obj, where)
                if tokenizer is not None and max_length is not None:
                    n = len(render_ids(tokenizer, record["messages"]))
                    if n > max_length:
                        raise DataError(f"{where}: example is {n} tokens after the chat template; max_length={max_length}.")
            except DataError as exc:
                if on_error == "raise":
                    raise
                log.warning("skipping %s", exc)
                continue
            records.append(record)
    if not records:
        raise DataError(f"{path}: no valid records.")
    return records


def render_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` rendered with the tokenizer's chat template."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def save_jsonl(records: Iterable[Record], path: str | os.PathLike[str]) -> Path:
    """Validate and write records atomically (temp file, then rename); returns the path."""
    path = Path(path)
    records = list(records)
    for i, record in enumerate(records):
        validate_record(record, f"record {i}")
    write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return path


def chat(question: str, answer: str | None = None, system: str | None = None) -> Record:
    """Build a chat record from a question (and answer, and optional system prompt)."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": question})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}
