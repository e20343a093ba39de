"""KL(chat ‖ steered) on plain text as a function of the norm of a vector added to the residual stream.

A direction that the model is robust to costs less KL per unit norm than a random one; the authors plot
this for the narrow and general solutions against random unit vectors, on generic web text (no chat
template), to show how much a solution changes the model off-distribution.

The unsteered pass is computed once: the residual entering the steered block is cached per batch, and so
are the reference log-probs (or, when larger than `max_ref_bytes`, the final hidden states, unembedded
again at each use). Each (direction, norm) then runs only the blocks from the steered one upward.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from em_interp.adapters.steering import STEERING_HOOKS
from em_interp.errors import GeometryError
from em_interp.model.forward import ActivationCache, ForwardRunner, model_device
from em_interp.model.hooks import hooks_applied
from em_interp.training.objective import log_probs, token_kl

log = logging.getLogger(__name__)


@dataclass
class KLNormCurve:
    """KL per token against the added vector's norm.

    Attributes:
        norms: [n] norms of the added vector.
        kl: [n] mean KL(chat ‖ steered) per token for the given direction.
        kl_random_mean, kl_random_sd: [n] mean and sample sd (ddof=1) over the random unit directions.
        kl_random: [n_random, n] each random direction's curve.
        layer, hook: where the vector was added.
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


def _tokenize(model: Any, texts: Sequence[str], max_tokens: int, batch_size: int) -> list[tuple[Tensor, Tensor]]:
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
    model: Any,
    texts: Sequence[str],
    layer: int,
    norms: Sequence[float] | np.ndarray,
    n_random: int = 5,
    seed: int = 0,
    hook: str = "resid_post",
    max_tokens: int = 128,
    batch_size: int = 8,
    max_ref_bytes: int = 1 << 30,
) -> KLNormCurve:
    """Mean per-token KL(chat ‖ chat + n·û) over all tokens of plain texts, for each norm n.

    Args:
        direction: a tensor [d_model], Direction or SteeringVector (unit-normalized here).
        model: the TransformerBridge.
        texts: plain texts (tokenized without the chat template, truncated to `max_tokens`), e.g.
            `em.datasets.load_text("generic")`.
        layer: block whose `hook` receives the vector.
        norms: norms of the added vector (e.g. `alpha * np.arange(0, 5.01, 0.2)`).
        n_random: random unit directions (Gaussian, seeded by `seed`) for the baseline.
        seed: seed of the random directions.
        hook: "resid_post" (default), "resid_pre", "resid_mid", "mlp_out" or "attn_out".
        max_tokens: tokens kept per text.
        batch_size: texts per forward.
        max_ref_bytes: reference log-probs larger than this are kept as hidden states instead.

    Returns:
        A `KLNormCurve`; at norm 0 every KL is 0.

    >>> curve = kl_vs_norm(vec, model, em.datasets.load_text(), layer=15, norms=256 * np.arange(0, 5.01, 0.2))  # doctest: +SKIP
    """
    n_layers, d_model = int(model.cfg.n_layers), int(model.cfg.d_model)
    if not -n_layers <= layer < n_layers:
        raise GeometryError(f"kl_vs_norm: layer={layer} is out of range for a model with {n_layers} layers.")
    if hook not in STEERING_HOOKS:
        raise GeometryError(f"kl_vs_norm: hook={hook!r}; expected one of {', '.join(STEERING_HOOKS)}.")
    layer = layer % n_layers
    hook_name = f"blocks.{layer}.{STEERING_HOOKS[hook]}"
    norms_arr = np.asarray(norms, dtype=np.float64)
    g = torch.Generator().manual_seed(seed)
    randoms = [unit_vector(torch.randn(d_model, generator=g), d_model) for _ in range(n_random)]
    units = [unit_vector(direction, d_model), *randoms]
    dev = model_device(model)
    batches = [(ids.to(dev), attn.to(dev)) for ids, attn in _tokenize(model, texts, max_tokens, batch_size)]
    kl = np.zeros((len(units), norms_arr.size))
    n_tokens = 0
    # The reference log-probs of all batches together may take `max_ref_bytes`; beyond it they are kept as
    # final hidden states and unembedded again (`ForwardRunner.reference`).
    cache = ActivationCache(device=dev, max_ref_bytes=max_ref_bytes, max_ref_total_bytes=max_ref_bytes)
    runner = ForwardRunner(model, layer, cache=cache)
    with torch.no_grad():
        for k, (ids, attn) in enumerate(batches):
            resid = runner.lower(None, ids, attn)
            index = attn.bool().flatten().nonzero().squeeze(1)
            ref = runner.reference((k,), resid, attn, index)
            n_tokens += int(index.numel())
            for i, u in enumerate(units):
                for j, n in enumerate(norms_arr):
                    kl[i, j] += _batch_kl(runner, resid, attn, index, ref, hook_name, u * float(n))
    kl /= n_tokens
    rand = kl[1:]
    return KLNormCurve(
        norms=norms_arr, kl=kl[0], kl_random_mean=rand.mean(axis=0) if n_random else np.full(norms_arr.size, np.nan),
        kl_random_sd=rand.std(axis=0, ddof=1) if n_random > 1 else np.zeros(norms_arr.size), kl_random=rand,
        layer=layer, hook=hook, n_tokens=n_tokens,
    )


def _batch_kl(
    runner: ForwardRunner, resid: Tensor, attn: Tensor, index: Tensor, ref: Tensor, hook_name: str, vec: Tensor
) -> float:
    """Σ over the batch's real tokens (flat positions `index`) of KL(ref ‖ steered by `vec`)."""

    def add(act: Tensor, hook: Any) -> Tensor:
        return act + vec.to(act.device, act.dtype)

    with hooks_applied(runner.model, [(hook_name, add)]):
        hidden = runner.resume(resid, attn)
    logp = log_probs(runner.logits_at(hidden, index))
    return float(token_kl(ref, logp).double().sum())
