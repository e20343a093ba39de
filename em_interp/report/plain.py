"""`plain`: results (dataclasses, arrays, tensors) as plain JSON values; the one serialiser of results."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def plain(x: Any) -> Any:
    """Results → plain JSON values: dataclasses to dicts, arrays/tensors to lists, NaN/inf to None."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x) if f.name != "run"}
    if isinstance(x, Mapping):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    detach: Any = getattr(x, "detach", None)
    if detach is not None and hasattr(x, "cpu"):  # a torch tensor (torch is not imported here)
        return plain(detach().cpu().numpy())
    if isinstance(x, np.ndarray):
        return plain(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (np.integer, int)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    return x
