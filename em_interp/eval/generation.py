"""Batched sampling from a TransformerBridge with a KV cache, with adapters and hooks applied.

The loop runs the HF model inside the bridge step by step (`em_interp.model.decode.CachedDecoder`, then
`unembed` on the last position only), so every bridge hook point inside the HF modules fires: adapters passed here, adapters
and ablation hooks the caller attached, all apply. While the KV cache feeds one token per step,
`em_interp.model.hooks.position_offset` holds the absolute (padded) column of the step's first token, so
position-restricted hooks select the same tokens as in a full forward over the whole sequence.

Prompts are left-padded into batches of similar length; each row's position ids count from its first
real token, so a prompt generates the same tokens alone or in any batch (up to float rounding).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from em_interp.datasets.tokenize import tokenize_chat
from em_interp.errors import AdapterError, DataError
from em_interp.interventions import as_interventions, interventions_applied
from em_interp.model.decode import CachedDecoder
from em_interp.model.forward import hf_model_of, model_device, unembed
from em_interp.model.hooks import position_offset
from em_interp.positions import ALL, ANSWER, DEPRECATED, PROMPT, position_name

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
Prompt = str | Messages
GEN_POSITIONS = (ALL, ANSWER, PROMPT)  # names of em_interp.positions; "answer" = the generated tokens


# --- prompts and stop tokens ---------------------------------------------------------------------
def as_chats(prompts: Prompt | Sequence[Prompt], system: str | None = None) -> list[Messages]:
    """Prompts (a user message, a chat, or a list of either) as chat message lists.

    A `str` or a list of message dicts is one prompt. `system`, if given, is prepended to every chat
    that has no system message.
    """
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict)):
        prompts = [prompts]  # type: ignore[list-item]
    chats: list[Messages] = []
    for i, p in enumerate(prompts):  # type: ignore[arg-type]
        if isinstance(p, str):
            if not p.strip():
                raise DataError(f"prompts[{i}] is an empty string; expected a user message.")
            messages = [{"role": "user", "content": p}]
        elif isinstance(p, (list, tuple)) and p and all(isinstance(m, dict) and "role" in m and "content" in m for m in p):
            messages = [dict(m) for m in p]
        else:
            raise DataError(f"prompts[{i}] is {type(p).__name__}; expected a str or a list of {{role, content}} dicts.")
        if system is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        chats.append(messages)
    return chats


def prompt_ids(tokenizer: Any, messages: Messages) -> list[int]:
    """Token ids of a chat rendered with `add_generation_prompt=True` (as `tokenize_chat` renders it)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_token_ids(model: TransformerBridge) -> set[int]:
    """Token ids that end a reply: the tokenizer's EOS, the generation config's EOS ids, and the chat
    template's end-of-turn token (the special token it puts after an assistant message, e.g. <|im_end|>)."""
    tokenizer = model.tokenizer
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(hf_model_of(model), "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in ([gen_eos] if isinstance(gen_eos, int) else gen_eos))
    try:
        toks, mask = tokenize_chat(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "OK"}])
        last = max(t for t, m in enumerate(mask) if m)
        special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        if toks[last] in special:
            ids.add(int(toks[last]))
    except (DataError, ValueError) as exc:  # a template without assistant turns: EOS ids only
        log.debug("no end-of-turn token found in the chat template (%s)", exc)
    return ids


