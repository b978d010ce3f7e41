"""python -m collector.worker -c CFG --srvid N [--once]"""

import os
import sys

from collector.worker import startgate

# the heavy imports wait for a start slot (see collector.worker.startgate)
ARGV = sys.argv[1:]
with startgate.held(startgate.wanted(ARGV, os.environ), startgate.server_id(ARGV)):
    from collector.worker.loop import main

sys.exit(main())
