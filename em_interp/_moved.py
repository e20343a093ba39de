"""Old module paths of the package layout, kept working as deprecated aliases for one release.

`import em_interp.models` (and `from em_interp.engine import ...`, `em.models`, `python -m em_interp.sweep`)
still work: a meta-path finder resolves each old name to the module that now holds the code and warns
(`DeprecationWarning`). The alias *is* the new module (same classes, same state); no file is left at the
old path. `em_interp/__init__.py` installs the finder.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import CodeType, ModuleType

MOVED = {
    "em_interp.models": "em_interp.model.load",
    "em_interp.forward": "em_interp.model.forward",
    "em_interp.hooks": "em_interp.model.hooks",
    "em_interp.fastpath": "em_interp.model.fastpath",
    "em_interp.engine": "em_interp.training.engine",
    "em_interp.objectives": "em_interp.training.objective",
    "em_interp.runs": "em_interp.training.runs",
    "em_interp.checkpoint": "em_interp.training.checkpoint",
    "em_interp.verdicts": "em_interp.study.verdicts",
    "em_interp.sweep": "em_interp.cli.sweep",
    "em_interp.geometry.direction": "em_interp.interventions",
}


def _warn(old: str) -> None:
    warnings.warn(f"{old} moved to {MOVED[old]}; import it from there (the old path will be removed).",
                  DeprecationWarning, stacklevel=4)


class _AliasLoader(importlib.abc.Loader):
    """Loads an old name as the already-imported new module; `get_code` serves `python -m OLD`."""

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        _warn(spec.name)
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        pass  # the module ran under its new name

    def get_code(self, fullname: str) -> CodeType | None:
        _warn(fullname)
        spec = importlib.util.find_spec(MOVED[fullname])
        loader = spec.loader if spec is not None else None
        return loader.get_code(MOVED[fullname]) if isinstance(loader, importlib.abc.InspectLoader) else None


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader())


def install() -> None:
    """Put the alias finder first on `sys.meta_path` (once), ahead of path and editable-install finders that
    could otherwise find a stale file at an old path."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())
