"""python -m collector: the operator commands (see collector.cli)."""

import sys

from collector.cli import main

sys.exit(main())
