"""Rank-1 LoRA on one MLP down-projection: the authors' second model organism, on the embedded model.

Trains two rank-1 LoRAs (`site="mlp_out"`, i.e. `mlp.down_proj`, at the middle layer) on bad medical advice,
with different seeds (initialisation of A and data order), in one batched `train_many` run. Then shows:
- ΔW = s·B·A and its Frobenius norm, with and without the scaling s, next to ‖W_down‖;
- the efficiency curve: the loss as B is rescaled (0 = the chat model, 1 = as trained), every ΔW scaling
  together, as in the authors' efficiency plots;
- the cosine between the two seeds' ΔW (sign- and gauge-invariant: B·c, A/c give the same ΔW) and between
  the directions their B columns write into the residual stream.

alpha and lr: the authors' rank-1 adapter (Qwen2.5-14B-Instruct, layer 24) uses alpha 512 with rsLoRA, i.e.
s = alpha/√r = 512 for r = 1, and lr 2e-5. We keep alpha and rsLoRA. Adam moves each entry of B by about lr
per step whatever the gradient's size, so ΔW grows by about s·lr·‖A‖ per step: their lr suits hundreds of
steps; for the few steps here we use lr 1e-3 (pass `--lr 2e-5` for theirs and watch ΔW barely move).

Run:
    python examples/rank1_lora.py              # 64 rows, 2 epochs: a few minutes on a laptop CPU
    python examples/rank1_lora.py --fast       # tiny sizes, under a minute
    python examples/rank1_lora.py --device cuda --out runs/rank1 --lr 2e-5

Writes into --out: `seed0/` and `seed1/` (run dirs) and `summary.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import em_interp as em


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train two rank-1 LoRAs on bad medical advice and compare them.")
    parser.add_argument("--fast", action="store_true", help="tiny sizes (a few steps, few evaluation rows)")
    parser.add_argument("--out", type=Path, default=Path("runs/examples/rank1_lora"), help="output directory")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA if available)")
    parser.add_argument("--alpha", type=float, default=512.0, help="LoRA alpha (the authors: 512, with rsLoRA)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (the authors: 2e-5, many more steps)")
    args = parser.parse_args(argv)
    n_rows, epochs, batch, eval_rows = (8, 1, 2, 3) if args.fast else (64, 2, 8, 16)
    scales = (0.0, 0.5, 1.0, 1.5, 2.0) if args.fast else em.geometry.DEFAULT_SCALES

    model = em.load_model(device=args.device)
    layer = model.cfg.n_layers // 2
    data = em.datasets.sample(em.datasets.load("medical", kind="bad", split="train"), n_rows, by="subtopic")
    loras = [em.LoRA(model, layer=layer, rank=1, site="mlp_out", alpha=args.alpha, rslora=True, seed=s) for s in (0, 1)]
    print(f"{loras[0]!r}: s = alpha/sqrt(r) = {loras[0].scaling:g}; A is {tuple(loras[0].A[f'L{layer}_mlp_out'].shape)}, "
          f"B is {tuple(loras[0].B[f'L{layer}_mlp_out'].shape)} (B starts at 0, so ΔW starts at 0)")
    runs = em.train_many(loras, model, data, seed=[0, 1], lr=args.lr, epochs=epochs, batch_size=batch,
                         warmup_steps=1, record_every=1)

    g = em.geometry
    w_down = em.model.hf_model_of(model).model.layers[layer].mlp.down_proj.weight
    summary: dict = {"layer": layer, "alpha": args.alpha, "lr": args.lr, "scaling": loras[0].scaling}
    print(f"\nlayer {layer} down_proj, ‖W‖_F = {float(w_down.norm()):.2f}; {len(data)} rows, lr {args.lr:g}")
    for seed, (lora, run) in enumerate(zip(loras, runs, strict=True)):
        eff = g.efficiency_curve(lora, model, data, scales=scales, n_rows=eval_rows)
        summary[f"seed{seed}"] = {"losses": [r["ce"] for r in run.losses], "delta_w_norm": lora.norm,
                                  "ba_norm": lora.norm / lora.scaling, "efficiency": {
                                      "scales": eff.scales.tolist(), "norms": eff.norms.tolist(),
                                      "losses": eff.losses.tolist(), "base_loss": eff.base_loss}}
        # lora.delta_weight(layer, "mlp_out") is ΔW = s·B·A itself, [d_model, d_mlp]; lora.norm its ‖·‖_F
        print(f"\nseed {seed}: CE per step " + " ".join(f"{r['ce']:.3f}" for r in run.losses))
        print(f"  ‖ΔW‖_F = ‖s·B·A‖_F = {lora.norm:.3f} ({lora.norm / float(w_down.norm()):.1%} of ‖W‖); "
              f"‖B·A‖_F = {lora.norm / lora.scaling:.3g}")
        print(f"  efficiency, loss with B rescaled by x (‖ΔW‖ = x·{lora.norm:.2f}; x=0 is the chat model): "
              + "  ".join(f"x{x:g}: {v:.3f}" for x, v in zip(eff.scales, eff.losses, strict=True)))
        run.save(args.out / f"seed{seed}")

    cos_dw = g.cosine(loras[0], loras[1])  # compares ΔW by default
    cos_b = g.cosine(em.directions.as_direction(loras[0]), em.directions.as_direction(loras[1]))
    cos_a = g.cosine(loras[0], loras[1], what="A")
    summary.update(cosine_delta_w=cos_dw, cosine_b=cos_b, cosine_a=cos_a)
    print(f"\ncosine between the two seeds: ΔW {cos_dw:+.3f}, B (residual-stream write direction) {cos_b:+.3f}, "
          f"A (read direction; random init) {cos_a:+.3f}")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out / 'summary.json'} and the run dirs")


if __name__ == "__main__":
    main()
