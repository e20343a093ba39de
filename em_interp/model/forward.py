"""The one way through the model: every partial forward of a `TransformerBridge` goes through here.

- `hf_model_of` / `model_device` / `model_dtype`: the one accessor of the HF model inside a bridge (nothing
  else reads `model.original_model`).
- `lower_forward` (blocks `:stop`, the residual entering block `stop`), `resume_forward` (blocks `start:` and
  the final norm on a cached residual), `full_hidden` (all blocks) and `unembed` (LM head, Gemma2 soft-cap):
  the partial forwards, each running hook-free bridge components as plain HF modules (SDPA attention) when
  the fast path applies (`em_interp.model.fastpath`; on by default on every device).
- `start_layer`: the one rule for where a forward may resume given the interventions applied.
- `ActivationCache`: residuals entering a block, and reference log-probs, stored once per fixed batch.
- `ForwardRunner`: one model resumed from one start layer with its lower residuals cached, unembedding only
  at the positions that enter a loss. The trainer (`engine.LossComputer`), `geometry.loss_on`,
  `geometry.kl_vs_norm` and `eval.contrastive` run their forwards through it; `directions.mean_diff` calls
  `lower_forward`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor

from em_interp.errors import ModelLoadError
from em_interp.fileio import atomic_file
from em_interp.model import fastpath as _fastpath

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


# --- the one accessor of HF internals -------------------------------------------------------------
def hf_model_of(model: TransformerBridge) -> Any:
    """The HF `PreTrainedModel` inside a `TransformerBridge`."""
    return model.original_model


def attention_bridges(model: TransformerBridge) -> list[torch.nn.Module]:
    """The TransformerLens attention bridges inside `model` (the modules that run attention and update
    the KV cache themselves)."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    return [m for m in hf_model_of(model).modules() if isinstance(m, AttentionBridge)]


def log_probs(logits: Float[Tensor, "n vocab"]) -> Float[Tensor, "n vocab"]:
    """float32 log-softmax."""
    return torch.log_softmax(logits.float(), dim=-1)


def model_device(model: TransformerBridge) -> torch.device:
    """Device of the model's input embedding (where token ids must go)."""
    return hf_model_of(model).get_input_embeddings().weight.device


def model_dtype(model: TransformerBridge) -> torch.dtype:
    """dtype of the model's weights (of its first parameter)."""
    return next(iter(hf_model_of(model).parameters())).dtype


def start_layer(model: TransformerBridge, interventions: Sequence[Any]) -> int:
    """The block a forward may resume at with `interventions` applied: the lowest `first_layer` among them,
    at most the last block; 0 when one of them does not declare an int `first_layer` (it may act anywhere)."""
    layers: list[int] = []
    for a in interventions:
        first = getattr(a, "first_layer", None)
        if not isinstance(first, int) or isinstance(first, bool):
            return 0
        layers.append(first)
    return min([*layers, int(model.cfg.n_layers) - 1])


# --- partial forwards ----------------------------------------------------------------------------
class _SkippedLayer(torch.nn.Module):
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states  # stands in for a decoder layer below the resume point


@contextlib.contextmanager
def upper_layers(model: TransformerBridge, start: int) -> Iterator[Any]:
    """Temporarily make the HF decoder stack run only blocks `start:`; yields the HF base model.

    Resumes a forward from a cached residual without running the lower blocks (which the bridge's
    `start_at_layer` still executes). Blocks below `start` become pass-throughs, not sliced away, so kept
    blocks keep their index: Gemma2/3 and Qwen2 pick each block's mask (sliding/full) and rotary table by
    it in `config.layer_types`. Hooks in kept blocks fire. Prefer `resume_forward` (positions, scale).
    Raises `ModelLoadError` if `start` is not in `0..n_layers`.
    """
    base = hf_model_of(model).model
    layers = base.layers
    if not 0 <= start <= len(layers):
        raise ModelLoadError(f"upper_layers: start={start}; expected 0..{len(layers)} (the model's block count).")
    skip = _SkippedLayer()
    base.layers = torch.nn.ModuleList([skip] * start + list(layers)[start:])
    try:
        yield base
    finally:
        base.layers = layers


