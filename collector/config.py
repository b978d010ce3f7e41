"""Load and validate ``collector.cfg`` into frozen, typed objects.

Every problem found is collected and raised at once in one ``ConfigError``,
one line each, naming the file, the section and the key.  Secrets (the
repository DSN, the Redis URL, the supervisord password) are never echoed
back in those messages.
"""

from __future__ import annotations

import configparser
import contextlib
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, TypeVar
from urllib.parse import urlsplit

from psycopg.conninfo import conninfo_to_dict

from collector.errors import ConfigError

CONFIG_ENV = "POWA_FLEET_CONFIG"
#: the production place of the configuration (see docs/operations.md)
SYSTEM_CONFIG = Path("/etc/powa-fleet/collector.cfg")
_CHECKOUT = Path(__file__).resolve().parent.parent
#: the checkout's own collector.cfg: the last fallback, only when running from a checkout
DEFAULT_CONFIG = _CHECKOUT / "collector.cfg"

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
LOG_LEVELS = ("debug", "info", "warning", "error")
_BOOLEANS = configparser.ConfigParser.BOOLEAN_STATES
_PLUGIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_PREFIX = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.\-]{0,252})")

T = TypeVar("T")


@dataclass(frozen=True)
class RepositoryConfig:
    # repr=False: DSNs and URLs may embed a password
    dsn: str = field(repr=False)
    connect_timeout: int = 10
    #: a worker whose server is collected more often than this (seconds) keeps its
    #: repository session between snapshots; others open one per snapshot
    keep_session_below: int = 60


@dataclass(frozen=True)
class RedisConfig:
    url: str = field(default=DEFAULT_REDIS_URL, repr=False)
    prefix: str = "powa"
    #: seconds a worker's status key lives without a heartbeat
    status_ttl: int = 30


@dataclass(frozen=True)
class SupervisorConfig:
    #: "host:port" of the web UI / XML-RPC over HTTP, "" to disable it
    http: str = "127.0.0.1:9001"
    username: str = ""
    password: str = field(default="", repr=False)
    #: extra program files for supervisord to include (globs relative to the fleet directory)
    include: tuple[str, ...] = ()


@dataclass(frozen=True)
class CollectorConfig:
    use_server_alias: bool = False
    auto_enable: bool = True
    log_level: str = "info"
    #: seconds a stopping worker waits for its snapshot before rolling it back
    stop_grace: int = 10
    #: libpq connect_timeout for remote servers, in seconds
    connect_timeout: int = 5
    #: a FATAL program is started again after this many seconds (doubling); 0: never
    restart_fatal_after: int = 30


@dataclass(frozen=True)
class PluginsConfig:
    enabled: tuple[str, ...] = ()
    #: raw settings of each ``[plugin:NAME]`` section, validated by the plugin
    settings: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class FleetConfig:
    """This host among the collector hosts sharing one repository and one Redis."""

    #: the name this host announces (default: the machine's host name)
    host: str = "localhost"
    #: seconds between two heartbeats of this host; it is taken for gone after three missed
    heartbeat: int = 5
    #: workers are forked by the fleet's spawner (collector.worker.spawner), which
    #: imports the libraries once for all; off: each worker imports them itself
    spawner: bool = True
    #: worker programs started a second (collector.fleet.starter); 0: 8 per usable CPU
    start_rate: int = 0


#: host names of [fleet] host: they end up in Redis keys and PostgreSQL application names
FLEET_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,39}")


def default_host_name() -> str:
    """The machine's host name, made a valid ``[fleet] host`` (first label kept when too long)."""
    name = re.sub(r"[^A-Za-z0-9_.\-]", "-", socket.gethostname()).lstrip("-_.") or "localhost"
    return name if FLEET_HOST.fullmatch(name) else name.split(".")[0][:40]


@dataclass(frozen=True)
class MetricsConfig:
    #: "host:port" of the Prometheus endpoint (collector.metrics), "" when metrics are off
    listen: str = ""
    #: serve a non-loopback address (the endpoint has no authentication)
    allow_remote: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.listen)

    def address(self) -> tuple[str, int]:
        """(host, port) to bind; host "" means every interface."""
        return split_address(self.listen)


