"""Deprecated: moved to `em_interp.model.forward`; this alias will be removed in a later release."""

import sys
import warnings

from em_interp.model import forward as _moved

warnings.warn("em_interp.forward moved to em_interp.model.forward; import it from there.", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
