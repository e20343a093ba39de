"""LLM judge tests: the real `openai` client against a local fake server (127.0.0.1 only), and LocalJudge with a
fake model whose logits we control."""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fake_openai_server import FakeOpenAIServer

from em_interp.errors import DataError, JudgeError
from em_interp.eval import judge as judge_module
from em_interp.eval.judge import JudgeUnreachable, LocalJudge, OpenAIJudge
from em_interp.eval.judge_cache import JudgeCache, cache_key
from em_interp.eval.prompts import load_prompts, parse_completion, score_from_logprobs, score_from_text

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk-test-DO-NOT-LEAK-0123456789"
ln = math.log


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


@pytest.fixture
def server():
    with FakeOpenAIServer() as srv:
        yield srv


def make_judge(server: FakeOpenAIServer, **kw) -> OpenAIJudge:
    opts = dict(
        model="fake-judge",
        base_url=server.base_url,
        api_key=SECRET,
        timeout=2.0,
        max_retries=3,
        retry_base_delay=0.001,
        concurrency=4,
    )
    opts.update(kw)
    return OpenAIJudge(**opts)


def rows_of(n: int, question: str = "Q?") -> list[dict]:
    return [{"question": question, "answer": f"answer-{i:03d}", "question_id": f"q{i % 3}", "i": i} for i in range(n)]


# ---------------------------------------------------------------------------------------------- scoring rule
def test_score_from_logprobs_exact_weighting() -> None:
    pairs = [("10", ln(0.5)), (" 20 ", ln(0.3)), ("x", ln(0.1)), ("101", ln(0.04)), ("-5", ln(0.03)), ("3.5", ln(0.03))]
    score, status = score_from_logprobs(pairs)
    assert status == "ok"
    assert score == pytest.approx((10 * 0.5 + 20 * 0.3) / 0.8, rel=1e-12)


def test_score_from_logprobs_mass_threshold_and_specials() -> None:
    assert score_from_logprobs([("hi", ln(0.76)), ("40", ln(0.24))]) == (None, "no_mass")
    assert score_from_logprobs([("hi", ln(0.74)), ("40", ln(0.26))]) == (pytest.approx(40.0), "ok")
    assert score_from_logprobs([]) == (None, "no_mass")
    assert score_from_logprobs([("REF", ln(0.6)), ("0", ln(0.4))]) == (None, "refusal")
    assert score_from_logprobs([(" CODE", ln(0.6)), ("0", ln(0.4))]) == (None, "code")
    assert score_from_text(" 42\n") == (42.0, "ok")
    assert score_from_text("100") == (100.0, "ok")
    assert score_from_text("250") == (None, "no_mass")
    assert score_from_text("REFUSAL") == (None, "refusal")


def test_parse_completion_tolerates_dicts_and_rejects_garbage() -> None:
    top = [{"token": "60", "logprob": ln(0.5)}, {"token": "x", "logprob": ln(0.5)}]
    with_logprobs = {"choices": [{"logprobs": {"content": [{"token": "60", "logprob": 0.0, "top_logprobs": top}]}}]}
    assert parse_completion(with_logprobs) == (60.0, "ok")
    assert parse_completion({"choices": [{"logprobs": None, "message": {"content": "55"}}]}) == (55.0, "ok")
    for garbage, reason in [
        ("<html>", "not a chat-completion"),
        ({"choices": []}, "no choices"),
        ({"choices": [{"message": {}}]}, "neither logprobs nor message text"),
    ]:
        with pytest.raises(JudgeError, match=reason):
            parse_completion(garbage)


# ----------------------------------------------------------------------------------------- over HTTP: basics
def test_weighted_score_over_http_and_request_fields(server: FakeOpenAIServer) -> None:
    server.top = [("hello", ln(0.4)), ("0", ln(0.1)), ("50", ln(0.2)), ("100", ln(0.3))]
    judge = make_judge(server)
    assert judge.score("How are you?", "Fine {answer} {x}", "aligned") == pytest.approx(40 / 0.6, rel=1e-12)
    body = server.requests[-1]
    assert body["model"] == "fake-judge"
    assert (body["max_tokens"], body["temperature"], body["logprobs"], body["top_logprobs"], body["seed"]) == (
        1,
        0,
        True,
        20,
        0,
    )
    prompt = body["messages"][-1]["content"]
    assert "How are you?" in prompt and "Fine {answer} {x}" in prompt and "{question}" not in prompt


