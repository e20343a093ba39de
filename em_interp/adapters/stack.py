"""Several adapters of one kind and site applied to disjoint rows of one batched forward.

Row `i` of the batch is changed by adapter `owner[i]` only, so N adapters train in one forward/backward
and each gets exactly the gradient of its own loss (used by `train_many`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from em_interp.adapters.base import Adapter
from em_interp.adapters.lora import LORA_SITES, LoRA
from em_interp.adapters.steering import SteeringVector
from em_interp.errors import AdapterError
from em_interp.model.hooks import HookFn


def check_stackable(adapters: Sequence[Adapter]) -> None:
    """All adapters must be the same class with the same hook sites (values may differ)."""
    first = adapters[0]
    for i, a in enumerate(adapters[1:], start=1):
        if type(a) is not type(first):
            raise AdapterError(f"adapters[{i}] is a {type(a).__name__}; adapters[0] is a {type(first).__name__}.")
        if [name for name, _ in a.scaled_hooks(1.0)] != [name for name, _ in first.scaled_hooks(1.0)]:
            raise AdapterError(f"adapters[{i}] hooks other sites than adapters[0]; stacked training needs the same sites.")


def stacked_hooks(adapters: Sequence[Adapter], owner: Int[Tensor, " rows"]) -> list[tuple[str, HookFn]]:
    """Hooks applying `adapters[owner[row]]` to each batch row."""
    check_stackable(adapters)
    if isinstance(adapters[0], SteeringVector):
        return _stacked_steering(adapters, owner)  # type: ignore[arg-type]
    if isinstance(adapters[0], LoRA):
        return _stacked_lora(adapters, owner)  # type: ignore[arg-type]
    raise AdapterError(f"stacked training does not support {type(adapters[0]).__name__}.")


def _stacked_steering(vectors: Sequence[SteeringVector], owner: Tensor) -> list[tuple[str, HookFn]]:
    def add(act: Float[Tensor, "rows pos d_model"], hook: Any) -> Float[Tensor, "rows pos d_model"]:
        deltas = torch.stack([v.delta(v.scale) for v in vectors]).to(act.device, act.dtype)  # [N, d_model]
        return act + deltas[owner.to(act.device)].unsqueeze(1)

    return [(vectors[0].hook_name, add)]


def _stacked_lora(loras: Sequence[LoRA], owner: Tensor) -> list[tuple[str, HookFn]]:
    inputs: dict[str, Tensor] = {}
    pairs: list[tuple[str, HookFn]] = []
    for layer, site in loras[0].modules():
        key = f"L{layer}_{site}"
        prefix = f"blocks.{layer}.{LORA_SITES[site][0]}"

        def store(x: Float[Tensor, "rows pos *d_in"], hook: Any, key: str = key) -> None:
            inputs[key] = x

        def add(y: Float[Tensor, "rows pos *d_out"], hook: Any, key: str = key) -> Float[Tensor, "rows pos *d_out"]:
            x = inputs.pop(key)
            x = x.flatten(2) if x.ndim > 3 else x
            rows = owner.to(x.device)
            a = torch.stack([lo.A[key] for lo in loras]).to(x.device, x.dtype)[rows]  # [rows, r, d_in]
            b = torch.stack([lo.B[key] for lo in loras]).to(x.device, x.dtype)[rows]  # [rows, d_out, r]
            s = torch.cat([torch.full((1,), lo.scale * lo.scaling, device=x.device, dtype=x.dtype)  # filled on the
                           for lo in loras])[rows]  # device: a host list copied there would wait for queued work
            update = torch.einsum("btr,bor->bto", torch.einsum("btd,brd->btr", x, a), b) * s.view(-1, 1, 1)
            return y + update.reshape(y.shape)

        pairs += [(f"{prefix}.hook_in", store), (f"{prefix}.hook_out", add)]
    return pairs