def mask_positions(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """Position ids [batch, pos] from a 0/1 attention mask exactly as TransformerBridge derives them: rows
    with a masked token before a real one (left padding) count from their first real token; other rows
    keep `arange` (right padding changes nothing). Needs no host sync."""
    mask = attention_mask.long()
    derived = (mask.cumsum(-1) - 1).clamp_(min=0)
    arange = torch.arange(mask.shape[1], device=mask.device)
    needs = ((derived != arange) & (mask != 0)).any(dim=1, keepdim=True)
    return torch.where(needs, derived, arange)


def _positions(attention_mask: Tensor | None, position_ids: Tensor | None = None) -> Tensor | None:
    if position_ids is None and attention_mask is not None and attention_mask.ndim == 2:
        return mask_positions(attention_mask)
    return position_ids


@contextlib.contextmanager
def _unpacked_rows(attention_mask: Tensor | None, position_ids: Tensor | None) -> Iterator[None]:
    """Within the context, HF's mask code takes the rows as unpacked (one sequence per row) without checking.

    With no attention mask, HF's `create_causal_mask` looks for packed sequences in the position ids
    (`masking_utils.find_packed_sequence_indices`), a device-to-host read that stalls the host once per
    forward. The partial forwards' rows are never packed when they pass neither a mask nor position ids
    (HF then numbers each row 0..pos-1), so the answer is known: None, which is what the check returns for
    such rows. Any other call keeps HF's check. `full_hidden` keeps HF's mask code as it is (the path the
    authors' trainer runs). A transformers version without the function is left alone (it then has no check).
    """
    from transformers import masking_utils

    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if attention_mask is not None or position_ids is not None or original is None:
        yield
        return
    masking_utils.find_packed_sequence_indices = _no_packed_sequences
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


def _no_packed_sequences(position_ids: Tensor) -> None:
    return None


def resume_forward(
    model: TransformerBridge,
    resid: Float[Tensor, "batch pos d_model"],
    start: int,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    position_ids: Int[Tensor, "batch pos"] | None = None,
    *,
    fast: bool | None = None,
) -> Float[Tensor, "batch pos d_model"]:
    """Run blocks `start:` and the final norm on a cached residual stream.

    Args:
        model: the TransformerBridge.
        resid: [batch, pos, d_model], the input of block `start` (its `hook_resid_pre`, i.e. the
            `hook_resid_post` of block `start - 1`; for `start == 0`, the scaled token embeddings).
        start: index of the first block to run (0..n_layers).
        attention_mask: [batch, pos] 0/1 mask of the forward that produced `resid` (None: all ones).
        position_ids: [batch, pos]; default derived from `attention_mask` as the bridge's forward does.
        fast: run hook-free bridge components as plain HF modules (`em_interp.model.fastpath`); default the
            `fastpath.set_fast_path` setting.

    Returns:
        Final hidden states [batch, pos, d_model] after the final norm; `unembed` turns them into logits
        equal to the full forward's. Hooks (adapters) on blocks `start:` apply; none below `start` fire.

    >>> resid = cache["blocks.11.hook_resid_post"]  # doctest: +SKIP
    >>> logits = unembed(model, resume_forward(model, resid, 12, attention_mask))  # doctest: +SKIP
    """
    position_ids = _positions(attention_mask, position_ids)
    scale = _inputs_embeds_scale(model)
    if scale is not None:  # older Gemma code multiplies inputs_embeds by √d_model inside the forward
        resid = resid / torch.tensor(scale, dtype=resid.dtype)  # a host 0-d tensor: no copy, no wait for the device
    with (upper_layers(model, start) as base, _maybe_plain(model, base, resid.device, fast),
          _unpacked_rows(attention_mask, position_ids)):
        out = base(inputs_embeds=resid, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def lower_forward(
    model: TransformerBridge,
    input_ids: Int[Tensor, "batch pos"],
    stop: int,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    *,
    fast: bool | None = None,
) -> Float[Tensor, "batch pos d_model"]:
    """The residual stream entering block `stop` ([batch, pos, d_model]), i.e. `hook_resid_pre` of `stop`
    (for `stop == n_layers`, the last block's output before the final norm).

    Equals `model(input_ids, attention_mask=..., stop_at_layer=stop)`, which is what runs when the fast
    path is off. With it on, blocks `:stop` run through the HF base model with hook-free bridge components
    swapped for plain HF modules (`em_interp.model.fastpath`); hooks attached on the embedding or blocks `:stop`
    still fire. Raises `ModelLoadError` if `stop` is not in `0..n_layers`.
    """
    base = hf_model_of(model).model
    layers = base.layers
    if not 0 <= stop <= len(layers):
        raise ModelLoadError(f"lower_forward: stop={stop}; expected 0..{len(layers)} (the model's block count).")
    if not _fastpath.enabled(input_ids.device, fast, model):
        return model(input_ids, attention_mask=attention_mask, stop_at_layer=stop)
    norm = base.norm
    base.layers, base.norm = torch.nn.ModuleList(list(layers)[:stop]), torch.nn.Identity()
    try:
        with _maybe_plain(model, base, input_ids.device, True), _unpacked_rows(attention_mask, None):
            out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=_positions(attention_mask),
                       use_cache=False)
    finally:
        base.layers, base.norm = layers, norm
    return out.last_hidden_state


def full_hidden(
    model: TransformerBridge, input_ids: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"] | None = None,
    *, fast: bool | None = None,
) -> Float[Tensor, "batch pos d_model"]:
    """Hidden states after the final norm of a forward through all blocks (every attached hook fires),
    without the LM head; `unembed` of them gives the bridge forward's logits."""
    base = hf_model_of(model).model
    with _maybe_plain(model, base, input_ids.device, fast):
        out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=_positions(attention_mask),
                   use_cache=False)
    return out.last_hidden_state


