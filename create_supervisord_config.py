#!/usr/bin/env python3
"""Generate the supervisord programs of a powa-fleet from powa_servers.

Thin entry point: the logic lives in collector.generator and collector.fleet.
"""

import sys

from collector.fleet.generator import main

if __name__ == "__main__":
    sys.exit(main())
