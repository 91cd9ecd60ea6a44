"""``python -m witness``: the same as ``odo-witness``."""

import sys

from witness.cli import main

sys.exit(main())
