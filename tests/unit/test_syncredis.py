"""redis-py's synchronous client alone (collector.syncredis): light, and still whole.

A worker must not carry redis-py's asyncio, cluster and sentinel clients
(about 2 MiB each, times hundreds of workers).  When a redis-py release
moves the pieces so that the light import no longer works, the module falls
back to the plain ``import redis``: the fleet still runs, and these tests
fail so that we notice.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from collector.demo import sandbox

PACKAGE = Path(__file__).resolve().parents[2] / "collector"

#: what redis-py's __init__ imports and a worker must not
HEAVY = ("redis.asyncio.client", "redis.asyncio.cluster", "redis.cluster", "redis.sentinel",
         "redis.multidb", "redis.keyspace_notifications")

PROBE = """
import json, sys
from collector.syncredis import LIGHT, redis
client = redis.Redis.from_url(sys.argv[1], socket_timeout=5)
client.set("syncredis:probe", "x", ex=30)
script = client.register_script("return redis.call('GET', KEYS[1])")
pubsub = client.pubsub(ignore_subscribe_messages=True)
pubsub.subscribe("syncredis:channel")
client.publish("syncredis:channel", "hello")
message = None
for _ in range(20):
    # the subscribe confirmation comes first, ignored as None
    message = message or pubsub.get_message(timeout=0.5)
try:
    redis.Redis(port=1, socket_connect_timeout=0.5).ping()
    refused = None
except redis.RedisError as exc:
    refused = type(exc).__name__
print(json.dumps({
    "light": LIGHT,
    "heavy": [m for m in sys.argv[2:] if m in sys.modules],
    "script": script(keys=["syncredis:probe"]).decode(),
    "message": message and message["data"].decode(),
    "refused": refused,
}))
"""


def probe(code: str, *args: str) -> dict[str, object]:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                            text=True, check=True, cwd=PACKAGE.parent, timeout=60)
    return dict(json.loads(result.stdout))


def test_the_client_alone_works_against_a_real_redis(redis_server: sandbox.RedisServer) -> None:
    answer = probe(PROBE, redis_server.url, *HEAVY)
    assert answer == {"light": True, "heavy": [], "script": "x", "message": "hello",
                      "refused": "ConnectionError"}, (
        "redis-py no longer imports its synchronous client alone: see collector/syncredis.py")


def test_a_name_of_the_whole_package_still_imports() -> None:
    code = ("import json; from collector.syncredis import LIGHT, redis;"
            " from redis import RedisCluster; from redis.asyncio import Redis;"
            " print(json.dumps({'light': LIGHT, 'cluster': RedisCluster.__name__,"
            " 'async': Redis.__module__, 'version': redis.__version__ > ''}))")
    assert probe(code) == {"light": True, "cluster": "RedisCluster",
                           "async": "redis.asyncio.client", "version": True}


def test_redis_already_imported_is_used_as_it_is() -> None:
    code = ("import json, redis; from collector import syncredis;"
            " print(json.dumps({'light': syncredis.LIGHT, 'same': syncredis.redis is redis}))")
    assert probe(code) == {"light": False, "same": True}


def test_every_module_imports_redis_through_syncredis() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "syncredis.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""])
            if any(name == "redis" or name.startswith("redis.") for name in names):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert offenders == [], "import redis as: from collector.syncredis import redis"
