"""Deprecated: moved to `em_interp.model.load`; this alias will be removed in a later release."""

import sys
import warnings

from em_interp.model import load as _moved

warnings.warn("em_interp.models moved to em_interp.model.load; import it from there.", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
