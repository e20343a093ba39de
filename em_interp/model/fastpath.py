"""The fast path of the partial forwards (`em_interp.model.forward`): hook-free bridge components run as plain HF modules.

`TransformerBridge` wraps every HF submodule in a bridge component that fires hook points. Its attention
component re-implements attention step by step (materialized scores and pattern, so that
`hook_attn_scores` / `hook_pattern` fire), which is slower than the model's own attention (SDPA / flash on
a GPU), and every component adds Python work per call. While `resume_forward` / `lower_forward` / `full_hidden` run with
the fast path on, each bridge component whose whole subtree has no hook attached is swapped, for that
call only, for a plain-HF copy of it that shares its weights (built once, cached on the model). Components
with a hook anywhere inside keep their bridge, and their hook-free children are swapped in turn, so every
attached hook still fires exactly where it did: an adapter at `blocks.24.hook_resid_post` keeps block 24's
bridge and its own hook, and its attention and MLP run as plain HF modules.

Mode (`set_fast_path`, or the environment variables `EM_INTERP_FAST_PATH=auto|on|off` and `EM_INTERP_COMPILE=auto|0|1`):
"auto" (default) uses the fast path on every device wherever the model supports it (`supports`); "on" forces it,
"off" runs the bridge everywhere. With `compile=True` the plain copies of
hook-free decoder layers also run through `torch.compile` (regional compilation: one compiled graph serves
every layer). The default, "auto", compiles on one CUDA device and nothing else: compilation costs 5–20 s
once per process (one graph per grad mode and mask kind, with dynamic shapes; logged as a warning), which pays
off on long runs on an accelerator (benchmarks/results/bench_gpu.jsonl, study.jsonl). `EM_INTERP_COMPILE=0|1`
overrides it.

The two paths compute the same function (tested: float32 agreement to ~1e-6 relative on CPU, and training
losses equal to ~1e-6); in bf16 they differ by the usual bf16 rounding, as HF's own SDPA and eager attention do.
On CPU the fast path is also the faster one (SDPA instead of materialized attention patterns, less Python).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import logging
import os
import time
import types
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

log = logging.getLogger(__name__)

_STATE: dict[str, Any] = {
    "mode": os.environ.get("EM_INTERP_FAST_PATH", "auto"),
    "compile": {"": "auto", "auto": "auto", "0": False, "false": False, "False": False}.get(
        os.environ.get("EM_INTERP_COMPILE", "auto"), True),
}
# Per model (weakly keyed, so neither deep copies nor pickles of a model carry it): plain clones, subtree lists.
_CACHES: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def set_fast_path(mode: str | bool = "auto", *, compile: bool | str = "auto") -> None:
    """Choose when the trainer's partial forwards bypass hook-free bridge components.

    Args:
        mode: "auto" (on wherever the model supports it), "on"/True, or "off"/False.
        compile: run plain copies of hook-free decoder layers through `torch.compile` (fast path only):
            True, False, or "auto" (on for a model on one CUDA device, see `compile_pays`; off on CPU).
    """
    value = {True: "on", False: "off"}.get(mode, mode) if isinstance(mode, bool) else mode
    if value not in ("auto", "on", "off"):
        raise ValueError(f"fast path mode {mode!r}; expected 'auto', 'on' or 'off'.")
    if compile != "auto" and not isinstance(compile, bool):
        raise ValueError(f"compile={compile!r}; expected True, False or 'auto'.")
    _STATE["mode"], _STATE["compile"] = value, compile


def fast_path_mode() -> dict[str, Any]:
    """The current setting: {"mode": ..., "compile": ...}."""
    return dict(_STATE)


def enabled(device: torch.device | str, fast: bool | None = None, model: TransformerBridge | None = None) -> bool:
    """Whether the fast path applies to activations on `device` (an explicit `fast` wins; every device
    counts alike since the fast path became the CPU default too: `device` is kept for callers).

    Never for a bridge in TransformerLens' compatibility mode (processed weights) or with its split-QKV /
    attn_in inputs on: there the bridge components compute something other than the HF modules.
    """
    if model is not None and not supports(model):
        return False
    if fast is not None:
        return fast
    return _STATE["mode"] != "off"


def supports(model: TransformerBridge) -> bool:
    """Whether the bridge's components compute what the plain HF modules compute (see `enabled`)."""
    cfg = getattr(model, "cfg", None)
    return not (
        getattr(model, "compatibility_mode", False)
        or getattr(cfg, "use_split_qkv_input", False)
        or getattr(cfg, "use_attn_in", False)
    )


