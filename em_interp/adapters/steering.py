"""A trainable residual-stream steering vector: adds `scale · alpha · v` at one hook of one layer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from em_interp.adapters.base import Adapter, check_finite, check_layer
from em_interp.errors import AdapterError
from em_interp.hooks import HookFn, Positions, position_weight

# Our hook names -> the TransformerLens hook point inside block `layer`.
STEERING_HOOKS = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "mlp_out": "hook_mlp_out",
    "attn_out": "hook_attn_out",
}


class SteeringVector(Adapter):
    """A vector `v` [d_model] added as `scale · alpha · v` to every selected token at one hook.

    Args:
        model: the TransformerBridge it is made for.
        layer: block index in 0..n_layers-1 (negative indices are refused: pass `n_layers - 1` for the last block).
        hook: one of "resid_post" (default), "resid_pre", "resid_mid", "mlp_out", "attn_out".
            The authors' code adds to the MLP down-projection output ("mlp_out"), which for Llama/Qwen
            equals adding to "resid_post" of the same layer.
        init: "zeros" (default, the authors' choice), "random" (unit-norm Gaussian, seeded by `seed`),
            or a tensor [d_model].
        alpha: fixed multiplier (the authors use 256; it scales the effective learning rate).
        seed: seed for init="random".

    >>> vec = SteeringVector(model, layer=15)  # doctest: +SKIP
    >>> vec.hook_name  # doctest: +SKIP
    'blocks.15.hook_resid_post'
    """

    kind = "steering_vector"

    def __init__(
        self,
        model: Any,
        layer: int,
        hook: str = "resid_post",
        init: str | Tensor = "zeros",
        alpha: float = 1.0,
        seed: int = 0,
    ):
        super().__init__(model)
        n_layers, d_model = model.cfg.n_layers, model.cfg.d_model
        self.layer = check_layer(layer, n_layers, "SteeringVector")
        if hook not in STEERING_HOOKS:
            raise AdapterError(f"SteeringVector: hook={hook!r}; expected one of {', '.join(STEERING_HOOKS)}.")
        self.hook = hook
        self.alpha = check_finite(alpha, "alpha", "SteeringVector")
        self.vector = nn.Parameter(_initial_vector(init, d_model, seed))

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.{STEERING_HOOKS[self.hook]}"

    @property
    def first_layer(self) -> int:
        return self.layer  # the hook point lives in block `layer`, so that block must run

    def config(self) -> dict[str, Any]:
        return {"layer": self.layer, "hook": self.hook, "alpha": self.alpha}

    @property
    def norm(self) -> float:
        """‖alpha · v‖: the size of the added vector at scale 1 (as LoRA's norm includes its alpha/r)."""
        return float(self.delta(1.0).detach().float().norm())

    def delta(self, scale: float) -> Tensor:
        """The vector actually added, `scale · alpha · v` [d_model]."""
        return self.vector * (scale * self.alpha)

    def hooks(self, scale: float, positions: Positions = "all") -> list[tuple[str, HookFn]]:
        def add_vector(act: Tensor, hook: Any) -> Tensor:
            delta = self.delta(scale).to(act.device, act.dtype)
            weight = position_weight(positions, act)
            return act + (delta if weight is None else weight * delta)

        return [(self.hook_name, add_vector)]

    def __repr__(self) -> str:
        return (f"SteeringVector({self.hook_name}, d_model={self.d_model}, alpha={self.alpha:g}, scale={self.scale:g}, "
                f"norm={self.norm:.4g}){self._provenance_line()}")

    @property
    def d_model(self) -> int:
        return int(self.vector.shape[0])

    def export_gguf(self, path: str | os.PathLike[str], model_hint: str | None = None) -> Path:
        """Write this vector (its `scale · alpha · v`) as a llama.cpp control-vector GGUF.

        It becomes `direction.N` with N = `layer` for resid_post (and mlp_out on Llama/Mistral/Qwen),
        `layer - 1` for resid_pre; see `em_interp.adapters.export`. `model_hint` defaults to llama.cpp's
        name for the model's architecture ("llama", "qwen2", ...).

        >>> vec.export_gguf("vec.gguf")  # doctest: +SKIP
        >>> # llama-cli -m model.gguf --control-vector vec.gguf
        """
        from em_interp.adapters.export import export_control_vector

        return export_control_vector(self, path, model_hint)


def _initial_vector(init: str | Tensor, d_model: int, seed: int) -> Tensor:
    if isinstance(init, Tensor):
        if tuple(init.shape) != (d_model,):
            raise AdapterError(f"init tensor has shape {tuple(init.shape)}; expected ({d_model},).")
        if not bool(torch.isfinite(init).all()):
            raise AdapterError("SteeringVector: the init tensor has NaN or infinite entries; expected finite values.")
        return init.detach().float().clone()
    if init == "zeros":
        return torch.zeros(d_model)
    if init == "random":
        v = torch.randn(d_model, generator=torch.Generator().manual_seed(seed))
        return v / v.norm()
    raise AdapterError(f"init={init!r}; expected 'zeros', 'random' or a tensor of shape ({d_model},).")
