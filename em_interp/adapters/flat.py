"""An adapter (or a snapshot of its parameters) as one flat vector: what cosines and trajectories compare.

What is flattened (`what`):
- a `SteeringVector`: its vector (`alpha` and `scale` are positive scalars, so they change no cosine);
- a `LoRA`: by default ("delta_w") the effective ΔW = s·B·A of every module, flattened and concatenated in
  `modules()` order — invariant to the B/A gauge (B·c, A/c); "A" or "B" the factors alone, "params" all
  parameters as `flat()` gives them;
- any other `Adapter`: `flat()`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from jaxtyping import Float
from torch import Tensor

from em_interp.adapters.base import Adapter
from em_interp.adapters.lora import LoRA
from em_interp.adapters.steering import SteeringVector
from em_interp.errors import GeometryError

WHATS = ("delta_w", "A", "B", "params")


def check_what(what: str) -> None:
    """`GeometryError` unless `what` is one of `WHATS`."""
    if what not in WHATS:
        raise GeometryError(f"what={what!r}; expected one of {', '.join(WHATS)}.")


def adapter_vector(adapter: Adapter, what: str = "delta_w") -> Float[Tensor, " n"]:
    """The adapter as a detached float32 CPU vector (see the module docstring).

    Raises:
        GeometryError: unknown `what`, or "A"/"B" for an adapter that is not a LoRA.
    """
    check_what(what)
    if isinstance(adapter, LoRA):
        return _lora_vector(adapter, what)
    if what in ("A", "B"):
        raise GeometryError(f"what={what!r} applies to LoRA only; got a {type(adapter).__name__}.")
    if isinstance(adapter, SteeringVector):
        return adapter.vector.detach().float().cpu().clone()
    return adapter.flat()


def _lora_vector(lora: LoRA, what: str) -> Float[Tensor, " n"]:
    with torch.no_grad():
        if what == "delta_w":
            parts = [lora.delta_weight(layer, site) for layer, site in lora.modules()]
        elif what in ("A", "B"):
            factors = lora.A if what == "A" else lora.B
            parts = [factors[f"L{layer}_{site}"] for layer, site in lora.modules()]
        else:
            return lora.flat()
        return torch.cat([p.detach().float().cpu().flatten() for p in parts])


def state_vector(template: Adapter | None, state: Mapping[str, Tensor], what: str = "delta_w") -> Float[Tensor, " n"]:
    """`adapter_vector` of an adapter whose parameters are `state` (a snapshot), without touching `template`.

    Args:
        template: an adapter of the snapshot's kind and shape (copied, never modified); or None to
            work from the tensors alone: "params" concatenates them in order, "A"/"B" a LoRA's
            factors, "delta_w" a LoRA's B·A per module *without* the constant scaling s (which
            changes no cosine); a steering vector's state is its vector.
        state: parameter name -> tensor, e.g. one of `TrainRun.snapshots`.
        what: as in `adapter_vector`.

    Returns:
        The flat float32 vector.
    """
    if template is None:
        is_lora = any(k.startswith("A.") for k in state)
        if is_lora and what in ("A", "B"):
            return torch.cat([state[k].float().flatten() for k in state if k.startswith(f"{what}.")])
        if is_lora and what == "delta_w":
            keys = [k[2:] for k in state if k.startswith("A.")]
            return torch.cat([(state[f"B.{k}"].float() @ state[f"A.{k}"].float()).flatten() for k in keys])
        return torch.cat([v.float().flatten() for v in state.values()])
    clone = copy.deepcopy(template)
    clone.load_state(dict(state))
    return adapter_vector(clone, what)