def is_bridge(module: nn.Module) -> bool:
    """A TransformerLens bridge component (wraps an HF module as `original_component`)."""
    return type(module).__module__.startswith("transformer_lens.model_bridge") and (
        getattr(module, "original_component", None) is not None
    )


def _original(bridge: nn.Module) -> nn.Module:
    """The HF module a bridge component wraps."""
    inner = bridge.original_component
    assert isinstance(inner, nn.Module), f"{type(bridge).__name__}.original_component is a {type(inner).__name__}"
    return inner


def _hook_dicts(m: nn.Module) -> tuple[dict[Any, Any], ...]:
    return (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)


def _user_hooks(hooks: dict[Any, Any]) -> bool:
    """Whether a hook dict holds a hook that counts. TransformerBridge's internal bookkeeping hooks (functions
    defined in `transformer_lens.model_bridge`, e.g. the pre-hooks on ln1/ln2 that capture the pre-norm
    residual for its split-QKV mode, wired at the first bridge forward) do not; hooks added through hook
    points (and any other hook) do."""
    return any(not str(getattr(fn, "__module__", "") or "").startswith("transformer_lens.model_bridge") for fn in hooks.values())


def _own_hooks(m: nn.Module) -> bool:
    return any(_user_hooks(d) for d in _hook_dicts(m) if d)


class _Walk:
    """Facts about the module graph for one call. A bridge's subtree (static) is listed once and cached on
    the model; whether any module in it has a hook is checked at every call (hooks come and go)."""

    def __init__(self, cache: dict[str, Any]):
        self._subtrees: dict[int, tuple[nn.Module, list[dict[Any, Any]], bool]] = cache.setdefault("subtrees", {})

    def _subtree(self, m: nn.Module) -> tuple[nn.Module, list[dict[Any, Any]], bool]:
        key = id(m)
        entry = self._subtrees.get(key)
        if entry is None or entry[0] is not m:  # the entry keeps its module: an id is never reused while cached
            mods = list(m.modules())
            # The hook dicts themselves are listed (modules mutate them in place), so a check is one C-level
            # scan for a non-empty dict.
            dicts = [d for x in mods for d in _hook_dicts(x)]
            self._subtrees[key] = (m, dicts, any(is_bridge(x) for x in mods))
        return self._subtrees[key]

    def hooked(self, m: nn.Module) -> bool:
        return any(_user_hooks(d) for d in filter(None, self._subtree(m)[1]))

    def bridged(self, m: nn.Module) -> bool:
        if is_bridge(m):
            return True
        if isinstance(m, nn.ModuleList) or not m._modules:  # containers may be temporary: not cached
            return any(self.bridged(c) for c in m._modules.values() if c is not None)
        return self._subtree(m)[2]


def _plain(module: nn.Module, cache: dict[str, Any], walk: _Walk) -> nn.Module:
    """A plain-HF version of a hook-free module subtree, sharing parameters (cached by module)."""
    if is_bridge(module):
        return _plain(_original(module), cache, walk)
    if not walk.bridged(module):
        return module
    clones: dict[int, tuple[nn.Module, nn.Module]] = cache.setdefault("clones", {})
    key = id(module)
    entry = clones.get(key)
    if entry is None or entry[0] is not module:  # (a deep copy of the model carries stale entries)
        clone = copy.copy(module)
        clone.__dict__["_modules"] = {
            name: (None if child is None else _plain(child, cache, walk)) for name, child in module._modules.items()
        }
        _rebind_accelerate_hook(module, clone)
        clones[key] = (module, clone)
    return clones[key][1]


def _rebind_accelerate_hook(original: nn.Module, clone: nn.Module) -> None:
    # accelerate (device_map) replaces `forward` with a partial bound to the original module; rebind it to
    # the clone so the clone's own (plain) children run, with the same device-moving hook around them.
    fwd = original.__dict__.get("forward")
    if "_old_forward" in original.__dict__ and isinstance(fwd, functools.partial):
        clone.__dict__["_old_forward"] = types.MethodType(type(original).forward, clone)
        clone.__dict__["forward"] = functools.update_wrapper(functools.partial(fwd.func, clone), type(original).forward)


