"""Attaching hook functions to a TransformerBridge's hook points, level-safely, with position selection.

Hooks are registered as *permanent* TransformerLens hooks so that a user's `run_with_hooks` /
`reset_hooks` inside our context managers never strips them, and each attachment removes exactly the
handles it added (so nested contexts never remove each other's hooks).

Position selection (the same option for adapters, steering and ablation; the names are those of
`em_interp.positions`):
- "all": every token;
- an int k: tokens at absolute position >= k (with a KV cache, the offset of the step is tracked);
- a Bool tensor [batch, pos]: exactly those tokens (e.g. a batch's `assistant_mask` for the "answer" tokens).
A plain forward does not know which tokens are the answer, so "answer" and "prompt" are refused here with a
hint (pass the batch's mask); `generate` and `mean_diff` accept them.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from em_interp.errors import AdapterError

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

HookFn = Callable[..., Any]


class HookOwner(Protocol):
    """What attaching hooks needs of a model: its `hook_dict` (a TransformerBridge has one)."""

    @property
    def hook_dict(self) -> Mapping[str, Any]: ...

Positions = str | int | Bool[Tensor, "batch pos"]

# Absolute position of the first token the model sees in the current forward (non-zero while a KV
# cache feeds one new token at a time during generation).
position_offset: contextvars.ContextVar[int] = contextvars.ContextVar("em_interp_position_offset", default=0)


class HookHandle:
    """Handles of hooks added by one `attach_hooks` call; `remove()` detaches exactly those."""

    def __init__(self, entries: list[tuple[Any, Any]]):
        self._entries = entries

    def remove(self) -> None:
        for hook_point, handle in self._entries:
            handle.hook.remove()
            if handle in hook_point.fwd_hooks:
                hook_point.fwd_hooks.remove(handle)
        self._entries = []


def hook_point(model: HookOwner, name: str) -> Any:
    """The hook point called `name` (canonical TransformerLens names and aliases both work)."""
    hook_dict = model.hook_dict
    if name not in hook_dict:
        raise AdapterError(f"hook {name!r} does not exist on this model (e.g. 'blocks.0.hook_resid_post').")
    return hook_dict[name]


def attach_hooks(model: HookOwner, hooks: Sequence[tuple[str, HookFn]]) -> HookHandle:
    """Register `(hook_name, fn(activation, hook))` pairs permanently; returns a handle to remove them."""
    points = [(hook_point(model, name), fn) for name, fn in hooks]  # resolve all names before adding any
    entries = [(hp, hp.add_hook(fn, is_permanent=True)) for hp, fn in points]
    return HookHandle(entries)


@contextlib.contextmanager
def hooks_applied(model: HookOwner, hooks: Sequence[tuple[str, HookFn]]) -> Iterator[None]:
    """Context manager: hooks are attached on entry and always removed on exit."""
    handle = attach_hooks(model, hooks)  # registered before the try: a failure leaves nothing behind
    try:
        yield
    finally:
        handle.remove()


def model_has_hooks(model: TransformerBridge) -> bool:
    """True when any forward hook is attached to one of the model's hook points."""
    return any(hp.fwd_hooks or hp._forward_hooks for hp in model.hook_dict.values())


def check_positions(positions: Positions) -> Positions:
    """Validate a position selection (see module docstring)."""
    if isinstance(positions, str):
        if positions in ("answer", "prompt"):
            raise AdapterError(
                f"positions={positions!r}: a forward over token ids does not know which tokens are the {positions}; "
                "pass the batch's Bool [batch, pos] mask (e.g. `batch.assistant_mask` for the answer tokens), or use "
                f"generate(positions={positions!r})."
            )
        if positions != "all":
            raise AdapterError(f"positions={positions!r}; expected 'all', an int k, or a Bool [batch, pos] mask.")
    elif isinstance(positions, bool) or not isinstance(positions, (int, Tensor)):
        raise AdapterError(f"positions of type {type(positions).__name__}; expected 'all', int or Bool tensor.")
    elif isinstance(positions, Tensor) and (positions.dtype != torch.bool or positions.ndim != 2):
        raise AdapterError(f"positions mask must be Bool [batch, pos]; got {positions.dtype} {tuple(positions.shape)}.")
    return positions


def position_weight(positions: Positions, act: Float[Tensor, "batch pos *rest"]) -> Float[Tensor, "#batch pos 1"] | None:
    """A [batch, pos, 1] 0/1 weight selecting positions of `act` [batch, pos, ...]; None means all."""
    if isinstance(positions, str):
        return None
    batch, n_pos = act.shape[0], act.shape[1]
    offset = position_offset.get()
    if isinstance(positions, int):
        absolute = torch.arange(offset, offset + n_pos, device=act.device)
        return (absolute >= positions).to(act.dtype).view(1, n_pos, 1)
    mask = positions.to(act.device)
    if mask.shape[0] != batch or mask.shape[1] < offset + n_pos:
        raise AdapterError(
            f"positions mask has shape {tuple(mask.shape)} but the activation is [batch={batch}, pos={n_pos}] "
            f"at offset {offset}."
        )
    return mask[:, offset : offset + n_pos].to(act.dtype).unsqueeze(-1)
