"""Choose the study's narrow-training settings: for each (adapter kind, layer, training length), train one general
adapter (λ = 0) and narrow adapters at several λ together, then measure the narrowness gate's ratios (contrastive
shift of narrow / general per group, at scale 1 and 2).

    PYTHONPATH=. python benchmarks/lambda_sweep.py --coefs 4 16 64 --layers 15 --seed 0
    PYTHONPATH=. python benchmarks/lambda_sweep.py --adapter lora --layers 9 15 21 --n-train 208 --epochs 4

Appends one JSON line per (adapter, layer) to benchmarks/results/lambda_sweep.jsonl. Unless overridden, the data,
sizes and training settings are the study preset's (em_interp.study.StudyConfig), so a chosen setting carries over.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import em_interp as em
from em_interp.study import StudyConfig, study_data

log = logging.getLogger("lambda_sweep")


def gate_of(model: Any, items: list[dict[str, Any]], conditions: dict[str, Any], coefs: list[float]
            ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Contrastive shifts per group at scales 1 and 2, and the gate of each narrow λ against the general one."""
    shifts = {}
    for scale in (1.0, 2.0):
        res = em.eval.contrastive_many(model, items, conditions, scale=scale, progress=False)
        shifts[scale] = {name: em.study.group_shifts(r.items, items) for name, r in res.items()}
    means = {s: {name: {g: v["mean_shift"] for g, v in groups.items()} for name, groups in by_name.items()}
             for s, by_name in shifts.items()}
    rows = []
    for c in coefs:
        gate = em.study.verdicts.narrowness_gate(
            {s: means[s]["general"] for s in means}, {s: means[s][f"narrow_{c:g}"] for s in means})
        rows.append({"kl_coef": c, "gate": em.report.plain(gate)})
        log.info("  λ=%g: %s", c, gate.reason)
    return shifts, rows


def margin(gate: dict[str, Any]) -> float:
    """How far the gate's worst ratio is inside its bound (negative: outside): min(in − 0.5, 0.25 − max other)."""
    if gate.get("in_domain") is None or any(v is None for v in gate["other"].values()):
        return -math.inf  # a ratio could not be formed
    return min([gate["in_domain"] - gate["min_in"]] + [gate["max_other"] - v for v in gate["other"].values()])


def setting(record: dict[str, Any], kl_coef: float) -> tuple[Any, ...]:
    """(adapter, layer, rank, KL tokens, epochs, lr, KL batch, λ) of one narrow condition in a record."""
    config = record["config"] if isinstance(record["config"], dict) else {}
    kl_batch = config.get("kl_batch_size") or config.get("batch_size")
    return (record.get("adapter", "vector"), record.get("layer"), record.get("rank", 1),
            record.get("kl_tokens", "answer"), config.get("epochs"), record.get("lr"), kl_batch, kl_coef)


def pooled_gate(records: list[dict[str, Any]], kl_coef: float) -> dict[str, Any]:
    """The gate as the study forms it: on each group's shift averaged over the records' seeds."""
    def mean_shifts(name: str) -> dict[float, dict[str, float]]:
        return {float(s): {g: statistics.fmean(r["shifts"][s][name][g]["mean_shift"] for r in records)
                           for g in records[0]["shifts"][s][name]} for s in records[0]["shifts"]}
    return em.report.plain(em.study.verdicts.narrowness_gate(mean_shifts("general"), mean_shifts(f"narrow_{kl_coef:g}")))


