"""KL(chat ‖ steered) on plain text as a function of the norm of a vector added to the residual stream.

A direction that the model is robust to costs less KL per unit norm than a random one; the authors plot
this for the narrow and general solutions against random unit vectors, on generic web text (no chat
template), to show how much a solution changes the model off-distribution.

The unsteered pass is computed once: the residual entering the steered block is cached per batch, and so
are the reference log-probs (or, when larger than `max_ref_bytes`, the final hidden states, unembedded
again at each use). Each (direction, norm) then runs only the blocks from the steered one upward.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from em_interp.adapters.base import Adapter
from em_interp.adapters.steering import STEERING_HOOKS, SteeringVector
from em_interp.errors import GeometryError
from em_interp.geometry.curves import effective_norm
from em_interp.model.forward import ActivationCache, ForwardRunner, model_device, start_layer
from em_interp.model.hooks import HookFn, hooks_applied
from em_interp.training.objective import token_kl

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

log = logging.getLogger(__name__)


@dataclass
class KLNormCurve:
    """KL per token against the added vector's norm.

    Attributes:
        norms: [n] norms of the added vector.
        kl: [n] mean KL(chat ‖ steered) per token for the given direction.
        kl_random_mean, kl_random_sd: [n] mean and sample sd (ddof=1) over the random unit directions.
        kl_random: [n_random, n] each random direction's curve.
        layer, hook: where the vector was added (an adapter: its first layer, and "<Kind> sites").
        n_tokens: tokens averaged over.
    """

    norms: Float[np.ndarray, " n"]
    kl: Float[np.ndarray, " n"]
    kl_random_mean: Float[np.ndarray, " n"]
    kl_random_sd: Float[np.ndarray, " n"]
    kl_random: Float[np.ndarray, "n_random n"]
    layer: int
    hook: str
    n_tokens: int

    def __repr__(self) -> str:
        return (f"KLNormCurve(blocks.{self.layer}.{self.hook}, {len(self.norms)} norms up to {float(np.max(self.norms)):.3g}, "
                f"{len(self.kl_random)} random directions, {self.n_tokens} tokens; KL at the largest norm "
                f"{float(self.kl[-1]):.4g} vs random {float(self.kl_random_mean[-1]):.4g})")

    def plot(self, name: str = "trained") -> Any:
        """KL against norm, trained vs random directions, as a plotly Figure (the report's `figures.kl_vs_norm`)."""
        from em_interp.report import figures

        section = {"norms": self.norms, "kl": self.kl, "kl_random_mean": self.kl_random_mean,
                   "kl_random_sd": self.kl_random_sd}
        return figures.kl_vs_norm({"kl_vs_norm": {name: section}})


def unit_vector(direction: Any, d_model: int) -> Float[Tensor, " d_model"]:
    """A float32 unit vector from a tensor, a Direction or a SteeringVector (anything with `.vector`).

    Raises:
        GeometryError: wrong size or zero vector.
    """
    v = direction.vector if hasattr(direction, "vector") else direction
    v = torch.as_tensor(v).detach().float().cpu().flatten()
    if v.numel() != d_model:
        raise GeometryError(f"the direction has {v.numel()} entries; the model's d_model is {d_model}.")
    norm = float(v.norm())
    if norm == 0.0:
        raise GeometryError("the direction is the zero vector; it has no unit direction.")
    return v / norm


def _tokenize(model: TransformerBridge, texts: Sequence[str], max_tokens: int, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    seqs = [tok(t, truncation=True, max_length=max_tokens)["input_ids"] for t in texts if t and t.strip()]
    seqs = [s for s in seqs if len(s) >= 2]
    if not seqs:
        raise GeometryError("kl_vs_norm: no text with at least 2 tokens.")
    seqs.sort(key=len)
    out = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, s in enumerate(chunk):
            ids[r, : len(s)] = torch.tensor(s)
            attn[r, : len(s)] = 1
        out.append((ids, attn))
    return out


def kl_vs_norm(
    direction: Any,
    model: TransformerBridge,
    texts: Sequence[str],
    layer: int | None,
    norms: Sequence[float] | np.ndarray,
    n_random: int = 5,
    seed: int = 0,
    hook: str = "resid_post",
    max_tokens: int = 128,
    batch_size: int = 8,
    max_ref_bytes: int = 1 << 30,
) -> KLNormCurve:
    """Mean per-token KL(chat ‖ chat + change of size n) over all tokens of plain texts, for each norm n.

    For a direction (a tensor, Direction or SteeringVector) the change is n·û added at `layer`'s `hook`, and
    the baseline is random unit directions. For another adapter (e.g. a LoRA) the change is the adapter
    rescaled to effective norm n (`effective_norm`: mean ‖ΔW‖_F for a LoRA), and the baseline is adapters of
    the same kind and sites with Gaussian parameters, rescaled to the same norms.

    Args:
        direction: a tensor [d_model], Direction, SteeringVector, or another adapter (LoRA).
        model: the TransformerBridge.
        texts: plain texts (tokenized without the chat template, truncated to `max_tokens`), e.g.
            `em.datasets.load_text("generic")`.
        layer: block whose `hook` receives the vector; for an adapter other than a SteeringVector, None (its
            own sites are used).
        norms: norms of the change (e.g. `alpha * np.arange(0, 5.01, 0.2)`).
        n_random: random directions (or random adapters), seeded by `seed`, for the baseline.
        seed: seed of the random directions.
        hook: "resid_post" (default), "resid_pre", "resid_mid", "mlp_out" or "attn_out" (directions only).
        max_tokens: tokens kept per text.
        batch_size: texts per forward.
        max_ref_bytes: reference log-probs larger than this are kept as hidden states instead.

    Returns:
        A `KLNormCurve`; at norm 0 every KL is 0.

    >>> curve = kl_vs_norm(vec, model, em.datasets.load_text(), layer=15, norms=256 * np.arange(0, 5.01, 0.2))  # doctest: +SKIP
    """
    return kl_vs_norm_each([direction], model, texts, layer, norms, n_random, seed, hook, max_tokens, batch_size,
                           max_ref_bytes)[0]


def kl_vs_norm_each(
    directions: Sequence[Any],
    model: TransformerBridge,
    texts: Sequence[str],
    layer: int | None,
    norms: Sequence[float] | np.ndarray,
    n_random: int = 5,
    seed: int = 0,
    hook: str = "resid_post",
    max_tokens: int = 128,
    batch_size: int = 8,
    max_ref_bytes: int = 1 << 30,
) -> list[KLNormCurve]:
    """`kl_vs_norm` of several directions (or adapters of one kind and sites) on the same texts, with the
    chat model's pass and the random baseline computed once: each curve carries that same baseline (drawn
    like `kl_vs_norm`'s for `directions[0]`). Arguments as `kl_vs_norm`'s.

    Raises:
        GeometryError: no directions, or a mix of steering directions and other adapters, or adapters whose
            parameters differ in name or shape.
    """
    if not directions:
        raise GeometryError("kl_vs_norm_each: no directions given.")
    is_adapter = [isinstance(d, Adapter) and not isinstance(d, SteeringVector) for d in directions]
    if any(is_adapter):
        if not all(is_adapter):
            raise GeometryError("kl_vs_norm_each: mix of steering directions and other adapters; pass one kind.")
        if layer is not None:
            raise GeometryError(f"kl_vs_norm: layer={layer} given for a {type(directions[0]).__name__}; pass "
                                "layer=None (an adapter is applied at its own sites).")
        _check_same_shapes(directions)
        start = start_layer(model, directions)
        makers = [_adapter_maker(a) for a in directions]
        makers += [_adapter_maker(a) for a in _random_adapters(directions[0], n_random, seed)]
        return _kl_curves(model, texts, start, makers, len(directions), norms, max_tokens, batch_size,
                          max_ref_bytes, start, f"{type(directions[0]).__name__} sites")
    n_layers, d_model = int(model.cfg.n_layers), int(model.cfg.d_model)
    if layer is None or not -n_layers <= layer < n_layers:
        raise GeometryError(f"kl_vs_norm: layer={layer} is out of range for a model with {n_layers} layers.")
    if hook not in STEERING_HOOKS:
        raise GeometryError(f"kl_vs_norm: hook={hook!r}; expected one of {', '.join(STEERING_HOOKS)}.")
    layer = layer % n_layers
    hook_name = f"blocks.{layer}.{STEERING_HOOKS[hook]}"
    g = torch.Generator().manual_seed(seed)
    randoms = [unit_vector(torch.randn(d_model, generator=g), d_model) for _ in range(n_random)]
    units = [unit_vector(d, d_model) for d in directions] + randoms
    makers = [_vector_maker(hook_name, u) for u in units]
    return _kl_curves(model, texts, layer, makers, len(directions), norms, max_tokens, batch_size, max_ref_bytes,
                      layer, hook)


def _check_same_shapes(adapters: Sequence[Adapter]) -> None:
    shapes = [{k: tuple(v.shape) for k, v in a.state().items()} for a in adapters]
    for i, s in enumerate(shapes[1:], start=1):
        if type(adapters[i]) is not type(adapters[0]) or s != shapes[0]:
            raise GeometryError(f"kl_vs_norm_each: adapter {i} ({type(adapters[i]).__name__}, {s}) differs from "
                                f"adapter 0 ({type(adapters[0]).__name__}, {shapes[0]}) in kind or parameter shapes.")


HookMaker = Callable[[float], list[tuple[str, HookFn]]]


def _vector_maker(hook_name: str, unit: Tensor) -> HookMaker:
    """Hooks adding `n · unit` at `hook_name`, for a norm n."""

    def make(n: float) -> list[tuple[str, HookFn]]:
        vec = unit * float(n)

        def add(act: Tensor, hook: Any) -> Tensor:
            return act + vec.to(act.device, act.dtype)

        return [(hook_name, add)]

    return make


def _adapter_maker(adapter: Adapter) -> HookMaker:
    """Hooks applying `adapter` rescaled to effective norm n."""
    unit = effective_norm(adapter, 1.0)
    if unit == 0.0:
        raise GeometryError(f"kl_vs_norm: the {type(adapter).__name__} has norm zero; it cannot be rescaled.")
    return lambda n: adapter.scaled_hooks(adapter.scale * float(n) / unit)


def _random_adapters(adapter: Adapter, n: int, seed: int) -> list[Adapter]:
    """`n` copies of `adapter` with standard Gaussian parameters (seeded), as the random baseline."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        clone = copy.deepcopy(adapter)
        clone.load_state({k: torch.randn(v.shape, generator=g) for k, v in adapter.state().items()})
        out.append(clone)
    return out


def _kl_curves(
    model: TransformerBridge, texts: Sequence[str], start: int, makers: list[HookMaker], n_curves: int,
    norms: Sequence[float] | np.ndarray, max_tokens: int, batch_size: int, max_ref_bytes: int, layer: int, hook: str,
) -> list[KLNormCurve]:
    """KL per token of each maker's hooks at each norm (makers[:n_curves]: the curves; the rest: the random
    baseline every curve carries)."""
    norms_arr = np.asarray(norms, dtype=np.float64)
    n_random = len(makers) - n_curves
    dev = model_device(model)
    batches = [(ids.to(dev), attn.to(dev)) for ids, attn in _tokenize(model, texts, max_tokens, batch_size)]
    kl = np.zeros((len(makers), norms_arr.size))
    n_tokens = 0
    # The reference log-probs of all batches together may take `max_ref_bytes`; beyond it they are kept as
    # final hidden states and unembedded again (`ForwardRunner.reference`).
    cache = ActivationCache(device=dev, max_ref_bytes=max_ref_bytes, max_ref_total_bytes=max_ref_bytes)
    runner = ForwardRunner(model, start, cache=cache)
    with torch.no_grad():
        for k, (ids, attn) in enumerate(batches):
            resid = runner.lower(None, ids, attn)
            index = attn.bool().flatten().nonzero().squeeze(1)
            ref = runner.reference((k,), resid, attn, index)
            n_tokens += int(index.numel())
            for i, make in enumerate(makers):
                for j, n in enumerate(norms_arr):
                    kl[i, j] += _batch_kl(runner, resid, attn, index, ref, make(float(n)))
    kl /= n_tokens
    rand = kl[n_curves:]
    random_mean = rand.mean(axis=0) if n_random else np.full(norms_arr.size, np.nan)
    random_sd = rand.std(axis=0, ddof=1) if n_random > 1 else np.zeros(norms_arr.size)
    return [KLNormCurve(norms=norms_arr, kl=kl[i], kl_random_mean=random_mean, kl_random_sd=random_sd, kl_random=rand,
                        layer=layer, hook=hook, n_tokens=n_tokens) for i in range(n_curves)]


def _batch_kl(
    runner: ForwardRunner, resid: Tensor, attn: Tensor, index: Tensor, ref: Tensor, hooks: list[tuple[str, HookFn]]
) -> float:
    """Σ over the batch's real tokens (flat positions `index`) of KL(ref ‖ the model with `hooks`)."""
    with hooks_applied(runner.model, hooks):
        hidden = runner.resume(resid, attn)
    return float(token_kl(ref, runner.logits_at(hidden, index)).double().sum())
