"""Time the full study's training steps (the `--seeds 8` preset: 16 rank-1 LoRAs in one `train_many`) on this
machine for a few steps, and extrapolate to the preset's 312 steps: for machines where the whole study takes hours.

    python benchmarks/full_study_steps.py [--steps 4] [--device cpu]

Appends one JSON line to benchmarks/results/full_study_steps.jsonl (measured step times and the extrapolation,
labelled as such).
"""

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import em_interp as em
from em_interp.study import StudyConfig, study_data
from em_interp.training.loop import train_many


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "full_study_steps.jsonl"))
    a = p.parse_args()
    model = em.load_model(device=a.device, dtype="bfloat16")
    cfg = StudyConfig.preset("full")
    layer = model.cfg.n_layers // 2
    data = study_data(cfg, 0)
    adapters = [cfg.new_adapter(model, layer, cfg.seed + i // 2) for i in range(2 * cfg.seeds)]
    stamps: list[float] = []
    t0 = time.perf_counter()
    train_many(adapters, model, data.train, kl_data=data.kl, kl_coef=[0.0, cfg.kl_coef] * cfg.seeds,
               seed=[cfg.seed + i // 2 for i in range(2 * cfg.seeds)], lr=cfg.train_lr, steps=a.steps,
               batch_size=cfg.batch_size, kl_batch_size=cfg.kl_batch, schedule="constant", record_every=1,
               progress=False, on_step=lambda step, losses: stamps.append(time.perf_counter()))
    later = [b - x for x, b in zip(stamps, stamps[1:], strict=False)]
    total = cfg.epochs * -(-len(data.train) // cfg.batch_size)
    record = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "device": str(em.model.model_device(model)), "machine": platform.processor() or platform.machine(),
              "command": "python " + " ".join(sys.argv), "adapters": len(adapters), "kl_batch_size": cfg.kl_batch, "first_step_s": stamps[0] - t0,
              "later_steps_s": later, "steps_per_run": total,
              "extrapolated_training_h": total * sum(later) / len(later) / 3600,
              "note": "an extrapolation from the measured steps, not a timed full run (training only)"}
    print(json.dumps(record))
    with open(a.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
