"""em_interp: interpretability tools for emergent misalignment research.

>>> import em_interp as em
>>> model = em.load_model()                                    # doctest: +SKIP
>>> vec = em.SteeringVector(model, layer=15)                   # doctest: +SKIP
>>> run = em.train(vec, model, em.datasets.load("medical", kind="bad"), lr=5e-4)  # doctest: +SKIP
"""

import importlib
from typing import TYPE_CHECKING, Any

from em_interp import _moved, datasets
from em_interp._version import __version__ as __version__
from em_interp.adapters import Adapter, LoRA, SteeringSet, SteeringVector, load_adapter
from em_interp.errors import EmInterpError
from em_interp.model import ActivationCache, load_model
from em_interp.training import Reversion, TrainConfig, TrainRun, continue_run, reversion, train, train_many

if TYPE_CHECKING:  # imported lazily at run time (see __getattr__); listed here for type checkers and IDEs
    from em_interp import directions, eval, geometry, interventions, model, report, study  # noqa: A004
    from em_interp.eval.generation import generate

_LAZY = {"geometry": "em_interp.geometry", "directions": "em_interp.directions", "eval": "em_interp.eval",
         "interventions": "em_interp.interventions", "report": "em_interp.report", "study": "em_interp.study"}
_moved.install()  # old module paths (em_interp.models, ...) resolve to the moved modules, with a DeprecationWarning


def __getattr__(name: str) -> Any:
    # Higher layers (geometry, directions, eval, report) import on first use, keeping `import em_interp` light.
    if name in _LAZY:
        return importlib.import_module(_LAZY[name])
    if f"em_interp.{name}" in _moved.MOVED:  # em.models etc. (deprecated)
        return importlib.import_module(f"em_interp.{name}")
    if name == "generate":
        return importlib.import_module("em_interp.eval.generation").generate
    raise AttributeError(f"module 'em_interp' has no attribute {name!r}")


def __dir__() -> list[str]:
    # Tab completion and dir(em) list the lazily imported names too.
    return sorted(set(globals()) | set(_LAZY) | {"generate"})


__all__ = [
    "ActivationCache", "Adapter", "EmInterpError", "LoRA", "Reversion", "SteeringSet", "SteeringVector", "TrainConfig",
    "TrainRun", "continue_run", "datasets", "directions", "eval", "generate", "geometry", "interventions", "load_adapter", "load_model", "model", "report", "reversion", "study",
    "train", "train_many",
]
