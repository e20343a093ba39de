"""The `em-interp` command: `demo`, `report`, `train`, `sweep`, `bench`.

    em-interp demo --out runs/demo [--fast] [--seeds N] [--device cuda] [--lora]   # the narrow-vs-general study
    em-interp report runs/demo                                         # re-render report.html from results.json
    em-interp train configs/narrow.toml                                # train one adapter from a TOML file
    em-interp sweep configs/sweep.toml                                 # a grid of runs (see em_interp.sweep)
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
file, section and key, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import os
import runpy
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from em_interp.errors import ConfigError, EmInterpError

log = logging.getLogger("em_interp.cli")

ADAPTER_KEYS = {
    "steering": {"kind", "layer", "hook", "site", "alpha", "init", "seed"},
    "lora": {"kind", "layer", "rank", "site", "alpha", "rslora", "init", "seed"},
}
MODEL_KEYS = {"name", "device", "dtype", "device_map"}
DATA_SPEC_KEYS = {"domains", "kind", "split", "seed", "system", "limit", "path"}
TRAIN_EXTRA = {"out": str, "checkpoint_dir": str, "progress": bool}
_TYPES: dict[str, tuple[type, ...]] = {"float": (int, float), "int": (int,), "str": (str,), "bool": (bool,),
                                       "None": (type(None),)}


# --- train config ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSpec:
    """A validated `em-interp train` config: what to load, what to build, how to train, where to save."""

    source: Path
    model: dict[str, Any]
    adapter: dict[str, Any]
    data: dict[str, Any]
    kl: dict[str, Any] | None
    train: dict[str, Any]
    out: Path
    checkpoint_dir: Path | None = None
    progress: bool = True


def load_train_config(path: str | os.PathLike[str]) -> TrainSpec:
    """Read and check a `train` TOML file (no model is loaded).

    Args:
        path: the TOML file; relative paths inside it are resolved from its folder.

    Returns:
        The validated `TrainSpec` (run it with `run_train_config`).

    Raises:
        ConfigError: unreadable file, TOML syntax error, missing or unknown section/key, wrong value type,
            or a training setting out of range (checked by `TrainConfig`).
    """
    from em_interp.training import TrainConfig

    path = Path(path)
    raw = _read_toml(path)
    where = str(path)
    _check_keys(where, "", raw, {"model", "adapter", "data", "train"})
    sections = {}
    for name in ("model", "adapter", "data", "train"):
        sec = raw.get(name, {})
        if not isinstance(sec, dict):
            raise ConfigError(f"{where}: [{name}] must be a table; got {type(sec).__name__}.")
        sections[name] = dict(sec)
    model, adapter, data, train = (sections[n] for n in ("model", "adapter", "data", "train"))

    _check_keys(where, "[model]", model, MODEL_KEYS)
    for key in ("name", "device", "dtype"):
        _check_type(where, "[model]", key, model, (str,))
    if isinstance(model.get("name"), str) and (path.parent / model["name"]).is_dir():
        model["name"] = str(path.parent / model["name"])

    kind = adapter.get("kind", "steering")
    if kind not in ADAPTER_KEYS:
        raise ConfigError(f"{where}: [adapter] kind = {kind!r}; expected \"steering\" or \"lora\".")
    _check_keys(where, f"[adapter] (kind={kind!r})", adapter, ADAPTER_KEYS[kind])
    _require(where, "adapter", adapter, "layer")
    multi = (int, list) if kind == "lora" else (int,)
    _check_type(where, "[adapter]", "layer", adapter, multi)
    _check_type(where, "[adapter]", "site", adapter, (str, list) if kind == "lora" else (str,))
    for key, types in (("hook", (str,)), ("alpha", (int, float)), ("rank", (int,)), ("rslora", (bool,)),
                       ("init", (str,)), ("seed", (int,))):
        _check_type(where, "[adapter]", key, adapter, types)
    if kind == "steering" and "site" in adapter:
        if "hook" in adapter:
            raise ConfigError(f"{where}: [adapter] has both hook and site; give one (for a steering vector they mean the same).")
        adapter["hook"] = adapter.pop("site")

    _check_keys(where, "[data]", data, {"train", "kl"})
    _require(where, "data", data, "train")
    train_data = _data_spec(where, "train", data["train"], path.parent)
    kl_data = _data_spec(where, "kl", data["kl"], path.parent) if "kl" in data else None

    fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    _check_keys(where, "[train]", train, set(fields) | set(TRAIN_EXTRA))
    _require(where, "train", train, "out")
    for key, ann in fields.items():
        _check_type(where, "[train]", key, train, tuple(t for part in str(ann).split("|")
                                                       for t in _TYPES.get(part.strip(), (object,))))
    for key, typ in TRAIN_EXTRA.items():
        _check_type(where, "[train]", key, train, (typ,))
    settings = {k: v for k, v in train.items() if k not in TRAIN_EXTRA}
    try:
        TrainConfig(**settings)  # range checks now, before a model is loaded
    except EmInterpError as exc:
        raise ConfigError(f"{where}: [train] {exc}") from exc
    if settings.get("kl_coef", 0) > 0 and kl_data is None:
        raise ConfigError(f"{where}: [train] kl_coef = {settings['kl_coef']} needs KL data; add `kl = ...` to [data].")
    ckpt = train.get("checkpoint_dir")
    return TrainSpec(source=path, model=model, adapter=adapter, data=train_data, kl=kl_data, train=settings,
                     out=path.parent / train["out"], checkpoint_dir=path.parent / ckpt if ckpt else None,
                     progress=train.get("progress", True))


def run_train_config(spec: TrainSpec) -> Any:
    """Load the model and data of `spec`, train the adapter, save the run dir (with a copy of the TOML)."""
    import em_interp as em

    # data errors surface before a (possibly large) model is loaded
    data = _load_data(spec.data, f"{spec.source}: [data] train")
    kl = _load_data(spec.kl, f"{spec.source}: [data] kl") if spec.kl is not None else None
    model = em.load_model(spec.model.get("name"), device=spec.model.get("device"), dtype=spec.model.get("dtype"),
                          device_map=spec.model.get("device_map"))
    opts = {k: v for k, v in spec.adapter.items() if k != "kind"}
    adapter = em.LoRA(model, **opts) if spec.adapter.get("kind") == "lora" else em.SteeringVector(model, **opts)
    log.info("train: %s on %d rows%s", type(adapter).__name__, len(data), f", KL on {len(kl)} rows" if kl else "")
    run = em.train(adapter, model, data, kl_data=kl, checkpoint_dir=spec.checkpoint_dir, progress=spec.progress,
                   **spec.train)
    run.save(spec.out)
    shutil.copyfile(spec.source, spec.out / "config.toml")
    return run


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError as exc:
            raise ConfigError("reading TOML on Python 3.10 needs the `tomli` package (pip install tomli).") from exc
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file.")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc


def _check_keys(where: str, place: str, table: dict[str, Any], allowed: set[str]) -> None:
    """Raise for a key of `table` not in `allowed` (place: "[adapter]" etc., "" for the top-level sections)."""
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            what = f"{place} unknown key" if place else "unknown section"
            raise ConfigError(f"{where}: {what} {key!r}{hint}; expected one of: {', '.join(sorted(allowed))}.")


def _require(where: str, section: str, table: dict[str, Any], key: str) -> None:
    if key not in table:
        raise ConfigError(f"{where}: [{section}] is missing the required key {key!r}.")


def _check_type(where: str, place: str, key: str, table: dict[str, Any], types: tuple[type, ...]) -> None:
    if key not in table or object in types:
        return
    value = table[key]
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        names = {"number" if t is float else "none" if t is type(None) else t.__name__ for t in types}
        names = " or ".join(sorted(names - {"int"} if "number" in names else names))
        raise ConfigError(f"{where}: {place} {key} = {value!r} is a {type(value).__name__}; expected {names}.")


def _data_spec(where: str, key: str, value: Any, base: Path) -> dict[str, Any]:
    if isinstance(value, str):
        value = {"path": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [data] {key} must be a JSONL path or a table like "
                          f"{{ domains = [\"medical\"], kind = \"bad\", split = \"train\" }}; got {type(value).__name__}.")
    _check_keys(where, f"[data] {key}:", value, DATA_SPEC_KEYS)
    if "path" in value:
        extra = set(value) - {"path", "limit"}
        if extra:
            raise ConfigError(f"{where}: [data] {key}: a JSONL path takes only `limit`; remove {', '.join(sorted(extra))}.")
        file = base / value["path"]
        if not file.is_file():
            raise ConfigError(f"{where}: [data] {key}: no such JSONL file {file}.")
        value = {**value, "path": str(file)}
    for k, types in (("kind", (str,)), ("split", (str,)), ("seed", (int,)), ("system", (str,)), ("limit", (int,)),
                     ("domains", (str, list))):
        _check_type(where, f"[data] {key}:", k, value, types)
    return dict(value)


def _load_data(spec: dict[str, Any], where: str) -> list[Any]:
    import em_interp as em

    spec = dict(spec)
    limit = spec.pop("limit", None)
    try:
        if "path" in spec:
            rows = em.datasets.load_jsonl(spec["path"])
        else:
            rows = em.datasets.load(spec.pop("domains", "medical"), **spec)
    except EmInterpError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    rows = rows[:limit] if limit is not None else rows
    if not rows:
        raise ConfigError(f"{where}: selects no rows; expected at least one.")
    return rows


# --- commands --------------------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace) -> int:
    from em_interp.study import run_study

    t0 = time.perf_counter()
    record = args.record
    if record is None and Path("benchmarks/results").is_dir():
        record = "benchmarks/results/study.jsonl"  # in a checkout: every full run leaves a record
    command = "em-interp " + " ".join(sys.argv[1:]) if "demo" in sys.argv[1:] else None
    results = run_study(args.out, fast=args.fast, seeds=args.seeds, device=args.device, lora=args.lora,
                        dtype=args.dtype, record=None if args.no_record else record, command=command)
    out = Path(args.out).resolve()
    print(f"report:  {out / 'report.html'}")
    print(f"results: {out / 'results.json'}")
    gate = results.get("gate") or {}
    print(f"gate: {'passed' if gate.get('passed') else 'FAILED'} ({gate.get('reason', 'not measured')})")
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
    from em_interp.sweep import run_sweep

    runs = run_sweep(args.config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"sweep: {len(runs)} runs")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
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
    d.add_argument("--lora", action="store_true", help="also train and compare the seed's rank-1 LoRA pair")
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
