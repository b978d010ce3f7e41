#!/usr/bin/env python3
"""Generate the supervisord programs of a powa-fleet from powa_servers.

Thin entry point kept for the contract: the logic lives in
collector.fleet.generator, which ``powa-fleet generate`` runs too.
"""

import sys

from collector.fleet.generator import main

if __name__ == "__main__":
    sys.exit(main())
