"""The Prometheus endpoint of a fleet (``python -m collector.metrics``).

Its own room: it uses the shared modules only, and reads nothing but Redis
(the workers' status documents, the event listener's program table, the
control's counters), at scrape time.  See docs/metrics.md.
"""
