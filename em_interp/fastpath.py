"""The fast path of the trainer's partial forwards: hook-free bridge components run as plain HF modules.

`TransformerBridge` wraps every HF submodule in a bridge component that fires hook points. Its attention
component re-implements attention step by step (materialized scores and pattern, so that
`hook_attn_scores` / `hook_pattern` fire), which is slower than the model's own attention (SDPA / flash on
a GPU), and every component adds Python work per call. While `resume_forward` / `lower_forward` run with
the fast path on, each bridge component whose whole subtree has no hook attached is swapped, for that
call only, for a plain-HF copy of it that shares its weights (built once, cached on the model). Components
with a hook anywhere inside keep their bridge, and their hook-free children are swapped in turn, so every
attached hook still fires exactly where it did: an adapter at `blocks.24.hook_resid_post` keeps block 24's
bridge and its own hook, and its attention and MLP run as plain HF modules.

Mode (`set_fast_path`): "auto" (default) uses the fast path for activations on an accelerator and the bridge
everywhere on CPU, so CPU results stay bitwise those of the bridge; "on" / "off" force it. With
`compile=True` the plain copies of hook-free decoder layers also run through `torch.compile` (regional
compilation: one compiled graph serves every layer of the same shape); off by default.

The two paths compute the same function (tested: float32 agreement to ~1e-6 relative on CPU); in bf16 on a
GPU they differ by the usual bf16 rounding, as HF's own SDPA and eager attention do.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

_STATE: dict[str, Any] = {"mode": "auto", "compile": False}
_CACHE_ATTR = "_em_fastpath_cache"


def set_fast_path(mode: str | bool = "auto", *, compile: bool = False) -> None:
    """Choose when the trainer's partial forwards bypass hook-free bridge components.

    Args:
        mode: "auto" (on for non-CPU activations), "on"/True, or "off"/False.
        compile: run plain copies of hook-free decoder layers through `torch.compile` (fast path only).
    """
    value = {True: "on", False: "off"}.get(mode, mode) if isinstance(mode, bool) else mode
    if value not in ("auto", "on", "off"):
        raise ValueError(f"fast path mode {mode!r}; expected 'auto', 'on' or 'off'.")
    _STATE["mode"], _STATE["compile"] = value, bool(compile)


def fast_path_mode() -> dict[str, Any]:
    """The current setting: {"mode": ..., "compile": ...}."""
    return dict(_STATE)


def enabled(device: torch.device | str, fast: bool | None = None) -> bool:
    """Whether the fast path applies to activations on `device` (an explicit `fast` wins)."""
    if fast is not None:
        return fast
    if _STATE["mode"] == "auto":
        return torch.device(device).type != "cpu"
    return _STATE["mode"] == "on"


def is_bridge(module: nn.Module) -> bool:
    """A TransformerLens bridge component (wraps an HF module as `original_component`)."""
    return type(module).__module__.startswith("transformer_lens.model_bridge") and (
        getattr(module, "original_component", None) is not None
    )


def _own_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


class _Walk:
    """Memoized per-call facts about the module graph (bridges share children with their HF modules)."""

    def __init__(self) -> None:
        self._hooked: dict[int, bool] = {}
        self._bridged: dict[int, bool] = {}

    def hooked(self, m: nn.Module) -> bool:
        key = id(m)
        if key not in self._hooked:
            self._hooked[key] = False  # guards against cycles
            self._hooked[key] = _own_hooks(m) or any(self.hooked(c) for c in m._modules.values() if c is not None)
        return self._hooked[key]

    def bridged(self, m: nn.Module) -> bool:
        key = id(m)
        if key not in self._bridged:
            self._bridged[key] = False
            self._bridged[key] = is_bridge(m) or any(self.bridged(c) for c in m._modules.values() if c is not None)
        return self._bridged[key]


def _plain(module: nn.Module, cache: dict[int, nn.Module], walk: _Walk) -> nn.Module:
    """A plain-HF version of a hook-free module subtree, sharing parameters (cached by module id)."""
    if is_bridge(module):
        return _plain(module.original_component, cache, walk)
    if not walk.bridged(module):
        return module
    key = id(module)
    if key not in cache:
        clone = copy.copy(module)
        clone.__dict__["_modules"] = {
            name: (None if child is None else _plain(child, cache, walk)) for name, child in module._modules.items()
        }
        _rebind_accelerate_hook(module, clone)
        cache[key] = clone
    return cache[key]


def _rebind_accelerate_hook(original: nn.Module, clone: nn.Module) -> None:
    # accelerate (device_map) replaces `forward` with a partial bound to the original module; rebind it to
    # the clone so the clone's own (plain) children run, with the same device-moving hook around them.
    fwd = original.__dict__.get("forward")
    if "_old_forward" in original.__dict__ and isinstance(fwd, functools.partial):
        clone.__dict__["_old_forward"] = types.MethodType(type(original).forward, clone)
        clone.__dict__["forward"] = functools.update_wrapper(functools.partial(fwd.func, clone), type(original).forward)


class _Compiled(nn.Module):
    """A plain decoder layer called through `torch.compile` (the layer itself stays the registered child)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self._fn = torch.compile(layer, dynamic=False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)


@contextlib.contextmanager
def plain_modules(root: nn.Module, owner: Any, *, compile_layers: bool | None = None) -> Iterator[None]:
    """Within the context, hook-free bridge components under `root` run as plain-HF copies.

    Args:
        root: the HF base model (e.g. `Qwen2Model`) whose forward is about to run.
        owner: object on which the plain copies are cached (the TransformerBridge).
        compile_layers: wrap plain decoder layers (children of a `ModuleList`) in `torch.compile`;
            default the `set_fast_path(compile=...)` setting.
    """
    cache = owner.__dict__.setdefault(_CACHE_ATTR, {})
    compiled = cache.setdefault("compiled", {})
    do_compile = _STATE["compile"] if compile_layers is None else compile_layers
    walk = _Walk()
    undo: list[tuple[nn.Module, str, nn.Module]] = []

    def swap(parent: nn.Module) -> None:
        for name, child in list(parent._modules.items()):
            if child is None or not walk.bridged(child):
                continue
            if is_bridge(child) and not walk.hooked(child):
                plain = _plain(child, cache, walk)
                if do_compile and isinstance(parent, nn.ModuleList):
                    plain = compiled.setdefault(id(plain), _Compiled(plain))
                parent._modules[name] = plain
                undo.append((parent, name, child))
            else:
                swap(child.original_component if is_bridge(child) else child)

    try:
        swap(root)
        yield
    finally:
        for parent, name, child in reversed(undo):
            parent._modules[name] = child