@dataclass(frozen=True)
class Config:
    path: Path
    repository: RepositoryConfig
    redis: RedisConfig
    supervisor: SupervisorConfig
    collector: CollectorConfig
    plugins: PluginsConfig
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)

    @property
    def directory(self) -> Path:
        """Every generated file of the fleet lives beside the config file."""
        return self.path.parent

    @property
    def workers_available(self) -> Path:
        return self.directory / "workers_available"

    @property
    def workers_enabled(self) -> Path:
        return self.directory / "workers_enabled"

    @property
    def supervisord_conf(self) -> Path:
        return self.directory / "supervisord.conf"

    @property
    def log_dir(self) -> Path:
        return self.directory / "logs"

    @property
    def supervisor_socket(self) -> Path:
        return self.directory / "supervisor.sock"

    @property
    def supervisord_pidfile(self) -> Path:
        return self.directory / "supervisord.pid"

    def secrets(self) -> list[str]:
        """Every secret of this configuration, for log redaction."""
        found = [self.supervisor.password]
        found += _url_passwords(self.redis.url)
        found += _dsn_passwords(self.repository.dsn)
        return [s for s in found if s]


def candidates() -> list[Path]:
    """Where a configuration is looked for when neither -c nor $POWA_FLEET_CONFIG names one.

    ``./collector.cfg``, then ``/etc/powa-fleet/collector.cfg``, then, when
    this package runs from a checkout (not from an installed copy), the
    checkout's ``collector.cfg``, which ``create_supervisord_config.py``
    beside it has always used.
    """
    try:
        found = [Path("collector.cfg").absolute(), SYSTEM_CONFIG]
    except OSError:
        # the working directory is gone or out of reach
        found = [SYSTEM_CONFIG]
    if (_CHECKOUT / "create_supervisord_config.py").is_file():
        found.append(DEFAULT_CONFIG)
    return found


