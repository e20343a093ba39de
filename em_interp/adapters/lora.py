"""Rank-k LoRA adapters as hooks: `Δy = scale · s · (x Aᵀ) Bᵀ` with s = alpha/r (or alpha/√r, rsLoRA).

For each (layer, site) the input of the site's linear map is read at its input hook and the update is
added at its output hook. The result equals running the model whose weight W was replaced by
`W + scale · s · B A`; weights are never edited.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
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

# Our site names -> (bridge submodule of the block, HF submodule of the decoder layer).
LORA_SITES = {
    "mlp_out": ("mlp.out", "mlp.down_proj"),
    "mlp_up": ("mlp.in", "mlp.up_proj"),
    "mlp_gate": ("mlp.gate", "mlp.gate_proj"),
    "attn_q": ("attn.q", "self_attn.q_proj"),
    "attn_k": ("attn.k", "self_attn.k_proj"),
    "attn_v": ("attn.v", "self_attn.v_proj"),
    "attn_out": ("attn.o", "self_attn.o_proj"),
}
ALL_SITES = tuple(LORA_SITES)


class LoRA(Adapter):
    """Low-rank updates `B A` (A: [r, d_in], B: [d_out, r]) of one or more linear maps.

    Args:
        model: the TransformerBridge it is made for.
        layer: a block index or a list of them.
        rank: r.
        site: a site name or a list: "mlp_out" (down_proj, the seed's rank-1 adapter), "mlp_up",
            "mlp_gate", "attn_q", "attn_k", "attn_v", "attn_out" ("all" = all seven).
        alpha: scaling numerator (default r, i.e. s = 1).
        rslora: use s = alpha/√r (the authors' setting) instead of alpha/r.
        init: "default" (A Kaiming-uniform as in PEFT, B zeros, so ΔW = 0), "random" (both Gaussian,
            std 1/√d), or "zeros".
        seed: seed of the initialisation.
    """

    kind = "lora"

    def __init__(
        self,
        model: TransformerBridge,
        layer: int | Sequence[int],
        rank: int = 1,
        site: str | Sequence[str] = "mlp_out",
        alpha: float | None = None,
        rslora: bool = False,
        init: str = "default",
        seed: int = 0,
    ):
        super().__init__(model)
        n_layers = model.cfg.n_layers
        layers: list[Any] = [layer]  # checked one by one below (a 0-d array or tensor is one index)
        if isinstance(layer, Iterable) and not isinstance(layer, str) and getattr(layer, "ndim", None) != 0:
            layers = list(layer)
        sites = list(ALL_SITES) if site == "all" else [site] if isinstance(site, str) else list(site)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise AdapterError(f"LoRA: rank={rank!r}; expected an int >= 1.")
        if not layers:
            raise AdapterError("LoRA: layer=[] is empty; expected a block index or a list of them.")
        for s in sites:
            if s not in LORA_SITES:
                raise AdapterError(f"LoRA: site={s!r}; expected one of {', '.join(LORA_SITES)} or 'all'.")
        self.layers = sorted({check_layer(lyr, n_layers, "LoRA") for lyr in layers})
        self.sites = sites
        self.rank = rank
        self.alpha = check_finite(alpha if alpha is not None else rank, "alpha", "LoRA")
        self.rslora = rslora
        self.scaling = self.alpha / (math.sqrt(rank) if rslora else rank)
        g = torch.Generator().manual_seed(seed)
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for lyr in self.layers:
            block = model.blocks[lyr]
            for s in sites:
                linear = block.get_submodule(LORA_SITES[s][0])
                d_out, d_in = linear.weight.shape if hasattr(linear, "weight") else linear.original_component.weight.shape
                a, b = _initial_factors(init, rank, d_in, d_out, g)
                self.A[_key(lyr, s)] = nn.Parameter(a)
                self.B[_key(lyr, s)] = nn.Parameter(b)
        self._inputs: dict[str, Tensor] = {}

    @property
    def first_layer(self) -> int:
        return self.layers[0]

    def config(self) -> dict[str, Any]:
        return {"layer": self.layers, "rank": self.rank, "site": self.sites, "alpha": self.alpha, "rslora": self.rslora}

    def modules(self) -> list[tuple[int, str]]:  # type: ignore[override]
        """The (layer, site) pairs this adapter changes."""
        return [(lyr, s) for lyr in self.layers for s in self.sites]

    def delta_weight(self, layer: int, site: str, scale: float = 1.0) -> Float[Tensor, "d_out d_in"]:
        """The effective ΔW = scale · s · B A [d_out, d_in] at (layer, site)."""
        k = _key(layer, site)
        return scale * self.scaling * (self.B[k] @ self.A[k])

    @property
    def norm(self) -> float:
        """Mean over modules of ‖B A‖_F (times the scaling), as in the authors' efficiency plots."""
        with torch.no_grad():
            norms = [self.delta_weight(lyr, s).float().norm() for lyr, s in self.modules()]
        return float(torch.stack(norms).mean())

    def scaled_hooks(self, total: float, positions: Positions = "all") -> list[tuple[str, HookFn]]:
        pairs: list[tuple[str, HookFn]] = []
        for lyr, s in self.modules():
            prefix = f"blocks.{lyr}.{LORA_SITES[s][0]}"
            pairs.append((f"{prefix}.hook_in", self._store_input(_key(lyr, s))))
            pairs.append((f"{prefix}.hook_out", self._add_update(_key(lyr, s), total, positions)))
        return pairs

    def _store_input(self, key: str) -> HookFn:
        def store(x: Float[Tensor, "batch pos *d_in"], hook: Any) -> None:
            self._inputs[key] = x

        return store

    def _add_update(self, key: str, scale: float, positions: Positions) -> HookFn:
        def add(y: Float[Tensor, "batch pos *d_out"], hook: Any) -> Float[Tensor, "batch pos *d_out"]:
            x = self._inputs.pop(key)
            x = x.flatten(2) if x.ndim > 3 else x  # attn.o's input is shown split into heads (hook_z)
            a = self.A[key].to(x.device, x.dtype)
            b = self.B[key].to(x.device, x.dtype)
            update = (x @ a.T) @ b.T * (scale * self.scaling)  # [batch, pos, d_out]
            weight = position_weight(positions, update)
            update = update if weight is None else weight * update
            return y + update.reshape(y.shape)  # attention sites show q/k/v split into heads

        return add

    def __repr__(self) -> str:
        n_params = sum(p.numel() for p in self.parameters())
        return (
            f"LoRA(layers={self.layers}, sites={self.sites}, rank={self.rank}, alpha={self.alpha:g}, "
            f"rslora={self.rslora}, scale={self.scale:g}, params={n_params}, norm={self.norm:.4g})"
            f"{self._provenance_line()}"
        )

    def export_peft(self, directory: str | os.PathLike[str], base_model_name: str | None = None) -> Path:
        """Write this adapter as a PEFT LoRA directory (see `em_interp.adapters.export.export_peft`).

        >>> lora.export_peft("runs/lora_peft", "Qwen/Qwen2.5-14B-Instruct")  # doctest: +SKIP
        """
        return file_format_function("export_peft")(self, directory, base_model_name)

    @classmethod
    def from_peft(cls, directory: str | os.PathLike[str], model: TransformerBridge) -> LoRA:
        """Read a PEFT LoRA directory for `model` (see `em_interp.adapters.export.lora_from_peft`)."""
        return file_format_function("lora_from_peft")(directory, model)


def _key(layer: int, site: str) -> str:
    return f"L{layer}_{site}"


def _initial_factors(init: str, rank: int, d_in: int, d_out: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    if init == "default":
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=√5) as in PEFT/nn.Linear
        a = (torch.rand(rank, d_in, generator=g) * 2 - 1) * bound
        return a, torch.zeros(d_out, rank)
    if init == "random":
        return torch.randn(rank, d_in, generator=g) / math.sqrt(d_in), torch.randn(d_out, rank, generator=g) / math.sqrt(rank)
    if init == "zeros":
        return torch.zeros(rank, d_in), torch.zeros(d_out, rank)
    raise AdapterError(f"init={init!r}; expected 'default', 'random' or 'zeros'.")