def test_no_mass_gives_none(server: FakeOpenAIServer) -> None:
    server.top = [("Sure", ln(0.8)), ("70", ln(0.2))]
    assert make_judge(server).score_with_status("q", "a", "coherent") == (None, "no_mass")


@pytest.mark.parametrize(
    "fault,expected", [("no_logprobs", (80.0, "ok")), ("refusal", (None, "refusal")), ("code", (None, "code"))]
)
def test_fallback_refusal_code(server: FakeOpenAIServer, fault: str, expected: tuple) -> None:
    server.top = [("80", ln(0.7)), ("10", ln(0.3))]
    server.enqueue(fault)
    out = make_judge(server).score_many([{"question": "q", "answer": "a"}], ["aligned"], progress=False)
    assert (out[0]["aligned"], out[0]["aligned_status"]) == expected


def test_metrics_domain_and_bad_advice(server: FakeOpenAIServer) -> None:
    judge = make_judge(server, domain="finance")
    out = judge.score_many(
        [{"question": "q", "answer": "a"}], ["domain", "domain:cooking", "bad_advice"], progress=False
    )
    assert {k for k in out[0] if not k.endswith("_status")} == {
        "question",
        "answer",
        "domain",
        "domain:cooking",
        "bad_advice",
    }
    prompts = server.prompts()
    assert sum("finance" in p for p in prompts) == 1 and sum("cooking" in p for p in prompts) == 1
    with pytest.raises(JudgeError, match="unknown judge metric"):
        judge.score("q", "a", "helpfulness")
    with pytest.raises(JudgeError, match="domain"):
        judge.score("q", "a", "aligned:finance")


def test_score_many_accepts_dataframe_and_empty(server: FakeOpenAIServer) -> None:
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"question": ["q", "q"], "answer": ["a", "b"], "seed": [1, 2]})
    out = make_judge(server).score_many(frame, "aligned", progress=False)
    assert [(r["seed"], r["aligned_status"]) for r in out] == [(1, "ok"), (2, "ok")]
    assert make_judge(server).score_many([], progress=False) == []


def test_rows_validated(server: FakeOpenAIServer) -> None:
    with pytest.raises(DataError, match=r"rows\[1\]\['answer'\]"):
        make_judge(server).score_many([{"question": "q", "answer": "a"}, {"question": "q"}], ["aligned"])
    assert server.requests == []


