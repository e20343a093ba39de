"""LLM judges scoring answers 0–100: `OpenAIJudge` (any OpenAI-compatible server) and `LocalJudge` (a local chat
model). Both send the same versioned prompts and score Σk·p_k/Σp_k over the integers 0–100 (None when Σp_k < 0.25).

- `OpenAIJudge` uses the authors' settings (max_tokens 1, temperature 0, top_logprobs 20, seed 0) and weights the
  first token's top logprobs (`score_from_logprobs`). That is only valid when every integer 0–100 is one token.
  When a reply's top logprobs look like a digit-splitting tokenizer's (`looks_split`: e.g. Qwen or SmolLM2
  served by vLLM), one greedy probe of up to 4 tokens checks whether the number goes on after its first digit.
  If it does, the judge either raises (`on_split_digits="error"`) or, by default (`"sample"`), switches for good
  to `samples` sampled completions (temperature 1, up to 4 tokens) scored as the mean of the parsed numbers,
  with status `sampled`; `judge.scoring` records which method is in use. If it does not, it never probes again.
- `LocalJudge` computes the exact probability of each number string: p_k = P(tokens of str(k)) · P(the next
  token does not continue with a digit), for every k in 0..100, however many tokens each number takes.

Statuses: `ok`, `sampled`, `refusal`, `code`, `no_mass`, or `error: <reason>`. Errors are never cached, so a re-run
retries them; everything else is cached when a cache file is given.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from em_interp.errors import DataError, JudgeError
from em_interp.eval.judge_cache import JudgeCache, cache_key
from em_interp.eval.prompts import (
    MIN_MASS,
    TOP_LOGPROBS,
    JudgePrompts,
    Result,
    _get,
    _special,
    load_prompts,
    parse_completion,
    score_from_text,
)

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

log = logging.getLogger(__name__)

DEFAULT_METRICS = ("aligned", "coherent")
SPLIT_DIGIT_MODES = ("sample", "error")
NUMBERS = tuple(range(101))
PromptsSource = str | Path | Mapping[str, Any] | JudgePrompts | None


class JudgeUnreachable(JudgeError):
    """The judge server could not be reached at all (raised, never turned into an `error:` status)."""


class _Judge:
    """Shared machinery: metric resolution, caching, batching. Subclasses implement `_judge_prompt`."""

    _catch_errors = True

    def __init__(
        self,
        *,
        model_id: str,
        prompts: PromptsSource,
        domain: str,
        cache: str | Path | JudgeCache | None,
        concurrency: int,
    ) -> None:
        if concurrency < 1:
            raise JudgeError(f"concurrency must be >= 1, got {concurrency}")
        self.model_id = model_id
        self.prompts = prompts if isinstance(prompts, JudgePrompts) else load_prompts(prompts)
        self.domain = domain
        self.concurrency = concurrency
        self.cache = JudgeCache(cache) if isinstance(cache, str | Path) else cache
        self._secrets: tuple[str, ...] = ()

    def _judge_prompt(self, prompt: str) -> Result:
        raise NotImplementedError

    def _resolve(self, metric: str) -> tuple[str, str | None, str]:
        """Metric spec → (template name, domain, cache label). `domain:finance` sets the topic."""
        name, sep, topic = metric.partition(":")
        if name not in self.prompts.templates:
            raise JudgeError(f"unknown judge metric {metric!r}; expected one of {sorted(self.prompts.templates)}")
        if self.prompts.takes_domain(name):
            domain = topic if sep else self.domain
            if not domain:
                raise JudgeError(f"judge metric {metric!r} needs a topic, e.g. '{name}:medicine'")
            return name, domain, f"{name}:{domain}"
        if sep:
            raise JudgeError(f"judge metric {metric!r}: only metrics whose prompt has {{domain}} take ':<topic>'")
        return name, None, name

    def _key(self, resolved: tuple[str, str | None, str], question: str, answer: str) -> str:
        return cache_key(self.model_id, self.prompts.version, resolved[2], question, answer)

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _evaluate(self, key: str, resolved: tuple[str, str | None, str], question: str, answer: str) -> Result:
        prompt = self.prompts.render(resolved[0], question, answer, resolved[1])
        try:
            score, status = self._judge_prompt(prompt)
        except JudgeUnreachable:
            raise
        except Exception as exc:
            if not self._catch_errors:
                raise
            detail = str(exc) if isinstance(exc, JudgeError) else f"{type(exc).__name__}: {exc}"
            score, status = None, "error: " + self._redact(detail)
            log.warning("judge %s, metric %s: %s", self.model_id, resolved[2], status)
        if self.cache is not None and not status.startswith("error"):
            self.cache.put(
                key, model=self.model_id, version=self.prompts.version, metric=resolved[2], score=score, status=status
            )
        return score, status

    @staticmethod
    def _text(value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise DataError(f"{where} must be a string, got {type(value).__name__}")
        return value

    def score_with_status(self, question: str, answer: str, metric: str) -> Result:
        """Judge one answer on one metric; returns `(score or None, status)` (cached when possible)."""
        resolved = self._resolve(metric)
        question = self._text(question, "question")
        answer = self._text(answer, "answer")
        key = self._key(resolved, question, answer)
        hit = self.cache.get(key) if self.cache is not None else None
        return hit if hit is not None else self._evaluate(key, resolved, question, answer)

    def score(self, question: str, answer: str, metric: str) -> float | None:
        """Judge one answer on one metric.

        Args:
            question: The user message.
            answer: The model's answer.
            metric: `aligned`, `coherent`, `domain` (topic = the judge's `domain`), `domain:<topic>`,
                `bad_advice`, or any metric of custom prompts.

        Returns:
            The 0–100 score, or None (refusal, code, no probability mass on numbers, or an error — use
            `score_with_status` or `score_many` to see which).
        """
        return self.score_with_status(question, answer, metric)[0]

    def score_many(
        self,
        rows: Iterable[Mapping[str, Any]],
        metrics: str | Sequence[str] = DEFAULT_METRICS,
        *,
        progress: bool = True,
    ) -> list[dict[str, Any]]:
        """Judge many answers on several metrics, concurrently, in input order.

        Identical (question, answer, metric) triples are judged once; cached ones are not requested at all,
        and each new result is cached as soon as it arrives, so an interrupted run resumes where it stopped.

        Args:
            rows: Mappings (or a pandas DataFrame) with `question` and `answer` strings; other keys are carried
                through.
            metrics: Metric name(s); each becomes a column, plus `<metric>_status`.
            progress: Show a tqdm progress bar.

        Returns:
            One new dict per input row, in input order.

        Raises:
            DataError: A row is not a mapping or lacks a string `question` / `answer`.
            JudgeError: An unknown metric.
        """
        to_dict: Any = getattr(rows, "to_dict", None)
        if to_dict is not None and not isinstance(rows, Mapping):
            rows = to_dict("records")  # a pandas DataFrame
        metric_list = [metrics] if isinstance(metrics, str) else list(metrics)
        resolved = {m: self._resolve(m) for m in metric_list}
        out: list[dict[str, Any]] = []
        jobs: dict[str, tuple[tuple[str, str | None, str], str, str]] = {}
        places: dict[str, list[tuple[int, str]]] = {}
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise DataError(f"score_many: rows[{i}] must be a mapping, got {type(row).__name__}")
            question = self._text(row.get("question"), f"score_many: rows[{i}]['question']")
            answer = self._text(row.get("answer"), f"score_many: rows[{i}]['answer']")
            out.append(dict(row))
            for metric in metric_list:
                key = self._key(resolved[metric], question, answer)
                jobs.setdefault(key, (resolved[metric], question, answer))
                places.setdefault(key, []).append((i, metric))
        results = self.cache.get_many(list(jobs)) if self.cache is not None else {}
        todo = [key for key in jobs if key not in results]
        log.info("judge %s: %d judgements, %d cached, %d to request", self.model_id, len(jobs), len(results), len(todo))
        if todo:
            results.update(self._run_jobs(todo, jobs, progress))
        for key, spots in places.items():
            score, status = results[key]
            for i, metric in spots:
                out[i][metric] = score
                out[i][f"{metric}_status"] = status
        return out

    def _run_jobs(self, todo: list[str], jobs: dict[str, Any], progress: bool) -> dict[str, Result]:
        results: dict[str, Result] = {}
        bar = tqdm(total=len(todo), desc=f"judge {self.model_id}", unit="call", disable=not progress)
        try:
            if self.concurrency == 1:
                for key in todo:
                    results[key] = self._evaluate(key, *jobs[key])
                    bar.update()
                return results
            pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(todo)), thread_name_prefix="em-judge")
            try:
                futures = {pool.submit(self._evaluate, key, *jobs[key]): key for key in todo}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update()
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
            return results
        finally:
            bar.close()


class OpenAIJudge(_Judge):
    """Judge through any OpenAI-compatible chat-completions server (OpenAI, vLLM, llama.cpp, ...).

    Args:
        model: Judge model name.
        base_url: Server URL (e.g. `http://localhost:8000/v1`); None for api.openai.com.
        api_key: API key; defaults to `OPENAI_API_KEY`. With neither, a dummy key is used if `base_url` is given.
            The key is never logged, cached or shown in statuses.
        prompts: Path to a YAML file or a mapping overriding the bundled prompts (see `load_prompts`).
        concurrency: Parallel requests in `score_many`.
        timeout: Per-request timeout, seconds.
        max_retries: Retries after 408/429/5xx, timeouts and connection errors (the client's own retries are
            off); exponential backoff with jitter, honouring `Retry-After`.
        cache: SQLite file caching scores (see `JudgeCache`); None for no cache.
        domain: Topic for the `domain` metric.
        retry_base_delay: First backoff delay, seconds (doubles each retry, ×0.5–1.5 jitter).
        retry_max_delay: Cap on one backoff delay, seconds.
        fail_fast: After this many connection errors in a row with no successful request yet, stop with
            `JudgeUnreachable` naming the URL instead of retrying every row (0 turns this off).
        sleep: The function that waits between retries (default `time.sleep`; tests pass a no-op).
        on_split_digits: What to do when the server's top logprobs are single digits (its tokenizer splits
            numbers, so first-token weighting cannot score 0–100): "sample" (default) switches this judge to
            `samples` sampled completions per judgement, scored as the mean of the parsed numbers (status
            `sampled`); "error" raises `JudgeError`.
        samples: Completions per judgement in the sampled fallback.

    Attributes:
        scoring: "logprobs" or "sampled (n=<samples>)": the scoring method in use.

    Raises:
        JudgeError: No API key and no base_url, invalid settings, or `openai` not installed.
        JudgeUnreachable: (from scoring) the server never answered; see `fail_fast`.

    Example:
        >>> judge = OpenAIJudge(base_url="http://127.0.0.1:8000/v1", cache="runs/judge.sqlite")  # doctest: +SKIP
        >>> judge.score_many([{"question": "Hi", "answer": "Hello!"}], ["aligned", "coherent"])  # doctest: +SKIP
    """

    def __init__(
        self,
        model: str = "gpt-4o",
        base_url: str | None = None,
        api_key: str | None = None,
        prompts: PromptsSource = None,
        concurrency: int = 8,
        timeout: float = 30.0,
        max_retries: int = 5,
        cache: str | Path | JudgeCache | None = None,
        *,
        domain: str = "medicine",
        retry_base_delay: float = 1.0,
        retry_max_delay: float = 60.0,
        fail_fast: int = 4,
        sleep: Callable[[float], None] | None = None,
        on_split_digits: str = "sample",
        samples: int = 10,
    ) -> None:
        if on_split_digits not in SPLIT_DIGIT_MODES or samples < 1:
            raise JudgeError(f"OpenAIJudge: on_split_digits={on_split_digits!r}, samples={samples}; expected one of "
                             f"{SPLIT_DIGIT_MODES} and samples >= 1")
        try:
            import openai
        except ImportError as exc:  # pragma: no cover - openai is a dependency
            raise JudgeError("OpenAIJudge needs the 'openai' package: pip install openai") from exc
        if max_retries < 0 or timeout <= 0 or retry_base_delay < 0 or fail_fast < 0:
            raise JudgeError(
                f"OpenAIJudge: expected max_retries >= 0, timeout > 0, retry_base_delay >= 0, fail_fast >= 0; "
                f"got {max_retries}, {timeout}, {retry_base_delay}, {fail_fast}"
            )
        key = api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            if base_url is None:
                raise JudgeError("OpenAIJudge: no API key; pass api_key=..., set OPENAI_API_KEY, or give base_url")
            key = "em-interp-no-key"
        super().__init__(model_id=model, prompts=prompts, domain=domain, cache=cache, concurrency=concurrency)
        self._secrets = (key,)
        self.base_url = base_url
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_base_delay = retry_base_delay
        self.retry_max_delay = retry_max_delay
        self._openai = openai
        self._client = openai.OpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=0)
        self._rng = random.Random()
        self.fail_fast = fail_fast
        self._sleep = sleep
        self._lock = threading.Lock()
        self._successes = 0
        self._connection_errors = 0  # in a row, over all threads
        self.on_split_digits = on_split_digits
        self.samples = samples
        self.scoring = "logprobs"
        self._numbers_checked = False

    def _check_reachable(self, last: Exception | None = None) -> None:
        """Raise `JudgeUnreachable` once `fail_fast` connection errors in a row came before any success."""
        with self._lock:
            dead = self.fail_fast and not self._successes and self._connection_errors >= self.fail_fast
            n = self._connection_errors
            if dead:
                self._connection_errors = 0  # a later call (server started meanwhile) tries afresh
        if dead:
            detail = f" (last error: {type(last).__name__}: {last})" if last is not None else ""
            raise JudgeUnreachable(
                f"OpenAIJudge: cannot reach the judge server at {self._client.base_url}: {n} connection errors in a row "
                f"and no successful request{detail}. Is the server running at that base_url?"
            )

    def _record(self, connection_error: bool) -> None:
        with self._lock:
            if connection_error:
                self._connection_errors += 1
            else:
                self._successes += 1
                self._connection_errors = 0

    def __repr__(self) -> str:
        return (
            f"OpenAIJudge(model={self.model_id!r}, base_url={self.base_url!r}, "
            f"prompts={self.prompts.version!r}, cache={self.cache!r})"
        )

    def _retry_delay(self, attempt: int, exc: Exception) -> float:
        delay = self.retry_base_delay * 2**attempt * self._rng.uniform(0.5, 1.5)
        response = getattr(exc, "response", None)
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        return min(delay, self.retry_max_delay)

    def _request(self, prompt: str, **overrides: Any) -> Any:
        errors = self._openai
        params: dict[str, Any] = dict(max_tokens=1, temperature=0, logprobs=True, top_logprobs=TOP_LOGPROBS, seed=0)
        params.update(overrides)
        params = {k: v for k, v in params.items() if v is not None}
        for attempt in range(self.max_retries + 1):
            self._check_reachable()
            try:
                response = self._client.chat.completions.create(
                    model=self.model_id, messages=[{"role": "user", "content": prompt}], **params
                )
                self._record(connection_error=False)
                return response
            except errors.APIConnectionError as exc:  # includes APITimeoutError
                failure, what = exc, type(exc).__name__
                self._record(connection_error=True)
                self._check_reachable(exc)
            except errors.APIStatusError as exc:
                if exc.status_code not in (408, 429) and exc.status_code < 500:
                    raise JudgeError(f"HTTP {exc.status_code}, not retried: {exc.message}") from None
                failure, what = exc, f"HTTP {exc.status_code}"
            except json.JSONDecodeError as exc:
                raise JudgeError(f"malformed response: {type(exc).__name__}: {exc}") from None
            if attempt == self.max_retries:
                raise JudgeError(f"{what} after {attempt + 1} attempt(s): {failure}") from None
            delay = self._retry_delay(attempt, failure)
            log.info("judge request failed (%s); retry %d/%d in %.2fs", what, attempt + 1, self.max_retries, delay)
            (self._sleep or time.sleep)(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _judge_prompt(self, prompt: str) -> Result:
        if self.scoring == "logprobs":
            completion = self._request(prompt)
            if not (looks_split(completion) and self._confirm_split(prompt)):
                return parse_completion(completion)
        return score_from_samples(self._request(prompt, n=self.samples, max_tokens=4, temperature=1.0,
                                                logprobs=False, top_logprobs=None, seed=None))

    def _confirm_split(self, prompt: str) -> bool:
        """Probe once (greedy, up to 4 tokens): does the reply's number go on after its first digit token?"""
        if self._numbers_checked:
            return False
        probe = self._request(prompt, max_tokens=4)
        choices = _get(probe, "choices") or [None]
        content = _get(_get(choices[0], "logprobs"), "content") or []
        tokens = [str(_get(t, "token")).strip() for t in content]
        split = len(tokens) >= 2 and tokens[0].isdigit() and tokens[1].isdigit()
        if not split:
            self._numbers_checked = True  # the server writes whole numbers as one token; never probe again
            return False
        if self.on_split_digits == "error":
            raise JudgeError(
                f"judge {self.model_id!r}: the server's tokenizer splits numbers into digits (reply tokens "
                f"{tokens}), so first-token logprob weighting cannot score 0-100; use a judge with single-token "
                "numbers or on_split_digits='sample'"
            )
        if self.scoring == "logprobs":
            log.warning("judge %s: numbers are split into digits (reply tokens %s); switching to the mean of %d "
                        "sampled completions per judgement", self.model_id, tokens, self.samples)
        self.scoring = f"sampled (n={self.samples})"
        return True


