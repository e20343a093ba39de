"""Step-by-step decoding with a KV cache through the HF model inside a TransformerBridge.

Every bridge hook point inside the HF modules fires (adapters, ablations, the caller's hooks). This module holds
what that needs of transformers' and TransformerLens's internals, so generation code needs none of them:

- the cache is a `transformers.DynamicCache` we create, passed under the keyword `forward` takes (`cache` from
  transformers 5.24, `past_key_values` before);
- TransformerLens 4.3's attention bridges (which re-implement attention) read only `past_key_values`; a torch
  forward pre-hook (public API) hands them the cache under that name while decoding;
- after every step the cache must hold as many positions as were fed, else a clear error (an incompatible
  transformers / transformer-lens pair would otherwise make generation silently ignore the prompt).
"""

from __future__ import annotations

import copy
import inspect
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers import DynamicCache

from em_interp.errors import ModelLoadError
from em_interp.model.forward import attention_bridges, hf_model_of, model_device, unembed

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


def cache_argument(base: Any) -> str:
    """The keyword under which `base.forward` takes the KV cache: `cache` (transformers >= 5.24) or
    `past_key_values` (earlier releases)."""
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _pass_cache(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook: copy `cache=` to `past_key_values=` where only the former is given."""
    if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
        return args, {**kwargs, "past_key_values": kwargs["cache"]}
    return None


class CachedDecoder:
    """Context manager: `step(...)` runs the decoder on the next tokens with a KV cache and returns the last
    position's hidden state; the attention bridges' pre-hooks are removed on exit.

    >>> with CachedDecoder(model) as decoder:  # doctest: +SKIP
    ...     hidden = decoder.step(ids, attention_mask, position_ids)
    """

    def __init__(self, model: TransformerBridge):
        self.model = model
        self.base = hf_model_of(model).model
        self.cache = DynamicCache(config=hf_model_of(model).config)
        self.argument = cache_argument(self.base)
        self.seen = 0
        self._handles: list[Any] = []

    def fork(self, rows: int) -> CachedDecoder:
        """A decoder continuing from this one's cache (a copy, each row repeated `rows` times); use it inside
        this decoder's context (whose hooks it relies on)."""
        other = copy.copy(self)
        other.cache = copy.deepcopy(self.cache)
        other.cache.batch_repeat_interleave(rows)
        other._handles = []
        return other

    def __enter__(self) -> CachedDecoder:
        self._handles = [m.register_forward_pre_hook(_pass_cache, with_kwargs=True)
                         for m in attention_bridges(self.model)]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def step(
        self, input_ids: Int[Tensor, "batch new"], attention_mask: Int[Tensor, "batch seen_plus_new"],
        position_ids: Int[Tensor, "batch new"],
    ) -> Float[Tensor, "batch d_model"]:
        """Feed the next tokens (the whole prompt first, then one token per step); final hidden state at the
        last fed position.

        Raises:
            ModelLoadError: the cache did not grow by the number of tokens fed.
        """
        out = self.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=True, **{self.argument: self.cache})
        self.seen += input_ids.shape[1]
        check_cache_filled(self.cache, self.seen)
        return out.last_hidden_state[:, -1]


def check_cache_filled(cache: DynamicCache, expected: int) -> None:
    """Fail loudly when the KV cache did not grow with the sequence."""
    seen = cache.get_seq_length()
    if seen != expected:
        raise ModelLoadError(
            f"KV cache holds {seen} positions after a forward over {expected}: this transformers / "
            "transformer-lens pair does not fill the cache through the bridge. See docs/compatibility.md."
        )


class PromptCache:
    """Context manager: one prompt's keys and values computed once, then the logits of the token after the prompt
    followed by each of many short continuations (as a judge scoring "0" .. "100" needs).

    >>> with PromptCache(model, prompt_ids) as prompt:  # doctest: +SKIP
    ...     logits = prompt.next_logits([[17], [18]])  # [2, d_vocab]
    """

    def __init__(self, model: TransformerBridge, prompt_ids: list[int]):
        if not prompt_ids:
            raise ValueError("PromptCache: empty prompt.")
        self.model, self.prompt = model, list(prompt_ids)
        self.device = model_device(model)
        self.decoder = CachedDecoder(model)

    def __enter__(self) -> PromptCache:
        self.decoder.__enter__()
        n = len(self.prompt)
        ids = torch.tensor([self.prompt], dtype=torch.long, device=self.device)
        with torch.no_grad():
            hidden = self.decoder.step(ids, torch.ones_like(ids), torch.arange(n, device=self.device)[None])
            self.last = unembed(self.model, hidden[:, None])[:, 0]  # [1, d_vocab]
        return self

    def __exit__(self, *exc: object) -> None:
        self.decoder.__exit__(*exc)

    def next_logits(self, continuations: list[list[int]] | list[tuple[int, ...]]) -> Float[Tensor, "n d_vocab"]:
        """Logits of the token after prompt + each continuation (all of one length; length 0: after the prompt).

        Raises:
            ValueError: continuations of different lengths.
        """
        lengths = {len(c) for c in continuations}
        if len(lengths) != 1:
            raise ValueError(f"PromptCache.next_logits: continuations of lengths {sorted(lengths)}; give one length.")
        (d,), n, p = lengths, len(continuations), len(self.prompt)
        if d == 0:
            return self.last.expand(n, -1)
        ids = torch.tensor([list(c) for c in continuations], dtype=torch.long, device=self.device)
        positions = torch.arange(p, p + d, device=self.device).expand(n, -1)
        with torch.no_grad():
            hidden = self.decoder.fork(n).step(ids, torch.ones((n, p + d), dtype=torch.long, device=self.device),
                                               positions)
            return unembed(self.model, hidden[:, None])[:, 0]
