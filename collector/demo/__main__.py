"""python -m collector.demo [--clean]"""

import sys

from collector.demo.demo import main

sys.exit(main())