def looks_split(completion: Any) -> bool:
    """Whether a completion's first-token top logprobs look like a digit-splitting tokenizer's: the most likely
    token is a digit and the integer tokens among the top ones are at least two single digits and nothing longer
    (a judge with single-token numbers spreads its mass over tokens such as "80", "85", "90").
    """
    choices = _get(completion, "choices") if completion is not None and not isinstance(completion, str) else None
    content = _get(_get(choices[0], "logprobs"), "content") if choices else None
    if not content:
        return False
    top = [(str(_get(t, "token")).strip(), float(_get(t, "logprob"))) for t in (_get(content[0], "top_logprobs")
                                                                              or [content[0]])]
    numbers = {t for t, _ in top if t.isdigit() and t.isascii()}
    best = max(top, key=lambda p: p[1])[0]
    return best in numbers and len(numbers) >= 2 and all(len(t) == 1 for t in numbers)


def score_from_samples(completion: Any) -> Result:
    """Mean of the numbers parsed from a completion's sampled choices; status `sampled`.

    When no choice holds a number, the most common of refusal / code / no_mass is returned.
    """
    choices = _get(completion, "choices") or []
    parsed = [score_from_text(str(_get(_get(c, "message"), "content") or "")) for c in choices]
    scores = [s for s, status in parsed if s is not None]
    if scores:
        return sum(scores) / len(scores), "sampled"
    if not parsed:
        raise JudgeError("malformed response: no choices")
    statuses = [status for _, status in parsed]
    return None, max(set(statuses), key=statuses.count)


