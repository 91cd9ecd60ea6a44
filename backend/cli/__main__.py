"""``python -m backend.cli``: the same as ``odo-backend``."""

import sys

from backend.cli import main

sys.exit(main())
