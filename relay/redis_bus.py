"""Messages between the processes of one store (a `Bus`).

``DELETE`` on any process cancels the answer on the process running it; a keyed
stream that takes an answer over closes the older stream of it on another process;
``abandoned`` cancels an answer whose client did not come back within
``--resume-grace``. With one Redis or Sentinel they are published on
``relay:cancel`` and ``relay:takeover``, which every process reads (one node:
nothing to spread; `BroadcastBus`). In a cluster, classic pub/sub would copy every
message to every node, so each process reads a sharded channel of its own,
``relay:inbox:{<proc>}`` (``SSUBSCRIBE``: the node that owns its slot and that node's
replicas only; `InboxBus`), and a message is ``SPUBLISH``ed to the one process it
concerns: the session's hash names the process that runs it, and the
Idempotency-Key index the process of the answer's latest keyed reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from relay.errors import RelayError
from relay.redis_client import BACKOFF, STORE_ERRORS, STORE_TIMEOUT

if TYPE_CHECKING:
    from relay.redis_store import RedisStore

log = logging.getLogger("relay.redis")

CANCEL_CHANNEL = "relay:cancel"
TAKEOVER_CHANNEL = "relay:takeover"
ABANDONED = "abandoned"  # a cancel message's reason: no client came back (relay.resume)
# How long a message to another process is sent again while nobody hears it (its
# process's listener may be between two nodes of a failover).
MESSAGE_RETRY = 10.0


def inbox(proc: str) -> str:
    """A process's sharded channel in a cluster (its id is the hash tag)."""
    return f"relay:inbox:{{{proc}}}"


class Bus:
    """Messages between the processes of one store: ``cancel``, ``abandoned`` and
    ``takeover`` of a session, each meant for one process (``proc``)."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.redis = store.redis

    async def listen(self) -> None:
        """Pass the messages for this process to `RedisStore.heard`, reconnecting after
        failures, until the store closes."""
        attempt = 0
        while not self.store.closed:
            pubsub = None
            try:
                pubsub = await self._open()
                attempt = 0
                while True:
                    message = await self._next(pubsub)
                    if message is not None:
                        await self.store.heard(*message)
            except STORE_ERRORS:
                pass
            finally:
                # At once: a subscription nobody reads would take messages and lose them.
                if pubsub is not None:
                    await self._close(pubsub)
            self.store.troubled()
            await asyncio.sleep(BACKOFF[min(attempt, len(BACKOFF) - 1)])
            attempt += 1

    async def post(self, proc: str | None, kind: str, uid: str, arg: str = "") -> None:
        """Send a message to ``proc`` (None: unknown); if it fails or nobody hears it,
        log it and send it again in the background for up to `MESSAGE_RETRY` seconds."""
        if not self._needed(proc):
            return
        try:
            heard = await self.store.call(self._send(proc, kind, uid, arg))
        except RelayError:
            log.warning("could not send a %s message through the store (retrying)", kind)
            heard = False
        if not heard:
            self.store.spawn(self._resend(proc, kind, uid, arg))

    async def _resend(self, proc: str | None, kind: str, uid: str, arg: str) -> None:
        deadline = time.monotonic() + MESSAGE_RETRY
        for attempt in range(1 << 30):
            await asyncio.sleep(BACKOFF[min(attempt, len(BACKOFF) - 1)])
            with contextlib.suppress(RelayError):
                if await self.store.call(self._send(proc, kind, uid, arg)):
                    return
            if time.monotonic() > deadline:
                log.warning("a %s message went unheard for %g s; dropped", kind, MESSAGE_RETRY)
                return

    def _needed(self, proc: str | None) -> bool:
        raise NotImplementedError

    async def _send(self, proc: str | None, kind: str, uid: str, arg: str) -> bool:
        """Send once; whether a process heard it."""
        raise NotImplementedError

    async def _open(self) -> Any:
        """A subscription to this process's messages."""
        raise NotImplementedError

    async def _close(self, pubsub: Any) -> None:
        with contextlib.suppress(*STORE_ERRORS):
            await pubsub.aclose()

    async def _next(self, pubsub: Any) -> tuple[str, str, str] | None:
        raise NotImplementedError


