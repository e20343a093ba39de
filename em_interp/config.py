"""Typed, round-tripping configs shared by the Python API, `em-interp train` and `em-interp sweep`.

- `TrainConfig`: the settings of one training run (the keywords of `em.train`).
- `ModelConfig`, `AdapterConfig`, `DataSpec`: which model to load, which adapter to build, which rows to use.
- `TrainSpec` / `SweepSpec`: a whole `train` / `sweep` TOML file, read by `load_train_config` /
  `load_sweep_config` (no model is loaded; every key and type is checked first).

Each of the first four is a frozen dataclass with `to_dict()` (plain JSON/TOML values) and `from_dict()`
(checks keys and value types against the field annotations and raises `ConfigError` naming the place and the
key), and `X.from_dict(x.to_dict()) == x`.

>>> cfg = TrainConfig(lr=1e-3, kl_coef=1.0)
>>> TrainConfig.from_dict(cfg.to_dict()) == cfg
True
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from em_interp.errors import ConfigError, EmInterpError, TrainingError
from em_interp.positions import ALL, ANSWER, DEPRECATED, position_name

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

# The training methods (see `em_interp.training.engine`) and KL reductions (`em_interp.training.objective`);
# defined here, below the trainer, so that configs validate without importing it.
METHODS = ("cached", "toggle", "precomputed_reference")
KL_REDUCTIONS = ("token_mean", "token_vocab_mean")

T = TypeVar("T")

ADAPTER_KEYS = {
    "steering": {"kind", "layer", "hook", "alpha", "init", "seed"},
    "lora": {"kind", "layer", "rank", "site", "alpha", "rslora", "init", "seed"},
}
TRAIN_EXTRA = {"out": str, "checkpoint_dir": str, "progress": bool}  # [train] keys of a TOML file only
GRID_KEYS = {"kl_coef", "seed", "adapter"}


# --- checking plain values against annotations ------------------------------------------------------
def check_keys(where: str, table: Mapping[str, Any], allowed: set[str], what: str = "unknown key") -> None:
    """Raise `ConfigError` for a key of `table` not in `allowed`, with a did-you-mean hint."""
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where} {what} {key!r}{hint}; expected one of: {', '.join(sorted(allowed))}.".lstrip())


def require(where: str, table: Mapping[str, Any], key: str) -> None:
    """Raise `ConfigError` if `key` is missing from `table`."""
    if key not in table:
        raise ConfigError(f"{where} is missing the required key {key!r}.")


def _matches(value: Any, hint: Any) -> bool:
    """Whether a plain (TOML/JSON) value fits a type annotation (an int fits `float`; a list fits `tuple[X, ...]`)."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_matches(v, typing.get_args(hint)[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        names = [_describe(h) for h in typing.get_args(hint)]
        return " or ".join(n for n in names if n != "none") or "none"
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if origin is dict:
        return "a table"
    return {float: "number", type(None): "none"}.get(hint, getattr(hint, "__name__", str(hint)))


def _plain_to_field(value: Any, hint: Any) -> Any:
    """Lists become tuples where the field is a tuple (frozen dataclasses stay hashable and comparable)."""
    wants = typing.get_origin(hint) is tuple or any(typing.get_origin(h) is tuple for h in typing.get_args(hint))
    return tuple(value) if isinstance(value, list) and wants else value