def logged_compile(fn: Callable[..., Any], what: str, **options: Any) -> Callable[..., Any]:
    """`torch.compile(fn, **options)`; its first call, where the compilation happens, logs the time it took
    (as a warning, when over 1 s: a one-time cost the user should see)."""
    fused = torch.compile(fn, **options)
    first_call = True

    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal first_call
        if not first_call:
            return fused(*args, **kwargs)
        first_call, start = False, time.perf_counter()
        out = fused(*args, **kwargs)
        if (seconds := time.perf_counter() - start) > 1.0:
            log.warning("torch.compile of %s took %.1f s (one-time; EM_INTERP_COMPILE=0 or set_fast_path(compile=False) "
                        "turns it off).", what, seconds)
        return out

    return call


class _Compiled(nn.Module):
    """A plain decoder layer called through `torch.compile` (the layer itself stays the registered child)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        # dynamic shapes from the start: one graph serves every batch size and sequence length (a static first
        # graph compiles a second, dynamic one when a shape first changes, for each grad mode and mask kind); the
        # first layer compiles, the others reuse its graph
        self._fn = logged_compile(layer, "the plain decoder layers", dynamic=True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)


def compile_pays(device_type: str, n_devices: int) -> bool:
    """compile="auto": on for a model on one CUDA device. Measured on one H200: a 14 B model's later steps ran
    1.3× faster compiled (bench_gpu.jsonl), and SmolLM2-135M's full study took 146 / 117 s compiled against
    157 / 143 s not (two seed sets, study.jsonl) once the layers compiled with dynamic shapes (with static first
    graphs, which recompile when a shape first changes, it took 195 s against 169 s). A CPU is not compiled; a
    `device_map` split would recompile at accelerate's hooks."""
    return device_type == "cuda" and n_devices <= 1


def _compile_pays(root: nn.Module, owner: Any, cache: dict[str, Any]) -> bool:
    """`compile_pays` for the model under `root` (worked out once per model)."""
    if "compile_pays" not in cache:
        device_map = getattr(getattr(owner, "original_model", None), "hf_device_map", None) or {}
        first = next(itertools.islice(root.parameters(), 1), None)
        cache["compile_pays"] = compile_pays(first.device.type if first is not None else "cpu", len(set(device_map.values())))
    return cache["compile_pays"]


def compiles(root: nn.Module, owner: Any) -> bool:
    """Whether the current setting compiles the model under `root` (the HF base model; `owner` its bridge)."""
    setting = _STATE["compile"]
    return _compile_pays(root, owner, _CACHES.setdefault(owner, {})) if setting == "auto" else bool(setting)


@contextlib.contextmanager
def plain_modules(root: nn.Module, owner: Any, *, compile_layers: bool | None = None) -> Iterator[None]:
    """Within the context, hook-free bridge components under `root` run as plain-HF copies.

    Args:
        root: the HF base model (e.g. `Qwen2Model`) whose forward is about to run.
        owner: object on which the plain copies are cached (the TransformerBridge).
        compile_layers: wrap plain decoder layers (children of a `ModuleList`) in `torch.compile`;
            default the `set_fast_path(compile=...)` setting.
    """
    cache = _CACHES.setdefault(owner, {})
    compiled: dict[int, nn.Module] = cache.setdefault("compiled", {})
    do_compile = compiles(root, owner) if compile_layers is None else compile_layers
    walk = _Walk(cache)
    undo: list[tuple[nn.Module, str, nn.Module]] = []

    def swap(parent: nn.Module) -> None:
        for name, child in list(parent._modules.items()):
            if child is None or not walk.bridged(child):
                continue
            if is_bridge(child) and not walk.hooked(child):
                plain = _plain(child, cache, walk)
                if do_compile and isinstance(parent, nn.ModuleList):
                    entry = compiled.get(id(plain))
                    if entry is None or entry.layer is not plain:
                        compiled[id(plain)] = entry = _Compiled(plain)
                    plain = entry
                parent._modules[name] = plain
                undo.append((parent, name, child))
            else:
                swap(_original(child) if is_bridge(child) else child)

    try:
        swap(root)
        yield
    finally:
        for parent, name, child in reversed(undo):
            parent._modules[name] = child