def resolve_path(path: str | os.PathLike[str] | None) -> Path:
    """The config file to use: ``path``, else $POWA_FLEET_CONFIG, else the first of
    ``candidates()`` that exists; ConfigError naming every place when none does."""
    if path:
        return Path(path).expanduser().absolute()
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env).expanduser().absolute()
    places = candidates()
    for place in places:
        with contextlib.suppress(OSError):
            # a working directory the user may not read (sudo -u from /root) is no answer
            if place.is_file():
                return place
    raise ConfigError([
        "no configuration file: give -c FILE or $" + CONFIG_ENV + ", or create one of "
        + ", ".join(str(p) for p in places)
    ])


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate a configuration file; raise ConfigError listing every problem."""
    cfg_path = resolve_path(path)
    parser = configparser.ConfigParser(interpolation=None, default_section="__no_default__")
    try:
        with cfg_path.open(encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as exc:
        raise ConfigError([f"{cfg_path}: cannot read configuration file: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{cfg_path}: configuration file is not valid UTF-8"]) from None
    except configparser.Error as exc:
        first_line = str(exc).splitlines()[0]
        raise ConfigError([f"{cfg_path}: cannot parse configuration file: {first_line}"]) from None
    return _Reader(cfg_path, parser).config()


class _Reader:
    """Reads sections and keys while collecting every problem found."""

    SECTIONS: Mapping[str, frozenset[str]] = {
        "repository": frozenset({"dsn", "connect_timeout", "keep_session_below"}),
        "redis": frozenset({"url", "prefix", "status_ttl"}),
        "supervisor": frozenset({"http", "username", "password", "include"}),
        "collector": frozenset(
            {"use_server_alias", "auto_enable", "log_level", "stop_grace", "connect_timeout",
             "restart_fatal_after"}
        ),
        "plugins": frozenset({"enabled"}),
        "metrics": frozenset({"listen", "allow_remote"}),
        "fleet": frozenset({"host", "heartbeat", "spawner", "start_rate"}),
    }

    def __init__(self, path: Path, parser: configparser.ConfigParser) -> None:
        self.path = path
        self.parser = parser
        self.problems: list[str] = []

    def problem(self, section: str, key: str | None, message: str) -> None:
        where = f"[{section}] {key}" if key else f"[{section}]"
        self.problems.append(f"{self.path}: {where}: {message}")

    def config(self) -> Config:
        self._check_names()
        repository = RepositoryConfig(
            dsn=self._dsn(),
            connect_timeout=self._int("repository", "connect_timeout", 10, 1, 300),
            keep_session_below=self._int("repository", "keep_session_below", 60, 0, 86400),
        )
        redis = RedisConfig(
            url=self._redis_url(),
            prefix=self._prefix(),
            status_ttl=self._int("redis", "status_ttl", 30, 5, 3600),
        )
        supervisor = self._supervisor()
        collector = CollectorConfig(
            use_server_alias=self._bool("collector", "use_server_alias", False),
            auto_enable=self._bool("collector", "auto_enable", True),
            log_level=self._choice("collector", "log_level", "info", LOG_LEVELS),
            stop_grace=self._int("collector", "stop_grace", 10, 1, 600),
            connect_timeout=self._int("collector", "connect_timeout", 5, 1, 300),
            restart_fatal_after=self._int("collector", "restart_fatal_after", 30, 0, 86400),
        )
        plugins = self._plugins()
        metrics = self._metrics(supervisor)
        fleet = self._fleet()
        if self.problems:
            raise ConfigError(self.problems)
        return Config(self.path, repository, redis, supervisor, collector, plugins, metrics,
                      fleet)

    def _fleet(self) -> FleetConfig:
        host = self._get("fleet", "host") or default_host_name()
        if not FLEET_HOST.fullmatch(host):
            self.problem("fleet", "host", "expected a name of letters, digits, '.', '_' or '-'"
                         " (40 at most, starting with a letter or digit)")
        return FleetConfig(host=host, heartbeat=self._int("fleet", "heartbeat", 5, 1, 60),
                           spawner=self._bool("fleet", "spawner", True),
                           start_rate=self._int("fleet", "start_rate", 0, 0, 10_000))

    def _check_names(self) -> None:
        for section in self.parser.sections():
            if section.startswith("plugin:"):
                if not _PLUGIN_NAME.fullmatch(section.removeprefix("plugin:")):
                    self.problem(section, None, "invalid plugin name")
                continue
            known = self.SECTIONS.get(section)
            if known is None:
                self.problem(section, None, "unknown section")
                continue
            for key in self.parser.options(section):
                if key not in known:
                    self.problem(section, key, "unknown key")
        if not self.parser.has_section("repository"):
            self.problem("repository", None, "missing section")

    def _get(self, section: str, key: str) -> str | None:
        if not self.parser.has_option(section, key):
            return None
        return self.parser.get(section, key).strip()

    def _typed(
        self, section: str, key: str, default: T, convert: Callable[[str], T], expected: str
    ) -> T:
        raw = self._get(section, key)
        if raw is None or raw == "":
            return default
        try:
            return convert(raw)
        except ValueError:
            self.problem(section, key, f"expected {expected}, got {raw!r}")
            return default

    def _bool(self, section: str, key: str, default: bool) -> bool:
        def convert(raw: str) -> bool:
            return _BOOLEANS[raw.lower()] if raw.lower() in _BOOLEANS else _invalid(raw)

        return self._typed(section, key, default, convert, "true or false")

    def _int(self, section: str, key: str, default: int, low: int, high: int) -> int:
        def convert(raw: str) -> int:
            value = int(raw)
            return value if low <= value <= high else _invalid(raw)

        return self._typed(section, key, default, convert, f"an integer from {low} to {high}")

    def _choice(self, section: str, key: str, default: str, choices: tuple[str, ...]) -> str:
        def convert(raw: str) -> str:
            return raw.lower() if raw.lower() in choices else _invalid(raw)

        return self._typed(section, key, default, convert, "one of " + ", ".join(choices))

    def _dsn(self) -> str:
        if not self.parser.has_section("repository"):
            return ""
        dsn = self._get("repository", "dsn")
        if not dsn:
            self.problem("repository", "dsn", "missing value (a libpq connection string or URI)")
            return ""
        try:
            conninfo_to_dict(dsn)
        except Exception:
            # libpq's message may quote the string, password included: do not echo it
            self.problem("repository", "dsn", "not a valid libpq connection string or URI")
        return dsn

    def _redis_url(self) -> str:
        url = self._get("redis", "url") or DEFAULT_REDIS_URL
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            # e.g. an unclosed [ of an IPv6 host; the message may quote the password
            self.problem("redis", "url", "not a valid URL (host or port)")
            return url
        if parts.scheme not in ("redis", "rediss", "unix"):
            self.problem("redis", "url", "expected a redis://, rediss:// or unix:// URL")
        elif parts.scheme != "unix" and parts.hostname and not is_loopback(parts.hostname) \
                and not parts.password and "ssl_certfile" not in parts.query:
            # whoever can write to that Redis could forge statuses and commands
            self.problem("redis", "url", f"{parts.hostname} is not a loopback address: give"
                         " Redis a password (redis://:PASSWORD@host...) or a TLS client"
                         " certificate (rediss://...?ssl_certfile=...), or use 127.0.0.1")
        return url

    def _prefix(self) -> str:
        prefix = self._get("redis", "prefix") or RedisConfig.prefix
        if not _PREFIX.fullmatch(prefix):
            self.problem("redis", "prefix", "use 1 to 64 letters, digits, '_', '-' or '.'")
        return prefix

    def _supervisor(self) -> SupervisorConfig:
        http = self._get("supervisor", "http")
        http = SupervisorConfig.http if http is None else http
        username = self._get("supervisor", "username") or ""
        password = self._get("supervisor", "password") or ""
        for key, value in (("username", username), ("password", password)):
            if any(c in value for c in "\n\r;#%") or value != value.strip():
                self.problem("supervisor", key, "must not contain ';', '#', '%' or line breaks")
        if http:
            host = self._http_host(http)
            if host is not None and not is_loopback(host) and not password:
                self.problem(
                    "supervisor",
                    "http",
                    f"{http} is not a loopback address: set a password, or use 127.0.0.1",
                )
        if password and not username:
            self.problem("supervisor", "username", "required when a password is set")
        include = tuple((self._get("supervisor", "include") or "").split())
        for pattern in include:
            if any(c in pattern for c in ";#%") or pattern.startswith("workers_enabled"):
                self.problem("supervisor", "include", f"unusable pattern {pattern!r}")
        return SupervisorConfig(http=http, username=username, password=password, include=include)

    def _http_host(self, http: str) -> str | None:
        host, sep, port = http.rpartition(":")
        if not sep:
            host, port = "", http
        if not port.isdigit() or not 0 < int(port) < 65536:
            self.problem("supervisor", "http", f"expected host:port, got {http!r}")
            return None
        return host.strip("[]")

    def _plugins(self) -> PluginsConfig:
        raw = self._get("plugins", "enabled") or ""
        names = tuple(n for n in re.split(r"[\s,]+", raw) if n)
        for name in names:
            if not _PLUGIN_NAME.fullmatch(name):
                self.problem("plugins", "enabled", f"invalid plugin name {name!r}")
        settings = {
            section.removeprefix("plugin:"): dict(self.parser.items(section))
            for section in self.parser.sections()
            if section.startswith("plugin:")
        }
        return PluginsConfig(enabled=names, settings=settings)


    def _metrics(self, supervisor: SupervisorConfig) -> MetricsConfig:
        listen = self._get("metrics", "listen") or ""
        allow_remote = self._bool("metrics", "allow_remote", False)
        if not listen:
            return MetricsConfig(allow_remote=allow_remote)
        try:
            host, port = split_address(listen)
        except ValueError:
            self.problem("metrics", "listen", f"expected host:port (e.g. 127.0.0.1:9187),"
                         f" got {listen!r}")
            return MetricsConfig(allow_remote=allow_remote)
        if not allow_remote and not is_loopback(host):
            self.problem("metrics", "listen", f"{listen} is not a loopback address: use"
                         " 127.0.0.1, or set allow_remote = true (the endpoint has no password)")
        if _same_socket((host, port), supervisor.http):
            self.problem("metrics", "listen", f"{listen} is the address of [supervisor] http")
        return MetricsConfig(listen=listen, allow_remote=allow_remote)


def split_address(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``; ``*:port`` or ``:port`` for every interface) as
    (host, port), host "" for every interface; ValueError when it is none of these."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(text)
    if host.startswith("[") and host.endswith("]"):
        host = str(ipaddress.IPv6Address(host[1:-1]))
    elif host in ("", "*"):
        host = ""
    elif not _HOST_NAME.fullmatch(host):
        # an IPv6 address without brackets, or not a host at all
        raise ValueError(text)
    return host, int(port)


def _same_socket(address: tuple[str, int], other: str) -> bool:
    """Would binding ``address`` and ``other`` (host:port text) clash?"""
    try:
        host, port = split_address(other)
    except ValueError:
        return False
    return port == address[1] and (host == address[0] or "" in (host, address[0]))


def _invalid(raw: str) -> NoReturn:
    raise ValueError(raw)


def is_loopback(host: str) -> bool:
    """True for names and addresses that only this machine can reach."""
    if host in ("", "*"):
        # supervisord binds every interface for an empty host
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_passwords(url: str) -> list[str]:
    try:
        password = urlsplit(url).password
    except ValueError:
        return []
    return [password] if password else []


def _dsn_passwords(dsn: str) -> list[str]:
    try:
        password = conninfo_to_dict(dsn).get("password")
    except Exception:
        return []
    return [str(password)] if password else []
