"""Two-GPU check (issue 8 item 2): a model split over cuda:0 and cuda:1 with `device_map` trains like one GPU.

Builds a random SmolLM2-shaped model, saves it, loads it once on cuda:0 and once split (blocks 0-14 on cuda:0,
15-29 + final norm on cuda:1, tied head on cuda:0), trains the same steering vector at layer 20 for 6 steps with the KL term (cached and
toggle methods) on synthetic batches, and compares losses and final vectors. Appends a JSON record to
benchmarks/results/two_gpus.jsonl. Run on a machine with 2 GPUs: python benchmarks/check_two_gpus.py
"""

from __future__ import annotations

import datetime
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu import SHAPES, SyntheticChats, build_hf  # noqa: E402

import em_interp as em  # noqa: E402
from em_interp.models import wrap_hf_model  # noqa: E402


def main() -> None:
    from transformers import AutoModelForCausalLM

    shape = SHAPES["smollm2"]
    folder = Path(tempfile.mkdtemp())
    build_hf(shape, "cuda:0", torch.float32).save_pretrained(folder)
    n = shape["num_hidden_layers"]
    # lm_head is tied to embed_tokens in this shape: tied weights must share a device
    split = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 0}
    split.update({f"model.layers.{i}": (0 if i < n // 2 else 1) for i in range(n)})
    data = SyntheticChats(16, 128, shape["vocab_size"], seed=1)
    kl = SyntheticChats(16, 128, shape["vocab_size"], seed=2)
    out = {}
    for name, device_map in (("one_gpu", {"": 0}), ("two_gpus", split)):
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map=device_map)
        model = wrap_hf_model(hf, None, model_id="random-smollm2")
        for method in ("cached", "toggle"):
            vec = em.SteeringVector(model, layer=20, init="random", alpha=4.0)
            run = em.train(vec, model, data, kl_data=kl, kl_coef=5.0, lr=1e-2, steps=6, batch_size=8, kl_batch_size=8,
                           warmup_steps=1, method=method, progress=False)
            out[(name, method)] = ([r["total"] for r in run.losses], vec.vector.detach().float().cpu())
        print(name, {m: out[(name, m)][0][-1] for m in ("cached", "toggle")}, "devices:",
              sorted({str(p.device) for p in hf.parameters()}))
    ref_losses, ref_vec = out[("one_gpu", "cached")]
    record = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "check": "two_gpus_device_map", "devices": [torch.cuda.get_device_name(i) for i in range(2)]}
    for key, (losses, vec) in out.items():
        rel = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True))
        vec_rel = float((vec - ref_vec).norm() / ref_vec.norm())
        record[f"{key[0]}_{key[1]}_max_loss_rel_diff"] = rel
        record[f"{key[0]}_{key[1]}_vector_rel_diff"] = vec_rel
        print(f"{key[0]:>9} {key[1]:>7}: max loss rel diff {rel:.2e}, vector rel diff {vec_rel:.2e}")
    results = Path(__file__).parent / "results" / "two_gpus.jsonl"
    with open(results, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
