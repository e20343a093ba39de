"""Trainable residual-stream steering: `SteeringVector` adds `scale · alpha · v` at one hook of one layer;
`SteeringSet` holds one such vector per layer for several layers of one hook (as a repeng `ControlVector` or
a llama.cpp control-vector file does) and trains, applies, saves and exports them together."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from em_interp.adapters.base import Adapter, check_finite, check_layer, file_format_function
from em_interp.errors import AdapterError
from em_interp.model.hooks import HookFn, Positions, position_weight

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

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
        model: TransformerBridge,
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

    def delta(self, scale: float) -> Float[Tensor, " d_model"]:
        """The vector actually added, `scale · alpha · v` [d_model]."""
        return self.vector * (scale * self.alpha)

    def scaled_hooks(self, total: float, positions: Positions = "all") -> list[tuple[str, HookFn]]:
        def add_vector(act: Float[Tensor, "batch pos d_model"], hook: Any) -> Float[Tensor, "batch pos d_model"]:
            delta = self.delta(total).to(act.device, act.dtype)
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
        return file_format_function("export_control_vector")(self, path, model_hint)


class SteeringSet(Adapter):
    """One steering vector per layer, at the same hook of several layers: adds `scale · alpha · v_L` to block L.

    Trained, applied, saved (`save` / `load_adapter`) and exported as one adapter. It is what a repeng
    `ControlVector` or a llama.cpp control-vector GGUF holds (read them with `from_repeng` / `from_gguf`); a
    one-layer set is a `SteeringVector` (see `split`).

    Args:
        model: the TransformerBridge it is made for.
        layers: block indices (negative counts from the end; each once).
        hook: as for `SteeringVector` ("resid_post" by default).
        init: "zeros" (default), "random" (unit-norm Gaussian per layer, layer i of the sorted list seeded by
            `seed + i`), or a mapping {layer: tensor [d_model]} with exactly the given layers.
        alpha: fixed multiplier, as for `SteeringVector`.
        seed: seed for init="random".

    >>> vecs = SteeringSet(model, layers=[10, 12, 14], init="random")  # doctest: +SKIP
    >>> vecs.hook_names  # doctest: +SKIP
    ['blocks.10.hook_resid_post', 'blocks.12.hook_resid_post', 'blocks.14.hook_resid_post']
    """

    kind = "steering_set"

    def __init__(
        self,
        model: TransformerBridge,
        layers: Sequence[int],
        hook: str = "resid_post",
        init: str | Mapping[int, Tensor] = "zeros",
        alpha: float = 1.0,
        seed: int = 0,
    ):
        super().__init__(model)
        n_layers, d_model = int(model.cfg.n_layers), int(model.cfg.d_model)
        if isinstance(layers, (int, str)) or not len(layers):
            raise AdapterError(f"layers={layers!r}; expected a non-empty list of block indices.")
        for layer in layers:
            if not -n_layers <= int(layer) < n_layers:
                raise AdapterError(f"layer {layer} is out of range for a model with {n_layers} layers.")
        chosen = sorted({int(layer) % n_layers for layer in layers})
        if len(chosen) != len(layers):
            raise AdapterError(f"layers={list(layers)} names a block twice; expected each layer once.")
        if hook not in STEERING_HOOKS:
            raise AdapterError(f"hook={hook!r}; expected one of {', '.join(STEERING_HOOKS)}.")
        if isinstance(init, Mapping):
            given = {int(k) % n_layers if -n_layers <= int(k) < n_layers else int(k): v for k, v in init.items()}
            if sorted(given) != chosen:
                raise AdapterError(f"init has vectors for layers {sorted(given)}; expected exactly {chosen}.")
            inits: list[str | Tensor] = [torch.as_tensor(given[layer]) for layer in chosen]
        else:
            inits = [init] * len(chosen)
        self.layers = chosen
        self.hook = hook
        self.alpha = float(alpha)
        self.vectors = nn.ParameterDict(
            {f"L{layer}": nn.Parameter(_initial_vector(x, d_model, seed + i)) for i, (layer, x) in enumerate(zip(chosen, inits, strict=True))}
        )

    @property
    def hook_names(self) -> list[str]:
        return [f"blocks.{layer}.{STEERING_HOOKS[self.hook]}" for layer in self.layers]

    @property
    def first_layer(self) -> int:
        return self.layers[0]

    def config(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "hook": self.hook, "alpha": self.alpha}

    @property
    def norm(self) -> float:
        """‖alpha · [v_L for all L]‖: the size of all added vectors together at scale 1."""
        return float(torch.sqrt(sum(((d.detach().float() ** 2).sum() for d in self.deltas(1.0).values()), torch.zeros(()))))

    def deltas(self, scale: float | None = None) -> dict[int, Float[Tensor, " d_model"]]:
        """{layer: the vector added there, `scale · alpha · v_L` [d_model]}; scale defaults to `self.scale`."""
        factor = (self.scale if scale is None else float(scale)) * self.alpha
        return {layer: self.vectors[f"L{layer}"] * factor for layer in self.layers}

    def scaled_hooks(self, total: float, positions: Positions = "all") -> list[tuple[str, HookFn]]:
        def make(layer: int) -> HookFn:
            def add_vector(act: Float[Tensor, "batch pos d_model"], hook: Any) -> Float[Tensor, "batch pos d_model"]:
                delta = (self.vectors[f"L{layer}"] * (total * self.alpha)).to(act.device, act.dtype)
                weight = position_weight(positions, act)
                return act + (delta if weight is None else weight * delta)

            return add_vector

        return [(name, make(layer)) for name, layer in zip(self.hook_names, self.layers, strict=True)]

    def split(self, model: TransformerBridge) -> list[SteeringVector]:
        """One `SteeringVector` per layer (copies: same hook, alpha, scale and values), for `model`."""
        self.check_model(model)
        out = []
        for layer in self.layers:
            vec = SteeringVector(model, layer, self.hook, init=self.vectors[f"L{layer}"].detach(), alpha=self.alpha)
            vec.scale = self.scale
            out.append(vec)
        return out

    def __repr__(self) -> str:
        return (f"SteeringSet({STEERING_HOOKS[self.hook]} at layers {self.layers}, alpha={self.alpha:g}, "
                f"scale={self.scale:g}, norm={self.norm:.4g})")

    def export_gguf(self, path: str | os.PathLike[str], model_hint: str | None = None) -> Path:
        """Write the set (each layer's `scale · alpha · v_L`) as one llama.cpp control-vector GGUF.

        Layer L becomes `direction.N` exactly as for `SteeringVector.export_gguf` (N = L for resid_post);
        see `em_interp.adapters.export`.
        """
        return file_format_function("export_control_vector")(self, path, model_hint)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str], model: TransformerBridge) -> SteeringSet:
        """Read a llama.cpp control-vector GGUF for `model` (see `em_interp.adapters.export.from_gguf`)."""
        return file_format_function("from_gguf")(path, model)

    @classmethod
    def from_repeng(cls, control_vector: Any, model: TransformerBridge) -> SteeringSet:
        """Convert a repeng `ControlVector` for `model` (see `em_interp.adapters.export.from_repeng`)."""
        return file_format_function("from_repeng")(control_vector, model)


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
