"""Deprecated: moved to `em_interp.cli.sweep` (`python -m em_interp.cli.sweep`); this alias will be removed."""

import sys
import warnings

warnings.warn("em_interp.sweep moved to em_interp.cli.sweep; import or run it from there.", DeprecationWarning,
              stacklevel=2)

if __name__ == "__main__":  # python -m em_interp.sweep CONFIG (e.g. under torch.distributed.run)
    from em_interp.cli.sweep import main

    sys.exit(main())
else:
    from em_interp.cli import sweep as _moved

    sys.modules[__name__] = _moved
