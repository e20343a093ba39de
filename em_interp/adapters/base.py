"""The `Adapter` base: trainable parameters plus TransformerLens hook functions; never edits weights.

An adapter records the model it was made for (id, d_model, layer count, architecture) and checks it again
when loaded. Saved adapters are a directory with `adapter.safetensors` (float32 tensors) and
`adapter.json` (metadata); loading never unpickles anything.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from jaxtyping import Float
from safetensors.torch import save_file
from torch import Tensor, nn

from em_interp._version import __version__
from em_interp.errors import AdapterError
from em_interp.fileio import atomic_directory, read_saved
from em_interp.model.forward import hf_model_of
from em_interp.model.hooks import HookFn, HookHandle, Positions, attach_hooks, check_positions

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

FORMAT_VERSION = 1
_REGISTRY: dict[str, type[Adapter]] = {}
# adapter -> ids of the models it is attached to now (weak keys: a deep copy of an applied adapter is not applied).
_ATTACHED: weakref.WeakKeyDictionary[Adapter, set[int]] = weakref.WeakKeyDictionary()


_FILE_FORMATS: dict[str, Callable[..., Any]] = {}
_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def file_format(name: str) -> Callable[[_Fn], _Fn]:
    """Register a reader or writer of another tool's adapter files under `name`.

    `em_interp.adapters.export` registers its PEFT and llama.cpp functions here, so the adapters' own
    `export_*` / `from_*` methods reach them without importing that module (which imports the adapters).
    """

    def register(fn: _Fn) -> _Fn:
        _FILE_FORMATS[name] = fn
        return fn

    return register


def file_format_function(name: str) -> Callable[..., Any]:
    """The function registered as `name` by `em_interp.adapters.export` (which the `em_interp.adapters` package
    imports, so it is registered before any adapter exists)."""
    if name not in _FILE_FORMATS:
        raise AdapterError(f"no adapter file format {name!r} is registered; expected one of {sorted(_FILE_FORMATS)}.")
    return _FILE_FORMATS[name]


def check_finite(value: Any, name: str, owner: str) -> float:
    """`value` as a float; `AdapterError` naming `owner.name` if it is not a finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not _is_scalar_tensor(value):
        raise AdapterError(f"{owner}: {name}={value!r} is a {type(value).__name__}; expected a finite number.")
    number = float(value)
    if not math.isfinite(number):
        raise AdapterError(f"{owner}: {name}={number}; expected a finite number (not NaN or infinity).")
    return number


def _is_scalar_tensor(value: Any) -> bool:
    return hasattr(value, "item") and getattr(value, "ndim", 1) == 0


def check_layer(layer: Any, n_layers: int, owner: str) -> int:
    """A block index in [0, n_layers); `AdapterError` with a hint for strings, negatives and out-of-range values."""
    if isinstance(layer, str):
        hint = f" Pass layer={int(layer)} (an int)." if layer.strip().lstrip("-").isdigit() else ""
        raise AdapterError(f"{owner}: layer={layer!r} is a string; expected an int block index in 0..{n_layers - 1}.{hint}")
    if isinstance(layer, bool) or not isinstance(layer, int) and not _is_scalar_tensor(layer):
        raise AdapterError(f"{owner}: layer={layer!r} is a {type(layer).__name__}; expected an int block index in 0..{n_layers - 1}.")
    layer = int(layer)
    if layer < 0:
        hint = f" For the block {-layer} from the end pass layer={n_layers + layer}." if -layer <= n_layers else ""
        raise AdapterError(f"{owner}: layer={layer} is negative; expected a block index in 0..{n_layers - 1} "
                           f"(negative indices are not accepted).{hint}")
    if layer >= n_layers:
        raise AdapterError(f"{owner}: layer={layer} is out of range for a model with {n_layers} layers (0..{n_layers - 1}).")
    return layer


def provenance_line(provenance: dict[str, Any], limit: int = 100) -> str:
    """`"\\n  provenance: k=v, ..."` (each value cut to 40 characters, the line to `limit`), or "" if empty."""
    if not provenance:
        return ""

    def short(v: Any) -> str:
        text = f"{v:.4g}" if isinstance(v, float) else repr(v)
        return text if len(text) <= 40 else text[:37] + "..."

    text = ", ".join(f"{k}={short(v)}" for k, v in provenance.items())
    return "\n  provenance: " + (text if len(text) <= limit else text[: limit - 3] + "...")