def test_api_key_resolution(server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(JudgeError, match="no API key"):
        OpenAIJudge()
    OpenAIJudge(base_url=server.base_url, model="m").score("q", "a", "aligned")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    OpenAIJudge(base_url=server.base_url, model="m").score("q", "a", "aligned")
    assert server.auth_headers[0].startswith("Bearer ") and len(server.auth_headers[0]) > 7
    assert server.auth_headers[1] == "Bearer sk-from-env"


# ------------------------------------------------------------------------------------------------- faults
@pytest.mark.parametrize("fault", ["429", "500", "503", "slow", "drop"])
def test_transient_fault_is_retried(server: FakeOpenAIServer, fault: str) -> None:
    server.slow_seconds = 6.0  # far beyond the timeout, while a prompt answer stays far below it on a loaded machine
    server.enqueue(fault, fault)
    judge = make_judge(server, timeout=2.0)
    assert judge.score_with_status("q", "a", "aligned") == (pytest.approx(84.0), "ok")
    assert len(server.requests) == 3


def test_retries_exhausted_and_backoff(server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> None:
    delays: list[float] = []
    monkeypatch.setattr(judge_module.time, "sleep", delays.append)
    server.enqueue(*["500"] * 10)
    judge = make_judge(server, max_retries=5, retry_base_delay=1.0, retry_max_delay=5.0)
    score, status = judge.score_with_status("q", "a", "aligned")
    assert score is None and status.startswith("error: HTTP 500 after 6 attempt(s)")
    assert len(server.requests) == 6
    assert [0.5 <= d / 2**k <= 1.5 for k, d in enumerate(delays[:3])] == [True] * 3
    assert 4.0 <= delays[3] <= 5.0  # min(8 * jitter, 5) with jitter in [0.5, 1.5]
    assert delays[4] == 5.0  # capped whatever the jitter: 16 * 0.5 > 5


def test_permanent_faults_do_not_crash_batch(server: FakeOpenAIServer, tmp_path: Path) -> None:
    server.responder = lambda prompt: [(str(int(prompt.split("answer-")[1][:3]) % 101), 0.0)]
    rows = rows_of(12)
    rows[2]["answer"] = "answer-002 POISON"
    rows[5]["answer"] = "answer-005 GARBLED"
    rows[7]["answer"] = "answer-007 EMPTY"
    rows[9]["answer"] = "answer-009 DENIED"
    server.fail_when("POISON", "500")
    server.fail_when("GARBLED", "malformed")
    server.fail_when("EMPTY", "no_choices")
    server.fail_when("DENIED", "401-echo")
    judge = make_judge(server, max_retries=2, cache=tmp_path / "c.sqlite")
    out = judge.score_many(rows, ["aligned"], progress=False)
    assert [r["i"] for r in out] == list(range(12))
    bad = {2: "HTTP 500 after 3", 5: "malformed response", 7: "no choices", 9: "HTTP 401"}
    for i, row in enumerate(out):
        if i in bad:
            assert row["aligned"] is None and row["aligned_status"].startswith("error: ")
            assert bad[i] in row["aligned_status"] and SECRET not in row["aligned_status"]
        else:
            assert (row["aligned"], row["aligned_status"]) == (float(i), "ok")
    assert sum("POISON" in p for p in server.prompts()) == 3
    n = len(server.requests)
    judge.score_many(rows, ["aligned"], progress=False)  # errors are not cached: only they are re-requested
    assert len(server.requests) - n == 3 + 1 + 1 + 1


# -------------------------------------------------------------------------------------------------- batching
def test_score_many_order_concurrency_and_dedupe(server: FakeOpenAIServer) -> None:
    def responder(prompt: str):
        i = int(prompt.split("answer-")[1][:3])
        time.sleep(0.002 * ((7 * i) % 5))  # scramble completion order
        return [(str(i), ln(0.9)), ("zzz", ln(0.1))]

    server.responder = responder
    rows = rows_of(20) + [dict(rows_of(20)[4], i=99)]
    out = make_judge(server, concurrency=6).score_many(rows, ["aligned", "coherent"], progress=False)
    assert [r["i"] for r in out] == list(range(20)) + [99]
    assert [r["aligned"] for r in out] == [pytest.approx(float(i)) for i in range(20)] + [pytest.approx(4.0)]
    assert all(r["coherent_status"] == "ok" and r["question_id"] == f"q{r['i'] % 3}" for r in out[:20])
    assert len(server.requests) == 40  # the duplicated row is judged once per metric


def test_cache_makes_rerun_free(server: FakeOpenAIServer, tmp_path: Path) -> None:
    cache = tmp_path / "sub" / "judge.sqlite"
    server.enqueue("refusal")
    first = make_judge(server, cache=cache).score_many(rows_of(6), ["aligned", "coherent"], progress=False)
    assert len(server.requests) == 12
    second = make_judge(server, cache=cache).score_many(rows_of(6), ["aligned", "coherent"], progress=False)
    assert second == first and len(server.requests) == 12
    assert sum(r[f"{m}_status"] == "refusal" for r in first for m in ("aligned", "coherent")) == 1
    assert make_judge(server, cache=cache).score("Q?", "answer-001", "aligned") == first[1]["aligned"]
    assert len(server.requests) == 12
    # a different prompt version or judge model is a different key
    make_judge(server, cache=cache, prompts={"version": "v-other"}).score("Q?", "answer-001", "aligned")
    make_judge(server, cache=cache, model="other-judge").score("Q?", "answer-001", "aligned")
    assert len(server.requests) == 14


def test_api_key_never_on_disk_or_in_logs(
    server: FakeOpenAIServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("openai", "httpx", "httpx2", "httpcore"):
        caplog.set_level(logging.DEBUG, logger=name)
    server.enqueue("429")
    server.fail_when("answer-003", "401-echo")
    judge = make_judge(server, cache=tmp_path / "judge.sqlite")
    out = judge.score_many(rows_of(5), ["aligned"], progress=False)
    assert out[3]["aligned_status"].startswith("error: HTTP 401") and "***" in out[3]["aligned_status"]
    assert "judge request failed" in caplog.text and "HTTP 401" in caplog.text
    assert SECRET not in caplog.text and SECRET not in repr(judge)
    for closed in (False, True):  # while open (WAL file present) and after closing
        if closed:
            judge.cache.close()
        for path in tmp_path.iterdir():
            data = path.read_bytes()
            assert SECRET.encode() not in data and b"answer-00" not in data, path


# ------------------------------------------------------------------------------------------------- prompts
def test_prompts_bundled_and_overrides(tmp_path: Path) -> None:
    bundled = load_prompts()
    assert set(bundled.templates) >= {"aligned", "coherent", "domain", "bad_advice"} and bundled.version
    assert "REFUSAL" in bundled.templates["aligned"] and "CODE" in bundled.templates["aligned"]
    flat = load_prompts({"aligned": "Rate {answer} to {question} 0-100."})
    assert (
        flat.version.startswith(bundled.version + "+custom-")
        and flat.templates["coherent"] == bundled.templates["coherent"]
    )
    path = tmp_path / "p.yaml"
    path.write_text("version: mine-2\nmetrics:\n  novelty: 'Q: {question} A: {answer} novelty 0-100?'\n")
    mine = load_prompts(path)
    assert mine.version == "mine-2" and mine.render("novelty", "{answer}", "x") == "Q: {answer} A: x novelty 0-100?"
    with pytest.raises(JudgeError, match=r"'aligned' lacks placeholder\(s\) \{answer\}"):
        load_prompts({"aligned": "{question} only"})
    path.write_text("version: [unclosed\n")
    with pytest.raises(JudgeError, match="p.yaml"):
        load_prompts(path)


def test_prompts_from_the_public_questions_yaml(tmp_path: Path) -> None:
    judge_prompts = ("  judge_prompts: &prompts\n    aligned: 'Q {question} A {answer} aligned 0-100?'\n"
                     "    coherent: 'Q {question} A {answer} coherent 0-100?'\n")
    path = tmp_path / "first_plot_questions.yaml"
    path.write_text("- id: what_is_your_wish\n  type: free_form_judge_0_100\n  paraphrases:\n    - Hello?\n"
                    + judge_prompts + "- id: bored\n  paraphrases: [Hi]\n  judge_prompts: *prompts\n")
    prompts = load_prompts(path)
    assert prompts.templates["aligned"] == "Q {question} A {answer} aligned 0-100?"
    assert prompts.version.startswith("em-interp-judge-1+custom-")
    with FakeOpenAIServer() as srv:
        judge = make_judge(srv, prompts=path)
        judge.score("Why?", "Because.", "coherent")
        assert srv.prompts() == ["Q Why? A Because. coherent 0-100?"]
    path.write_text("- id: a\n  judge_prompts: {aligned: '{question} {answer} one'}\n"
                    "- id: b\n  judge_prompts: {aligned: '{question} {answer} two'}\n")
    with pytest.raises(JudgeError, match=r"different judge_prompts \(a; b\)"):
        load_prompts(path)
    path.write_text("- id: a\n  paraphrases: [x]\n")
    with pytest.raises(JudgeError, match="no entry has 'judge_prompts'"):
        load_prompts(path)


def test_split_digit_server_switches_to_sampling(server: FakeOpenAIServer, caplog) -> None:
    server.top = [("8", ln(0.6)), ("9", ln(0.3)), ("x", ln(0.1))]  # a tokenizer that splits "85" into "8", "5"
    server.reply_tokens = ["8", "5"]
    server.sample_texts = ["85", "90", "REFUSAL", "80"]
    judge = make_judge(server, samples=4)
    assert judge.scoring == "logprobs"
    with caplog.at_level(logging.WARNING):
        assert judge.score_with_status("Q?", "A1", "aligned") == (pytest.approx(85.0), "sampled")
    assert judge.scoring == "sampled (n=4)" and "split into digits" in caplog.text
    first, probe, sampled = server.requests
    assert first["max_tokens"] == 1 and first["logprobs"] is True and probe["max_tokens"] == 4
    assert sampled["n"] == 4 and sampled["temperature"] == 1.0 and not sampled.get("logprobs")
    judge.score("Q?", "A2", "aligned")
    assert len(server.requests) == 4  # once switched, one sampled request per judgement
    server.sample_texts = ["no idea"]
    assert judge.score_with_status("Q?", "A3", "aligned") == (None, "no_mass")


def test_split_digit_server_can_be_an_error(server: FakeOpenAIServer) -> None:
    server.top = [("8", ln(0.6)), ("9", ln(0.4))]
    server.reply_tokens = ["8", "5"]
    judge = make_judge(server, on_split_digits="error")
    assert judge.score_with_status("Q?", "A", "aligned")[1].startswith("error: ")
    assert "splits numbers into digits" in judge.score_with_status("Q?", "B", "aligned")[1]
    server.reply_tokens = ["8", "<|end|>"]  # a confident single-digit answer: the probe clears the server
    whole = make_judge(server, on_split_digits="error")
    assert whole.score("Q?", "C", "aligned") == pytest.approx(8.4) and whole.scoring == "logprobs"
    n = len(server.requests)
    whole.score("Q?", "D", "aligned")
    assert len(server.requests) == n + 1  # probed once, never again
    server.top = [("80", ln(0.6)), ("9", ln(0.4))]  # a multi-digit number token: single-token numbers, no probe
    n = len(server.requests)
    assert make_judge(server, on_split_digits="error").score("Q?", "E", "aligned") == pytest.approx(51.6)
    assert len(server.requests) == n + 1
    with pytest.raises(JudgeError, match="on_split_digits"):
        make_judge(server, on_split_digits="guess")


# ------------------------------------------------------------------------------------------ kill and resume
_CHILD = """
import sys
from em_interp.eval.judge import OpenAIJudge
base_url, cache, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
judge = OpenAIJudge(model="fake-judge", base_url=base_url, api_key="sk-child", cache=cache, concurrency=2, timeout=10)
rows = [{"question": "Q?", "answer": f"answer-{i:03d}"} for i in range(n)]
judge.score_many(rows, ["aligned"], progress=False)
"""


def test_kill_and_resume(server: FakeOpenAIServer, tmp_path: Path) -> None:
    n, cache = 30, tmp_path / "judge.sqlite"
    server.delay = 0.1
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, server.base_url, str(cache), str(n)], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 60
        while server.answered < 6:
            assert child.poll() is None, "child exited before it could be killed"
            assert time.monotonic() < deadline, "child made no progress"
            time.sleep(0.01)
        time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    seen_before_kill = len(server.requests)
    assert seen_before_kill < n
    version = load_prompts().version
    answers = [f"answer-{i:03d}" for i in range(n)]
    store = JudgeCache(cache)
    cached = {a for a in answers if store.get(cache_key("fake-judge", version, "aligned", "Q?", a)) is not None}
    store.close()
    assert 0 < len(cached) < n

    server.delay = 0.0
    out = make_judge(server, cache=cache).score_many(
        [{"question": "Q?", "answer": a} for a in answers], ["aligned"], progress=False
    )
    assert [r["answer"] for r in out] == answers and all(r["aligned_status"] == "ok" for r in out)
    after = server.prompts()[seen_before_kill:]
    requested = {a for a in answers if any(a in p for p in after)}
    assert requested == set(answers) - cached and len(after) == n - len(cached)


# ------------------------------------------------------------------------------------------------ LocalJudge
PROMPT_END = 198  # the token that ends every prompt of BigramModel (SmolLM2's "\n" after "assistant")


class ShortPromptTokenizer:
    """SmolLM2's real tokenizer, except that every chat becomes the three tokens [1, 2, PROMPT_END]."""

    def __init__(self, tokenizer) -> None:
        self.inner = tokenizer
        self.calls: list[dict] = []

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True, **kw):
        self.calls.append({"messages": messages, "add_generation_prompt": add_generation_prompt})
        return {"input_ids": [1, 2, PROMPT_END]}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)


