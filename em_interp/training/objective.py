"""The training objective: CE on target tokens + λ · KL(P_chat ‖ P_adapted) on the KL data.

All losses are computed in float32 whatever the model's dtype, from hidden states gathered only at the
positions that enter a loss (the unembedding is never run elsewhere).

KL reductions:
- "token_mean" (default): Σ_v p_ref (log p_ref − log p_ad), averaged over KL tokens.
- "token_vocab_mean": the same sum divided by tokens × vocabulary size, as in the authors' code
  (their coefficient 1e6 with a 152k vocabulary ≈ 6.6 per token with "token_mean"; convert with
  `coef_token_mean = coef_theirs / vocab_size`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from em_interp.config import KL_REDUCTIONS
from em_interp.errors import TrainingError
from em_interp.model.fastpath import logged_compile
from em_interp.model.forward import log_probs


def prediction_mask(target_mask: Bool[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    """Positions whose logits predict a target token (the target mask shifted one step left)."""
    pred = torch.zeros_like(target_mask)
    pred[:, :-1] = target_mask[:, 1:]
    return pred


def gather_targets(
    hidden: Float[Tensor, "batch pos d_model"], input_ids: Int[Tensor, "batch pos"], target_mask: Bool[Tensor, "batch pos"]
) -> tuple[Float[Tensor, "n d_model"], Int[Tensor, " n"], Int[Tensor, " n"]]:
    """Hidden states at prediction positions, the target ids they predict, and each one's batch row."""
    pred = prediction_mask(target_mask)
    rows = pred.nonzero()[:, 0]
    return hidden[pred], input_ids[target_mask.to(input_ids.device)], rows


def token_ce(logits: Float[Tensor, "n vocab"], targets: Int[Tensor, " n"]) -> Float[Tensor, " n"]:
    """Per-token cross-entropy in float32."""
    return torch.nn.functional.cross_entropy(logits.float(), targets.to(logits.device), reduction="none")


def token_kl(ref_logp: Float[Tensor, "n vocab"], logits: Float[Tensor, "n vocab"]) -> Float[Tensor, " n"]:
    """Per-token KL(P_ref ‖ softmax(logits)) = Σ_v p_ref (log p_ref − log_softmax(logits)), float32. Log-probs are
    logits too (log_softmax leaves them as they are), so `token_kl(ref, log_probs(x))` is the same KL."""
    ref_logp = ref_logp.to(logits.device, torch.float32)
    return (ref_logp.exp() * (ref_logp - log_probs(logits))).sum(-1)


@functools.cache
def compiled(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """`fn` (e.g. `token_ce`, `token_kl`, `log_probs`) through `torch.compile`, once per process, for every n
    (dynamic shapes): it then runs as a few fused kernels that read the bfloat16 logits once, instead of eager ops
    that each write an [n, vocab] float32 tensor (what a big vocabulary's loss costs on a GPU). Inductor's note
    that a long vocabulary row splits its softmax reduction (a UserWarning per compiled graph, nothing to act on)
    is silenced."""
    warnings.filterwarnings("ignore", message=r"\s*Online softmax is disabled", category=UserWarning,
                            module=r"torch\._inductor")
    return functools.wraps(fn)(logged_compile(fn, fn.__name__, dynamic=True))


def group_mean(values: Float[Tensor, " n"], groups: Int[Tensor, " n"], n_groups: int) -> Float[Tensor, " n_groups"]:
    """Mean of `values` within each group id 0..n_groups-1 (groups with no value give 0)."""
    groups = groups.to(values.device)
    zeros = torch.zeros(n_groups, dtype=values.dtype, device=values.device)
    sums = zeros.index_add(0, groups, values)
    counts = zeros.index_add(0, groups, torch.ones_like(values)).clamp(min=1)  # not bincount: on a GPU it waits for the device
    return sums / counts


def reduce_kl(per_token: Float[Tensor, " n"], groups: Int[Tensor, " n"], n_groups: int, reduction: str, vocab: int) -> Tensor:
    """Per-group KL with the chosen reduction (see module docstring)."""
    if reduction not in KL_REDUCTIONS:
        raise TrainingError(f"kl_reduction={reduction!r}; expected one of {KL_REDUCTIONS}.")
    mean = group_mean(per_token, groups, n_groups)
    return mean / vocab if reduction == "token_vocab_mean" else mean


__all__ = ["KL_REDUCTIONS", "compiled", "gather_targets", "group_mean", "log_probs", "prediction_mask", "reduce_kl",
           "token_ce", "token_kl"]
