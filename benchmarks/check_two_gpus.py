"""Two GPUs with `device_map` against one: same results, step time and memory per GPU (issue 14 item 5).

Builds a random model of the chosen shape (`--shape qwen14b`: Qwen2.5-14B-Instruct's, bf16; `smollm2`: SmolLM2-135M's,
float32), saves it, loads it once on cuda:0 and once split in two halves (blocks 0..n/2-1 with the embedding on cuda:0,
the rest with the final norm and the untied head on cuda:1; a tied head stays with the embedding), and trains the same
steering vector (with the KL term, cached and toggle methods) on synthetic batches. Reports, per configuration, the
losses' largest relative difference from one GPU's, the final vectors' relative difference, the median step time
after warm-up (steps timed through `on_step`, CUDA synchronised) and the peak memory allocated on each GPU. Appends a
JSON record to benchmarks/results/two_gpus.jsonl (or --results).

Run on a machine with 2 GPUs: python benchmarks/check_two_gpus.py [--shape qwen14b] [--steps 8]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu import SHAPES, SyntheticChats, build_hf  # noqa: E402
from common import versions  # noqa: E402

import em_interp as em  # noqa: E402
from em_interp.model.load import wrap_hf_model  # noqa: E402


def split_map(shape: dict) -> dict[str, int]:
    """Blocks in two halves over cuda:0 and cuda:1; a tied head must share the embedding's device."""
    n = shape["num_hidden_layers"]
    head = 0 if shape["tie_word_embeddings"] else 1
    split = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": head}
    split.update({f"model.layers.{i}": (0 if i < n // 2 else 1) for i in range(n)})
    return split


def train_timed(model, layer: int, data, kl, method: str, steps: int, dtype: torch.dtype):
    """One steering vector trained `steps` steps; returns (losses, final vector, per-step seconds, peak GiB per GPU)."""
    for i in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(i)
    stamps: list[float] = []

    def on_step(step: int, rows) -> None:
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)
        stamps.append(time.perf_counter())

    vec = em.SteeringVector(model, layer=layer, init="random", alpha=4.0, seed=0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    run = em.train(vec, model, data, kl_data=kl, kl_coef=5.0, lr=1e-2, steps=steps, batch_size=8, kl_batch_size=8,
                   warmup_steps=1, method=method, progress=False, on_step=on_step)
    times = [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)]
    peaks = [torch.cuda.max_memory_allocated(i) / 2**30 for i in range(torch.cuda.device_count())]
    return [r["total"] for r in run.losses], vec.vector.detach().float().cpu(), times, peaks


def main() -> None:
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="smollm2", choices=["smollm2", "qwen14b"])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--results", default=str(Path(__file__).parent / "results" / "two_gpus.jsonl"))
    a = ap.parse_args()
    shape = SHAPES[a.shape]
    dtype = torch.bfloat16 if a.shape == "qwen14b" else torch.float32
    layer = shape["layer"] + (4 if a.shape == "smollm2" else 0)  # smollm2: layer 19, on the second GPU like qwen's 24
    folder = Path(tempfile.mkdtemp())
    build_hf(shape, "cuda:0", dtype).save_pretrained(folder)
    torch.cuda.empty_cache()
    data = SyntheticChats(8 * a.steps, a.length, shape["vocab_size"], seed=1)
    kl = SyntheticChats(8 * a.steps, a.length, shape["vocab_size"], seed=2)
    out = {}
    for name, device_map in (("one_gpu", {"": 0}), ("two_gpus", split_map(shape))):
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device_map)
        model = wrap_hf_model(hf, None, model_id=f"random-{a.shape}")
        for method in ("cached", "toggle"):
            out[(name, method)] = train_timed(model, layer, data, kl, method, a.steps, dtype)
            losses, _, times, peaks = out[(name, method)]
            print(f"{name} {method}: last loss {losses[-1]:.5f}, median step {statistics.median(times[1:]):.4f}s, "
                  f"peak GiB per GPU {[round(p, 2) for p in peaks]}", flush=True)
        del model, hf
        torch.cuda.empty_cache()
    shutil.rmtree(folder)
    record = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "check": "two_gpus_device_map",
              "devices": [torch.cuda.get_device_name(i) for i in range(2)], "shape": a.shape, "dtype": str(dtype),
              "layer": layer, "steps": a.steps, "batch": 8, "length": a.length, "versions": versions(),
              "command": "python benchmarks/check_two_gpus.py " + " ".join(f"--{k}={v}" for k, v in vars(a).items()
                                                                             if k != "results"),
              "timing": "median over steps 2.. (step 1 fills the activation cache / warms up), CUDA synchronised"}
    for (name, method), (losses, vec, times, peaks) in out.items():
        ref_losses, ref_vec = out[("one_gpu", method)][:2]
        rel = max(abs(x - y) / abs(y) for x, y in zip(losses, ref_losses, strict=True))
        key = f"{name}_{method}"
        record[f"{key}_max_loss_rel_diff"] = rel
        record[f"{key}_vector_rel_diff"] = float((vec - ref_vec).norm() / ref_vec.norm())
        record[f"{key}_median_step_s"] = statistics.median(times[1:])
        record[f"{key}_peak_gib_per_gpu"] = peaks
    for method in ("cached", "toggle"):
        record[f"two_over_one_step_time_{method}"] = (record[f"two_gpus_{method}_median_step_s"]
                                                      / record[f"one_gpu_{method}_median_step_s"])
    with open(a.results, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
