"""python -m collector.control -c CFG"""

import sys

from collector.control.server import main

sys.exit(main())
