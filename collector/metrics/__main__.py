"""python -m collector.metrics -c CFG"""

import sys

from collector.metrics.server import main

sys.exit(main())
