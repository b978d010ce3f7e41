"""python -m collector.worker -c CFG --srvid N [--once]"""

import os
import sys

from collector.worker import startgate

# the heavy imports wait for a start slot (see collector.worker.startgate)
ARGV = sys.argv[1:]
GATE = startgate.wanted(ARGV, os.environ)
startgate.be_nice(GATE)
with startgate.held(GATE, startgate.server_id(ARGV)):
    from collector.worker.loop import main

sys.exit(main())
