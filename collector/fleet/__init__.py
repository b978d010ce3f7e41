"""The fleet side: files on disk (supervisord.conf, workers_available/, workers_enabled/),
the supervisord client and the event listener that mirrors program states into Redis.

It imports only the shared modules of ``collector`` itself.
"""