def _maybe_plain(model: TransformerBridge, base: Any, device: torch.device, fast: bool | None) -> contextlib.AbstractContextManager[Any]:
    if not _fastpath.enabled(device, fast, model):
        return contextlib.nullcontext()
    return _fastpath.plain_modules(base, model)


def unembed(model: TransformerBridge, hidden: Float[Tensor, "*rows d_model"]) -> Float[Tensor, "*rows d_vocab"]:
    """Logits [..., d_vocab] from final hidden states as the full forward: LM head, then Gemma2's final
    soft-capping `cap · tanh(logits / cap)` where the config has one (in place when no grad is needed)."""
    hf = hf_model_of(model)
    logits = hf.lm_head(hidden)
    cap = getattr(hf.config, "final_logit_softcapping", None)
    if cap is None:
        return logits
    if torch.is_grad_enabled() and logits.requires_grad:
        return torch.tanh(logits / cap) * cap
    return logits.div_(cap).tanh_().mul_(cap)


def gather_rows(hidden: Float[Tensor, "batch pos d"], index: Int[Tensor, " n"]) -> Float[Tensor, "n d"]:
    """Rows `index` of hidden [batch, pos, d] flattened to [batch·pos, d] (= hidden[mask], without a sync)."""
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, index.to(hidden.device))


def _inputs_embeds_scale(model: TransformerBridge) -> float | None:
    # transformers >= 5 scales Gemma embeddings inside the embedding module (`embed_scale`), so
    # `inputs_embeds` are used as given; earlier Gemma forwards multiplied them by √hidden_size.
    hf = hf_model_of(model)
    if not str(getattr(hf.config, "model_type", "")).startswith("gemma"):
        return None
    emb = hf.get_input_embeddings()
    emb = getattr(emb, "original_component", emb)
    return None if hasattr(emb, "embed_scale") else float(hf.config.hidden_size) ** 0.5


