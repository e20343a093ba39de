"""Deprecated: `Direction` lives in `em_interp.interventions` (also `em_interp.directions.Direction`)."""

import warnings

from em_interp.interventions import Direction, as_direction, check_fits

warnings.warn("em_interp.geometry.direction is deprecated; import Direction from em_interp.interventions "
              "(or em_interp.directions).", DeprecationWarning, stacklevel=2)

__all__ = ["Direction", "as_direction", "check_fits"]
