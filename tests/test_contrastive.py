"""Contrastive log-prob metric: exact against a one-chat-at-a-time reference, shifts, bootstrap, domains."""

from __future__ import annotations

import json

import pytest
import torch

import em_interp as em
from em_interp import datasets
from em_interp.adapters import LoRA, SteeringVector
from em_interp.datasets import tokenize_chat
from em_interp.datasets.records import chat
from em_interp.errors import DataError
from em_interp.eval.contrastive import ContrastiveResult, contrastive

N_ITEMS = 6


@pytest.fixture(scope="module")
def items():
    chosen = datasets.load("medical", kind="paired", split="test")[:N_ITEMS]
    for i, it in enumerate(chosen):  # two domains for the grouping tests
        it["domain"] = "medical" if i % 2 == 0 else "finance"
    return chosen


def _mean_logprob(model, question, answer):
    ids, mask = tokenize_chat(model.tokenizer, chat(question, answer)["messages"])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).float(), dim=-1)[0]
    picked = [logp[t - 1, ids[t]] for t in range(1, len(ids)) if mask[t]]
    return float(torch.stack(picked).mean())


def _reference(model, items, adapter=None):
    def diffs():
        return [_mean_logprob(model, it["question"], it["bad"]) - _mean_logprob(model, it["question"], it["good"])
                for it in items]

    base = diffs()
    if adapter is None:
        return base, base
    with adapter.applied(model):
        return base, diffs()


def _vector(model, seed=3, alpha=2.0):
    return SteeringVector(model, layer=1, init="random", alpha=alpha, seed=seed)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_matches_reference_exactly(tiny, items, batch_size):
    vec = _vector(tiny)
    res = contrastive(tiny, items, vec, batch_size=batch_size, n_boot=50, progress=False)
    base, adapted = _reference(tiny, items, vec)
    assert [r["id"] for r in res.items] == [it["id"] for it in items]
    for row, b, a in zip(res.items, base, adapted, strict=True):
        assert row["base"] == pytest.approx(b, abs=1e-5)
        assert row["adapted"] == pytest.approx(a, abs=1e-5)
        assert row["shift"] == pytest.approx(a - b, abs=1e-5)
    assert any(abs(r["shift"]) > 1e-3 for r in res.items)  # the steering vector changes shifts


def test_lora_and_list_of_adapters(tiny, items):
    lora = LoRA(tiny, layer=2, rank=2, init="random", seed=1)
    res = contrastive(tiny, items, [lora], n_boot=0, progress=False)
    _, adapted = _reference(tiny, items, lora)
    assert [r["adapted"] for r in res.items] == pytest.approx(adapted, abs=1e-5)
    # two vectors at one hook applied together equal their sum
    v1, v2 = _vector(tiny, seed=1, alpha=1.0), _vector(tiny, seed=2, alpha=1.0)
    both = SteeringVector(tiny, layer=1, init=(v1.vector + v2.vector).detach(), alpha=1.0)
    pair = contrastive(tiny, items, [v1, v2], n_boot=0, progress=False)
    summed = contrastive(tiny, items, both, n_boot=0, progress=False)
    assert [r["shift"] for r in pair.items] == pytest.approx([r["shift"] for r in summed.items], abs=1e-5)


def test_no_adapters_gives_zero_shift(tiny, items):
    res = contrastive(tiny, items, (), n_boot=100, progress=False)
    assert all(r["shift"] == 0.0 and r["adapted"] == r["base"] for r in res.items)
    stats = res.domains["all"]
    assert stats["mean_shift"] == 0.0 and stats["ci_low"] == 0.0 and stats["ci_high"] == 0.0
    assert stats["frac_bad_base"] == stats["frac_bad_adapted"]


def test_bootstrap_ci_is_seeded_and_contains_mean(tiny, items):
    vec = _vector(tiny)
    a = contrastive(tiny, items, vec, n_boot=500, seed=7, progress=False)
    b = contrastive(tiny, items, vec, n_boot=500, seed=7, progress=False)
    c = contrastive(tiny, items, vec, n_boot=500, seed=8, progress=False)
    for name, s in a.domains.items():
        assert s["ci_low"] <= s["mean_shift"] <= s["ci_high"]
        assert s == b.domains[name]
    assert a.domains["all"]["ci_low"] != c.domains["all"]["ci_low"]
    assert a.domains["all"]["mean_shift"] == c.domains["all"]["mean_shift"]


def test_domain_grouping(tiny, items):
    vec = _vector(tiny)
    res = contrastive(tiny, items, vec, n_boot=10, progress=False)
    assert list(res.domains) == ["all", "medical", "finance"]
    assert res.domains["all"]["n"] == N_ITEMS
    for name in ("medical", "finance"):
        rows = [r for r in res.items if r["domain"] == name]
        s = res.domains[name]
        assert s["n"] == len(rows) == N_ITEMS // 2
        assert s["mean_shift"] == pytest.approx(sum(r["shift"] for r in rows) / len(rows), abs=1e-9)
        assert s["frac_bad_adapted"] == pytest.approx(sum(r["adapted"] > 0 for r in rows) / len(rows))
        assert s["frac_bad_base"] == pytest.approx(sum(r["base"] > 0 for r in rows) / len(rows))


def test_result_serialises(tiny, items):
    res = contrastive(tiny, items[:2], _vector(tiny), n_boot=10, progress=False)
    assert isinstance(res, ContrastiveResult)
    data = json.loads(json.dumps(res.to_dict()))
    assert set(data) == {"items", "domains", "meta"}
    assert set(data["items"][0]) == {"id", "domain", "subtopic", "base", "adapted", "shift"}
    assert "medical" in res.summary() and "SteeringVector" in data["meta"]["adapters"][0]


def test_bad_items(tiny):
    with pytest.raises(DataError, match="empty"):
        contrastive(tiny, [], progress=False)
    with pytest.raises(DataError, match=r"paired_items\[0\].*'good'"):
        contrastive(tiny, [{"question": "Q?", "bad": "B."}], progress=False)
    with pytest.raises(DataError, match="reserved"):
        contrastive(tiny, [{"question": "Q?", "good": "G.", "bad": "B.", "domain": "all"}], progress=False)


def test_contrastive_many_equals_separate_calls(tiny):
    model = tiny
    items = em.datasets.load(["medical", "finance"], kind="paired", split="test")[:3] + em.datasets.load(
        "finance", kind="paired", split="test")[:2]
    a = em.SteeringVector(model, layer=2, init="random", alpha=3.0, seed=1)
    b = em.LoRA(model, layer=[1, 3], rank=2, init="random", seed=2)
    many = em.eval.contrastive_many(model, items, {"a": a, "b": [b], "none": ()}, progress=False)
    for name, adapters in (("a", a), ("b", [b]), ("none", ())):
        single = em.eval.contrastive(model, items, adapters, progress=False)
        for x, y in zip(many[name].items, single.items, strict=True):
            assert x["base"] == pytest.approx(y["base"], abs=1e-5)
            assert x["adapted"] == pytest.approx(y["adapted"], abs=1e-5)
    assert all(r["shift"] == 0.0 for r in many["none"].items)
