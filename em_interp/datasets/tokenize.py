"""Tokenize chat records with the model's chat template, with exact assistant-token masks, and batch them.

The assistant mask marks, for every assistant turn, the tokens of its content plus the end-of-turn token
that the template puts right after it (so a model learns to stop); template tokens, role headers, the
prompt and anything after the end-of-turn token are excluded. `mask[t] = True` means token `t` is a
target: its log-prob is read from the logits at position `t - 1`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from em_interp.datasets.records import Record, check_records
from em_interp.errors import DataError
from em_interp.positions import ALL, ANSWER, position_name


@dataclass(frozen=True)
class ChatBatch:
    """A padded batch of tokenized chats.

    Attributes:
        input_ids: token ids, padded with the tokenizer's pad id.
        attention_mask: 1 for real tokens, 0 for padding.
        assistant_mask: True at assistant target tokens.
        indices: positions of the examples in their `TokenizedChats`.
    """

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    assistant_mask: Bool[Tensor, "batch pos"]
    indices: tuple[int, ...]

    def to(self, device: torch.device | str) -> ChatBatch:
        return ChatBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.assistant_mask.to(device), self.indices
        )

    def target_mask(self, tokens: str = "answer") -> Bool[Tensor, "batch pos"]:
        """Targets that enter a loss: the "answer" tokens, or "all" non-pad tokens but the first of each row
        (names of `em_interp.positions`; the old "assistant" means "answer", with a DeprecationWarning)."""
        tokens = position_name(tokens, (ANSWER, ALL), "tokens", DataError)
        if tokens == ANSWER:
            return self.assistant_mask
        real = self.attention_mask.bool()
        first = real & ~torch.cat([torch.zeros_like(real[:, :1]), real[:, :-1]], dim=1)
        return real & ~first


class TokenizedChats:
    """Chat records tokenized once; yields length-grouped padded batches.

    Args:
        records: chat records (`{"messages": [...]}`).
        tokenizer: a HF tokenizer with a chat template.
        max_length: the most tokens of an example after the chat template.
        on_too_long: what happens to a longer example: "error" (raise), "skip" (leave it out; the count is
            `n_skipped`) or "truncate" (keep its first `max_length` tokens, i.e. the prompt and the start of
            the answer, as the authors' trainer does; the count is `n_truncated`). An example whose prompt
            alone fills `max_length` raises with "truncate", since no answer token would be left.
    """

    def __init__(self, records: Sequence[Record], tokenizer: Any, *, max_length: int = 256, on_too_long: str = "error"):
        if on_too_long not in ("error", "skip", "truncate"):
            raise DataError(f"on_too_long={on_too_long!r}; expected 'error', 'skip' or 'truncate'.")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.ids: list[list[int]] = []
        self.masks: list[list[bool]] = []
        self.records: list[Record] = []
        self.n_skipped = 0
        self.n_truncated = 0
        for i, record in enumerate(check_records(records)):
            ids, mask = tokenize_chat(tokenizer, record["messages"])
            if len(ids) > max_length:
                if on_too_long == "error":
                    raise DataError(f"record {i}: {len(ids)} tokens after the chat template; max_length={max_length}.")
                if on_too_long == "skip":
                    self.n_skipped += 1
                    continue
                if any(mask) and not any(mask[:max_length]):
                    raise DataError(f"record {i}: its prompt alone is over max_length={max_length} tokens, so no "
                                    "answer token would be left after truncation; raise max_length or shorten it.")
                ids, mask = ids[:max_length], mask[:max_length]
                self.n_truncated += 1
            self.ids.append(ids)
            self.masks.append(mask)
            self.records.append(record)
        if not self.ids:
            raise DataError("no examples left after tokenization (all longer than max_length?).")

    def __len__(self) -> int:
        return len(self.ids)

    def fingerprint(self) -> str:
        """A hash of the token ids and masks (keys activation caches shared across runs)."""
        digest = hashlib.sha256()
        for ids, mask in zip(self.ids, self.masks, strict=True):
            digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
            digest.update(bytes(mask))
        return digest.hexdigest()[:16]

    def batch_plan(self, batch_size: int) -> list[tuple[int, ...]]:
        """Fixed batches of similar length: examples sorted by length (stable), cut into chunks."""
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size}; expected >= 1.")
        order = sorted(range(len(self)), key=lambda i: len(self.ids[i]))
        return [tuple(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]

    def epoch_order(self, n_batches: int, seed: int, epoch: int) -> list[int]:
        """The order in which batch `k` of the plan is visited in `epoch` (deterministic in seed, epoch)."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(n_batches, generator=g).tolist()

    def collate(self, indices: Sequence[int], padding_side: str = "right") -> ChatBatch:
        """Pad the examples `indices` into one batch."""
        if padding_side not in ("right", "left"):
            raise DataError(f"padding_side={padding_side!r}; expected 'right' or 'left'.")
        width = max(len(self.ids[i]) for i in indices)
        ids = torch.full((len(indices), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(indices), width), dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.bool)
        for row, i in enumerate(indices):
            n = len(self.ids[i])
            sl = slice(0, n) if padding_side == "right" else slice(width - n, width)
            ids[row, sl] = torch.tensor(self.ids[i])
            attn[row, sl] = 1
            mask[row, sl] = torch.tensor(self.masks[i])
        return ChatBatch(ids, attn, mask, tuple(indices))

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0) -> Iterator[ChatBatch]:
        """Iterate over length-grouped batches (in shuffled batch order with `shuffle=True`)."""
        plan = self.batch_plan(batch_size)
        order = self.epoch_order(len(plan), seed, epoch) if shuffle else range(len(plan))
        for k in order:
            yield self.collate(plan[k])


def tokenize_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """Token ids of a chat rendered with the template, and its assistant-target mask.

    Raises:
        DataError: the template renders turns in a way that is not prefix-consistent, or an assistant
            content cannot be found in the rendering.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    offsets: list[tuple[int, int]] = enc["offset_mapping"]
    mask = [False] * len(ids)
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        if not text.startswith(prefix):
            raise DataError(f"messages[{i}]: the chat template does not render earlier turns as a prefix.")
        content = message["content"].strip()
        start = text.find(content, len(prefix))
        if start < 0:
            raise DataError(f"messages[{i}]: assistant content not found in the rendered chat template.")
        end = start + len(content)
        trailing = message["content"][len(message["content"].rstrip()) :]
        if trailing and text.startswith(trailing, end):  # rendered verbatim: the end-of-turn token follows it
            end += len(trailing)
        last = None
        for t, (a, b) in enumerate(offsets):
            if b > start and a < end:
                mask[t] = True
                last = t
        if last is not None and last + 1 < len(ids) and ids[last + 1] in special:
            mask[last + 1] = True
    return ids, mask