def _field_to_plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def from_plain(cls: type[T], data: Mapping[str, Any], where: str, allowed: set[str] | None = None) -> T:
    """Build the dataclass `cls` from a plain dict, checking keys, required keys and value types.

    Args:
        cls: a dataclass type.
        data: field values (TOML/JSON types).
        where: the place named in errors (e.g. "run.toml: [train]").
        allowed: the keys accepted (default: all init fields).

    Raises:
        ConfigError: an unknown or missing key, a value of the wrong type, or one the class rejects.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a table; got {type(data).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    check_keys(where, data, set(fields) if allowed is None else allowed)
    for name, f in fields.items():
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            require(where, data, name)
    values = {}
    for key, value in data.items():
        if not _matches(value, hints[key]):
            raise ConfigError(f"{where} {key} = {value!r} is a {type(value).__name__}; expected {_describe(hints[key])}.")
        values[key] = _plain_to_field(value, hints[key])
    try:
        return cls(**values)
    except EmInterpError as exc:
        raise ConfigError(f"{where} {exc}") from exc


def to_plain(obj: Any, skip_none: bool = False) -> dict[str, Any]:
    """A dataclass's init fields as plain values (tuples as lists); without None values if `skip_none`."""
    out = {f.name: _field_to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    return {k: v for k, v in out.items() if v is not None} if skip_none else out


# --- the configs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """Settings of one run (written into its run dir). Defaults follow the authors' steering-vector runs.

    See `em_interp.train` for what each field means.
    """

    lr: float = 5e-4
    epochs: int = 1
    steps: int | None = None
    batch_size: int = 8
    kl_batch_size: int = 8
    kl_coef: float = 0.0
    grad_accum: int = 1
    warmup_steps: int = 5
    schedule: str = "linear"
    weight_decay: float = 0.0
    record_every: int = 10
    seed: int = 0
    max_length: int = 256
    ce_tokens: str = "answer"
    kl_tokens: str = "answer"
    kl_reduction: str = "token_mean"
    method: str = "cached"

    def __post_init__(self) -> None:
        for name in ("ce_tokens", "kl_tokens"):  # the old "assistant" becomes "answer" (DeprecationWarning)
            if getattr(self, name) in DEPRECATED:
                object.__setattr__(self, name, position_name(getattr(self, name), (ANSWER, ALL), name, TrainingError))
        checks = {
            "lr": self.lr > 0, "epochs": self.epochs >= 1, "steps": self.steps is None or self.steps >= 1,
            "batch_size": self.batch_size >= 1, "kl_batch_size": self.kl_batch_size >= 1,
            "kl_coef": self.kl_coef >= 0, "grad_accum": self.grad_accum >= 1, "warmup_steps": self.warmup_steps >= 0,
            "schedule": self.schedule in ("linear", "cosine", "constant"), "record_every": self.record_every >= 1,
            "max_length": self.max_length >= 2,
            "ce_tokens": self.ce_tokens in (ANSWER, ALL), "kl_tokens": self.kl_tokens in (ANSWER, ALL),
            "kl_reduction": self.kl_reduction in KL_REDUCTIONS, "method": self.method in METHODS,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise TrainingError(f"invalid training settings: {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}.")

    def to_dict(self) -> dict[str, Any]:
        """Every field as a plain value."""
        return to_plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "TrainConfig:") -> TrainConfig:
        """The config of `data` (a subset of the fields; the rest take their defaults); `ConfigError` if bad."""
        return from_plain(cls, data, where)

    def diff(self, other: TrainConfig) -> dict[str, tuple[Any, Any]]:
        """The fields that differ: name -> (this value, other value)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load (arguments of `em.load_model`; None: its default)."""

    name: str | None = None
    device: str | None = None
    dtype: str | None = None
    device_map: str | dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set."""
        return to_plain(self, skip_none=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "ModelConfig:") -> ModelConfig:
        """Checked like `TrainConfig.from_dict`."""
        return from_plain(cls, data, where)

    def load(self, device: str | None = None) -> Any:
        """Load the model (`device` overrides the configured one)."""
        from em_interp.model.load import load_model

        return load_model(self.name, device=device or self.device, dtype=self.dtype, device_map=self.device_map)


@dataclass(frozen=True)
class AdapterConfig:
    """Which adapter to build: `kind` ("steering" or "lora") and its constructor arguments (None: default).

    A steering vector takes layer, hook, alpha, init, seed; a LoRA takes layer (one or several), rank, site,
    alpha, rslora, init, seed. `from_dict` also accepts `site` for a steering vector's `hook`.
    """

    layer: int | tuple[int, ...]
    kind: str = "steering"
    hook: str | None = None
    site: str | tuple[str, ...] | None = None
    alpha: float | None = None
    rank: int | None = None
    rslora: bool | None = None
    init: str | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KEYS:
            raise ConfigError(f"kind = {self.kind!r}; expected \"steering\" or \"lora\".")
        foreign = [k for k, v in self.options().items() if k not in ADAPTER_KEYS[self.kind]]
        if foreign:
            raise ConfigError(f"kind = {self.kind!r} does not take {', '.join(foreign)}; "
                              f"expected only: {', '.join(sorted(ADAPTER_KEYS[self.kind] - {'kind'}))}.")
        if self.kind == "steering" and not isinstance(self.layer, int):
            raise ConfigError(f"layer = {self.layer!r}: a steering vector has one layer (an int).")

    def options(self) -> dict[str, Any]:
        """The constructor arguments that are set (all but `kind`)."""
        return {k: v for k, v in to_plain(self, skip_none=True).items() if k != "kind"}

    def to_dict(self) -> dict[str, Any]:
        """`kind` and the fields that are set."""
        return to_plain(self, skip_none=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "AdapterConfig:") -> AdapterConfig:
        """Checked against the keys of its kind (unknown ones named, with a did-you-mean hint)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be a table; got {type(data).__name__}.")
        data = dict(data)
        kind = data.get("kind", "steering")
        if kind not in ADAPTER_KEYS:
            raise ConfigError(f"{where} kind = {kind!r}; expected \"steering\" or \"lora\".")
        if kind == "steering" and "site" in data:
            if "hook" in data:
                raise ConfigError(f"{where} has both hook and site; give one (for a steering vector they mean the same).")
            data["hook"] = data.pop("site")
        return from_plain(cls, data, f"{where} (kind={kind!r})", allowed=ADAPTER_KEYS[kind])

    def build(self, model: TransformerBridge, **overrides: Any) -> Any:
        """The adapter for `model` (`overrides`, e.g. `seed`, replace configured arguments)."""
        from em_interp.adapters import LoRA, SteeringVector

        cls = LoRA if self.kind == "lora" else SteeringVector
        return cls(model, **{**self.options(), **overrides})


@dataclass(frozen=True)
class DataSpec:
    """Which rows to use: a JSONL file (`path`, optionally `limit`), or bundled data (`em.datasets.load` arguments).

    Bundled data without `domains` means "medical".
    """

    path: str | None = None
    domains: str | tuple[str, ...] | None = None
    kind: str | None = None
    split: str | None = None
    seed: int | None = None
    system: str | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.path is not None:
            extra = [k for k in ("domains", "kind", "split", "seed", "system") if getattr(self, k) is not None]
            if extra:
                raise ConfigError(f"a JSONL path takes only `limit`; remove {', '.join(extra)}.")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit = {self.limit}; expected >= 1.")

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set."""
        return to_plain(self, skip_none=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | str, where: str = "DataSpec:", base: Path | None = None) -> DataSpec:
        """From a table, or a JSONL path string; a relative path is resolved from `base` and must exist."""
        if isinstance(data, str):
            data = {"path": data}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be a JSONL path or a table like "
                              f"{{ domains = [\"medical\"], kind = \"bad\", split = \"train\" }}; got {type(data).__name__}.")
        spec = from_plain(cls, data, where)
        if spec.path is not None:
            file = (base or Path()) / spec.path
            if not file.is_file():
                raise ConfigError(f"{where} no such JSONL file {file}.")
            spec = dataclasses.replace(spec, path=str(file))
        return spec

    def load(self, where: str = "data") -> list[Any]:
        """The selected chat records; `ConfigError` naming `where` if none or unreadable."""
        from em_interp import datasets

        options = {k: v for k, v in self.to_dict().items() if k not in ("path", "domains", "limit")}
        try:
            if self.path is not None:
                rows = datasets.load_jsonl(self.path)
            else:
                domains = self.domains if self.domains is not None else "medical"
                rows = datasets.load(list(domains) if isinstance(domains, tuple) else domains, **options)
        except EmInterpError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        rows = rows[: self.limit] if self.limit is not None else rows
        if not rows:
            raise ConfigError(f"{where}: selects no rows; expected at least one.")
        return rows


