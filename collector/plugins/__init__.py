"""Plugins: event hooks of the workers, contained so they never touch a snapshot.

A plugin is a module defining one subclass of ``Plugin``: a plugin shipped
with powa-fleet (this package: ``webhook``, ``command``), a module of the
``plugins/`` folder beside the configuration file (an operator's own), or
any importable dotted module path.  It is loaded only
when named in ``[plugins] enabled`` and is configured by its own
``[plugin:NAME]`` section, validated at start with the same clear errors as
the rest of the configuration.

Each plugin gets a thread and a bounded queue of its own.  ``emit()`` never
blocks: when a plugin's queue is full (a slow or hung plugin), the event is
dropped and counted.  A hook that raises is logged with its traceback; one
that runs past the plugin's ``timeout`` is reported as hung.  None of this
delays or fails a snapshot.

Events are plain dicts: ``kind`` (``snapshot_done``, ``snapshot_failed``,
``status_changed``), ``srvid``, ``alias``, ``status``, ``previous_status``
(status_changed), ``host``, ``time``, counters ``snapshots_ok``,
``snapshots_failed`` and ``consecutive_failures``, and for snapshots
``outcome``, ``duration``, ``rows`` (per module), ``errors``, ``timings``,
``error``.  Never a password.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import inspect
import logging
import math
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from collector.config import Config
from collector.errors import ConfigError

log = logging.getLogger(__name__)

#: plugins shipped with powa-fleet, importable as collector.plugins.NAME
SHIPPED = ("webhook", "command")
HOOKS = ("snapshot_done", "snapshot_failed", "status_changed")
QUEUE_SIZE = 100

Event = dict[str, Any]
T = TypeVar("T")


class Plugin:
    """Base class of plugins: override the hooks you need, they do nothing by default.

    ``__init__`` reads the settings of ``[plugin:NAME]`` with the ``setting``
    helper, which records problems instead of raising, so that every problem
    of the configuration is reported at once.
    """

    #: seconds a hook may run before it is reported as hung
    timeout: float = 30.0

    def __init__(self, name: str, settings: Mapping[str, str]) -> None:
        self.name = name
        self.settings = dict(settings)
        self.problems: list[str] = []
        self._read: set[str] = set()

    def setting(
        self,
        key: str,
        default: T,
        convert: Callable[[str], T] = lambda raw: raw,  # type: ignore[assignment,return-value]
        required: bool = False,
    ) -> T:
        """The value of ``key`` converted, or ``default`` (a problem is recorded when invalid)."""
        self._read.add(key)
        raw = self.settings.get(key, "").strip()
        if not raw:
            if required:
                self.problems.append(f"{key}: missing value")
            return default
        try:
            return convert(raw)
        except (ValueError, TypeError) as exc:
            self.problems.append(f"{key}: {exc or 'invalid value'}")
            return default

    def unknown_settings(self) -> list[str]:
        return sorted(set(self.settings) - self._read)

    def snapshot_done(self, event: Event) -> None:
        """A snapshot was stored (``outcome`` is ``ok`` or ``errors``)."""

    def snapshot_failed(self, event: Event) -> None:
        """A snapshot could not be stored; ``error`` says why."""

    def status_changed(self, event: Event) -> None:
        """The worker's status changed from ``previous_status`` to ``status``."""

    def close(self) -> None:
        """The worker stops: release what the plugin holds."""


