"""`python -m em_interp.cli ...` runs the `em-interp` command."""

import sys

from em_interp.cli.command import main

sys.exit(main())
