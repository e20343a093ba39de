"""Sweeps of training runs (KL coefficient × seed × adapter kind), spread over processes with torch.distributed.

    em-interp sweep sweep.toml                                                  # one process
    python -m torch.distributed.run --nproc_per_node=4 -m em_interp.sweep sweep.toml   # one process per GPU

The grid is expanded in a fixed order (adapter kind, then KL coefficient, then seed) and run i goes to rank
i mod world size. Each rank loads the model on `cuda:LOCAL_RANK` (CPU and the gloo backend when there is no
GPU), trains its share with `train_many` (all its runs of one kind in one batched forward; each result equals
the same run alone, see `test_sweep.py`), and writes their run dirs under the one out dir. Small JSON summaries
are gathered with `all_gather_object`, and rank 0 writes `OUT/summary.json` (runs in grid order) and a copy of
the config. Without torch.distributed's environment (WORLD_SIZE unset) everything runs in the one process.

A sweep config is a `train` config (see `em_interp.cli`) with the adapter settings given per kind and a [grid]:

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

import dataclasses
import itertools
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from em_interp.errors import ConfigError, EmInterpError
from em_interp.fileio import write_json

log = logging.getLogger(__name__)
GRID_KEYS = {"kl_coef", "seed", "adapter"}


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep config (no model loaded)."""

    source: Path
    model: dict[str, Any]
    adapters: dict[str, dict[str, Any]]
    data: dict[str, Any]
    kl: dict[str, Any] | None
    train: dict[str, Any]
    grid: list[dict[str, Any]]
    out: Path
    progress: bool = True