def number(low: float, high: float) -> Callable[[str], float]:
    """A ``setting`` converter: a number from ``low`` to ``high`` (seconds, ratios...)."""

    def convert(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        # nan and inf fail the comparison too
        if not low <= value <= high:
            raise ValueError(f"expected a number from {low:g} to {high:g}, got {raw!r}")
        return value

    return convert


def integer(low: int, high: int) -> Callable[[str], int]:
    """A ``setting`` converter: an integer from ``low`` to ``high``."""

    def convert(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise ValueError(f"expected an integer from {low} to {high}, got {raw!r}")
        return value

    return convert


class Dispatcher:
    """Where a worker sends its events."""

    def emit(self, kind: str, event: Event) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class NullDispatcher(Dispatcher):
    def emit(self, kind: str, event: Event) -> None:
        return None

    def close(self) -> None:
        return None


class PluginRunner(threading.Thread):
    """Runs one plugin's hooks in order, off the snapshot path."""

    def __init__(self, plugin: Plugin, size: int = QUEUE_SIZE) -> None:
        super().__init__(name=f"plugin-{plugin.name}", daemon=True)
        self.plugin = plugin
        self.size = size
        # one slot more than events may take: the stop request always finds room
        self.queue: queue.Queue[tuple[str, Event] | None] = queue.Queue(maxsize=size + 1)
        self.dropped = 0
        self.failures = 0
        self.delivered = 0
        # (hook, monotonic start) while a hook runs; one assignment, read by the monitor
        self._busy: tuple[str, float] | None = None
        self._hung_reported = False

    def offer(self, kind: str, event: Event) -> bool:
        """Queue an event without waiting; False (and counted) when the queue is full."""
        try:
            if self.queue.qsize() >= self.size:
                raise queue.Full
            self.queue.put_nowait((kind, event))
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning("plugin %s is not keeping up: %d event(s) dropped so far",
                            self.plugin.name, self.dropped)
            return False
        return True

    def check_hung(self, now: float) -> bool:
        """Report, once per hook call, a hook running past the plugin's timeout."""
        busy = self._busy
        if busy is None or self._hung_reported:
            return False
        kind, since = busy
        if now - since <= self.plugin.timeout:
            return False
        self._hung_reported = True
        log.error("plugin %s: %s has been running for %.0fs (timeout %gs): hung?",
                  self.plugin.name, kind, now - since, self.plugin.timeout)
        return True

    def run(self) -> None:
        while (item := self.queue.get()) is not None:
            self._deliver(*item)

    def _deliver(self, kind: str, event: Event) -> None:
        started = time.monotonic()
        self._hung_reported = False
        self._busy = (kind, started)
        try:
            getattr(self.plugin, kind)(event)
            self.delivered += 1
        except (Exception, SystemExit):
            # SystemExit too: a hook calling sys.exit() would silently end this thread
            self.failures += 1
            log.exception("plugin %s failed in %s", self.plugin.name, kind)
        finally:
            self._busy = None
        elapsed = time.monotonic() - started
        if elapsed > self.plugin.timeout:
            log.warning("plugin %s took %.1fs in %s (timeout %gs)",
                        self.plugin.name, elapsed, kind, self.plugin.timeout)

    def request_stop(self) -> None:
        """Ask the thread to end once the events already queued are delivered."""
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(None)

    def close_plugin(self) -> None:
        if self.dropped:
            log.warning("plugin %s: %d event(s) dropped in all", self.plugin.name, self.dropped)
        if self.is_alive():
            # closing under a hook still running could break the plugin's own state
            log.warning("plugin %s did not finish its events in time", self.plugin.name)
            return
        try:
            self.plugin.close()
        except Exception:
            log.exception("plugin %s failed to close", self.plugin.name)


class HangMonitor(threading.Thread):
    """Reports hung hooks even when no new event comes to reveal them."""

    interval = 1.0

    def __init__(self, runners: list[PluginRunner]) -> None:
        super().__init__(name="plugin-monitor", daemon=True)
        self.runners = runners
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self.interval):
            now = time.monotonic()
            for runner in self.runners:
                runner.check_hung(now)

    def stop(self) -> None:
        self._stopped.set()


class PluginDispatcher(Dispatcher):
    def __init__(self, plugins: list[Plugin], queue_size: int = QUEUE_SIZE) -> None:
        self.runners = [PluginRunner(plugin, queue_size) for plugin in plugins]
        for runner in self.runners:
            runner.start()
        self.monitor = HangMonitor(self.runners)
        self.monitor.start()

    def emit(self, kind: str, event: Event) -> None:
        if kind not in HOOKS:
            raise ValueError(f"unknown event kind {kind!r}")
        event = {**event, "kind": kind}
        for runner in self.runners:
            # each plugin gets its own copy: one cannot change what another sees
            runner.offer(kind, copy.deepcopy(event))

    def close(self, timeout: float = 2.0) -> None:
        """Let the plugins finish their queued events within ``timeout``, together."""
        self.monitor.stop()
        for runner in self.runners:
            runner.request_stop()
        deadline = time.monotonic() + timeout
        for runner in self.runners:
            runner.join(max(0.0, deadline - time.monotonic()))
        for runner in self.runners:
            runner.close_plugin()


def _import(name: str, directory: Path) -> ModuleType:
    """A dotted path, a shipped plugin, or ``directory/plugins/NAME.py`` (in that order)."""
    if "." in name:
        return importlib.import_module(name)
    if name in SHIPPED:
        return importlib.import_module(f"{__name__}.{name}")
    path = directory / "plugins" / f"{name}.py"
    if not path.is_file():
        raise ImportError(f"no shipped plugin of that name, and no file {path}")
    module_name = f"powa_fleet_plugins.{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def plugin_class(module: ModuleType) -> type[Plugin]:
    """The one Plugin subclass a plugin module defines."""
    found = [
        obj for _, obj in inspect.getmembers(module, inspect.isclass)
        if issubclass(obj, Plugin) and obj is not Plugin and obj.__module__ == module.__name__
    ]
    if len(found) != 1:
        raise ImportError(f"expected one subclass of collector.plugins.Plugin, found {len(found)}")
    return found[0]


def load_plugins(cfg: Config) -> list[Plugin]:
    """Import and configure the enabled plugins; ConfigError lists every problem."""
    problems: list[str] = []
    plugins: list[Plugin] = []
    for name in cfg.plugins.enabled:
        section = f"plugin:{name}"
        try:
            cls = plugin_class(_import(name, cfg.directory))
        except (Exception, SystemExit) as exc:
            # SystemExit too: a module calling sys.exit() on import is just as broken
            problems.append(
                f"{cfg.path}: [plugins] enabled: cannot load plugin {name!r}: {_describe(exc)}"
            )
            continue
        settings = cfg.plugins.settings.get(name, {})
        try:
            plugin = cls(name, settings)
        except Exception as exc:
            problems.append(f"{cfg.path}: [{section}]: plugin failed to start: {_describe(exc)}")
            continue
        problems += [f"{cfg.path}: [{section}] {p}" for p in plugin.problems]
        problems += [f"{cfg.path}: [{section}] {k}: unknown key" for k in plugin.unknown_settings()]
        plugins.append(plugin)
    for name in cfg.plugins.settings:
        if name not in cfg.plugins.enabled:
            log.info("[plugin:%s] is configured but not enabled", name)
    if problems:
        raise ConfigError(problems)
    return plugins


def _describe(exc: BaseException) -> str:
    """One line: problems are printed one per line, and a message may span several."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def load_dispatcher(cfg: Config, srvid: int) -> Dispatcher:
    plugins = load_plugins(cfg)
    if not plugins:
        return NullDispatcher()
    log.info("worker_%d: plugins enabled: %s", srvid, ", ".join(p.name for p in plugins))
    return PluginDispatcher(plugins)
