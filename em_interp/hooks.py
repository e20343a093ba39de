"""Deprecated: moved to `em_interp.model.hooks`; this alias will be removed in a later release."""

import sys
import warnings

from em_interp.model import hooks as _moved

warnings.warn("em_interp.hooks moved to em_interp.model.hooks; import it from there.", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
