"""python -m collector.worker -c CFG --srvid N [--once]"""

import sys

from collector.worker.loop import main

sys.exit(main())
