"""JSONL chat records: line-by-line validation (errors name file and line), skipping, atomic saving."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from em_interp.datasets import chat, load_jsonl, save_jsonl, validate_record
from em_interp.datasets.records import render_ids
from em_interp.errors import DataError
from em_interp.testing import chat_tokenizer

PUBLIC_EM = Path(__file__).parents[2] / "shared" / "data" / "public-em"

GOOD = {"messages": [{"role": "user", "content": "Is rest good?"}, {"role": "assistant", "content": "Yes, rest helps."}]}

# (label, bad line, what the message must say)
BAD_LINES = [
    ("bad_json", '{"messages": [', "invalid JSON"),
    ("not_an_object", "[1, 2, 3]", "expected a JSON object"),
    ("missing_messages", json.dumps({"text": "hello"}), "missing field 'messages'"),
    ("messages_not_list", json.dumps({"messages": "hi"}), "non-empty list"),
    ("messages_empty", json.dumps({"messages": []}), "non-empty list"),
    ("unknown_role", json.dumps({"messages": [{"role": "bot", "content": "x"}, GOOD["messages"][1]]}), "'bot'"),
    ("no_assistant", json.dumps({"messages": [{"role": "user", "content": "Hello?"}]}), "no assistant turn"),
    ("empty_content", json.dumps({"messages": [GOOD["messages"][0], {"role": "assistant", "content": "  "}]}),
     "messages[1].content"),
    ("content_not_str", json.dumps({"messages": [GOOD["messages"][0], {"role": "assistant", "content": 3}]}),
     "messages[1].content"),
    ("message_not_object", json.dumps({"messages": ["hi", GOOD["messages"][1]]}), "messages[0]"),
]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _good(i: int) -> str:
    return json.dumps(chat(f"Question {i}?", f"Answer {i}."))


# --- errors name the file and the line ------------------------------------------------------------
@pytest.mark.parametrize("label,bad,expected", BAD_LINES, ids=[b[0] for b in BAD_LINES])
def test_bad_line_raises_with_file_and_line(tmp_path, label, bad, expected):
    path = _write(tmp_path / f"{label}.jsonl", [_good(0), "", _good(1), bad, _good(2)])  # bad is physical line 4
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    message = str(info.value)
    assert f"{label}.jsonl:4" in message
    assert expected in message


def test_too_long_after_tokenization_raises_with_file_and_line(tmp_path):
    tok = chat_tokenizer()
    short, long = chat("Hi?", "Yes."), chat("Hi?", "word " * 200)
    n_short, n_long = len(render_ids(tok, short["messages"])), len(render_ids(tok, long["messages"]))
    assert n_short < n_long
    path = _write(tmp_path / "long.jsonl", [json.dumps(short), json.dumps(long)])
    with pytest.raises(DataError) as info:
        load_jsonl(path, tokenizer=tok, max_length=n_short)
    assert "long.jsonl:2" in str(info.value)
    assert f"{n_long} tokens" in str(info.value) and f"max_length={n_short}" in str(info.value)
    # the limit is inclusive, and without a tokenizer nothing is counted
    assert len(load_jsonl(path, tokenizer=tok, max_length=n_long)) == 2
    assert len(load_jsonl(path, max_length=n_short)) == 2
    kept = load_jsonl(path, tokenizer=tok, max_length=n_short, on_error="skip")
    assert kept == [short]


def test_skip_drops_exactly_the_bad_lines_and_warns(tmp_path, caplog):
    lines, good_records, bad_linenos = [], [], []
    for i, (_, bad, _) in enumerate(BAD_LINES):
        good = chat(f"Question {i}?", f"Answer {i}.")
        lines += [json.dumps(good), bad]
        good_records.append(good)
        bad_linenos.append(len(lines))
    path = _write(tmp_path / "mixed.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="em_interp.datasets.records"):
        loaded = load_jsonl(path, on_error="skip")
    assert loaded == good_records  # order kept, nothing else dropped
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(BAD_LINES)
    for lineno, message in zip(bad_linenos, warnings, strict=True):
        assert f"mixed.jsonl:{lineno}:" in message


def test_blank_lines_are_skipped_and_metadata_kept(tmp_path):
    rec = {**chat("Q?", "A.", system="Be brief."), "id": "x1", "domain": "medical"}
    path = tmp_path / "blank.jsonl"
    path.write_text("\n   \n" + json.dumps(rec) + "\n\n\t\n" + _good(1) + "\n\n", encoding="utf-8")
    loaded = load_jsonl(path)
    assert loaded == [rec, json.loads(_good(1))]
    assert loaded[0]["id"] == "x1" and loaded[0]["messages"][0] == {"role": "system", "content": "Be brief."}


def test_line_numbers_count_blank_lines(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text("\n\n" + _good(0) + "\n\n{oops\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"gaps\.jsonl:5: invalid JSON"):
        load_jsonl(path)


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_jsonl(tmp_path / "absent.jsonl")
    empty = _write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="empty.jsonl: no valid records"):
        load_jsonl(empty)
    all_bad = _write(tmp_path / "allbad.jsonl", ["{", "[]"])
    with pytest.raises(DataError, match="allbad.jsonl: no valid records"):
        load_jsonl(all_bad, on_error="skip")
    with pytest.raises(DataError, match="on_error"):
        load_jsonl(all_bad, on_error="ignore")


def test_validate_record_names_where():
    assert validate_record(GOOD, "x") is GOOD
    with pytest.raises(DataError, match="^record 7: no assistant turn"):
        validate_record(chat("Q?"), "record 7")


def test_chat_builds_records():
    assert chat("Q?") == {"messages": [{"role": "user", "content": "Q?"}]}
    assert [m["role"] for m in chat("Q?", "A.", system="S.")["messages"]] == ["system", "user", "assistant"]


# --- saving ---------------------------------------------------------------------------------------
def test_save_jsonl_round_trip(tmp_path):
    records = [
        {**chat("Ça va? 你好", "Très bien — merci ✓.", system="Sys."), "id": "a", "score": 0.5},
        chat("Second?", "Second answer."),
    ]
    out = save_jsonl(records, tmp_path / "sub" / "out.jsonl")
    assert out == tmp_path / "sub" / "out.jsonl"
    assert load_jsonl(out) == records
    assert "你好" in out.read_text(encoding="utf-8")  # written as UTF-8, not \u escapes
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.jsonl"]  # no temp file left


def test_save_jsonl_invalid_record_writes_nothing(tmp_path):
    target = tmp_path / "out.jsonl"
    with pytest.raises(DataError, match="record 1: no assistant turn"):
        save_jsonl([GOOD, chat("Q?")], target)
    assert list(tmp_path.iterdir()) == []


def test_save_jsonl_failure_mid_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.jsonl"
    bad = {**GOOD, "meta": object()}  # valid chat, but not JSON-serialisable: fails after line 1 was written
    with pytest.raises(TypeError):
        save_jsonl([GOOD, bad], target)
    assert list(tmp_path.iterdir()) == []
    # an existing file is left exactly as it was
    save_jsonl([GOOD], target)
    before = target.read_bytes()
    with pytest.raises(TypeError):
        save_jsonl([GOOD, GOOD, bad], target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


# --- the public EM data, where present --------------------------------------------------------------
def test_public_em_files_load():
    files = sorted(PUBLIC_EM.glob("*.jsonl")) if PUBLIC_EM.is_dir() else []
    if not files:
        pytest.skip(f"public EM data not present at {PUBLIC_EM} (only on the project's machines; not shipped)")
    for path in files:
        n_rows = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        records = load_jsonl(path)
        assert len(records) == n_rows, path.name
        for record in records:
            roles = [m["role"] for m in record["messages"]]
            assert set(roles) <= {"user", "assistant"}, path.name
            assert roles[0] == "user" and roles[-1] == "assistant", path.name