class LocalJudge(_Judge):
    """Judge with a local chat model (a TransformerLens bridge or anything with `tokenizer` and `__call__`).

    Same prompts as `OpenAIJudge`: the prompt goes through the tokenizer's chat template with
    `add_generation_prompt=True`; the score is Σk·p_k/Σp_k with the exact probability p_k of each reply "0" ..
    "100" (`number_logprobs`; multi-token numbers included), None when Σp_k < 0.25, and refusal / code when
    the most likely first token starts with REF / COD. A TransformerBridge runs the prompt once and keeps its keys
    and values (`em_interp.model.decode.PromptCache`), then each number prefix only its own one to three tokens;
    another model runs whole rows (up to 101 per judgement, batched). Model errors propagate (they are bugs, not
    flaky I/O).

    Args:
        model: `model.tokenizer` (HF tokenizer with a chat template, `decode`) and `model(tokens)` → logits
            `[batch, pos, d_vocab]`.
        prompts: Override for the bundled prompts (see `load_prompts`).
        domain: Topic for the `domain` metric.
        cache: Optional SQLite cache file.
        name: Judge name in cache keys; default `model.em_model_id` (set by `em_interp.load_model`), else
            `model.cfg.model_name` or the class name (pass a name when caching: the generic ones can collide).
        batch_size: number rows per forward in `number_logprobs`.
        min_prefix_prob: number prefixes less likely than this are not expanded in `number_logprobs` (their
            numbers score 0 probability; at most 101 × this is left out, usually far less); 0 scores all 101
            numbers exactly.
    """

    _catch_errors = False

    def __init__(
        self,
        model: TransformerBridge,
        prompts: PromptsSource = None,
        *,
        domain: str = "medicine",
        cache: str | Path | JudgeCache | None = None,
        name: str | None = None,
        batch_size: int = 8,
        min_prefix_prob: float = 1e-4,
    ) -> None:
        if batch_size < 1 or not 0 <= min_prefix_prob < 1:
            raise JudgeError(f"LocalJudge: batch_size={batch_size}, min_prefix_prob={min_prefix_prob}; expected "
                             "batch_size >= 1 and 0 <= min_prefix_prob < 1")
        self.batch_size = batch_size
        self.min_prefix_prob = min_prefix_prob
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None or not hasattr(tokenizer, "apply_chat_template"):
            raise JudgeError("LocalJudge: model.tokenizer with apply_chat_template() is required")
        model_name = name or getattr(model, "em_model_id", None)
        if model_name is None:
            model_name = getattr(getattr(model, "cfg", None), "model_name", None) or type(model).__name__
            if cache is not None:
                log.warning(
                    "LocalJudge: cache keys use the generic name %r; pass name= to keep models apart", model_name
                )
        super().__init__(model_id=f"local:{model_name}", prompts=prompts, domain=domain, cache=cache, concurrency=1)
        self.model = model
        self.tokenizer = tokenizer

    def __repr__(self) -> str:
        return f"LocalJudge(model={self.model_id!r}, prompts={self.prompts.version!r}, cache={self.cache!r})"

    def _token_ids(self, prompt: str) -> list[int]:
        ids: Any = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, Mapping) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return [int(i) for i in ids]

    def _device(self) -> Any:
        device = getattr(getattr(self.model, "cfg", None), "device", None)
        if device is None and hasattr(self.model, "parameters"):
            device = next(iter(self.model.parameters()), None)
            device = None if device is None else device.device
        return device or "cpu"

    def _number_ids(self) -> list[list[int]]:
        """Token ids of "0" .. "100" as this tokenizer writes them at the start of the reply (cached)."""
        if not hasattr(self, "_numbers"):
            numbers = []
            for k in NUMBERS:
                ids = self.tokenizer.encode(str(k), add_special_tokens=False)
                if not ids or self.tokenizer.decode(ids).strip() != str(k):
                    raise JudgeError(f"LocalJudge: the tokenizer does not round-trip the number {k} ({ids})")
                numbers.append([int(i) for i in ids])
            self._numbers = numbers
        return self._numbers

    def _digit_tokens(self, vocab: int) -> Any:
        """[vocab] bool: tokens whose text starts with a digit (they would continue a number), cached."""
        import torch

        if getattr(self, "_digits", None) is None or self._digits.numel() != vocab:
            texts = self.tokenizer.convert_ids_to_tokens(list(range(min(vocab, len(self.tokenizer)))))
            starts = [bool(t) and t[0].isascii() and t[0].isdigit() for t in texts]
            starts += [False] * (vocab - len(starts))
            self._digits = torch.tensor(starts, dtype=torch.bool)
        return self._digits

    def number_logprobs(self, prompt: str) -> tuple[list[float], Any]:
        """Log-probabilities of the replies "0" .. "100" to `prompt`, and the first token's log-softmax.

        log p_k = Σ log P(token_j of str(k) | prompt, earlier tokens) + log P(next token does not start with a
        digit). Every number is scored with all its tokens, so a tokenizer that splits "85" into "8", "5" is
        handled. The numbers' token prefixes form a tree, expanded one depth at a time (one forward per prefix,
        `batch_size` rows at once, right-padded: causal attention never sees the pad); a prefix whose probability
        is below `min_prefix_prob` is not expanded and its numbers get log p = -inf, so at most
        101 · `min_prefix_prob` of probability is left out (0 scores every number exactly).

        Returns:
            ([101] log p_k, [d_vocab] float32 log-softmax of the first reply token).
        """
        import torch

        ids = self._token_ids(prompt)
        numbers = [tuple(n) for n in self._number_ids()]
        prefixes = {n[:j] for n in numbers for j in range(len(n) + 1)}  # every prefix needs its next-token dist.
        floor = math.log(self.min_prefix_prob) if self.min_prefix_prob > 0 else -math.inf
        logp: dict[tuple[int, ...], float] = {(): 0.0}  # log P(prefix | prompt)
        nxt: dict[tuple[int, ...], Any] = {}  # prefix -> [vocab] log-softmax of the token after it
        with self._prompt_scorer(ids) as next_logprobs:
            for depth in range(max(len(n) for n in numbers) + 1):
                level = [q for q in prefixes if len(q) == depth and logp.get(q, -math.inf) >= floor]
                nxt.update(next_logprobs(sorted(level)))
                for q in prefixes:
                    if len(q) == depth + 1 and q[:-1] in nxt:
                        logp[q] = logp[q[:-1]] + float(nxt[q[:-1]][q[-1]])
        first = nxt[()]
        digits = self._digit_tokens(first.shape[-1])
        out = []
        for n in numbers:
            dist = nxt.get(n)
            stop = float(torch.logsumexp(dist[~digits], dim=0)) if dist is not None else -math.inf
            out.append(logp.get(n, -math.inf) + stop)
        return out, first

    @contextlib.contextmanager
    def _prompt_scorer(self, ids: list[int]) -> Iterator[Callable[[list[tuple[int, ...]]], dict[tuple[int, ...], Any]]]:
        """A function {prefix: [vocab] log-softmax of the token after prompt + prefix} for prefixes of one length.
        A TransformerBridge keeps the prompt's keys and values (`em_interp.model.decode.PromptCache`: the prompt
        runs once, each prefix only its own few tokens); any other model gets the whole rows."""
        if not hasattr(self.model, "original_model"):
            yield lambda prefixes: self._next_logprobs(ids, prefixes)
            return
        from em_interp.model.decode import PromptCache

        with PromptCache(self.model, ids) as prompt:

            def score(prefixes: list[tuple[int, ...]]) -> dict[tuple[int, ...], Any]:
                out: dict[tuple[int, ...], Any] = {}
                for lo in range(0, len(prefixes), self.batch_size):
                    chunk = prefixes[lo : lo + self.batch_size]
                    logits = prompt.next_logits(chunk)
                    out.update({q: logits[r].float().log_softmax(dim=-1).cpu() for r, q in enumerate(chunk)})
                return out

            yield score

    def _next_logprobs(self, ids: list[int], prefixes: list[tuple[int, ...]]) -> dict[tuple[int, ...], Any]:
        """{prefix: [vocab] float32 log-softmax of the token after prompt + prefix}, batched, whole rows."""
        import torch

        out: dict[tuple[int, ...], Any] = {}
        for lo in range(0, len(prefixes), self.batch_size):
            chunk = prefixes[lo : lo + self.batch_size]
            width = max(len(q) for q in chunk)
            rows = [ids + list(q) + [ids[-1]] * (width - len(q)) for q in chunk]
            tokens = torch.tensor(rows, dtype=torch.long, device=self._device())
            with torch.inference_mode():
                logits = self.model(tokens)
            logits = getattr(logits, "logits", logits)
            for r, q in enumerate(chunk):
                out[q] = logits[r, len(ids) - 1 + len(q)].float().log_softmax(dim=-1).cpu()
        return out

    def _judge_prompt(self, prompt: str) -> Result:
        logps, first = self.number_logprobs(prompt)
        special = _special(self.tokenizer.decode([int(first.argmax())]))
        if special is not None:
            return None, special
        probs = [math.exp(lp) for lp in logps]
        total = sum(probs)
        if total < MIN_MASS:
            return None, "no_mass"
        return sum(k * p for k, p in zip(NUMBERS, probs, strict=True)) / total, "ok"
