"""python -m collector.worker -c CFG --srvid N [--once]"""

import os
import sys

from collector.spawning import config_path
from collector.worker import stub

ARGV = sys.argv[1:]
# forked by the fleet's spawner, this process standing in for it (see collector.worker.stub)
CODE = stub.forked(ARGV, os.environ, config_path(ARGV))
if CODE is not None:
    sys.exit(CODE)

from collector.worker import startgate  # noqa: E402  (only without a spawner)

# no spawner: the heavy imports wait for a start slot (see collector.worker.startgate)
GATE = startgate.wanted(ARGV, os.environ)
startgate.be_nice(GATE)
with startgate.held(GATE, startgate.server_id(ARGV)):
    from collector.worker.loop import main

sys.exit(main())
