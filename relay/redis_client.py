"""The Redis client of a ``--store`` URL, and what every call on it shares: its deadline,
the errors it may fail with, the back-off of the tasks that retry by themselves.

The clients do not retry by themselves (a cluster's MOVED and ASK redirections
excepted): every call has the `STORE_TIMEOUT` deadline, and what fails with one of
`STORE_ERRORS` is the caller's to handle (relay/redis_store.py answers 503; the writer,
the followers and the message listener retry after `BACKOFF`).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from relay.storeurl import StoreURL

STORE_TIMEOUT = 3.0  # seconds before a store operation answers 503
# GET /readyz: a PING answered within PING_TIMEOUT (well inside a probe's usual 1-3 s
# timeout); Sentinel is asked within it too.
PING_TIMEOUT = 1.0
# The delays, in seconds, between the attempts of a task that retries by itself (the last
# one repeats).
BACKOFF = (0.1, 0.25, 0.5, 1.0, 2.0)
# The connections one process may open to one node: every follower holds one while it
# waits in XREAD BLOCK, and every concurrent call one more (redis-py allows 100 by default,
# then fails at once with MaxConnectionsError).
_MAX_CONNECTIONS = 1 << 20

# What a store operation may fail with: the clients' errors (a cluster's "no node
# reachable" and "slot not covered" are not RedisErrors), a socket's, the deadline.
STORE_ERRORS = (TimeoutError, RedisError, RedisClusterException, OSError)


def connect(url: StoreURL) -> tuple[Any, Any]:
    """The client for ``url`` and, with Sentinel, the Sentinel manager (closed apart).

    No retries inside the clients: every call has the store's deadline and a failure is
    a 503 (the cluster client still follows MOVED and ASK, and refreshes its slot map
    after a node fails).
    """
    common: dict[str, Any] = {
        "socket_timeout": STORE_TIMEOUT,
        "socket_connect_timeout": STORE_TIMEOUT,
        "retry": Retry(NoBackoff(), 0),
        "max_connections": _MAX_CONNECTIONS,
    }
    if url.kind == "redis":
        return aioredis.from_url(url.url, **common), None
    auth: dict[str, Any] = {"username": url.username, "password": url.password}
    if url.kind == "sentinel":
        from redis.asyncio.sentinel import Sentinel

        sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
            list(url.nodes),
            sentinel_kwargs={
                "socket_timeout": PING_TIMEOUT,
                "socket_connect_timeout": PING_TIMEOUT,
                "password": url.sentinel_password,
                "retry": Retry(NoBackoff(), 0),
            },
        )
        return sentinel.master_for(url.service, db=url.db, **auth, **common), sentinel
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    client = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in url.nodes],
        **auth,
        **common,
    )
    return client, None
