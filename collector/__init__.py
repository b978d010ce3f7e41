"""powa-fleet: PoWA remote snapshots by a supervisord-managed fleet of worker processes."""

from collector import psycopgversion

__version__ = "0.1.0"

# before any psycopg import: its version modules without importlib.metadata
psycopgversion.install()