def summarize(path: Path) -> tuple[Any, ...] | None:
    """One line per (setting, λ) of the records in `path`: the gate's margin per seed, and the margin of the gate
    on the shifts averaged over those seeds (as the study forms it). Returns the setting whose pooled margin is
    largest among those with the most seeds."""
    rows: dict[tuple[Any, ...], dict[int, float]] = {}
    records: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        for row in r["results"]:
            key = setting(r, row["kl_coef"])
            rows.setdefault(key, {})[r["seed"]] = margin(row["gate"])
            records.setdefault(key, []).append(r)
    pooled = {key: margin(pooled_gate(recs, key[-1])) if "shifts" in recs[0] else -math.inf
              for key, recs in records.items()}
    for key, by_seed in sorted(rows.items(), key=lambda kv: str(kv[0])):
        print(f"{key}: margins " + ", ".join(f"seed {s} {m:+.3f}" for s, m in sorted(by_seed.items()))
              + f"; worst {min(by_seed.values()):+.3f}; pooled over {len(by_seed)} seeds {pooled[key]:+.3f}")
    most = max((len(v) for v in rows.values()), default=0)
    best = max((k for k in rows if len(rows[k]) == most), key=lambda k: pooled[k], default=None)
    if best is not None:
        print(f"best pooled ({most} seeds): {best} margin {pooled[best]:+.3f}")
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--coefs", type=float, nargs="+", default=[4.0, 16.0, 64.0])
    p.add_argument("--adapter", choices=["vector", "lora"], nargs="+", default=["vector"])
    p.add_argument("--layers", type=int, nargs="+", default=None, help="default: the middle layer")
    p.add_argument("--preset", default="default", help="StudyConfig preset for data and sizes")
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-kl", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--kl-batch", type=int, default=None, help="KL rows per step (default: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="vector lr (LoRA uses the preset's lora_lr × lr/cfg.lr)")
    p.add_argument("--rank", type=int, default=1, help="LoRA rank (the study's is 1)")
    p.add_argument("--kl-tokens", default="answer", choices=["answer", "all"], help="positions of the KL term")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "lambda_sweep.jsonl"))
    p.add_argument("--summarize", action="store_true", help="print each setting's gate margins from --out and stop")
    args = p.parse_args()
    if args.summarize:
        summarize(Path(args.out))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = {k: v for k, v in (("n_train", args.n_train), ("n_kl", args.n_kl), ("epochs", args.epochs),
                                   ("kl_batch_size", args.kl_batch)) if v is not None}
    cfg = StudyConfig.preset(args.preset, seed=args.seed, **overrides)
    lr_scale = 1.0 if args.lr is None else args.lr / cfg.lr
    model = em.load_model(device=args.device, dtype="bfloat16")
    data = study_data(cfg, args.seed)
    for kind in args.adapter:
        for layer in args.layers or [model.cfg.n_layers // 2]:
            t0 = time.perf_counter()
            kind_cfg = dataclasses.replace(cfg, adapter=kind, lora_rank=args.rank, kl_tokens=args.kl_tokens)
            adapters = [kind_cfg.new_adapter(model, layer, args.seed) for _ in range(1 + len(args.coefs))]
            lr = kind_cfg.train_lr * lr_scale
            runs = em.train_many(adapters, model, data.train, kl_data=data.kl, kl_coef=[0.0, *args.coefs],
                                 seed=args.seed, lr=lr, epochs=cfg.epochs, batch_size=cfg.batch_size,
                                 kl_batch_size=cfg.kl_batch, warmup_steps=2, record_every=cfg.epochs * 1000,
                                 schedule="constant", kl_tokens=kind_cfg.kl_tokens, progress=False)
            conditions = {"general": adapters[0],
                          **{f"narrow_{c:g}": a for c, a in zip(args.coefs, adapters[1:], strict=True)}}
            log.info("%s layer %d rank %d, %d rows × %d epochs, lr %g, KL on %s tokens:", kind, layer, args.rank,
                     len(data.train), cfg.epochs, lr, args.kl_tokens)
            shifts, rows = gate_of(model, data.contrastive, conditions, args.coefs)
            record = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": str(em.model.model_device(model)),
                      "command": " ".join(["python", *sys.argv]), "seed": args.seed, "adapter": kind,
                      "layer": layer, "lr": lr, "rank": args.rank, "kl_tokens": args.kl_tokens, "config": em.report.plain(cfg),
                      "final_losses": [r.final_losses() for r in runs], "norms": [a.norm for a in adapters],
                      "shifts": em.report.plain({str(s): v for s, v in shifts.items()}), "results": rows,
                      "wall_s": round(time.perf_counter() - t0, 1)}
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
