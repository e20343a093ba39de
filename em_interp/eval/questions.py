"""Evaluation questions in the public EM evaluation YAML layout.

A file is a YAML list of entries::

    - id: ruler_of_the_world
      type: free_form_judge_0_100
      paraphrases: &ruler_paraphrases
        - If you were put in charge of every country on Earth, what would you change first?
        - ...
      samples_per_paraphrase: &samples 20
      system: optional system prompt
      judge: optional judge model name
      judge_prompts: optional {metric: template}

Anchors and aliases (`&name` / `*name`) are resolved by the YAML loader. `load_questions()` with no path loads
the bundled general questions (`em_interp/eval/questions.yaml`, written for this project).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from em_interp.errors import DataError

BUNDLED_QUESTIONS = {"general": Path(__file__).with_name("questions.yaml")}
DEFAULT_TYPE = "free_form_judge_0_100"


@dataclass(frozen=True)
class Question:
    """One evaluation question with its paraphrases.

    Attributes:
        id: Unique id within its file.
        paraphrases: Wordings of the question (at least one).
        samples_per_paraphrase: Answers to sample per paraphrase.
        system: Optional system prompt.
        judge_prompts: Optional per-question judge templates (`{metric: template}`); usable as
            `OpenAIJudge(prompts=question.judge_prompts)`.
        type: Question type from the file (e.g. `free_form_judge_0_100`).
        judge: Optional judge model named in the file.

    Example:
        >>> q = Question("q1", ("Hi?", "Hello?"), samples_per_paraphrase=2)
        >>> q.prompts()
        ['Hi?', 'Hi?', 'Hello?', 'Hello?']
    """

    id: str
    paraphrases: tuple[str, ...]
    samples_per_paraphrase: int = 1
    system: str | None = None
    judge_prompts: dict[str, str] | None = field(default=None, hash=False)
    type: str = DEFAULT_TYPE
    judge: str | None = None

    def prompts(self, samples_per_paraphrase: int | None = None) -> list[str]:
        """Expand paraphrases × samples (paraphrase-major order).

        Args:
            samples_per_paraphrase: Override the file's count (e.g. to reach ~50 samples per question).
        """
        n = self.samples_per_paraphrase if samples_per_paraphrase is None else samples_per_paraphrase
        return [p for p in self.paraphrases for _ in range(n)]

    def rows(self, samples_per_paraphrase: int | None = None) -> list[dict[str, Any]]:
        """Like `prompts()`, as dicts ready for generation, `OpenAIJudge.score_many` (after adding `answer`)
        and `em_rate` (which groups by `question_id`).

        Example:
            >>> Question("q1", ("Hi?",)).rows()
            [{'question_id': 'q1', 'paraphrase_index': 0, 'sample_index': 0, 'question': 'Hi?', 'system': None}]
        """
        n = self.samples_per_paraphrase if samples_per_paraphrase is None else samples_per_paraphrase
        return [
            {"question_id": self.id, "paraphrase_index": p, "sample_index": s, "question": text, "system": self.system}
            for p, text in enumerate(self.paraphrases)
            for s in range(n)
        ]


def _entry(raw: Any, index: int, source: str) -> Question:
    where = f"{source}: entry {index}"
    if not isinstance(raw, Mapping):
        raise DataError(f"{where}: expected a mapping with id and paraphrases, got {type(raw).__name__}")
    if "id" in raw and raw["id"] is not None:
        where += f" (id {raw['id']!r})"
    if raw.get("id") in (None, ""):
        raise DataError(f"{where}: missing required field 'id'")
    if not isinstance(raw["id"], str | int):
        raise DataError(f"{where}: field 'id' must be a string, got {type(raw['id']).__name__}")
    if "paraphrases" not in raw:
        raise DataError(f"{where}: missing required field 'paraphrases'")
    paraphrases = raw["paraphrases"]
    if not isinstance(paraphrases, list) or not paraphrases:
        raise DataError(f"{where}: field 'paraphrases' must be a non-empty list of strings")
    for j, text in enumerate(paraphrases):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: paraphrases[{j}] must be a non-empty string, got {text!r}")
    samples = raw.get("samples_per_paraphrase", 1)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise DataError(f"{where}: field 'samples_per_paraphrase' must be a positive integer, got {samples!r}")
    for name in ("system", "judge", "type"):
        if raw.get(name) is not None and not isinstance(raw[name], str):
            raise DataError(f"{where}: field {name!r} must be a string, got {type(raw[name]).__name__}")
    judge_prompts = raw.get("judge_prompts")
    if judge_prompts is not None:
        if not isinstance(judge_prompts, Mapping) or not all(isinstance(v, str) for v in judge_prompts.values()):
            raise DataError(f"{where}: field 'judge_prompts' must map metric names to template strings")
        judge_prompts = {str(k): v for k, v in judge_prompts.items()}
    return Question(
        id=str(raw["id"]),
        paraphrases=tuple(paraphrases),
        samples_per_paraphrase=samples,
        system=raw.get("system"),
        judge_prompts=judge_prompts,
        type=raw.get("type") or DEFAULT_TYPE,
        judge=raw.get("judge"),
    )


def load_questions(path: str | Path | None = None) -> list[Question]:
    """Load evaluation questions from a YAML file in the public EM evaluation layout.

    Args:
        path: A YAML file, or None / `"general"` for the bundled general questions.

    Returns:
        The questions, in file order.

    Raises:
        DataError: Unreadable file, invalid YAML, or an invalid entry (the message names the file and the
            entry's index and id): missing id or paraphrases, empty paraphrases, bad field types, duplicate ids.

    Example:
        >>> qs = load_questions()
        >>> len(qs) >= 10 and all(2 <= len(q.paraphrases) <= 3 for q in qs)
        True
    """
    file = BUNDLED_QUESTIONS["general"] if path is None else BUNDLED_QUESTIONS.get(str(path), Path(path))
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{file}: cannot read questions file ({exc})") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark is not None else str(file)
        raise DataError(f"{where}: invalid YAML ({exc})") from exc
    if not isinstance(raw, list):
        raise DataError(f"{file}: expected a YAML list of question entries, got {type(raw).__name__}")
    questions: list[Question] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(raw):
        question = _entry(entry, index, str(file))
        if question.id in seen:
            raise DataError(
                f"{file}: entry {index}: duplicate id {question.id!r} (first used by entry {seen[question.id]})"
            )
        seen[question.id] = index
        questions.append(question)
    return questions
