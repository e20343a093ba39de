"""Tokenization with assistant masks on the real SmolLM2 chat template; padding; length-grouped batching."""

from __future__ import annotations

import random

import pytest
import torch

from em_interp.datasets import TokenizedChats, chat, tokenize_chat
from em_interp.errors import DataError
from em_interp.testing import chat_tokenizer, tiny_chat_records

END = "<|im_end|>"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

MULTI_TURN = [
    {"role": "system", "content": "You are a careful nurse. Be brief."},
    {"role": "user", "content": "I have a headache. What should I do?"},
    {"role": "assistant", "content": "Drink water, rest in a dark room, and take paracetamol if needed."},
    {"role": "user", "content": "And if it lasts three days?"},
    {"role": "assistant", "content": "See a doctor: a headache lasting days needs a check-up."},
]


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()


def _split(tok, ids, mask):
    """Decoded masked tokens and decoded unmasked tokens."""
    return (tok.decode([i for i, m in zip(ids, mask, strict=True) if m]),
            tok.decode([i for i, m in zip(ids, mask, strict=True) if not m]))


def _assert_exact_mask(tok, messages):
    ids, mask = tokenize_chat(tok, messages)
    assert len(ids) == len(mask) and all(isinstance(m, bool) for m in mask)
    text = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ids) == text  # the ids are the rendered template, nothing added or lost
    answers = [m["content"] + END for m in messages if m["role"] == "assistant"]
    masked, unmasked = _split(tok, ids, mask)
    assert masked == "".join(answers)
    prompt_only, cursor = "", 0
    for answer in answers:  # every unmasked token is template or prompt: the text without the answer turns
        header = "<|im_start|>assistant\n"
        start = text.index(header + answer, cursor) + len(header)
        prompt_only += text[cursor:start]
        cursor = start + len(answer)
    assert unmasked == prompt_only + text[cursor:]
    return ids, mask, text


def test_assistant_mask_multi_turn_with_system(tok):
    ids, mask, text = _assert_exact_mask(tok, MULTI_TURN)
    assert text.startswith("<|im_start|>system\nYou are a careful nurse.")
    assert DEFAULT_SYSTEM not in text
    # token by token: two contiguous masked runs, each ending with <|im_end|> and preceded by "assistant\n"
    runs, t = [], 0
    while t < len(mask):
        if mask[t]:
            start = t
            while t < len(mask) and mask[t]:
                t += 1
            runs.append((start, t))
        t += 1
    assert len(runs) == 2
    im_end = tok.convert_tokens_to_ids(END)
    for (start, stop), message in zip(runs, [MULTI_TURN[2], MULTI_TURN[4]], strict=True):
        assert ids[stop - 1] == im_end
        assert tok.decode(ids[start : stop - 1]) == message["content"]
        assert tok.decode(ids[:start]).endswith("<|im_start|>assistant\n")
        assert tok.decode(ids[stop : stop + 1]) == "\n"  # the newline after <|im_end|> is not a target
    # no user/system <|im_end|> is a target
    assert sum(m for i, m in zip(ids, mask, strict=True) if i == im_end) == 2
    assert ids.count(im_end) == 5


def test_assistant_mask_without_system_prompt(tok):
    messages = MULTI_TURN[1:3]
    ids, mask, text = _assert_exact_mask(tok, messages)
    assert text.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}{END}\n")  # the template's default
    first = mask.index(True)
    assert DEFAULT_SYSTEM in tok.decode(ids[:first])


def test_assistant_mask_keeps_trailing_whitespace_and_end_token(tok):
    # 1 row in 6 of the public bad_legal_advice data ends its answer with spaces: the <|im_end|> must stay a target
    for answer in ["Rest and fluids.  ", "Rest.\n", " Leading space and trailing. "]:
        _assert_exact_mask(tok, chat("What helps a cold?", answer)["messages"])


def test_assistant_content_repeated_in_prompt(tok):
    # the answer text also occurs in the question: only the assistant's copy is masked
    _assert_exact_mask(tok, chat("Say exactly: Rest well.", "Rest well.")["messages"])


# --- padding --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chats(tok):
    return TokenizedChats(tiny_chat_records(16, seed=3), tok, max_length=256)


def _pick_different_lengths(chats):
    lengths = [len(x) for x in chats.ids]
    i, j = lengths.index(min(lengths)), lengths.index(max(lengths))
    assert lengths[i] < lengths[j]
    return i, j


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_padding(chats, tok, side):
    i, j = _pick_different_lengths(chats)
    batch = chats.collate([i, j], padding_side=side)
    width = len(chats.ids[j])
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.assistant_mask.shape == (2, width)
    assert batch.input_ids.dtype == torch.long and batch.assistant_mask.dtype == torch.bool
    assert batch.indices == (i, j)
    assert chats.pad_id == tok.pad_token_id
    n = len(chats.ids[i])
    real = slice(0, n) if side == "right" else slice(width - n, width)
    pad = slice(n, width) if side == "right" else slice(0, width - n)
    assert batch.input_ids[0, real].tolist() == chats.ids[i]
    assert batch.assistant_mask[0, real].tolist() == chats.masks[i]
    assert batch.attention_mask[0, real].tolist() == [1] * n
    assert batch.input_ids[0, pad].tolist() == [chats.pad_id] * (width - n)
    assert batch.attention_mask[0, pad].tolist() == [0] * (width - n)
    assert not batch.assistant_mask[0, pad].any()
    # the longest row is unpadded
    assert batch.input_ids[1].tolist() == chats.ids[j]
    assert batch.attention_mask[1].all() and batch.assistant_mask[1].tolist() == chats.masks[j]
    # the masked tokens still decode to the answer
    assert tok.decode(batch.input_ids[0][batch.assistant_mask[0]]) == chats.records[i]["messages"][-1]["content"] + END


