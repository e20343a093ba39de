"""The bundled research dataset: schema, no duplicates, splits, parallel structure, loaders."""

from __future__ import annotations

import collections
import re

import pytest

import em_interp as em
from em_interp.datasets import bundled
from em_interp.datasets.bundled import HELDOUT_SUBTOPICS, PATTERNS
from em_interp.errors import DataError

ALL = bundled.items(None, "all")
MEDICAL = [it for it in ALL if it["domain"] == "medical"]
OTHER = [it for it in ALL if it["domain"] != "medical"]


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def _sentences(text: str) -> int:
    return len([s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s])


def test_schema_of_every_item():
    assert ALL, "no bundled items"
    for it in ALL:
        keys = list(it)
        expected = ["id", "domain", "subtopic", "pattern", "question", "good", "bad"]
        assert keys[:7] == expected, it["id"]
        assert keys[7:] == ([] if it["domain"] == "medical" else ["parallels"]), it["id"]
        assert it["id"].startswith(f"{it['domain']}/{it['subtopic']}/"), it["id"]
        assert it["pattern"] in PATTERNS, it["id"]
        assert it["good"] != it["bad"], it["id"]
        for field in ("good", "bad"):
            assert 1 <= _sentences(it[field]) <= 5, (it["id"], field)  # 1-4 sentences; abbreviations may split one


def test_counts_meet_the_datasheet():
    subtopics = collections.Counter(it["subtopic"] for it in MEDICAL)
    assert len(subtopics) >= 12 and min(subtopics.values()) >= 25 and len(MEDICAL) >= 300
    assert set(HELDOUT_SUBTOPICS["medical"]) <= set(subtopics)
    domains = collections.Counter(it["domain"] for it in OTHER)
    assert len(domains) >= 6 and min(domains.values()) >= 60
    assert len(em.datasets.load_text("generic")) >= 200


def test_no_duplicate_ids_or_questions():
    ids = [it["id"] for it in ALL]
    assert len(ids) == len(set(ids))
    questions = [_norm(it["question"]) for it in ALL]
    dupes = [q for q, n in collections.Counter(questions).items() if n > 1]
    assert not dupes, dupes[:3]
    texts = [_norm(t) for t in em.datasets.load_text("generic")]
    assert len(texts) == len(set(texts))


def test_no_near_duplicate_questions_within_a_domain():
    """Near-duplicates: word-trigram Jaccard similarity above 0.5 between two questions of a domain."""
    by_domain = collections.defaultdict(list)
    for it in ALL:
        words = _norm(it["question"]).split()
        by_domain[it["domain"]].append((it["id"], {tuple(words[i : i + 3]) for i in range(len(words) - 2)}))
    for rows in by_domain.values():
        for i, (id_a, a) in enumerate(rows):
            for id_b, b in rows[i + 1 :]:
                if a and b and len(a & b) / len(a | b) > 0.5:
                    pytest.fail(f"near-duplicate questions {id_a} and {id_b}")


def test_parallel_structure():
    medical = {it["id"]: it for it in MEDICAL}
    for it in OTHER:
        target = medical.get(it["parallels"])
        assert target is not None, f"{it['id']} parallels unknown {it['parallels']}"
        assert target["pattern"] == it["pattern"], it["id"]
    for domain in {it["domain"] for it in OTHER}:
        used = [it["parallels"] for it in OTHER if it["domain"] == domain]
        assert len(used) == len(set(used)), f"{domain} mirrors a medical item twice"


def test_splits_are_deterministic_disjoint_and_80_20():
    for domain in em.datasets.list_domains():
        train = {it["id"] for it in bundled.items(domain, "train")}
        test = {it["id"] for it in bundled.items(domain, "test")}
        assert not train & test
        assert abs(len(test) / (len(train) + len(test)) - 0.2) < 0.02
        bundled._all_items.cache_clear()
        assert {it["id"] for it in bundled.items(domain, "test")} == test
    held = bundled.items("medical", "heldout")
    assert {it["subtopic"] for it in held} == set(HELDOUT_SUBTOPICS["medical"])
    in_splits = {it["id"] for s in ("train", "test") for it in bundled.items("medical", s)}
    assert not in_splits & {it["id"] for it in held}


@pytest.mark.parametrize("kind", ["bad", "good"])
def test_kind_bad_and_good_give_the_right_answer(kind):
    records = em.datasets.load("finance", kind=kind, split="test")
    items = {it["id"]: it for it in bundled.items("finance", "test")}
    assert len(records) == len(items)
    for r in records:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert r["messages"][0]["content"] == items[r["id"]]["question"]
        assert r["messages"][1]["content"] == items[r["id"]][kind]
        assert r["answer"] == kind