# --- cached partial forwards ---------------------------------------------------------------------
class ActivationCache:
    """Residuals entering block `layer` and reference log-probs, per fixed batch, computed once.

    Keys include the data fingerprint, batch size and layer, so one cache can serve several runs
    (e.g. a sweep) over the same data. Tensors live on `device` (default CPU, so GPU memory stays
    bounded; pass the model's device to keep them there when they fit).

    Sizes: the residuals take tokens × d_model × dtype bytes (SmolLM2, 10k tokens: 23 MB in float32;
    Qwen2.5-14B, 100k tokens in bf16: 1 GB); reference log-probs take KL tokens × vocab × 4 bytes
    (SmolLM2, 5k KL tokens: 1 GB; Qwen2.5-14B, one batch of 8 × 256 tokens with ~800 KL tokens: 0.5 GB),
    so they are kept as final hidden states instead (KL tokens × d_model) and unembedded again at each
    use when a batch's log-probs are larger than `max_ref_bytes`, when all stored log-probs would pass
    `max_ref_total_bytes`, or when the cache lives on another device than the model (copying 0.5 GB
    per step costs more than the unembedding). A host cache of a GPU model is pinned.

    With `directory`, every entry is written there as a safetensors file and read back at each use, so
    memory stays bounded whatever the data size (for caches that do not fit in host memory).
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        max_ref_bytes: int = 2 << 30,
        max_ref_total_bytes: int = 8 << 30,
        directory: str | os.PathLike[str] | None = None,
    ):
        self.device = torch.device(device)
        self.max_ref_bytes = max_ref_bytes
        self.max_ref_total_bytes = max_ref_total_bytes
        self.directory = Path(directory) if directory is not None else None
        self._store: dict[tuple[Any, ...], Tensor] = {}
        self._on_disk: dict[tuple[Any, ...], tuple[Path, int]] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[Any, ...], compute: Callable[[], Tensor]) -> Tensor:
        """The value stored under `key`, computed by `compute()` and stored at the first call."""
        if key in self._store:
            self.hits += 1
            return self._store[key]
        if key in self._on_disk:
            self.hits += 1
            return load_file(str(self._on_disk[key][0]))["value"]
        self.misses += 1
        value = compute()
        if self.directory is not None:
            return self._to_disk(key, value)
        if self.device.type == "cpu" and value.device.type == "cuda":
            value = torch.empty_like(value, device="cpu", pin_memory=True).copy_(value)
        else:
            value = value.to(self.device)
        self._store[key] = value
        return value

    def keeps_log_probs(self, nbytes: int, compute_device: torch.device) -> bool:
        """Whether reference log-probs of `nbytes` are stored as such (else as hidden states)."""
        if compute_device.type != self.device.type or nbytes > self.max_ref_bytes:
            return False
        return self.nbytes() + nbytes <= self.max_ref_total_bytes

    def _to_disk(self, key: tuple[Any, ...], value: Tensor) -> Tensor:
        self.directory.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
        path = self.directory / f"{hashlib.sha256(repr(key).encode()).hexdigest()[:24]}.safetensors"  # type: ignore[operator]
        value = value.detach().to("cpu").contiguous()
        with atomic_file(path) as tmp:  # umask permissions (safetensors alone writes 0600)
            save_file({"value": value}, str(tmp))
        self._on_disk[key] = (path, value.numel() * value.element_size())
        return value

    def __len__(self) -> int:
        return len(self._store) + len(self._on_disk)

    def nbytes(self) -> int:
        """Bytes held in memory (entries on disk do not count)."""
        return sum(t.numel() * t.element_size() for t in self._store.values())


class ForwardRunner:
    """One model resumed at one block: lower residuals computed once (no grad) and cached, the upper blocks
    run per call with whatever hooks are attached, logits only at chosen positions.

    Args:
        model: the TransformerBridge (frozen).
        start: the first block that runs per call (see `start_layer`); clipped to 0..n_layers-1.
        cache: where lower residuals and reference log-probs are kept (default: a new CPU `ActivationCache`).
        fast: the fast-path choice for every forward (default: `fastpath.enabled` for the model's device).
    """

    def __init__(self, model: TransformerBridge, start: int, *, cache: ActivationCache | None = None, fast: bool | None = None):
        self.model = model
        self.device = model_device(model)
        self.start = max(0, min(int(start), int(model.cfg.n_layers) - 1))
        self.cache = cache if cache is not None else ActivationCache()
        self.fast = _fastpath.enabled(self.device, fast, model)
        self.vocab = int(model.cfg.d_vocab)

    def lower(
        self, key: tuple[Any, ...] | None, input_ids: Int[Tensor, "batch pos"], attention_mask: Tensor | None
    ) -> Float[Tensor, "batch pos d_model"]:
        """The residual entering block `start`, without grad; cached under `key` (None: not cached)."""

        def compute() -> Tensor:
            with torch.no_grad():
                return lower_forward(self.model, input_ids, self.start, attention_mask, fast=self.fast)

        if key is None:
            return compute()
        return self.cache.get(("resid", *key, self.start), compute).to(self.device, non_blocking=True)

    def resume(
        self, resid: Float[Tensor, "batch pos d_model"], attention_mask: Tensor | None
    ) -> Float[Tensor, "batch pos d_model"]:
        """Final hidden states of blocks `start:` on `resid` (the hooks attached now fire)."""
        return resume_forward(self.model, resid, self.start, attention_mask, fast=self.fast)

    def full(self, input_ids: Int[Tensor, "batch pos"], attention_mask: Tensor | None) -> Float[Tensor, "batch pos d_model"]:
        """Final hidden states of all blocks (for interventions that may act below `start`)."""
        return full_hidden(self.model, input_ids, attention_mask, fast=self.fast)

    def bridge_logits(self, input_ids: Int[Tensor, "batch pos"], attention_mask: Tensor | None) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits of the bridge's own full forward, where every hook point fires (the unembedding's too): for
        callers that cannot know which hooks others attached."""
        return self.model(input_ids, attention_mask=attention_mask)

    def logits_at(self, hidden: Float[Tensor, "batch pos d_model"], index: Int[Tensor, " n"]) -> Float[Tensor, "n d_vocab"]:
        """Logits at flat positions `index` of hidden (rows of [batch·pos]) only."""
        return unembed(self.model, gather_rows(hidden, index))

    def reference(
        self, key: tuple[Any, ...], resid: Float[Tensor, "batch pos d_model"], attention_mask: Tensor | None,
        index: Int[Tensor, " n"],
    ) -> Float[Tensor, "n d_vocab"]:
        """Log-probs of the forward resumed on `resid` with no hook added, at flat positions `index`, stored under
        `key` once (the key need not name the start block: the value does not depend on it): as log-probs while the cache's budget allows (`ActivationCache.keeps_log_probs`), else as
        final hidden states [n, d_model], unembedded again at each call. Call it with no adapter attached."""

        def compute() -> Tensor:
            with torch.no_grad():
                h = gather_rows(self.resume(resid, attention_mask), index)
                if not self.cache.keeps_log_probs(h.shape[0] * self.vocab * 4, h.device):
                    return h
                return log_probs(unembed(self.model, h))

        value = self.cache.get(("ref", *key), compute).to(self.device, non_blocking=True)
        if value.shape[-1] != self.vocab:  # stored as hidden states: unembed again
            with torch.no_grad():
                value = log_probs(unembed(self.model, value))
        return value
