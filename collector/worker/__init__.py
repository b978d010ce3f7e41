"""The worker side: one process per remote server (``python -m collector.worker``).

It imports only the shared modules of ``collector`` itself, never the control
or fleet sides.
"""
