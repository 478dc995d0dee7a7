"""``python -m optimum_prune.cli``."""

import sys

from . import main

sys.exit(main())