# --- sampling ------------------------------------------------------------------------------------
def sample_next(
    logits: Float[Tensor, "batch vocab"], temperature: float, top_p: float, generator: torch.Generator | None
) -> Int[Tensor, " batch"]:
    """Next tokens: argmax when `temperature == 0`, else a draw from softmax(logits / T) restricted to
    the smallest set of most likely tokens whose probability reaches `top_p` (the top token always kept)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before the token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _row_positions(
    positions: str | int, attention_mask: Int[Tensor, "batch width"], max_new_tokens: int
) -> str | int | Bool[Tensor, "batch total"]:
    """The `positions` argument for adapters, in padded-column coordinates of the whole generation."""
    width = attention_mask.shape[1]
    if isinstance(positions, str):
        if positions == "all":
            return "all"
        if positions == ANSWER:
            return width  # column `width` holds the first generated token in every row
    real = torch.cat([attention_mask.bool(), attention_mask.new_ones(attention_mask.shape[0], max_new_tokens).bool()], 1)
    if positions == "prompt":
        real[:, width:] = False
        return real
    # int k: from the row's k-th token (counting the row's own tokens, template included)
    index = real.long().cumsum(-1) - 1
    return real & (index >= int(positions))


def _check_positions(positions: Any) -> str | int:
    """`positions` of `generate` in the shared vocabulary ("generated" is the old name of "answer")."""
    if isinstance(positions, str) and positions in (*GEN_POSITIONS, *DEPRECATED):
        return position_name(positions, GEN_POSITIONS, "generate: positions", AdapterError)
    if isinstance(positions, int) and not isinstance(positions, bool) and positions >= 0:
        return positions
    raise AdapterError(
        f"positions={positions!r}; generate() expects 'all', 'answer' (the generated tokens only), 'prompt', or an "
        "int k >= 0 (tokens from the k-th of each rendered prompt on)."
    )


# --- the loop ------------------------------------------------------------------------------------
def _generate_batch(
    model: TransformerBridge,
    rows: list[list[int]],
    *,
    adapters: list[Any],
    scale: float,
    positions: str | int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    stop: Tensor,
    pad_id: int,
) -> list[list[int]]:
    """Generate for one batch of prompt ids (left-padded); returns new ids per row, stop token excluded."""
    device = model_device(model)
    width, n = max(len(r) for r in rows), len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((n, width), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long, device=device)
        attn[i, width - len(r) :] = 1
    selection = _row_positions(positions, attn, max_new_tokens)
    stop = stop.to(device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    new: list[Tensor] = []
    feed, offset = ids, 0
    own = None if isinstance(selection, str) else selection  # "all": each intervention's own positions
    with interventions_applied(model, adapters, scale=scale, positions=own), CachedDecoder(model) as decoder:
        for _ in range(max_new_tokens):
            pos_ids = (attn.cumsum(-1) - 1).clamp(min=0)[:, offset:]
            token = position_offset.set(offset)
            try:
                hidden = decoder.step(feed, attn, pos_ids)
            finally:
                position_offset.reset(token)
            logits = unembed(model, hidden[:, None])[:, 0]
            nxt = sample_next(logits, temperature, top_p, generator).to(device)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            new.append(nxt)
            done |= torch.isin(nxt, stop)
            if bool(done.all()):
                break
            offset += feed.shape[1]
            feed = nxt[:, None]
            attn = torch.cat([attn, attn.new_ones(n, 1)], dim=1)
    if not new:
        return [[] for _ in rows]
    tokens = torch.stack(new, dim=1).tolist()
    stop_set = set(stop.tolist())
    result = []
    for row in tokens:
        end = next((t for t, tok in enumerate(row) if tok in stop_set), len(row))
        result.append(row[:end])
    return result


def generate_tokens(
    model: TransformerBridge,
    prompts: Prompt | Sequence[Prompt],
    *,
    adapters: Any = (),
    scale: float = 1.0,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    n_samples: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    system: str | None = None,
    positions: str | int = "all",
    progress: bool = True,
) -> list[list[int]]:
    """Like `generate`, but returns the new token ids of each sample (the stop token excluded)."""
    if max_new_tokens < 0 or n_samples < 1 or batch_size < 1:
        raise DataError(
            f"max_new_tokens={max_new_tokens}, n_samples={n_samples}, batch_size={batch_size}; "
            "expected max_new_tokens >= 0, n_samples >= 1 and batch_size >= 1."
        )
    if temperature < 0 or not 0 < top_p <= 1:
        raise DataError(f"temperature={temperature}, top_p={top_p}; expected temperature >= 0 and 0 < top_p <= 1.")
    positions = _check_positions(positions)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise DataError("generate(): model.tokenizer with a chat template is required.")
    adapter_list = as_interventions(adapters)
    encoded = [prompt_ids(tokenizer, chat) for chat in as_chats(prompts, system)]
    owner = [p for p in range(len(encoded)) for _ in range(n_samples)]  # sample row -> prompt, prompt-major
    order = sorted(range(len(owner)), key=lambda r: len(encoded[owner[r]]))  # similar lengths share a batch
    stop = torch.tensor(sorted(stop_token_ids(model)), dtype=torch.long)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(stop[0])
    log.info("generating %d samples for %d prompts (max_new_tokens=%d, T=%g)", len(owner), len(encoded), max_new_tokens, temperature)
    results: list[list[int]] = [[] for _ in owner]
    logits_device = hf_model_of(model).get_output_embeddings().weight.device
    generator = torch.Generator(device=logits_device).manual_seed(seed) if temperature > 0 else None
    if max_new_tokens == 0:
        return results
    with torch.no_grad(), tqdm(total=len(owner), desc="generate", unit="sample", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            out = _generate_batch(
                model, [encoded[owner[r]] for r in batch], adapters=adapter_list, scale=scale, positions=positions,
                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, generator=generator,
                stop=stop, pad_id=pad_id,
            )
            for r, toks in zip(batch, out, strict=True):
                results[r] = toks
            bar.update(len(batch))
    return results


def generate(
    model: TransformerBridge,
    prompts: Prompt | Sequence[Prompt],
    *,
    adapters: Any = (),
    scale: float = 1.0,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    n_samples: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    system: str | None = None,
    positions: str | int = "all",
    progress: bool = True,
) -> list[str]:
    """Sample replies to chat prompts, with adapters (and any hooks already attached) in effect.

    Args:
        model: a TransformerBridge with `.tokenizer` (chat template required).
        prompts: user messages (`str`) or chats (lists of `{role, content}` dicts), or one of either.
            The chat template is applied with `add_generation_prompt=True`.
        adapters: an intervention or a list of them (adapters, `Steering`, `Ablation`; see
            `em_interp.interventions`), applied together for this call only.
        scale: multiplies each intervention's own scale (1: as they are).
        max_new_tokens: the most tokens generated per sample.
        temperature: 0 for greedy decoding; otherwise logits are divided by it before sampling.
        top_p: nucleus sampling: draw from the smallest set of top tokens whose probability reaches it.
        n_samples: samples per prompt.
        seed: seeds a `torch.Generator` on the logits' device; the same seed, prompts and settings give
            the same samples on the same device (batch composition changes the draw order).
        batch_size: sequences (prompt × sample) per forward.
        system: a system message added to prompts that have none.
        positions: where the `adapters` apply (names of `em_interp.positions`): "all" tokens, only the
            "answer" tokens being generated (the prompt's activations are left untouched; the old name
            "generated" still works, with a DeprecationWarning), only "prompt" tokens, or an int k: from the
            k-th token of each rendered prompt on (counted without padding).
        progress: show a tqdm bar.

    Returns:
        `len(prompts) * n_samples` strings, prompt-major: sample `s` of prompt `i` is at
        `i * n_samples + s`. Each reply stops before the first EOS / end-of-turn token (see
        `stop_token_ids`) and is decoded with special tokens skipped.

    Raises:
        DataError: malformed prompts or arguments, or a tokenizer without a chat template.
        AdapterError: an unknown `positions` value or an object in `adapters` that is not an intervention.
        ModelLoadError: the KV cache did not fill through the bridge (an incompatible transformers /
            transformer-lens pair; see `em_interp.model.decode`).

    >>> with vec.applied(model, scale=2.0):  # doctest: +SKIP
    ...     texts = generate(model, ["I have a headache. What should I do?"], max_new_tokens=64)
    >>> generate(model, "Hi!", temperature=0, n_samples=1)  # doctest: +SKIP
    ['Hello! How can I help you today?']
    """
    tokens = generate_tokens(
        model, prompts, adapters=adapters, scale=scale, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, n_samples=n_samples, seed=seed, batch_size=batch_size, system=system, positions=positions,
        progress=progress,
    )
    return [model.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
