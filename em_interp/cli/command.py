"""The `em-interp` command: `demo`, `report`, `train`, `sweep`, `bench`.

    em-interp demo --out runs/demo [--fast] [--seeds N] [--device cuda] [--adapter vector|lora] [--lora]   # the study
    em-interp report runs/demo                                         # re-render report.html from results.json
    em-interp train configs/narrow.toml                                # train one adapter from a TOML file
    em-interp sweep configs/sweep.toml                                 # a grid of runs (see em_interp.cli.sweep)
    em-interp bench [--device cuda ...]                                # the trainer benchmark (from a checkout)

A `train` config (relative paths are resolved from the TOML file's folder):

    [model]                       # optional; default: the embedded SmolLM2-135M-Instruct
    name = "Qwen/Qwen2.5-0.5B-Instruct"
    device = "cuda"
    dtype = "bfloat16"

    [adapter]
    kind = "steering"             # or "lora"
    layer = 15
    hook = "mlp_out"              # steering: resid_pre|resid_mid|resid_post|mlp_out|attn_out ("site" also accepted)
    alpha = 256                   # lora instead: rank, site, alpha, rslora

    [data]
    train = { domains = ["medical"], kind = "bad", split = "train" }   # bundled data, or a JSONL path
    kl = { domains = ["finance", "legal"], kind = "mixed", limit = 200 }

    [train]                       # any em.train keyword (TrainConfig fields), plus out / checkpoint_dir / progress
    lr = 5e-4
    epochs = 2
    kl_coef = 1.0
    out = "runs/narrow"

Errors in the config (missing or unknown keys, wrong types) exit with code 2 and a message naming the
file, section and key, without a traceback. The schema (`TrainSpec`, `load_train_config`) lives in
`em_interp.config`, shared with the Python API and the sweep.
"""

from __future__ import annotations

import argparse
import logging
import os
import runpy
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from em_interp.config import TrainSpec, load_train_config
from em_interp.errors import EmInterpError

log = logging.getLogger("em_interp.cli")


def run_train_config(spec: TrainSpec) -> Any:
    """Load the model and data of `spec`, train the adapter, save the run dir (with a copy of the TOML)."""
    from em_interp.training.loop import train

    # data errors surface before a (possibly large) model is loaded
    data = spec.data.load(f"{spec.source}: [data] train")
    kl = spec.kl.load(f"{spec.source}: [data] kl") if spec.kl is not None else None
    model = spec.model.load()
    adapter = spec.adapter.build(model)
    log.info("train: %s on %d rows%s", type(adapter).__name__, len(data), f", KL on {len(kl)} rows" if kl else "")
    run = train(adapter, model, data, kl_data=kl, checkpoint_dir=spec.checkpoint_dir, progress=spec.progress,
                **spec.train.to_dict())
    run.save(spec.out)
    shutil.copyfile(spec.source, spec.out / "config.toml")
    return run


