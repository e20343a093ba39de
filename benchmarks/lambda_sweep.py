"""Choose the study's KL weight λ: train one general vector (λ = 0) and narrow vectors at several λ together,
then measure the narrowness gate's ratios (contrastive shift of narrow / general per group, at scale 1 and 2).

    PYTHONPATH=. python benchmarks/lambda_sweep.py --coefs 5 20 80 --seed 0

Appends one JSON line per run to benchmarks/results/lambda_sweep.jsonl. The data, sizes and training settings are
the study's default preset (em_interp.study.StudyConfig), so the chosen λ carries over.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import em_interp as em
from em_interp.study import StudyConfig, study_data

log = logging.getLogger("lambda_sweep")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--coefs", type=float, nargs="+", default=[5.0, 20.0, 80.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "lambda_sweep.jsonl"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = StudyConfig.preset("default")
    t0 = time.perf_counter()
    model = em.load_model(device=args.device, dtype="bfloat16")
    layer = model.cfg.n_layers // 2
    data = study_data(cfg, args.seed)
    vecs = [em.SteeringVector(model, layer, alpha=cfg.alpha) for _ in range(1 + len(args.coefs))]
    runs = em.train_many(vecs, model, data.train, kl_data=data.kl, kl_coef=[0.0, *args.coefs], seed=args.seed,
                         lr=cfg.lr, epochs=cfg.epochs, batch_size=cfg.batch_size, kl_batch_size=cfg.batch_size,
                         warmup_steps=2, record_every=cfg.epochs * 100, schedule="constant", progress=False)
    conditions = {"general": vecs[0], **{f"narrow_{c:g}": v for c, v in zip(args.coefs, vecs[1:], strict=True)}}
    shifts = {}
    for scale in (1.0, 2.0):
        res = em.eval.contrastive_many(model, data.contrastive, conditions, scale=scale, progress=False)
        shifts[scale] = {name: em.study.group_shifts(r.items, data.contrastive) for name, r in res.items()}
    means = {s: {name: {g: v["mean_shift"] for g, v in groups.items()} for name, groups in by_name.items()}
             for s, by_name in shifts.items()}
    rows = []
    for c in args.coefs:
        gate = em.verdicts.narrowness_gate(
            {s: means[s]["general"] for s in means}, {s: means[s][f"narrow_{c:g}"] for s in means})
        rows.append({"kl_coef": c, "gate": em.report.plain(gate)})
        log.info("λ=%g: %s", c, gate.reason)
    record = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": str(em.models.model_device(model)),
              "seed": args.seed, "layer": layer, "config": em.report.plain(cfg),
              "final_losses": [r.final_losses() for r in runs], "norms": [v.norm for v in vecs],
              "shifts": em.report.plain({str(s): v for s, v in shifts.items()}), "results": rows,
              "wall_s": round(time.perf_counter() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