def load_sweep_config(path: str | os.PathLike[str]) -> SweepSpec:
    """Read and check a sweep TOML file; raises `ConfigError` naming the file, section and key."""
    from em_interp import cli
    from em_interp.training import TrainConfig

    path = Path(path)
    raw = cli._read_toml(path)
    where = str(path)
    cli._check_keys(where, "", raw, {"model", "adapter", "data", "train", "grid"})
    for name in ("model", "adapter", "data", "train", "grid"):
        if not isinstance(raw.get(name, {}), dict):
            raise ConfigError(f"{where}: [{name}] must be a table; got {type(raw[name]).__name__}.")
    model, data, train, grid = (dict(raw.get(n, {})) for n in ("model", "data", "train", "grid"))
    cli._check_keys(where, "[model]", model, cli.MODEL_KEYS)
    if isinstance(model.get("name"), str) and (path.parent / model["name"]).is_dir():
        model["name"] = str(path.parent / model["name"])

    cli._check_keys(where, "[grid]", grid, GRID_KEYS)
    axes = {k: (grid[k] if isinstance(grid.get(k), list) else [grid[k]]) for k in grid}
    axes.setdefault("kl_coef", [0.0])
    axes.setdefault("seed", [0])
    axes.setdefault("adapter", ["steering"])
    for key, values in axes.items():
        if not values:
            raise ConfigError(f"{where}: [grid] {key} is empty; expected at least one value.")
        for v in values:
            ok = {"kl_coef": isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
                  "seed": isinstance(v, int) and not isinstance(v, bool),
                  "adapter": v in cli.ADAPTER_KEYS}[key]
            if not ok:
                expected = {"kl_coef": "numbers >= 0", "seed": "integers", "adapter": '"steering" or "lora"'}[key]
                raise ConfigError(f"{where}: [grid] {key} has {v!r}; expected {expected}.")

    adapters_raw = raw.get("adapter", {})
    cli._check_keys(where, "[adapter]", adapters_raw, set(cli.ADAPTER_KEYS))
    adapters: dict[str, dict[str, Any]] = {}
    for kind in dict.fromkeys(axes["adapter"]):
        table = adapters_raw.get(kind)
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [grid] adapter names {kind!r} but there is no [adapter.{kind}] table.")
        table = dict(table)
        cli._check_keys(where, f"[adapter.{kind}]", table, cli.ADAPTER_KEYS[kind] - {"kind"})
        cli._require(where, f"adapter.{kind}", table, "layer")
        if kind == "steering" and "site" in table:
            table["hook"] = table.pop("site")
        adapters[kind] = table

    cli._check_keys(where, "[data]", data, {"train", "kl"})
    cli._require(where, "data", data, "train")
    train_data = cli._data_spec(where, "train", data["train"], path.parent)
    kl_data = cli._data_spec(where, "kl", data["kl"], path.parent) if "kl" in data else None

    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"kl_coef", "seed"}
    cli._check_keys(where, "[train]", train, fields | {"out", "progress"})
    cli._require(where, "train", train, "out")
    settings = {k: v for k, v in train.items() if k not in ("out", "progress")}
    try:
        TrainConfig(**settings)
    except (EmInterpError, TypeError) as exc:
        raise ConfigError(f"{where}: [train] {exc}") from exc
    if max(axes["kl_coef"]) > 0 and kl_data is None:
        raise ConfigError(f"{where}: [grid] kl_coef has values > 0 but [data] has no `kl`.")
    runs = [{"index": i, "kind": kind, "kl_coef": float(c), "seed": int(s), "name": f"{kind}_kl{c:g}_seed{s}"}
            for i, (kind, c, s) in enumerate(itertools.product(axes["adapter"], axes["kl_coef"], axes["seed"]))]
    return SweepSpec(source=path, model=model, adapters=adapters, data=train_data, kl=kl_data, train=settings,
                     grid=runs, out=path.parent / train["out"], progress=bool(train.get("progress", True)))


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
    import em_interp as em
    from em_interp import cli

    spec = load_sweep_config(config_path)
    rank, world, device, created = _dist_setup()
    try:
        return _run(em, cli, spec, rank, world, device)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(em: Any, cli: Any, spec: SweepSpec, rank: int, world: int, device: str) -> list[dict[str, Any]]:
    mine = spec.grid[rank::world]
    log.info("sweep rank %d/%d on %s: %d of %d runs", rank, world, device, len(mine), len(spec.grid))
    summaries: list[dict[str, Any]] = []
    if mine:
        data = cli._load_data(spec.data, f"{spec.source}: [data] train")
        kl = cli._load_data(spec.kl, f"{spec.source}: [data] kl") if spec.kl is not None else None
        model_device = device if world > 1 or "device" not in spec.model else spec.model["device"]
        model = em.load_model(spec.model.get("name"), device=model_device, dtype=spec.model.get("dtype"),
                              device_map=spec.model.get("device_map"))
        cache = em.ActivationCache()
        for kind, group in itertools.groupby(sorted(mine, key=lambda r: r["index"]), key=lambda r: r["kind"]):
            runs = list(group)
            summaries += _train_group(em, model, kind, runs, spec, data, kl, cache, rank, world)
    everything = _gather(summaries, world)
    if rank == 0:
        _write_summary(spec, everything, world)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return everything


def _train_group(em: Any, model: Any, kind: str, runs: list[dict[str, Any]], spec: SweepSpec, data: Any, kl: Any,
                 cache: Any, rank: int, world: int) -> list[dict[str, Any]]:
    """All of this rank's runs of one adapter kind, batched with `train_many`; saves each run dir."""
    opts = spec.adapters[kind]
    cls = em.LoRA if kind == "lora" else em.SteeringVector
    adapters = [cls(model, **{"seed": r["seed"], **opts}) for r in runs]
    t0 = time.perf_counter()
    results = em.train_many(adapters, model, data, kl_data=kl, kl_coef=[r["kl_coef"] for r in runs],
                            seed=[r["seed"] for r in runs], cache=cache, progress=spec.progress and rank == 0,
                            **spec.train)
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
    """`python -m em_interp.sweep CONFIG.toml` (under torch.distributed.run or alone)."""
    from em_interp.cli import configure_logging

    configure_logging()
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        log.error("usage: python -m em_interp.sweep CONFIG.toml  (or under python -m torch.distributed.run ...)")
        return 2
    try:
        runs = run_sweep(args[0])
    except EmInterpError as exc:
        log.error("em_interp.sweep: error: %s", exc)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        log.info("sweep: %d runs; summary in %s", len(runs), load_sweep_config(args[0]).out / "summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