# --- commands --------------------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace) -> int:
    from em_interp.study import run_study

    t0 = time.perf_counter()
    record = args.record
    if record is None and Path("benchmarks/results").is_dir():
        record = "benchmarks/results/study.jsonl"  # in a checkout: every full run leaves a record
    command = "em-interp " + " ".join(sys.argv[1:]) if "demo" in sys.argv[1:] else None
    overrides = {k: v for k, v in (("adapter", args.adapter), ("kl_coef", args.kl_coef), ("layer", args.layer),
                                   ("lora_rank", args.lora_rank), ("kl_tokens", args.kl_tokens),
                                   ("kl_batch_size", args.kl_batch_size), ("seed", args.seed),
                                   ("reversion_steps", args.reversion_steps)) if v is not None}
    results = run_study(args.out, fast=args.fast, seeds=args.seeds, device=args.device, lora=args.lora,
                        dtype=args.dtype, record=None if args.no_record else record, command=command, **overrides)
    out = Path(args.out).resolve()
    print(f"report:  {out / 'report.html'}")
    print(f"results: {out / 'results.json'}")
    gate = results.get("gate") or {}
    print(f"gate: {'passed' if gate.get('passed') else 'FAILED'} ({gate.get('reason', 'not measured')})")
    ratios = {**(gate.get("other") or {}), "medical@1": gate.get("in_domain")}
    for key, (lo, hi) in (gate.get("intervals") or {}).items():
        if lo is not None and hi is not None and ratios.get(key) is not None:
            print(f"  {key:<28} narrow/general {ratios[key]:.3f}, 95% over seeds [{lo:.3f}, {hi:.3f}]")
    for key, v in (results.get("verdicts") or {}).items():
        lo, hi = (v.get("interval") or [None, None])[:2]
        ci = "n/a" if lo is None or hi is None else f"[{lo:+.4g}, {hi:+.4g}]"
        est = v.get("estimate")
        print(f"  {key:<10} {str(v.get('verdict', '?')):<14} estimate {'n/a' if est is None else f'{est:+.4g}'}, "
              f"interval {ci}, n={v.get('n')}: {v.get('reason', '')}")
    total = (results.get("timings") or {}).get("total") or (time.perf_counter() - t0)
    print(f"total time: {total:.1f} s")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from em_interp.report import load_results, write_report

    run_dir = Path(args.run_dir)
    results = load_results(run_dir)
    target = Path(args.out) if args.out else (run_dir if run_dir.is_dir() else run_dir.parent) / "report.html"
    print(f"report: {write_report(results, target).resolve()}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    spec = load_train_config(args.config)
    t0 = time.perf_counter()
    run = run_train_config(spec)
    last = run.final_losses()
    losses = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k != "step")
    print(f"run: {spec.out.resolve()} ({len(run.losses)} steps, {time.perf_counter() - t0:.1f} s; final {losses}; "
          f"adapter norm {run.adapter.norm:.4g})")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from em_interp.cli.sweep import run_sweep

    runs = run_sweep(args.config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"sweep: {len(runs)} runs")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_train.py"
    if not script.is_file():
        print("The trainer benchmark is not part of the installed package. From a checkout of the em_interp "
              "repository run:\n    python benchmarks/bench_train.py --help\n(or `make bench`).", file=sys.stderr)
        return 1
    saved = sys.argv
    sys.argv = [str(script), *args.bench_args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `em-interp` (subcommands demo, report, train, sweep, bench)."""
    p = argparse.ArgumentParser(prog="em-interp", description="Interpretability tools for emergent misalignment.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("demo", help="run the narrow-vs-general study and write report.html + results.json")
    d.add_argument("--out", default="runs/demo", help="run dir (default: runs/demo)")
    d.add_argument("--fast", action="store_true", help="smoke-test sizes: a plumbing check, never a verdict")
    d.add_argument("--seeds", type=int, default=None,
                   help="training seeds per condition (default 3; 8 or more runs the full study's sizes)")
    d.add_argument("--record", default=None,
                   help="JSONL file to append the run's record to (default in a checkout: benchmarks/results/study.jsonl)")
    d.add_argument("--no-record", action="store_true", help="append no record")
    d.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    d.add_argument("--adapter", choices=["vector", "lora"], default=None,
                   help="the study's adapter (default: the preset's — vector for 3 seeds, rank-1 LoRA for the full study)")
    d.add_argument("--lora", action="store_true",
                   help="with a vector study, also train and compare the seed's rank-1 LoRA pair (seed 0)")
    d.add_argument("--kl-coef", type=float, default=None, help="λ of the narrow condition (default: the preset's)")
    d.add_argument("--layer", type=int, default=None, help="the adapters' layer (default: the middle layer)")
    d.add_argument("--kl-batch-size", type=int, default=None,
                   help="KL rows per training step (default: the preset's — the CE batch size, 32 for the full study)")
    d.add_argument("--seed", type=int, default=None, help="first training seed: seed i of the study is SEED + i (default 0)")
    d.add_argument("--reversion-steps", type=int, default=None,
                   help="steps of the reversion continuation and its control (default: the preset's)")
    d.add_argument("--lora-rank", type=int, default=None, help="rank of the study's LoRA (default 1)")
    d.add_argument("--kl-tokens", choices=["answer", "all"], default=None,
                   help="positions of the KL term (default: answer)")
    d.add_argument("--dtype", default="bfloat16", help="model dtype (default bfloat16; float32 for full precision)")
    d.set_defaults(func=_cmd_demo)
    r = sub.add_parser("report", help="re-render report.html from RUN_DIR/results.json")
    r.add_argument("run_dir", metavar="RUN_DIR")
    r.add_argument("--out", default=None, help="HTML file to write (default: RUN_DIR/report.html)")
    r.set_defaults(func=_cmd_report)
    t = sub.add_parser("train", help="train one adapter from a TOML config (`em-interp train -h` shows one)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="A config" + (__doc__ or "").split("A `train` config", 1)[-1])
    t.add_argument("config", metavar="CONFIG.toml")
    t.set_defaults(func=_cmd_train)
    w = sub.add_parser("sweep", help="run a grid of trainings (KL coefficient x seed x adapter kind) from a TOML config; "
                       "under `python -m torch.distributed.run --nproc_per_node=N` one process per GPU")
    w.add_argument("config", metavar="CONFIG.toml")
    w.set_defaults(func=_cmd_sweep)
    b = sub.add_parser("bench", add_help=False, help="run benchmarks/bench_train.py (all arguments, --help too, are passed on)")
    b.set_defaults(func=_cmd_bench)
    return p


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is at the time (survives stream swaps, e.g. under pytest)."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """Send em_interp's log records at `level` and above to stderr (once; later calls only change the level)."""
    logger = logging.getLogger("em_interp")
    logger.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `em-interp`; returns the exit code (0 ok, 2 bad input/config, 1 other failure)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.bench_args = extra
    configure_logging(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
    try:
        return int(args.func(args))
    except EmInterpError as exc:
        print(f"em-interp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"em-interp {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