class _AdapterHandle(HookHandle):
    """A `HookHandle` that also marks the adapter as no longer attached to the model."""

    def __init__(self, handle: HookHandle, adapter: Adapter, model_id: int):
        super().__init__(handle._entries)
        self._release = (adapter, model_id)

    def remove(self) -> None:
        super().remove()
        if self._release is not None:
            adapter, model_id = self._release
            _ATTACHED.get(adapter, set()).discard(model_id)
            self._release = None


def model_signature(model: TransformerBridge) -> dict[str, Any]:
    """What an adapter must match in a model: id, d_model, n_layers, architecture."""
    return {
        "model_id": getattr(model, "em_model_id", None),
        "d_model": int(model.cfg.d_model),
        "n_layers": int(model.cfg.n_layers),
        "architecture": str(getattr(model.cfg, "architecture", None) or type(hf_model_of(model)).__name__),
    }


class Adapter(nn.Module):
    """Base class: parameters, hook list, `applied()` context manager, scale, norm, state, save/load.

    An adapter is an `em_interp.interventions.Intervention`: `hooks(model, scale, positions)`,
    `first_layer`, `applied(model, scale, positions)`; `scale` multiplies its own `scale`.
    Subclasses implement `scaled_hooks(total, positions)`, `first_layer` and `config()` (the constructor
    arguments to save).
    """

    kind: ClassVar[str] = "adapter"

    def __init__(self, model: TransformerBridge):
        super().__init__()
        self.signature = model_signature(model)
        self._scale = 1.0
        self.provenance: dict[str, Any] = {}

    @property
    def scale(self) -> float:
        """The adapter's own multiplier (must be finite); `applied(model, scale=s)` applies `s · scale`."""
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        self._scale = check_finite(value, "scale", type(self).__name__)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.kind] = cls

    # --- hooks (the `em_interp.interventions.Intervention` protocol) ------------------------------
    def scaled_hooks(self, total: float, positions: Positions = "all") -> list[tuple[str, HookFn]]:
        """(hook_name, fn) pairs applying this adapter at the total factor `total` (its own `scale` already
        folded in by the caller; `hooks` does that). Subclasses implement this."""
        raise NotImplementedError

    def hooks(self, model: TransformerBridge, scale: float = 1.0, positions: Positions | None = None) -> list[tuple[str, HookFn]]:
        """(hook_name, fn) pairs applying this adapter to `model` at `scale` × `self.scale`.

        Raises:
            AdapterError: a model of another shape, a non-finite `scale`, or bad `positions`.
        """
        self.check_model(model)
        factor = 1.0 if scale is None else check_finite(scale, "scale", f"{type(self).__name__}.applied")
        return self.scaled_hooks(self.scale * factor, check_positions("all" if positions is None else positions))

    @property
    def first_layer(self) -> int:
        """The lowest block index whose computation this adapter changes."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Constructor arguments needed to rebuild this adapter (saved as metadata)."""
        raise NotImplementedError

    def attach(self, model: TransformerBridge, scale: float = 1.0, positions: Positions | None = None) -> HookHandle:
        """Add this adapter's hooks to `model` until `handle.remove()`; `scale` multiplies `self.scale`.

        Raises:
            AdapterError: the adapter is already attached to `model` (applying it twice would silently
                double it; pass `scale=2` instead), a non-finite `scale`, or a model of another shape.
        """
        hooks = self.hooks(model, scale, positions)
        attached = _ATTACHED.setdefault(self, set())
        if id(model) in attached:
            raise AdapterError(
                f"This {type(self).__name__} is already applied to this model; nesting `applied`/`attach` of the same adapter would add it "
                "twice. Use one `applied(model, scale=...)` with the total scale, or a copy.deepcopy of the adapter."
            )
        handle = attach_hooks(model, hooks)
        attached.add(id(model))
        return _AdapterHandle(handle, self, id(model))

    @contextlib.contextmanager
    def applied(self, model: TransformerBridge, scale: float = 1.0, positions: Positions | None = None) -> Iterator[Adapter]:
        """Context manager applying the adapter at `scale` × `self.scale`; its hooks are removed on exit, even
        on error.

        >>> with vec.applied(model, scale=2.0):  # twice the vector as trained  # doctest: +SKIP
        ...     logits = model(tokens)
        """
        handle = self.attach(model, scale, positions)
        try:
            yield self
        finally:
            handle.remove()

    def _provenance_line(self) -> str:
        """A short second repr line for the provenance (empty without one)."""
        return provenance_line(self.provenance)

    # --- parameters ----------------------------------------------------------------------------
    @property
    def norm(self) -> float:
        """L2 norm of all parameters together (LoRA overrides with the norm of its ΔW)."""
        return float(torch.sqrt(sum(((p.detach().float() ** 2).sum() for p in self.parameters()), torch.zeros(()))))

    def state(self) -> dict[str, Float[Tensor, "..."]]:
        """Detached float32 copies of the parameters, by name."""
        return {name: p.detach().float().cpu().clone() for name, p in self.named_parameters()}

    def load_state(self, state: dict[str, Float[Tensor, "..."]]) -> None:
        """Copy parameters from `state` (same names and shapes, else `AdapterError`)."""
        params = dict(self.named_parameters())
        if set(state) != set(params):
            raise AdapterError(f"state has parameters {sorted(state)}; this {self.kind} has {sorted(params)}.")
        with torch.no_grad():
            for name, p in params.items():
                if tuple(state[name].shape) != tuple(p.shape):
                    raise AdapterError(f"parameter {name}: saved shape {tuple(state[name].shape)}, expected {tuple(p.shape)}.")
                p.copy_(state[name].to(p.device, p.dtype))

    def flat(self) -> Float[Tensor, " n_params"]:
        """All parameters as one float32 vector (for cosine similarity and PCA)."""
        return torch.cat([p.detach().float().cpu().flatten() for p in self.parameters()])

    def check_model(self, model: TransformerBridge) -> None:
        """Raise `AdapterError` if `model` does not have the d_model, layer count and architecture recorded."""
        theirs = model_signature(model)
        for key in ("d_model", "n_layers", "architecture"):
            if self.signature[key] != theirs[key]:
                raise AdapterError(
                    f"{self.kind} was made for a model with {key}={self.signature[key]!r}; this model has {theirs[key]!r}."
                )

    # --- files ---------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "kind": self.kind,
            "config": self.config(),
            "scale": self.scale,
            "provenance": self.provenance,
            **self.signature,
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write `adapter.safetensors` + `adapter.json` into `directory` atomically."""
        with atomic_directory(directory) as tmp:
            save_file({k: v.contiguous() for k, v in self.state().items()}, str(tmp / "adapter.safetensors"))
            (tmp / "adapter.json").write_text(json.dumps(self.metadata(), indent=1, default=str))
        return Path(directory)

    @staticmethod
    def load(directory: str | os.PathLike[str], model: TransformerBridge) -> Adapter:
        """Rebuild a saved adapter for `model` (checked against the recorded signature)."""
        meta, tensors = read_saved(directory, "adapter", writer="Adapter.save", version=FORMAT_VERSION,
                                   error=AdapterError, required=("kind", "config"))
        meta_path, kind = Path(directory) / "adapter.json", meta["kind"]
        if kind not in _REGISTRY:
            raise AdapterError(f"{meta_path}: unknown adapter kind {kind!r}; known: {sorted(_REGISTRY)}.")
        theirs = model_signature(model)
        for key in ("d_model", "n_layers", "architecture"):
            if key in meta and meta[key] != theirs[key]:
                raise AdapterError(f"{meta_path}: saved for {key}={meta[key]!r}; this model has {key}={theirs[key]!r}.")
        adapter = _REGISTRY[kind](model, **meta["config"])
        adapter.load_state(tensors)
        adapter.scale = float(meta.get("scale", 1.0))
        adapter.provenance = dict(meta.get("provenance") or {})
        return adapter


def load_adapter(directory: str | os.PathLike[str], model: TransformerBridge) -> Adapter:
    """Load any saved adapter (its kind is read from the metadata)."""
    return Adapter.load(directory, model)
