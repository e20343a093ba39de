"""Narrow vs general: a small standalone version of the emergent-misalignment study.

Trains two steering vectors at the middle layer in one batched `train_many` run, both on bad medical advice:
a *general* one (kl_coef 0) and a *narrow* one (plus a strong KL penalty towards the chat model on other
domains: finance, legal, careers, home safety). Then prints what the study compares them on: their cosine,
efficiency (lowest loss when the vector is rescaled, and at which norm), stability (loss increase under
norm-preserving noise of size eps, in % of the gap between the vector's loss and the chat model's), and the
judge-free contrastive shift towards bad answers on medical vs other-domain test items. A narrow solution
should shift the medical items while leaving the other domains alone; a general one shifts both.

The full study (reversion, trajectory PCA, KL vs norm on generic text, verdicts, an HTML report) is one
command: `em-interp demo --out runs/demo` (or `make demo`).

Run:
    python examples/narrow_vs_general.py           # 48 rows, 3 epochs: 5-10 minutes on a CPU
    python examples/narrow_vs_general.py --fast    # tiny sizes, under a minute: a smoke test, not evidence
    python examples/narrow_vs_general.py --device cuda --out runs/nvg

Writes into --out: `general/` and `narrow/` (run dirs: losses, trajectory, adapter) and `summary.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import em_interp as em

KL_DOMAINS = ["finance", "legal", "careers", "home_safety"]
SIZES = {  # rows trained on, epochs, batch, rows for the curves, contrastive items per group, curve grids
    "fast": dict(n_rows=4, epochs=1, batch=2, eval_rows=2, items=2, scales=(0.0, 1.0, 2.0), eps=(0.5, 1.0), seeds=2),
    "full": dict(n_rows=48, epochs=3, batch=8, eval_rows=16, items=8, scales=em.geometry.DEFAULT_SCALES,
                 eps=(0.1, 0.2, 0.4, 0.7, 1.0), seeds=5),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train a general and a narrow steering vector and compare them.")
    parser.add_argument("--fast", action="store_true", help="tiny sizes (a few steps, few evaluation rows)")
    parser.add_argument("--out", type=Path, default=Path("runs/examples/narrow_vs_general"), help="output directory")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA if available)")
    parser.add_argument("--kl-coef", type=float, default=30.0, help="KL weight of the narrow vector (per token)")
    args = parser.parse_args(argv)
    z = SimpleNamespace(**SIZES["fast" if args.fast else "full"])

    model = em.load_model(device=args.device)
    layer = model.cfg.n_layers // 2
    data = em.datasets.sample(em.datasets.load("medical", kind="bad", split="train"), z.n_rows, by="subtopic")
    kl_data = em.datasets.sample(em.datasets.load(KL_DOMAINS, kind="mixed", split="train"), z.n_rows, by="domain")
    general = em.SteeringVector(model, layer=layer, alpha=16.0)
    narrow = em.SteeringVector(model, layer=layer, alpha=16.0)
    # One forward/backward per step trains both; each gets the same result as its own em.train() call.
    runs = em.train_many([general, narrow], model, data, kl_data=kl_data, kl_coef=[0.0, args.kl_coef], lr=2e-3,
                         epochs=z.epochs, batch_size=z.batch, kl_batch_size=z.batch, warmup_steps=1, record_every=1)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, run in zip(("general", "narrow"), runs, strict=True):
        run.save(args.out / name)

    # Contrastive items, grouped: contrastive() reports per `domain`, so we set it to our two groups.
    per_domain = max(1, z.items // len(KL_DOMAINS))
    groups = {"medical": em.datasets.load("medical", kind="paired", split="test")[: z.items],
              "other": [it for d in KL_DOMAINS for it in em.datasets.load(d, kind="paired", split="test")[:per_domain]]
              [: z.items]}
    items = [{**it, "domain": group} for group, rows in groups.items() for it in rows]

    g = em.geometry
    summary: dict = {"layer": layer, "kl_coef": args.kl_coef, "cosine": g.cosine(general, narrow)}
    for name, run in zip(("general", "narrow"), runs, strict=True):
        vec = run.adapter
        eff = g.efficiency_curve(vec, model, data, scales=z.scales, n_rows=z.eval_rows)
        stab = g.stability_curve(vec, model, data, eps=z.eps, seeds=z.seeds, n_rows=z.eval_rows)
        con = em.eval.contrastive(model, items, vec, n_boot=200, progress=False)
        summary[name] = {
            "final_losses": run.losses[-1], "norm": vec.norm,
            "efficiency": {"norms": eff.norms.tolist(), "losses": eff.losses.tolist(), "base_loss": eff.base_loss,
                           "best_norm": eff.best_norm, "min_loss": eff.min_loss},
            "stability": {"eps": list(z.eps), "relative_mean": stab.relative_mean.tolist(),
                          "loss_orig": stab.loss_orig, "loss_base": stab.loss_base},
            "contrastive": {group: con.domains[group] for group in groups},
        }

    print(f"\nlayer {layer}; {len(data)} medical rows; narrow: KL weight {args.kl_coef:g} on {', '.join(KL_DOMAINS)}")
    print(f"cosine(general, narrow) = {summary['cosine']:+.3f}")
    print(f"\n{'':<9}{'ce':>7}{'kl':>9}{'norm':>7}{'min loss':>10}{'at norm':>9}   stability (% of gap) at eps")
    for name in ("general", "narrow"):
        s = summary[name]
        stab_text = "  ".join(f"{e:g}: {r:+.0f}%" for e, r in zip(z.eps, s["stability"]["relative_mean"], strict=True))
        print(f"{name:<9}{s['final_losses']['ce']:>7.3f}{s['final_losses']['kl']:>9.5f}{s['norm']:>7.2f}"
              f"{s['efficiency']['min_loss']:>10.3f}{s['efficiency']['best_norm']:>9.2f}   {stab_text}")
    print(f"(the chat model's loss on the same {z.eval_rows} rows: {summary['general']['efficiency']['base_loss']:.3f})")
    print("\ncontrastive shift of mean log p(bad) - log p(good) per answer token [95% CI]:")
    for name in ("general", "narrow"):
        parts = [f"{group} {c['mean_shift']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] (n={c['n']})"
                 for group, c in summary[name]["contrastive"].items()]
        print(f"  {name:<8} " + "   ".join(parts))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nwrote {args.out / 'summary.json'} and the run dirs; for the full study run `em-interp demo`.")


if __name__ == "__main__":
    main()
