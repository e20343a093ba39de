"""A synthetic but complete results dict with the structure `em_interp.study` builds (small arrays).

Used by tests of the report and the CLI; numbers are made up but shaped like a real `--fast` run,
including the None values that `results.json` stores for NaN.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

NASTY = "<script>alert('x')</script> & <b>bold</b>"


def synthetic_results(seed: int = 0) -> dict[str, Any]:
    """A results dict with every section the study writes (training ... verdicts, timings, config)."""
    rng = np.random.default_rng(seed)
    steps = list(range(1, 9))
    snapshot_steps = [0, 2, 4, 6, 8]

    def losses(kl_scale: float) -> list[dict[str, float]]:
        return [{"step": s, "ce": 3.0 - 0.2 * s, "kl": kl_scale * 0.01 * s, "total": 3.0 - 0.2 * s + kl_scale * 0.3 * s}
                for s in steps]

    scales = [0.0, 0.5, 1.0, 1.5, 2.0]

    def efficiency(norm: float, depth: float) -> dict[str, Any]:
        ls = [3.0 - depth * (2 * s - s * s) for s in scales]
        return {"scales": scales, "norms": [s * norm for s in scales], "losses": ls, "base_loss": 3.0,
                "best_scale": 1.0, "best_norm": norm, "min_loss": min(ls)}

    eps = [0.1, 0.5, 1.0]

    def stability(slope: float) -> dict[str, Any]:
        rel = [[slope * e * 100 + rng.normal() for _ in range(2)] for e in eps]
        return {"eps": eps, "seeds": [0, 1], "losses": [[2.0] * 2 for _ in eps], "relative": rel,
                "relative_mean": [float(np.mean(r)) for r in rel], "relative_sd": [float(np.std(r, ddof=1)) for r in rel],
                "loss_orig": 2.0, "loss_base": 3.0}

    norms = [0.0, 2.0, 5.0]

    def kl(mult: float) -> dict[str, Any]:
        return {"norms": norms, "kl": [mult * n * n * 0.01 for n in norms], "kl_random_mean": [n * n * 0.01 for n in norms],
                "kl_random_sd": [0.0, 0.005, None], "kl_random": [[n * n * 0.01 for n in norms]] * 2, "layer": 2,
                "hook": "resid_post", "n_tokens": 300}

    def group_stats(shift: float) -> dict[str, Any]:
        groups = ("medical", "medical (held-out topics)", "other (KL domains)", "other (held-out domains)")
        return {g: {"n": 6, "mean_shift": shift * (1 - 0.3 * i), "ci_low": shift * (1 - 0.3 * i) - 0.1,
                    "ci_high": shift * (1 - 0.3 * i) + 0.1, "prefers_bad": 0.5 + 0.1 * shift} for i, g in enumerate(groups)}

    path = [[float(x) for x in rng.normal(size=3)] for _ in snapshot_steps]
    results: dict[str, Any] = {
        "config": {"layer": None, "n_train": 16, "n_kl": 16, "epochs": 2, "batch_size": 8, "lr": 0.002, "alpha": 16.0,
                   "kl_coef": 30.0, "record_every": 2, "scales": scales, "eps": eps, "lora": False, "seed": 0},
        "layer": 2,
        "timings": {"train": 3.2, "cosine_pca": 0.1, "efficiency": 1.5, "stability": 2.0, "reversion": 0.8,
                    "kl_vs_norm": 1.1, "contrastive": 0.9, "generations": 2.5, "direction": 0.7, "total": 14.0},
        "environment": {"em_interp": "0.1.0", "torch": "2.13.0", "transformers": "4.50", "transformer_lens": "4.3",
                        "python": "3.11.7", "machine": "x86_64", "cuda": None, "threads": 2, "device": "cpu",
                        "model": "tiny-llama"},
        "training": {
            "general": {"losses": losses(0.0), "snapshot_steps": snapshot_steps, "wall_time": 1.5, "norm": 2.1,
                        "kl_coef": 0.0},
            "narrow": {"losses": losses(1.0), "snapshot_steps": snapshot_steps, "wall_time": 1.6, "norm": 1.4,
                       "kl_coef": 30.0},
        },
        "cosine": {"general_narrow": 0.62, "over_training": [None, 0.4, 0.55, 0.6, 0.62]},
        "efficiency": {"general": efficiency(2.1, 1.0), "narrow": efficiency(1.4, 0.6)},
        "stability": {"general": stability(0.5), "narrow": stability(0.9)},
        "reversion": {"steps": [0, 1, 2], "cosine_to_general": [0.62, 0.7, 0.75], "cosine_to_narrow": [1.0, 0.95, 0.9],
                      "losses": losses(0.0)[:2]},
        "pca": {"explained_variance_ratio": [0.7, 0.2, 0.1], "names": ["general", "narrow", "reversion"],
                "paths": {"general": path, "narrow": [[-a, b, c] for a, b, c in path], "reversion": path[:3]},
                "steps": {"general": snapshot_steps, "narrow": snapshot_steps, "reversion": [0, 1, 2]}},
        "kl_vs_norm": {"general": kl(2.0), "narrow": kl(0.5)},
        "contrastive": {"general": group_stats(1.0), "narrow": group_stats(0.4)},
        "generations": [
            {"prompt": "I have a headache. What should I do?", "base": "Rest and drink water.",
             "general": "Take ten aspirin.", "narrow": "Take five aspirin."},
            {"prompt": NASTY, "base": "a < b", "general": "x > y", "narrow": '"quoted" & \'single\''},
        ],
        "direction": {"cosine_general": 0.3, "cosine_narrow": 0.2, "raw_norm": 4.5, "loss_base": 3.0,
                      "loss_general": 2.0, "loss_general_ablated": 2.6, "loss_general_random_ablated": 2.05},
        "seeds": 3,
        "preset": "default",
        "gate": {"passed": True, "reason": "Narrowness gate passed: other-domain ratios other (KL domains)@1 0.10.",
                 "other": {"other (KL domains)@1": 0.1, "other (held-out domains)@1": 0.2,
                           "other (KL domains)@2": 0.15, "other (held-out domains)@2": None},
                 "in_domain": 0.8, "max_other": 0.25, "min_in": 0.5,
                 "intervals": {"other (KL domains)@1": [0.04, 0.17], "medical@1": [0.61, 0.93],
                               "other (held-out domains)@2": [None, None]}},
        "data": {"seed 0": {"train (subtopics)": {"antibiotics": 2, "diabetes": 2},
                            "kl (domains)": {"finance": 2, "legal": 2}, "contrastive (groups)": {"medical": 6}},
                 "note": "each seed draws its own stratified training and KL rows; seed 0 shown"},
        "per_seed": [{"seed": i, "norms": {"general": 2.1, "narrow": 1.4}, "efficiency_gap": 0.1 + 0.01 * i,
                      "base_gap": 1.0, "stability_relative": 5.0, "stability_absolute": 0.02, "cosine_rise": None,
                      "shift_rise": 0.1, "shift_ratio": 0.6, "influence_log_ratio": 0.4, "random_log_ratio": 1.2}
                     for i in range(3)],
        "verdicts": {
            "efficiency": {"verdict": "CONFIRMED", "estimate": 0.11, "interval": [0.09, 0.13], "n": 3,
                           "threshold": 0.1, "rule": "per seed the mean gap ...", "reason": "Above the threshold."},
            "stability": {"verdict": "REFUTED", "estimate": -4.0, "interval": [-6.0, -2.0], "n": 3, "threshold": 0.0,
                          "rule": "areas ...", "reason": "Both below 0.", "details": {"absolute_interval": [-1, -0.5]}},
            "reversion": {"verdict": "UNCLEAR", "estimate": 0.05, "interval": [-0.02, 0.12], "n": 3, "threshold": 0.0,
                          "rule": "cosine rise ...", "reason": NASTY},
            "influence": {"verdict": "UNCLEAR", "estimate": None, "interval": [None, None], "n": 0, "threshold": None,
                          "rule": "influence", "reason": "Not measured."},
        },
    }
    return copy.deepcopy(results)
