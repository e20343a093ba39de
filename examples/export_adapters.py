"""Export trained adapters to other tools: a steering vector to llama.cpp, a LoRA to PEFT, and read them back.

Trains a steering vector and a rank-1 LoRA briefly on bad medical advice (embedded SmolLM2-135M-Instruct), then:
- writes the vector as a llama.cpp control vector (GGUF: architecture `controlvector`, tensor `direction.N`
  added to the output of block N, which is our `blocks.N.hook_resid_post`), reads it back with
  `read_control_vector` and checks it equals scale·alpha·v; prints the llama-cli command that applies it to
  the embedded model's own GGUF file;
- writes the LoRA as a PEFT adapter directory, reads it back with `LoRA.from_peft` and checks ΔW; prints how to
  load it with transformers + peft. With `peft` installed (a dev extra) it also loads the plain model in
  transformers, applies the adapter with PEFT and checks its logits equal our hooks' logits.

Run:
    python examples/export_adapters.py            # 32 rows: a minute or two on a laptop CPU
    python examples/export_adapters.py --fast     # tiny sizes, under a minute
    python examples/export_adapters.py --out runs/export

Writes into --out: `vec.gguf`, `lora_peft/` (adapter_config.json, adapter_model.safetensors), and the native
em_interp files `vec/` and `lora/` for comparison.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import em_interp as em
from em_interp.adapters.export import read_control_vector

BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded model's name on the HF hub


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a steering vector to GGUF and a LoRA to PEFT, then verify.")
    parser.add_argument("--fast", action="store_true", help="tiny sizes (a couple of training steps)")
    parser.add_argument("--out", type=Path, default=Path("runs/examples/export"), help="output directory")
    args = parser.parse_args(argv)
    n_rows = 4 if args.fast else 32

    model = em.load_model(device="cpu")
    layer = model.cfg.n_layers // 2
    data = em.datasets.sample(em.datasets.load("medical", kind="bad", split="train"), n_rows, by="subtopic")
    vec = em.SteeringVector(model, layer=layer, alpha=16.0)
    lora = em.LoRA(model, layer=layer, rank=1, site="mlp_out", alpha=512, rslora=True)  # the authors' rank-1 setup
    for adapter, lr in ((vec, 2e-3), (lora, 1e-3)):
        run = em.train(adapter, model, data, lr=lr, batch_size=2, warmup_steps=1, progress=False)
        print(f"trained {adapter!r}: CE {run.losses[0]['ce']:.3f} -> {run.losses[-1]['ce']:.3f}")
    vec.save(args.out / "vec")
    lora.save(args.out / "lora")

    # --- steering vector -> llama.cpp control vector ---------------------------------------------------
    gguf_path = vec.export_gguf(args.out / "vec.gguf")  # model_hint inferred from the architecture
    directions, meta = read_control_vector(gguf_path)
    index = next(iter(directions))
    error = float((directions[index] - vec.delta(vec.scale).detach()).abs().max())
    print(f"\nwrote {gguf_path}: {meta}, tensors {[f'direction.{i}' for i in directions]}")
    print(f"  read back: direction.{index} = scale·alpha·v of {vec.hook_name} (max abs error {error:.1e})")
    model_gguf = em.model.embedded_gguf_path()
    print("  apply it in llama.cpp (direction.N is added to block N's output; --control-vector-scaled FILE S "
          "sets the strength):")
    print(f"    llama-cli -m {model_gguf} --control-vector {gguf_path.resolve()} "
          "-cnv   # chat with the steered model")
    print(f"    llama-server -m {model_gguf} --control-vector {gguf_path.resolve()} --port 8080")

    # --- LoRA -> PEFT ------------------------------------------------------------------------------------
    peft_dir = lora.export_peft(args.out / "lora_peft", BASE_NAME)  # scale folded into B; r, alpha, rsLoRA kept
    back = em.LoRA.from_peft(peft_dir, model)
    with torch.no_grad():
        dw_error = float((back.delta_weight(layer, "mlp_out") - lora.delta_weight(layer, "mlp_out")).abs().max())
    print(f"\nwrote {peft_dir}: {sorted(p.name for p in peft_dir.iterdir())}")
    print(f"  read back with LoRA.from_peft: {back!r} (max abs ΔW error {dw_error:.1e})")
    print("  load it with transformers + peft:")
    print("    from peft import PeftModel")
    print("    from transformers import AutoModelForCausalLM")
    print(f"    base = AutoModelForCausalLM.from_pretrained('{BASE_NAME}')")
    print(f"    model = PeftModel.from_pretrained(base, '{peft_dir.resolve()}')   # .merge_and_unload() to bake ΔW in")
    print(f"  or serve it: vllm serve {BASE_NAME} --enable-lora --lora-modules em={peft_dir.resolve()}")
    try:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("  (install peft to check the logits: pip install peft)")
        return
    # A plain HF model with the same weights: de-quantized from the embedded GGUF (our cache is made the same way).
    plain = AutoModelForCausalLM.from_pretrained(model_gguf.parent, gguf_file=model_gguf.name, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(plain, str(peft_dir)).eval()
    tokens = model.tokenizer("My doctor says I should rest, but I feel fine.", return_tensors="pt").input_ids
    with torch.no_grad(), lora.applied(model):
        ours = model(tokens)
    with torch.no_grad():
        theirs = peft_model(tokens).logits
    print(f"  PEFT logits vs our hooks: max abs difference {float((ours - theirs).abs().max()):.1e}")


if __name__ == "__main__":
    main()
