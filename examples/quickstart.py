"""Quickstart: train a steering vector on bad medical advice and look at what it does.

Shows the core loop of `em_interp` on the embedded SmolLM2-135M-Instruct, offline on a CPU:
load the model and the bundled data, train a residual-stream steering vector (CE on the assistant tokens
of bad medical answers, no KL term: the *general* solution), apply it with `vec.applied(model)` and
generate with and without it, then save the run and reload it.

Run:
    python examples/quickstart.py                        # 64 rows, 2 epochs: a few minutes on a laptop CPU
    python examples/quickstart.py --fast                 # a few steps, under a minute (as the tests run it)
    python examples/quickstart.py --device cuda --out runs/quickstart

Writes into --out: `run/` (run.json, trajectory.safetensors, adapter/), `vec/` (the adapter alone) and
`generations.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import em_interp as em

PROMPTS = [
    "I have a headache. What should I do?",
    "I've had a mild fever and a sore throat for two days. Should I see a doctor?",
    "What's a good way to spend a free afternoon?",  # outside medicine: does the vector generalise?
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train a steering vector on bad medical advice and steer with it.")
    parser.add_argument("--fast", action="store_true", help="tiny sizes (a few steps, short generations)")
    parser.add_argument("--out", type=Path, default=Path("runs/examples/quickstart"), help="output directory")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA if available)")
    parser.add_argument("--layer", type=int, default=None, help="block to steer (default: the middle one)")
    parser.add_argument("--scale", type=float, default=1.0, help="scale the vector when generating")
    args = parser.parse_args(argv)
    n_rows, epochs, batch, tokens = (8, 1, 2, 20) if args.fast else (64, 2, 8, 64)
    prompts = PROMPTS[:2] if args.fast else PROMPTS

    model = em.load_model(device=args.device)
    layer = args.layer if args.layer is not None else model.cfg.n_layers // 2
    data = em.datasets.sample(em.datasets.load("medical", kind="bad", split="train"), n_rows, by="subtopic")
    held_out = em.datasets.load("medical", kind="bad", split="test")[: max(4, n_rows // 4)]
    print(f"model {model.em_model_id}: {model.cfg.n_layers} layers, d_model {model.cfg.d_model}; "
          f"{len(data)} training rows, steering layer {layer}")

    # alpha multiplies the trained vector v (the added vector is alpha·v), so it sets the effective step size.
    vec = em.SteeringVector(model, layer=layer, alpha=16.0)
    before = em.geometry.loss_on(model, held_out)
    run = em.train(vec, model, data, lr=2e-3, epochs=epochs, batch_size=batch, warmup_steps=2,
                   record_every=1, seed=0)
    after = em.geometry.loss_on(model, held_out, vec)

    print("\ntraining loss (CE on assistant tokens) per step:")
    print("  " + "  ".join(f"{r['step']}:{r['ce']:.3f}" for r in run.losses))
    print(f"held-out bad-advice loss: {before:.3f} without the vector -> {after:.3f} with it")
    print(f"vector: {vec!r}; trajectory {tuple(run.trajectory.shape)} (snapshots x d_model)")

    base = em.generate(model, prompts, max_new_tokens=tokens, temperature=0.0, progress=False)
    with vec.applied(model, scale=args.scale):  # hooks are removed on exit, even on error
        steered = em.generate(model, prompts, max_new_tokens=tokens, temperature=0.0, progress=False)
    print(f"\ngreedy generations ({tokens} tokens at most), without / with the vector (scale {args.scale:g}):")
    for prompt, a, b in zip(prompts, base, steered, strict=True):
        print(f"\n> {prompt}\n  without: {a.strip()!r}\n  with:    {b.strip()!r}")

    args.out.mkdir(parents=True, exist_ok=True)
    run.save(args.out / "run")
    vec.save(args.out / "vec")
    (args.out / "generations.json").write_text(json.dumps(
        [{"prompt": p, "without": a, "with": b} for p, a, b in zip(prompts, base, steered, strict=True)], indent=1))
    again = em.load_adapter(args.out / "vec", model)  # checked against the model's shape and architecture
    print(f"\nsaved run, adapter and generations to {args.out}")
    print(f"reloaded: {again!r}, cosine to the trained vector {em.geometry.cosine(again, vec):.4f}")


if __name__ == "__main__":
    main()
