"""The metrics process: Prometheus's text format over HTTP, read from Redis at each scrape.

    python -m collector.metrics -c CFG      (run by supervisord as [program:metrics])

Listens on ``[metrics] listen``; serves every path with the same page.  A
scrape reads Redis and nothing else, so it never waits on a worker,
supervisord or the repository; while Redis does not answer, a scrape still
succeeds and says so with ``powa_fleet_redis_up 0``.  Nothing is cached: each
scrape shows what Redis holds at that moment.  SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import Metric

from collector import config, daemon
from collector.errors import EXIT_CONFIG, EXIT_OK, EXIT_UNAVAILABLE
from collector.keys import client
from collector.logs import Outage
from collector.metrics.families import families, redis_down
from collector.metrics.reading import read
from collector.syncredis import redis
from collector.wakeup import SignalFlags, Wakeup

log = logging.getLogger("collector.metrics")

PROGRAM = "metrics"
#: a scrape gives up on Redis after this (Prometheus's default scrape timeout is 10 s)
REDIS_TIMEOUT = 2.0


class FleetCollector:
    """A prometheus_client collector whose ``collect()`` reads Redis at each scrape."""

    def __init__(self, url: str, prefix: str, host: str) -> None:
        self.redis = client(url, socket_timeout=REDIS_TIMEOUT)
        self.prefix = prefix
        #: this collector host: its supervisord's programs (collector.keys.programs_key)
        self.host = host
        self.outage = Outage(log, "cannot read Redis for a scrape")

    def collect(self) -> Iterable[Metric]:
        try:
            reading = read(self.redis, self.prefix, self.host)
        except (redis.RedisError, OSError) as exc:
            self.outage.failed(exc)
            return list(redis_down())
        self.outage.recovered("Redis answers scrapes again")
        return list(families(reading))


class Endpoint:
    def __init__(self, cfg: config.Config) -> None:
        self.cfg = cfg
        self.wakeup = Wakeup()
        self.flags = SignalFlags(self.wakeup)
        self.collector = FleetCollector(cfg.redis.url, cfg.redis.prefix, cfg.fleet.host)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self.server: WSGIServer | None = None
        self.thread: threading.Thread | None = None

    def run(self) -> int:
        self.flags.install()
        try:
            host, port = self.cfg.metrics.address()
            try:
                self.server, self.thread = start_http_server(port, host or "0.0.0.0",  # noqa: S104
                                                             self.registry)
            except OSError as exc:
                return daemon.fatal(PROGRAM, f"cannot listen on {self.cfg.metrics.listen}:"
                                    f" {exc.strerror or exc}", EXIT_UNAVAILABLE)
            log.info("serving metrics on http://%s/metrics", self.cfg.metrics.listen)
            while not self.flags.stop:
                self.wakeup.wait(3600)
        finally:
            self.shutdown()
        return EXIT_OK

    def shutdown(self) -> None:
        daemon.teardown(log, [
            ("http", self._close_http),
            ("redis", self.collector.redis.close),
            ("signals", self.flags.uninstall),
            ("wakeup", self.wakeup.close),
        ])

    def _close_http(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m collector.metrics",
        description="Serve a powa-fleet's metrics to Prometheus, read from Redis.",
    )
    daemon.config_argument(parser)
    args = parser.parse_args(argv)
    cfg = daemon.load_config(PROGRAM, args.config)
    if not cfg.metrics.enabled:
        return daemon.fatal(PROGRAM, f"{cfg.path}: [metrics] listen is empty: metrics are off",
                            EXIT_CONFIG)
    return Endpoint(cfg).run()


if __name__ == "__main__":
    sys.exit(main())
