"""redis-py's synchronous client, imported without the rest of redis-py.

``import redis`` runs redis-py's ``__init__``, which imports its asyncio,
cluster, sentinel, multidb and keyspace-notification clients: about 2 MiB
of every worker's memory, times hundreds of workers, for code no process of
the fleet runs.  This module imports ``redis.client`` and ``redis.exceptions``
alone, under light package modules for ``redis`` and ``redis.asyncio`` (their
``__path__`` is the real packages', so every submodule still loads as
usual), and exposes on ``redis`` the names the fleet uses.

It degrades, never breaks: a name of redis-py's ``__init__`` that the light
module lacks (``from redis import RedisCluster`` by some other code) runs the
real ``__init__`` into it on first use; a redis-py release whose client no
longer loads this way gets the plain ``import redis`` (``LIGHT`` is then
False, and ``tests/unit/test_syncredis.py`` fails so that we notice).

Every module of the package imports redis as ``from collector.syncredis import redis``.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
from typing import Any

log = logging.getLogger(__name__)

#: the packages whose ``__init__`` is skipped: ``redis.commands.core`` imports
#: ``redis.asyncio.observability``, which would run ``redis/asyncio/__init__.py``
LIGHT_PACKAGES = ("redis", "redis.asyncio")
#: what the light ``redis`` module holds besides its exceptions
CLIENT_NAMES = ("Redis", "StrictRedis")


def _is_submodule(package: str, attribute: str) -> bool:
    try:
        return importlib.util.find_spec(f"{package}.{attribute}") is not None
    except (ImportError, ValueError):
        return False


def _light_package(name: str) -> types.ModuleType:
    """A package module for ``name`` with the real package's path, its ``__init__`` not run."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        raise ImportError(f"{name} is not a package")
    module = importlib.util.module_from_spec(spec)
    state = {"loaded": False}

    def load_all(attribute: str) -> Any:
        # PEP 562: only names the module lacks come here
        if state["loaded"] or attribute.startswith("__") or _is_submodule(name, attribute):
            # a submodule is for the import system to load (``from redis import client``)
            raise AttributeError(f"module {name!r} has no attribute {attribute!r}")
        state["loaded"] = True
        log.debug("%s.%s asked for: importing the whole of %s", name, attribute, name)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return getattr(module, attribute)

    module.__getattr__ = load_all  # type: ignore[method-assign]
    return module


def _install() -> bool:
    """Import the synchronous client alone; False (nothing left half done) if it cannot."""
    if any(name in sys.modules for name in LIGHT_PACKAGES):
        # redis-py is imported already (a test, a plugin): use it as it is
        return False
    try:
        for name in LIGHT_PACKAGES:
            module = _light_package(name)
            sys.modules[name] = module
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], child, module)
        client = importlib.import_module("redis.client")
        exceptions = importlib.import_module("redis.exceptions")
        light = sys.modules["redis"]
        for attribute in CLIENT_NAMES:
            setattr(light, attribute, getattr(client, attribute))
        for attribute, value in vars(exceptions).items():
            if isinstance(value, type) and issubclass(value, BaseException):
                setattr(light, attribute, value)
    except Exception:
        # whatever a new release changed, the plain import is what is left
        for name in [n for n in sys.modules if n == "redis" or n.startswith("redis.")]:
            del sys.modules[name]
        return False
    return True


#: True when redis-py's synchronous client was imported alone
LIGHT = _install()

import redis  # noqa: E402 - after the light modules are in place

__all__ = ["LIGHT", "redis"]