@dataclass(frozen=True)
class TrainSpec:
    """A validated `em-interp train` config: what to load, what to build, how to train, where to save."""

    source: Path
    model: ModelConfig
    adapter: AdapterConfig
    data: DataSpec
    kl: DataSpec | None
    train: TrainConfig
    out: Path
    checkpoint_dir: Path | None = None
    progress: bool = True


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep config (no model loaded). `train` holds the shared settings; the grid sets kl_coef and seed."""

    source: Path
    model: ModelConfig
    adapters: dict[str, AdapterConfig]
    data: DataSpec
    kl: DataSpec | None
    train: TrainConfig
    grid: list[dict[str, Any]]
    out: Path
    progress: bool = True

    def train_kwargs(self) -> dict[str, Any]:
        """The shared `TrainConfig` fields as `train_many` keywords (all but kl_coef and seed)."""
        return {k: v for k, v in self.train.to_dict().items() if k not in ("kl_coef", "seed")}


# --- TOML files -------------------------------------------------------------------------------------
def read_toml(path: Path) -> dict[str, Any]:
    """The parsed TOML file; `ConfigError` if missing or invalid."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file.")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc


def _sections(path: Path, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    raw = read_toml(path)
    check_keys(f"{path}:", raw, set(names), what="unknown section")
    out = {}
    for name in names:
        sec = raw.get(name, {})
        if not isinstance(sec, dict):
            raise ConfigError(f"{path}: [{name}] must be a table; got {type(sec).__name__}.")
        out[name] = dict(sec)
    return out


def _model(path: Path, table: dict[str, Any]) -> ModelConfig:
    model = ModelConfig.from_dict(table, f"{path}: [model]")
    if model.name is not None and (path.parent / model.name).is_dir():  # a folder next to the config
        model = dataclasses.replace(model, name=str(path.parent / model.name))
    return model


def _data(path: Path, table: dict[str, Any]) -> tuple[DataSpec, DataSpec | None]:
    check_keys(f"{path}: [data]", table, {"train", "kl"})
    require(f"{path}: [data]", table, "train")
    train = DataSpec.from_dict(table["train"], f"{path}: [data] train:", path.parent)
    kl = DataSpec.from_dict(table["kl"], f"{path}: [data] kl:", path.parent) if "kl" in table else None
    return train, kl


def _check_kl(where: str, coefs: list[float], kl: DataSpec | None, coef_place: str) -> None:
    if max(coefs) > 0 and kl is None:
        raise ConfigError(f"{where}: {coef_place} kl_coef = {max(coefs):g} needs KL data; add `kl = ...` to [data].")
    if max(coefs) == 0 and kl is not None:
        raise ConfigError(f"{where}: [data] has `kl` but {coef_place} kl_coef is 0, so the KL data would be unused; "
                          "set kl_coef > 0 or remove `kl`.")


def load_train_config(path: str | os.PathLike[str]) -> TrainSpec:
    """Read and check a `train` TOML file (no model is loaded).

    Args:
        path: the TOML file; relative paths inside it are resolved from its folder.

    Returns:
        The validated `TrainSpec` (run it with `em_interp.cli.run_train_config`).

    Raises:
        ConfigError: unreadable file, TOML syntax error, missing or unknown section/key, wrong value type,
            a training setting out of range, or KL data without kl_coef > 0 (or the reverse).
    """
    path = Path(path)
    sec = _sections(path, ("model", "adapter", "data", "train"))
    model = _model(path, sec["model"])
    adapter = AdapterConfig.from_dict(sec["adapter"], f"{path}: [adapter]")
    data, kl = _data(path, sec["data"])
    train = sec["train"]
    where = f"{path}: [train]"
    check_keys(where, train, {f.name for f in dataclasses.fields(TrainConfig)} | set(TRAIN_EXTRA))
    require(where, train, "out")
    for key, typ in TRAIN_EXTRA.items():
        if key in train and not _matches(train[key], typ):
            raise ConfigError(f"{where} {key} = {train[key]!r} is a {type(train[key]).__name__}; expected {_describe(typ)}.")
    settings = TrainConfig.from_dict({k: v for k, v in train.items() if k not in TRAIN_EXTRA}, where)
    _check_kl(str(path), [settings.kl_coef], kl, "[train]")
    ckpt = train.get("checkpoint_dir")
    return TrainSpec(source=path, model=model, adapter=adapter, data=data, kl=kl, train=settings,
                     out=path.parent / train["out"], checkpoint_dir=path.parent / ckpt if ckpt else None,
                     progress=train.get("progress", True))


def load_sweep_config(path: str | os.PathLike[str]) -> SweepSpec:
    """Read and check a sweep TOML file (see `em_interp.cli.sweep`); raises `ConfigError` naming file, section and key."""
    path = Path(path)
    sec = _sections(path, ("model", "adapter", "data", "train", "grid"))
    model = _model(path, sec["model"])
    axes = _grid_axes(f"{path}: [grid]", sec["grid"])
    check_keys(f"{path}: [adapter]", sec["adapter"], set(ADAPTER_KEYS))
    adapters = {}
    for kind in dict.fromkeys(axes["adapter"]):
        table = sec["adapter"].get(kind)
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [grid] adapter names {kind!r} but there is no [adapter.{kind}] table.")
        if "kind" in table:
            raise ConfigError(f"{path}: [adapter.{kind}] unknown key 'kind' (the table name gives the kind).")
        adapters[kind] = AdapterConfig.from_dict({**table, "kind": kind}, f"{path}: [adapter.{kind}]")
    data, kl = _data(path, sec["data"])
    train = sec["train"]
    where = f"{path}: [train]"
    check_keys(where, train, {f.name for f in dataclasses.fields(TrainConfig)} - {"kl_coef", "seed"} | {"out", "progress"})
    require(where, train, "out")
    if "progress" in train and not isinstance(train["progress"], bool):
        raise ConfigError(f"{where} progress = {train['progress']!r} is a {type(train['progress']).__name__}; expected bool.")
    settings = TrainConfig.from_dict({k: v for k, v in train.items() if k not in ("out", "progress")}, where)
    _check_kl(str(path), [float(c) for c in axes["kl_coef"]], kl, "[grid]")
    runs = [{"index": i, "kind": kind, "kl_coef": float(c), "seed": int(s), "name": f"{kind}_kl{c:g}_seed{s}"}
            for i, (kind, c, s) in enumerate(itertools.product(axes["adapter"], axes["kl_coef"], axes["seed"]))]
    return SweepSpec(source=path, model=model, adapters=adapters, data=data, kl=kl, train=settings, grid=runs,
                     out=path.parent / train["out"], progress=bool(train.get("progress", True)))


def _grid_axes(where: str, grid: dict[str, Any]) -> dict[str, list[Any]]:
    check_keys(where, grid, GRID_KEYS)
    axes = {k: (grid[k] if isinstance(grid.get(k), list) else [grid[k]]) for k in grid}
    axes.setdefault("kl_coef", [0.0])
    axes.setdefault("seed", [0])
    axes.setdefault("adapter", ["steering"])
    for key, values in axes.items():
        if not values:
            raise ConfigError(f"{where} {key} is empty; expected at least one value.")
        for v in values:
            ok = {"kl_coef": isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
                  "seed": isinstance(v, int) and not isinstance(v, bool),
                  "adapter": v in ADAPTER_KEYS}[key]
            if not ok:
                expected = {"kl_coef": "numbers >= 0", "seed": "integers", "adapter": '"steering" or "lora"'}[key]
                raise ConfigError(f"{where} {key} has {v!r}; expected {expected}.")
    return axes
