"""``python -m verifier``: the same as ``odo-verify``."""

import sys

from verifier.cli import main

sys.exit(main())