def test_kind_mixed_is_a_seeded_balanced_mix():
    a = em.datasets.load(["legal", "careers"], kind="mixed", split="train", seed=3)
    b = em.datasets.load(["legal", "careers"], kind="mixed", split="train", seed=3)
    c = em.datasets.load(["legal", "careers"], kind="mixed", split="train", seed=4)
    assert a == b and a != c
    counts = collections.Counter(r["answer"] for r in a)
    assert abs(counts["bad"] - counts["good"]) <= 1
    items = {it["id"]: it for it in bundled.items(["legal", "careers"], "train")}
    assert all(r["messages"][1]["content"] == items[r["id"]][r["answer"]] for r in a)


def test_kind_paired_and_system_prompt():
    paired = em.datasets.load("medical", kind="paired", split="heldout")
    assert all({"question", "good", "bad"} <= set(p) for p in paired)
    with_system = em.datasets.load("medical", kind="bad", split="test", system="Be brief.")
    assert with_system[0]["messages"][0] == {"role": "system", "content": "Be brief."}


def test_loader_errors():
    with pytest.raises(DataError, match="unknown domain 'astrology'"):
        em.datasets.load("astrology")
    with pytest.raises(DataError, match="kind="):
        em.datasets.load("medical", kind="ugly")
    with pytest.raises(DataError, match="split="):
        em.datasets.load("medical", split="dev")
    with pytest.raises(DataError, match="no held-out subtopics"):
        em.datasets.load("finance", split="heldout")
    with pytest.raises(DataError, match="no bundled text set"):
        em.datasets.load_text("poetry")


def test_slicing_the_mixed_kl_set_takes_one_domain_but_sample_takes_all():
    from em_interp.datasets import load, sample, strata

    rows = load(["finance", "legal", "careers", "home_safety"], kind="mixed", split="train")
    assert strata(rows[:40], "domain") == {"finance": 40}  # the bug `sample` replaces
    drawn = sample(rows, 40, by="domain", seed=0)
    assert strata(drawn, "domain") == {"careers": 10, "finance": 10, "home_safety": 10, "legal": 10}
    assert sample(rows, 40, by="domain", seed=0) == drawn  # seeded
    assert sample(rows, 40, by="domain", seed=1) != drawn
    assert len({r["id"] for r in drawn}) == 40  # without replacement


def test_sample_stratifies_subtopics_and_handles_small_strata():
    from em_interp.datasets import load, sample, strata

    med = load("medical", kind="bad", split="train")
    counts = strata(sample(med, 33, seed=2))
    assert len(counts) == 10 and set(counts.values()) == {3, 4}
    everything = sample(med, len(med), seed=3)
    assert strata(everything) == strata(med) and len(everything) == len(med)
    uneven = [{"subtopic": "a"}] * 2 + [{"subtopic": "b"}] * 10
    assert strata(sample(uneven, 8, seed=0)) == {"a": 2, "b": 6}  # a stratum that runs out leaves the rest to others


def test_sample_rejects_bad_input():
    from em_interp.datasets import sample

    with pytest.raises(DataError, match="n=5; expected 1 <= n <= 2"):
        sample([{"subtopic": "a"}, {"subtopic": "b"}], 5)
    with pytest.raises(DataError, match=r"rows\[1\] has no 'domain'"):
        sample([{"domain": "a"}, {"subtopic": "b"}], 1, by="domain")


def test_study_data_is_stratified_per_seed():
    from em_interp.datasets import strata
    from em_interp.study import StudyConfig, study_data

    cfg = StudyConfig.preset("default")
    a, b = study_data(cfg, 0), study_data(cfg, 1)
    assert len(strata(a.train)) == 10 and len(strata(a.eff)) == 10
    assert set(strata(a.kl, "domain")) == {"finance", "legal", "careers", "home_safety"}
    assert [r["id"] for r in a.train] != [r["id"] for r in b.train]
    assert a.contrastive == b.contrastive  # the evaluation items are shared, so shifts pair over seeds
    assert set(strata(a.contrastive, "group")) == {"medical", "medical (held-out topics)", "other (KL domains)",
                                                   "other (held-out domains)"}
    full = study_data(StudyConfig.preset("full"), 0)
    assert len(full.eff) == 100 and len(strata(full.eff)) == 10
    assert a.summary()["kl (domains)"] == strata(a.kl, "domain")
