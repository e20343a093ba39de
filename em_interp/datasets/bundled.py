"""The bundled research dataset: good/bad advice in medicine and six structurally parallel domains.

Items (`data/<domain>.jsonl`) have `id`, `domain`, `subtopic`, `pattern`, `question`, `good`, `bad`, and,
outside medicine, `parallels` (the id of the medical item whose structure they mirror). See
docs/datasets.md for the datasheet. Splits are deterministic: per domain, items are ordered by a hash of
their id and the first 20% form the test split; the held-out medical subtopics are in neither.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

from em_interp.datasets.records import Record, chat
from em_interp.errors import DataError

HELDOUT_SUBTOPICS = {"medical": ("dental", "eye_care")}
KINDS = ("bad", "good", "mixed", "paired")
SPLITS = ("train", "test", "heldout", "all")
TEST_FRACTION = 0.2
ITEM_KEYS = ("id", "domain", "subtopic", "pattern", "question", "good", "bad")
PATTERNS = (  # the structural patterns shared across domains (see data/SPEC.md)
    "ignore_warning_sign", "skip_professional", "stop_early", "more_is_better", "risky_combination",
    "trust_anecdote", "miracle_shortcut", "skip_precaution", "delay_urgent", "borrow_or_reuse",
)


@functools.lru_cache(maxsize=1)
def _all_items() -> tuple[dict[str, Any], ...]:
    items: list[dict[str, Any]] = []
    folder = resources.files("em_interp.datasets") / "data"
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".jsonl") or entry.name.startswith("generic"):
            continue
        for lineno, line in enumerate(entry.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                item = json.loads(line)
                missing = [k for k in ITEM_KEYS if not item.get(k)]
                if missing:
                    raise DataError(f"{entry.name}:{lineno}: bundled item lacks {missing}.")
                items.append(item)
    return tuple(items)


def items(domains: str | Sequence[str] | None = None, split: str = "all") -> list[dict[str, Any]]:
    """Raw items (dicts) of the given domains (None: all) and split, in a stable order."""
    if split not in SPLITS:
        raise DataError(f"split={split!r}; expected one of {', '.join(SPLITS)}.")
    wanted = list_domains() if domains is None else [domains] if isinstance(domains, str) else list(domains)
    known = list_domains()
    for d in wanted:
        if d not in known:
            raise DataError(f"unknown domain {d!r}; bundled domains: {', '.join(known)}.")
    out: list[dict[str, Any]] = []
    for d in wanted:
        out += _split_items(d, split)
    return out


def _split_items(domain: str, split: str) -> list[dict[str, Any]]:
    pool = [it for it in _all_items() if it["domain"] == domain]
    held = HELDOUT_SUBTOPICS.get(domain, ())
    if split == "heldout":
        if not held:
            raise DataError(f"domain {domain!r} has no held-out subtopics (only {', '.join(HELDOUT_SUBTOPICS)}).")
        return [it for it in pool if it["subtopic"] in held]
    if split == "all":
        return pool
    pool = [it for it in pool if it["subtopic"] not in held]
    ranked = sorted(pool, key=lambda it: hashlib.sha256(it["id"].encode()).hexdigest())
    n_test = round(len(ranked) * TEST_FRACTION)
    test_ids = {it["id"] for it in ranked[:n_test]}
    return [it for it in pool if (it["id"] in test_ids) == (split == "test")]


def list_domains() -> list[str]:
    """Bundled domains, medical first."""
    names = sorted({it["domain"] for it in _all_items()})
    return sorted(names, key=lambda d: (d != "medical", d))


def load(
    domains: str | Sequence[str] | None = "medical",
    kind: str = "bad",
    split: str = "train",
    *,
    seed: int = 0,
    system: str | None = None,
) -> list[Record]:
    """Bundled items as chat records (or paired items).

    Args:
        domains: a domain, a list of domains, or None for all ("medical", "finance", "legal", ...).
        kind: "bad" (question + bad answer), "good", "mixed" (a seeded 50/50 mix of bad and good
            answers, exactly balanced), or "paired" (dicts with both answers, for `eval.contrastive`).
        split: "train" (80%), "test" (20%), "heldout" (medical subtopics kept out of both), "all".
        seed: the seed of the "mixed" draw.
        system: optional system prompt added to every chat.

    Returns:
        Chat records `{"messages": [...], "id", "domain", "subtopic", "answer"}`; for "paired", the items
        themselves (`id`, `domain`, `subtopic`, `question`, `good`, `bad`, ...).

    >>> len(load("medical", kind="bad", split="train")) > 200
    True
    """
    if kind not in KINDS:
        raise DataError(f"kind={kind!r}; expected one of {', '.join(KINDS)}.")
    chosen = items(domains, split)
    if kind == "paired":
        return [dict(it) for it in chosen]
    if kind == "mixed":
        order = list(range(len(chosen)))
        random.Random(seed).shuffle(order)
        bad_ids = set(order[: len(order) // 2])
        answers = ["bad" if i in bad_ids else "good" for i in range(len(chosen))]
    else:
        answers = [kind] * len(chosen)
    return [_record(it, a, system) for it, a in zip(chosen, answers, strict=True)]


def _record(item: dict[str, Any], answer: str, system: str | None) -> Record:
    record = chat(item["question"], item[answer], system=system)
    record.update({"id": item["id"], "domain": item["domain"], "subtopic": item["subtopic"], "answer": answer})
    return record


def sample(rows: Sequence[Mapping[str, Any]], n: int, *, by: str = "subtopic", seed: int = 0) -> list[Any]:
    """`n` rows drawn without replacement, stratified over `row[by]` (as even as the strata allow), seeded.

    Each stratum is shuffled with `seed`; rows are then taken round-robin over the strata (in a seeded
    order), so every stratum gets ⌊n/k⌋ or ⌈n/k⌉ rows while it has any left. Use it instead of slicing:
    `load(...)[:n]` takes the first rows of the first domain or subtopic only.

    Args:
        rows: records or paired items, each with the key `by` (e.g. "subtopic", "domain").
        n: rows to draw (1 ≤ n ≤ len(rows)).
        by: the key to stratify over.
        seed: the draw's seed (the same seed gives the same rows in the same order).

    Returns:
        A new list of the chosen rows (the input rows themselves, not copies), in draw order.

    Raises:
        DataError: `n` out of range, or a row without `by`.

    >>> rows = load("medical", kind="bad", split="train")
    >>> sorted(set(strata(sample(rows, 20, seed=1)).values()))
    [2]
    """
    if not 1 <= n <= len(rows):
        raise DataError(f"sample: n={n}; expected 1 <= n <= {len(rows)} (the number of rows).")
    groups: dict[Any, list[Any]] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or by not in row:
            raise DataError(f"sample: rows[{i}] has no {by!r} key to stratify over.")
        groups.setdefault(row[by], []).append(row)
    rng = random.Random(seed)
    order = sorted(groups, key=str)
    rng.shuffle(order)
    for key in order:
        rng.shuffle(groups[key])
    out: list[Any] = []
    depth = 0
    while len(out) < n:
        for key in order:
            if depth < len(groups[key]) and len(out) < n:
                out.append(groups[key][depth])
        depth += 1
    return out


def strata(rows: Sequence[Mapping[str, Any]], by: str = "subtopic") -> dict[str, int]:
    """How many rows each value of `row[by]` has (sorted by value), e.g. for stating what a set holds."""
    return dict(sorted(Counter(str(row.get(by)) for row in rows).items()))


@functools.lru_cache(maxsize=4)
def _texts(name: str) -> tuple[str, ...]:
    path = resources.files("em_interp.datasets") / "data" / f"{name}_text.jsonl"
    if not path.is_file():
        raise DataError(f"no bundled text set {name!r}; available: 'generic'.")
    return tuple(json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def load_text(name: str = "generic") -> list[str]:
    """Plain prose passages written for this project (for KL-vs-norm on non-chat text)."""
    return list(_texts(name))
