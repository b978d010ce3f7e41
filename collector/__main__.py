"""python -m collector: the operator commands, as ``powa-fleet`` (see collector.cli)."""

import sys

from collector.cli import main

sys.exit(main())