class BroadcastBus(Bus):
    """One Redis (or Sentinel's master): ``relay:cancel`` and ``relay:takeover``, read by
    every process, each keeping what concerns it."""

    def _needed(self, proc: str | None) -> bool:
        return proc != self.store.proc  # unknown: someone else's, perhaps

    async def _send(self, proc: str | None, kind: str, uid: str, arg: str) -> bool:
        if kind == "takeover":
            channel, data = TAKEOVER_CHANNEL, f"{uid} {arg}"
        else:
            channel, data = CANCEL_CHANNEL, uid if kind == "cancel" else f"{uid} {ABANDONED}"
        # Every process listens, this one too: none means the message reached nobody.
        return bool(await self.redis.publish(channel, data))

    async def _open(self) -> Any:
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(CANCEL_CHANNEL, TAKEOVER_CHANNEL)
        except BaseException:
            await self._close(pubsub)
            raise
        return pubsub

    async def _next(self, pubsub: Any) -> tuple[str, str, str] | None:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
        if message is None:
            return None
        uid, _, rest = message["data"].decode().partition(" ")
        if message["channel"] == TAKEOVER_CHANNEL.encode():
            return "takeover", uid, rest
        return (ABANDONED if rest == ABANDONED else "cancel"), uid, ""


class InboxBus(Bus):
    """A cluster: each process reads its own sharded channel, ``relay:inbox:{<proc>}``,
    so a message goes to one node (and its replicas) and one process, not to all.

    The subscription is a plain connection to the node that serves the channel's slot,
    this class its only owner: when the slot moves (a failover, resharding), the node
    says so or the connection fails, or the client's slot map names another node, and the
    listener subscribes again where the slot is. (redis-py's cluster pub/sub moves
    subscriptions by itself as well, and a message its moved subscription took while the
    listener was starting again would be lost.)
    """

    def __init__(self, store: RedisStore) -> None:
        super().__init__(store)
        self.channel = inbox(store.proc)
        self._node = ""  # the node of the subscription ("host:port")
        self._client: Any = None

    def _needed(self, proc: str | None) -> bool:
        return proc is not None and proc != self.store.proc

    async def _send(self, proc: str | None, kind: str, uid: str, arg: str) -> bool:
        if proc is None:  # not reached: `_needed` said no first
            return False
        return bool(await self.redis.spublish(inbox(proc), f"{kind} {uid} {arg}"))

    async def _open(self) -> Any:
        # The slot map, to find the channel's node. Again after a failure: the map the client
        # holds may predate a failover (it refreshes it only when its own commands fail).
        await asyncio.wait_for(self.redis.initialize(), STORE_TIMEOUT)
        if self._node:
            await asyncio.wait_for(self.redis.nodes_manager.initialize(), STORE_TIMEOUT)
        node = self.redis.get_node_from_key(self.channel)
        url = self.store.url
        self._client = aioredis.Redis(
            host=node.host,
            port=node.port,
            username=url.username,
            password=url.password,
            socket_timeout=STORE_TIMEOUT,
            socket_connect_timeout=STORE_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        )
        self._node = node.name
        pubsub = self._client.pubsub()
        try:
            await pubsub.ssubscribe(self.channel)
        except BaseException:
            await self._close(pubsub)
            raise
        return pubsub

    async def _close(self, pubsub: Any) -> None:
        await super()._close(pubsub)
        if self._client is not None:
            with contextlib.suppress(*STORE_ERRORS):
                await self._client.aclose()
            self._client = None

    async def _next(self, pubsub: Any) -> tuple[str, str, str] | None:
        message = await pubsub.get_message(timeout=1)
        if message is None:
            # Nothing buffered: if the client has learnt that another node serves the
            # slot (a frozen node says nothing), go there.
            if self.redis.get_node_from_key(self.channel).name != self._node:
                raise _Unsubscribed
            return None
        if message["type"] == "sunsubscribe":
            # This process never unsubscribes: the slot moved to another node (resharding,
            # a failover), and the node that lost it says so.
            raise _Unsubscribed
        if message["type"] != "smessage":
            return None
        kind, uid, arg = message["data"].decode().split(" ", 2)
        return kind, uid, arg


class _Unsubscribed(RedisError):
    """The listener's subscription is gone; it subscribes again."""