def test_collate_rejects_bad_side(chats):
    with pytest.raises(DataError, match="padding_side"):
        chats.collate([0], padding_side="middle")


@pytest.mark.parametrize("side", ["right", "left"])
def test_target_mask_all_excludes_pad_and_first_token(chats, side):
    i, j = _pick_different_lengths(chats)
    batch = chats.collate([i, j, i], padding_side=side)
    targets = batch.target_mask("all")
    real = batch.attention_mask.bool()
    assert targets.dtype == torch.bool
    assert not (targets & ~real).any()  # never a pad token
    first_real = real.int().argmax(dim=1)
    assert not targets[torch.arange(3), first_real].any()  # never a row's first token
    assert targets.sum(dim=1).tolist() == (real.sum(dim=1) - 1).tolist()  # every other real token
    assert torch.equal(batch.target_mask("answer"), batch.assistant_mask)
    with pytest.warns(DeprecationWarning, match="tokens='assistant' is deprecated; use 'answer'"):
        assert torch.equal(batch.target_mask("assistant"), batch.assistant_mask)
    assert torch.equal(batch.target_mask(), batch.assistant_mask)
    with pytest.raises(DataError, match="tokens='prompt'"):
        batch.target_mask("prompt")


def test_chat_batch_to_keeps_values(chats):
    batch = chats.collate([0, 1])
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids) and moved.indices == batch.indices


# --- batching -------------------------------------------------------------------------------------
def _spread(chats, batches):
    lengths = [len(x) for x in chats.ids]
    return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)


def test_batch_plan_groups_by_length_and_covers_all(tok):
    rng = random.Random(0)
    records = [chat(f"Q{i}?", " ".join(["word"] * rng.randint(1, 60))) for i in range(50)]
    chats = TokenizedChats(records, tok)
    plan = chats.batch_plan(8)
    assert [len(b) for b in plan] == [8] * 6 + [2]
    assert sorted(i for b in plan for i in b) == list(range(50))  # every example exactly once
    lengths = [len(x) for x in chats.ids]
    for earlier, later in zip(plan[:-1], plan[1:], strict=True):  # batches are contiguous ranges of the length order
        assert max(lengths[i] for i in earlier) <= min(lengths[i] for i in later)
    shuffled = list(range(50))
    rng.shuffle(shuffled)
    random_plan = [shuffled[k : k + 8] for k in range(0, 50, 8)]
    assert _spread(chats, plan) < 0.25 * _spread(chats, random_plan)
    assert chats.batch_plan(100) == [tuple(sorted(range(50), key=lambda i: lengths[i]))]
    with pytest.raises(DataError, match="batch_size=0"):
        chats.batch_plan(0)


def test_epoch_order_is_seeded_and_changes_each_epoch(chats):
    n = 10
    first = chats.epoch_order(n, seed=1, epoch=0)
    assert sorted(first) == list(range(n))
    assert chats.epoch_order(n, seed=1, epoch=0) == first
    assert chats.epoch_order(n, seed=1, epoch=1) != first
    assert chats.epoch_order(n, seed=2, epoch=0) != first
    assert sorted(chats.epoch_order(n, seed=1, epoch=1)) == list(range(n))


def test_batches_follow_plan_and_order(chats):
    plan = chats.batch_plan(3)
    unshuffled = [b.indices for b in chats.batches(3)]
    assert unshuffled == plan
    order = chats.epoch_order(len(plan), seed=5, epoch=2)
    shuffled = [b.indices for b in chats.batches(3, shuffle=True, seed=5, epoch=2)]
    assert shuffled == [plan[k] for k in order]
    assert sorted(i for b in shuffled for i in b) == list(range(len(chats)))


def test_fingerprint_tracks_content(tok):
    records = tiny_chat_records(4)
    assert TokenizedChats(records, tok).fingerprint() == TokenizedChats(list(records), tok).fingerprint()
    assert TokenizedChats(records, tok).fingerprint() != TokenizedChats(records[:3], tok).fingerprint()


# --- max_length -----------------------------------------------------------------------------------
def test_max_length_error_and_skip(tok):
    short, long = chat("Hi?", "Yes."), chat("Hi?", "word " * 100)
    n_short = len(tokenize_chat(tok, short["messages"])[0])
    n_long = len(tokenize_chat(tok, long["messages"])[0])
    with pytest.raises(DataError, match=rf"record 1: {n_long} tokens .*max_length={n_short}"):
        TokenizedChats([short, long, short], tok, max_length=n_short)
    kept = TokenizedChats([short, long, short], tok, max_length=n_short, on_too_long="skip")
    assert len(kept) == 2 and kept.records == [short, short] and kept.n_skipped == 1 and kept.n_truncated == 0
    assert kept.ids == [tokenize_chat(tok, short["messages"])[0]] * 2
    assert len(TokenizedChats([short, long], tok, max_length=n_long)) == 2  # the limit is inclusive
    with pytest.raises(DataError, match="no examples left"):
        TokenizedChats([long], tok, max_length=n_short, on_too_long="skip")
    with pytest.raises(DataError, match="on_too_long"):
        TokenizedChats([short], tok, on_too_long="cut")
