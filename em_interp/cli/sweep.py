"""Sweeps of training runs (KL coefficient × seed × adapter kind), spread over processes with torch.distributed.

    em-interp sweep sweep.toml                                                  # one process
    python -m torch.distributed.run --nproc_per_node=4 -m em_interp.cli.sweep sweep.toml   # one process per GPU

The grid is expanded in a fixed order (adapter kind, then KL coefficient, then seed) and run i goes to rank
i mod world size. Each rank loads the model on `cuda:LOCAL_RANK` (CPU and the gloo backend when there is no
GPU), trains its share with `train_many` (all its runs of one kind in one batched forward; each result equals
the same run alone, see `test_sweep.py`), and writes their run dirs under the one out dir. Small JSON summaries
are gathered with `all_gather_object`, and rank 0 writes `OUT/summary.json` (runs in grid order) and a copy of
the config. Without torch.distributed's environment (WORLD_SIZE unset) everything runs in the one process.

A sweep config (schema in `em_interp.config`) is a `train` config (see `em_interp.cli`) with the adapter settings given per kind and a [grid]:

    [model]                         # optional, as for `train`
    name = "Qwen/Qwen2.5-14B-Instruct"
    dtype = "bfloat16"

    [adapter.steering]              # settings of each kind named in grid.adapter
    layer = 24
    hook = "mlp_out"
    alpha = 256
    [adapter.lora]
    layer = 24
    rank = 1
    site = "mlp_out"
    alpha = 512
    rslora = true

    [data]
    train = { domains = ["medical"], kind = "bad", split = "train" }
    kl = { domains = ["finance", "legal"], kind = "mixed" }

    [train]                         # any em.train keyword but kl_coef and seed, plus out / progress
    lr = 1e-4
    epochs = 2
    out = "runs/kl_sweep"

    [grid]
    kl_coef = [0.0, 1.0, 10.0]
    seed = [0, 1]
    adapter = ["steering", "lora"]

The grid seed sets both the data order and the adapter's initialisation (unless [adapter.KIND] sets `seed`).
Run dirs are named `{kind}_kl{coef}_seed{seed}`; `summary.json` holds for each run its settings, final losses,
adapter norm, wall time, rank and device.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import sys
import time
from typing import TYPE_CHECKING, Any

import torch

from em_interp.config import SweepSpec, load_sweep_config
from em_interp.errors import EmInterpError
from em_interp.fileio import write_json

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

log = logging.getLogger(__name__)
__all__ = ["SweepSpec", "load_sweep_config", "main", "run_sweep"]


def _dist_setup() -> tuple[int, int, str, bool]:
    """(rank, world size, device, whether we created the process group) from torch.distributed's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world == 1:
        return 0, 1, "cuda" if cuda else "cpu", False
    import torch.distributed as dist

    if cuda:
        torch.cuda.set_device(local)
    else:  # the processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), f"cuda:{local}" if cuda else "cpu", created


def run_sweep(config_path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Run (this rank's share of) the sweep in `config_path`; returns every run's summary (grid order).

    Raises:
        ConfigError: a bad config (before any model is loaded).
    """
    spec = load_sweep_config(config_path)
    rank, world, device, created = _dist_setup()
    try:
        return _run(spec, rank, world, device)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(spec: SweepSpec, rank: int, world: int, device: str) -> list[dict[str, Any]]:
    from em_interp.training.engine import ActivationCache

    mine = spec.grid[rank::world]
    log.info("sweep rank %d/%d on %s: %d of %d runs", rank, world, device, len(mine), len(spec.grid))
    summaries: list[dict[str, Any]] = []
    if mine:
        data = spec.data.load(f"{spec.source}: [data] train")
        kl = spec.kl.load(f"{spec.source}: [data] kl") if spec.kl is not None else None
        model = spec.model.load(device if world > 1 or spec.model.device is None else spec.model.device)
        cache = ActivationCache()
        for kind, group in itertools.groupby(sorted(mine, key=lambda r: r["index"]), key=lambda r: r["kind"]):
            runs = list(group)
            summaries += _train_group(model, kind, runs, spec, data, kl, cache, rank, world)
    everything = _gather(summaries, world)
    if rank == 0:
        _write_summary(spec, everything, world)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return everything


def _train_group(model: TransformerBridge, kind: str, runs: list[dict[str, Any]], spec: SweepSpec, data: Any, kl: Any,
                 cache: Any, rank: int, world: int) -> list[dict[str, Any]]:
    """All of this rank's runs of one adapter kind, batched with `train_many`; saves each run dir."""
    from em_interp.training.loop import train_many

    config = spec.adapters[kind]
    adapters = [config.build(model, seed=config.seed if config.seed is not None else r["seed"]) for r in runs]
    t0 = time.perf_counter()
    results = train_many(adapters, model, data, kl_data=kl, kl_coef=[r["kl_coef"] for r in runs],
                         seed=[r["seed"] for r in runs], cache=cache, progress=spec.progress and rank == 0,
                         **spec.train_kwargs())
    wall = time.perf_counter() - t0
    out = []
    for r, run in zip(runs, results, strict=True):
        run.save(spec.out / r["name"])
        out.append({**r, "rank": rank, "world_size": world, "device": str(next(iter(run.adapter.parameters())).device),
                    "batched_with": len(runs), "final": run.final_losses(), "norm": run.adapter.norm,
                    "steps": len(run.losses), "wall_time_group_s": wall, "dir": r["name"]})
    return out


def _gather(summaries: list[dict[str, Any]], world: int) -> list[dict[str, Any]]:
    if world == 1:
        return sorted(summaries, key=lambda r: r["index"])
    import torch.distributed as dist

    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, summaries)
    return sorted((r for part in parts for r in (part or [])), key=lambda r: r["index"])


def _write_summary(spec: SweepSpec, runs: list[dict[str, Any]], world: int) -> None:
    spec.out.mkdir(parents=True, exist_ok=True)
    doc = {"config": str(spec.source), "world_size": world, "n_runs": len(runs), "runs": runs}
    write_json(spec.out / "summary.json", doc, default=str)
    shutil.copyfile(spec.source, spec.out / "config.toml")


def main(argv: list[str] | None = None) -> int:
    """`python -m em_interp.cli.sweep CONFIG.toml` (under torch.distributed.run or alone)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        log.error("usage: python -m em_interp.cli.sweep CONFIG.toml  (or under python -m torch.distributed.run ...)")
        return 2
    try:
        runs = run_sweep(args[0])
    except EmInterpError as exc:
        log.error("em_interp.cli.sweep: error: %s", exc)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        log.info("sweep: %d runs; summary in %s", len(runs), load_sweep_config(args[0]).out / "summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