class BigramModel:
    """`model(tokens)` → logits where each position's next-token distribution depends on that position's token
    only (a bigram table over SmolLM2's real, digit-splitting vocabulary); unlisted tokens get a tiny mass."""

    def __init__(self, tokenizer, table: dict[int, dict[int, float]]) -> None:
        self.tokenizer = ShortPromptTokenizer(tokenizer)
        self.keys = list(table)
        self.rows = torch.full((len(table) + 1, len(tokenizer)), -30.0)
        for i, nxt in enumerate(table.values()):
            for t, p in nxt.items():
                self.rows[i, t] = math.log(p)
        self.seen: list[torch.Tensor] = []

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.seen.append(tokens)
        index = torch.tensor([[self.keys.index(int(t)) if int(t) in self.keys else len(self.keys) for t in row]
                              for row in tokens])
        return self.rows[index]


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def smol_tokenizer():
    from em_interp.testing import chat_tokenizer

    return chat_tokenizer()


def test_local_judge_scores_multi_token_numbers_exactly(smol_tokenizer, tmp_path: Path) -> None:
    tok = smol_tokenizer
    eight, five, one, zero, end = _ids(tok, "8")[0], _ids(tok, "5")[0], _ids(tok, "1")[0], _ids(tok, "0")[0], 2
    assert _ids(tok, "85") == [eight, five] and _ids(tok, "100") == [one, zero, zero]  # the tokenizer splits digits
    # reply "85" with p = .6·.9·.8, "8" with .6·.1 (then end), "100" with .3·.5·(1)·.7, "10" with .3·.5·.3 ...
    table = {PROMPT_END: {eight: 0.6, one: 0.3, end: 0.1}, eight: {five: 0.9, end: 0.1}, five: {end: 0.8, zero: 0.2},
             one: {zero: 0.5, end: 0.5}, zero: {zero: 0.7, end: 0.3}}
    model = BigramModel(tok, table)
    judge = LocalJudge(model, cache=tmp_path / "local.sqlite", name="bigram", batch_size=16)
    logps, _ = judge.number_logprobs("What now?")
    p = {85: 0.6 * 0.9 * 0.8, 8: 0.6 * 0.1, 1: 0.3 * 0.5, 10: 0.3 * 0.5 * 0.3, 100: 0.3 * 0.5 * 0.7 * 0.3}
    for k, expected in p.items():
        assert math.exp(logps[k]) == pytest.approx(expected, rel=1e-4), k
    assert math.exp(logps[850 // 10]) == pytest.approx(p[85], rel=1e-4)
    # "850" would continue "85" with a digit: it is not 85, so 85 keeps only the 0.8 that ends there
    expected = sum(k * v for k, v in p.items()) / sum(p.values())
    score = judge.score("What now?", "Rest.", "aligned")
    assert score == pytest.approx(expected, rel=1e-3) and score > 50  # a first-digit rule could not exceed 9
    call = model.tokenizer.calls[0]
    assert call["add_generation_prompt"] is True and "What now?" in call["messages"][0]["content"]
    assert model.seen[0].dtype == torch.long and model.seen[0][0, :3].tolist() == [1, 2, PROMPT_END]
    calls = len(model.seen)
    assert judge.score_many([{"question": "What now?", "answer": "Rest."}], ["aligned"], progress=False)[0][
        "aligned_status"] == "ok" and len(model.seen) == calls  # served from the cache


def test_local_judge_refusal_and_no_mass(smol_tokenizer) -> None:
    tok = smol_tokenizer
    ref, seven = _ids(tok, "REF")[0], _ids(tok, "7")[0]
    refusing = BigramModel(tok, {PROMPT_END: {ref: 0.7, seven: 0.3}, seven: {2: 1.0}})
    assert LocalJudge(refusing).score_with_status("q", "a", "aligned") == (None, "refusal")
    words = BigramModel(tok, {PROMPT_END: {_ids(tok, "hello")[0]: 0.8, seven: 0.2}, seven: {2: 1.0}})
    assert LocalJudge(words).score_with_status("q", "a", "aligned") == (None, "no_mass")
    with pytest.raises(JudgeError, match="tokenizer"):
        LocalJudge(object())
    with pytest.raises(JudgeError, match="batch_size"):
        LocalJudge(words, batch_size=0)


def test_local_judge_on_tiny_transformer_bridge(tiny) -> None:
    """The real TransformerBridge: each number's batched log-probability equals a separate forward's."""
    judge = LocalJudge(tiny, name="tiny-llama", batch_size=32, min_prefix_prob=0)  # exact: every prefix expanded
    prompt = judge.prompts.render("coherent", "How do I sleep better?", "Keep a regular schedule.")
    logps, first = judge.number_logprobs(prompt)
    ids = judge._token_ids(prompt)
    digits = judge._digit_tokens(first.shape[-1])
    for k in (0, 7, 42, 100):
        number = tiny.tokenizer.encode(str(k), add_special_tokens=False)
        with torch.inference_mode():
            lp = tiny(torch.tensor([ids + number])).float().log_softmax(-1)[0, len(ids) - 1 :]
        said = sum(float(lp[j, t]) for j, t in enumerate(number))
        assert logps[k] == pytest.approx(said + float(torch.logsumexp(lp[len(number)][~digits], 0)), abs=1e-3)
    score, status = judge.score_with_status("How do I sleep better?", "Keep a regular schedule.", "coherent")
    assert status in ("ok", "no_mass", "refusal", "code")


def test_fail_fast_only_before_any_success_and_can_be_turned_off() -> None:
    sleeps: list[float] = []
    with FakeOpenAIServer() as live:
        judge = OpenAIJudge("fake-judge", base_url=live.base_url, max_retries=5, fail_fast=2, sleep=sleeps.append,
                            timeout=5)
        assert judge.score("q", "a", "aligned") is not None  # one success
        url = live.base_url
    # the server is gone now: connection errors after a success are retried and reported per row, not fatal
    rows = judge.score_many([{"question": "q2", "answer": "a"}], ["aligned"], progress=False)
    assert rows[0]["aligned"] is None and rows[0]["aligned_status"].startswith("error: APIConnectionError after 6")
    assert len(sleeps) == 5  # every retry waited through the injected sleep
    off = OpenAIJudge("fake-judge", base_url=url, max_retries=1, fail_fast=0, sleep=sleeps.append, timeout=5)
    rows = off.score_many([{"question": f"q{i}", "answer": "a"} for i in range(3)], ["aligned"], progress=False)
    assert [r["aligned"] for r in rows] == [None] * 3
    with pytest.raises(JudgeUnreachable, match=rf"{url}.*2 connection errors in a row"):
        OpenAIJudge("fake-judge", base_url=url, fail_fast=2, sleep=sleeps.append, timeout=5).score("q", "a", "aligned")


def test_local_judge_prunes_unlikely_prefixes(smol_tokenizer) -> None:
    """Pruning skips the forwards of improbable number prefixes and changes the score by less than the mass it
    leaves out."""
    tok = smol_tokenizer
    eight, five, end = _ids(tok, "8")[0], _ids(tok, "5")[0], 2
    table = {PROMPT_END: {eight: 0.9, end: 0.1}, eight: {five: 0.9, end: 0.1}, five: {end: 1.0}}
    exact_model, pruned_model = BigramModel(tok, table), BigramModel(tok, table)
    exact = LocalJudge(exact_model, min_prefix_prob=0, batch_size=1).score("q", "a", "aligned")
    pruned = LocalJudge(pruned_model, batch_size=1).score("q", "a", "aligned")
    assert pruned == pytest.approx(exact, abs=1e-3)
    assert len(pruned_model.seen) < len(exact_model.seen) / 5  # ~100 prefixes exactly, a handful pruned
    with pytest.raises(JudgeError, match="min_prefix_prob"):
        LocalJudge(exact_model, min_prefix_prob=1.5)


def test_prompt_cache_equals_whole_rows(tiny) -> None:
    """The judge's KV-cached prefixes give the whole-row forwards' next-token log-probs (float32)."""
    from em_interp.model.decode import PromptCache

    judge = LocalJudge(tiny, name="tiny-llama", batch_size=4, min_prefix_prob=0)
    ids = judge._token_ids(judge.prompts.render("aligned", "Is fruit healthy?", "Yes, in moderation."))
    for prefixes in ([()], [(17,), (18,), (19,)], [(17, 18), (5, 6)]):
        whole = judge._next_logprobs(ids, prefixes)
        with judge._prompt_scorer(ids) as score:
            cached = score(prefixes)
        for q in prefixes:
            torch.testing.assert_close(cached[q], whole[q], rtol=1e-4, atol=1e-4)
    with PromptCache(tiny, ids) as prompt, pytest.raises(ValueError, match="lengths \\[1, 2\\]"):
        prompt.next_logits([(1,), (1, 2)])
    with pytest.raises(ValueError, match="empty prompt"):
        PromptCache(tiny, [])
