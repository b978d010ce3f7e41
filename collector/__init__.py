"""powa-fleet: PoWA remote snapshots by a supervisord-managed fleet of worker processes."""

__version__ = "0.1.0"
