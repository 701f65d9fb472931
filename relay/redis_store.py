"""Sessions shared through Redis, so any process can serve any session's stream.

``--store`` names one Redis (``redis://``), a master followed through Sentinel
(``redis+sentinel://``) or a Redis Cluster (``redis+cluster://``); see
relay/storeurl.py, and relay/redis_client.py for the client. All three hold the
same keys (relay/redis_keys.py).

`RedisStore` is the store API (the one `relay.memory_store.MemoryStore` has); it
hands itself to each of its parts:

* the process that created a session runs its upstream call and keeps its events
  in memory (a normal `Session`, in the store's `MemoryStore`); a `RedisWriter`
  (relay/redis_writer.py) copies them to Redis, off the hot path;
* readers on that process read the local session; readers on other processes get
  a `MirrorSession` (relay/redis_mirror.py) that follows its Redis Stream;
* a `Bus` (relay/redis_bus.py) carries the messages between processes: the
  cancel of a ``DELETE``, a keyed answer's takeover, an abandoned answer.

Failure handling: one-shot sessions never touch Redis (unless the limits are
counted there, relay/shared_limits.py), so they keep streaming while Redis is
down. Creating or looking up a session with Redis unreachable, or with the
session's slot without a master, is 503 ``store_unavailable`` within
``STORE_TIMEOUT`` seconds: the clients do not retry by themselves (a cluster's
MOVED and ASK redirections excepted), and every call has that deadline. The
writer, the followers and the message listener retry by themselves; after Redis
comes back (possibly empty, after a restart, or a promoted replica) the writer
resynchronises from the last entry Redis has and rewrites what is missing from
memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

from relay.errors import RelayError
from relay.idempotency import Entry, KeyedAsk, RedisIndex
from relay.memory_store import MemoryStore, abandoned, not_attached
from relay.redis_bus import ABANDONED, BroadcastBus, Bus, InboxBus
from relay.redis_client import PING_TIMEOUT, STORE_ERRORS, STORE_TIMEOUT, connect
from relay.redis_keys import as_text, entry_seq, events_key, meta_key
from relay.redis_mirror import MirrorSession
from relay.redis_writer import APPEND_SCRIPT, RedisWriter
from relay.sessions import Session, SessionLimits
from relay.storeurl import parse_store_url

log = logging.getLogger("relay.redis")

# GET /readyz: a PING's answer (within PING_TIMEOUT) is reused for PING_TTL, so that a
# storm of probes costs Redis one PING a second per process.
PING_TTL = 1.0
BLOCK_MS = 1000
# A cluster's slot map is asked for again after a failure, at most this often (seconds).
_REFRESH_EVERY = 0.5
# Kept a few seconds after DELETE so followers on other processes read the end.
_DELETED_LINGER = 5

T = TypeVar("T")


def unavailable() -> RelayError:
    return RelayError(503, "store_unavailable", "the session store is unreachable; retry shortly")


class RedisStore:
    """The session store on Redis, with this process's running sessions in memory."""

    def __init__(
        self,
        url: str,
        ttl: float,
        limits: SessionLimits | None = None,
        max_kept_bytes: int = 1 << 62,
    ) -> None:
        self.ttl = ttl
        self.limits = limits or SessionLimits()
        self.local = MemoryStore(ttl, self.limits, max_kept_bytes)
        self.ledger = self.local.ledger
        self.url = parse_store_url(url)
        self.redis, self._sentinel = connect(self.url)
        self.cluster = self.url.kind == "cluster"
        self.append_script = self.redis.register_script(APPEND_SCRIPT)
        self.index = RedisIndex(self.redis, ttl)
        # Told ``(uid, token)`` when a keyed stream on another process takes an answer over.
        self.on_takeover: Callable[[str, str], None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closed = False  # set by close(): the message listener stops
        self.pid = os.getpid()
        # This process, as other processes address it (pids repeat across hosts).
        self.proc = secrets.token_hex(8)
        self.bus: Bus = InboxBus(self) if self.cluster else BroadcastBus(self)
        self._refresh: asyncio.Task[None] | None = None
        self._refreshed_at = 0.0  # when the cluster's slot map was last asked for (monotonic)
        self._ping: asyncio.Task[bool] | None = None
        self._pinged_at = 0.0  # when the last PING's answer came (monotonic)
        self._reached = True  # what the last PING found, to log each change once

    # -- the store interface ----------------------------------------------------

    def __len__(self) -> int:
        return len(self.local)

    def __iter__(self) -> Iterator[Session]:
        return iter(self.local)

    def start(self) -> None:
        self.spawn(self.bus.listen())

    async def close(self) -> None:
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.redis.aclose()
        if self._sentinel is not None:
            await self._sentinel.aclose()

    async def reachable(self) -> bool:
        """Whether Redis answers a PING within `PING_TIMEOUT` (``GET /readyz``); in a
        cluster, every master must, and the cluster must serve every slot.

        Concurrent callers share one PING, and its answer stands for `PING_TTL` seconds.
        """
        fresh = time.monotonic() - self._pinged_at < PING_TTL
        if self._ping is None or (self._ping.done() and not fresh):
            self._ping = self.spawn(self._ping_once())
        # Shielded: a caller that goes away must not cancel the PING the others wait for.
        return await asyncio.shield(self._ping)

    async def _ping_once(self) -> bool:
        try:
            reached = bool(await asyncio.wait_for(self._probe(), PING_TIMEOUT))
        except STORE_ERRORS:
            reached = False
        self._pinged_at = time.monotonic()
        if reached != self._reached:
            self._reached = reached
            if reached:
                log.info("the session store answers again: ready")
            else:
                log.warning("the session store does not answer a PING: not ready")
        return reached

    async def _probe(self) -> bool:
        if not await self.redis.ping():
            return False
        if not self.cluster:
            return True
        # The client's map leaves out slots whose master failed, so every master it knows
        # may answer while part of the cluster is down: ask a node what it sees.
        info: dict[str, Any] = await self.redis.cluster_info()
        return info.get("cluster_state") == "ok"

    def prune(self) -> int:
        """Redis expires its keys itself; this only drops expired local sessions."""
        return self.local.prune()

    @property
    def evicted(self) -> int:
        return self.local.evicted

    async def create(
        self,
        owner: str,
        robot_id: str,
        replayable: bool,
        quota_key: str | None = None,
        keyed: str | None = None,
    ) -> Session:
        session = await self.local.create(owner, robot_id, replayable, quota_key, keyed)
        if not replayable:
            return session  # one-shot: memory only, so it survives Redis trouble
        writer = RedisWriter(self, session)
        try:
            await self.call(writer.write_meta())
        except RelayError:
            await self.local.remove(session.uid)
            raise
        session.observers.append(writer.wake)
        self.spawn(writer.run())
        return session

    async def get(self, uid: str) -> Session | None:
        session = await self.local.get(uid)
        if session is not None:
            return session
        meta, first = await self.call(self._lookup(uid))
        if not meta or meta.get(b"deleted"):
            return None
        return MirrorSession(self, uid, meta, first)

    async def remove(self, uid: str) -> None:
        """Remove a session everywhere; the process running it cancels its upstream call."""
        session = self.local.find(uid)
        await self.local.remove(uid)
        if session is not None and not session.replayable:
            return  # one-shot: never in Redis, so its end needs no Redis either
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(meta_key(uid), "deleted", 1)
        pipe.expire(meta_key(uid), _DELETED_LINGER)
        pipe.expire(events_key(uid), _DELETED_LINGER)
        pipe.hget(meta_key(uid), "proc")
        *_, runs_on = await self.call(pipe.execute())
        if session is None:  # it runs on another process (if it still runs)
            await self.bus.post(as_text(runs_on), "cancel", uid)

    # -- keyed sessions (relay.idempotency, relay.resume) ----------------------------

    async def keyed(self, index: str) -> Entry | None:
        return await self.call(self.index.get(index))

    async def claim(self, ask: KeyedAsk, uid: str, reader: str, stale: str = "") -> Entry | None:
        return await self.call(self.index.claim(ask, uid, reader, stale, self.proc))

    async def take_over(self, session: Session, reader: str) -> None:
        """Record ``reader`` as the keyed answer's reader and tell the process of the
        previous one, whose older stream of it ends."""
        session.reader = reader
        if session.keyed is None:  # not reached: only keyed answers have readers taken over
            return
        try:
            previous = await self.call(self.index.set_reader(session.keyed, reader, self.proc))
        except RelayError:
            log.warning("could not record a takeover in the store")
            return
        await self.bus.post(previous, "takeover", session.uid, reader)

    async def is_reader(self, session: Session, reader: str) -> bool:
        if session.keyed is None:  # not reached: only keyed answers have a recorded reader
            return False
        try:
            return await self.call(self.index.reader(session.keyed)) == reader
        except RelayError:
            return False  # unknown: let it run rather than cancel an answer someone reads

    async def abandon(self, session: Session) -> None:
        """Cancel the answer here if it runs here, else ask the process that runs it."""
        if self.local.find(session.uid) is session:
            session.cancel(abandoned())
            return
        await self.bus.post(getattr(session, "proc", None), ABANDONED, session.uid)

    def cancel_unattached(self, now: float, grace: float) -> int:
        """Cancel this process's sessions that no reader attached to within ``grace``,
        here or on another process (which records its attach in the session's hash)."""
        late = self.local.unattached(now, grace)
        if late:
            self.spawn(self._cancel_unless_attached(late, grace))
        return len(late)

    def record_attach(self, uid: str) -> None:
        """Tell the process running the answer that a reader attached here."""
        self.spawn(self._record_attach(uid))

    async def _record_attach(self, uid: str) -> None:
        try:
            await self.call(self.redis.hset(meta_key(uid), "attached", 1))
        except RelayError:
            log.warning("could not record an attach in the store")

    async def _cancel_unless_attached(self, late: list[Session], grace: float) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for session in late:
            pipe.hget(meta_key(session.uid), "attached")
        try:
            attached = await self.call(pipe.execute())
        except RelayError:
            return  # unknown: let them run rather than cancel an answer someone reads
        for session, mark in zip(late, attached, strict=True):
            if not mark:
                session.cancel(not_attached(grace))

    # -- what it and its parts share (the writers, the mirrors, the bus) ------------------

    async def call(self, aw: Awaitable[T]) -> T:
        """Run a Redis operation with a deadline; any failure is 503 store_unavailable."""
        try:
            return await asyncio.wait_for(aw, STORE_TIMEOUT)
        except STORE_ERRORS:
            self.troubled()
            raise unavailable() from None

    def troubled(self) -> None:
        """A call failed. In a cluster, ask for the slot map again, in the background, at
        most once in `_REFRESH_EVERY` seconds: redis-py's cluster pipelines do not when
        they fail (without retries), so a process that only sends pipelines would keep
        sending them to a dead master after its replica took over."""
        if not self.cluster or (self._refresh is not None and not self._refresh.done()):
            return
        if time.monotonic() - self._refreshed_at < _REFRESH_EVERY:
            return
        self._refreshed_at = time.monotonic()
        self._refresh = self.spawn(self._refresh_map())

    async def _refresh_map(self) -> None:
        with contextlib.suppress(*STORE_ERRORS):
            await asyncio.wait_for(self.redis.nodes_manager.initialize(), STORE_TIMEOUT)
            # The client asks one node (the default one, fixed when it starts) where the
            # keys of some commands are; that node may be the one that died.
            parser = self.redis.commands_parser
            await asyncio.wait_for(parser.initialize(self.redis.get_default_node()), STORE_TIMEOUT)

    def read_stream(self, key: str, cursor: int) -> Awaitable[Any]:
        """``XREAD BLOCK`` on one stream, after event ``cursor``. In a cluster it goes to the
        node of the key's slot straight away: the client would first ask a node to find the
        key in an XREAD (a round trip per read, to a node that may be gone)."""
        if not self.cluster:
            read: Awaitable[Any] = self.redis.xread(
                {key: f"{cursor}-0"}, count=1000, block=BLOCK_MS
            )
            return read
        read = self.redis.execute_command(
            "XREAD",
            *("COUNT", 1000, "BLOCK", BLOCK_MS, "STREAMS", key, f"{cursor}-0"),
            target_nodes=self.redis.get_node_from_key(key),
        )
        return read

    async def _lookup(self, uid: str) -> tuple[dict[bytes, bytes], int | None]:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(meta_key(uid))
        pipe.xrange(events_key(uid), "-", "+", count=1)
        pipe.expire(meta_key(uid), int(self.ttl) + 1)
        pipe.expire(events_key(uid), int(self.ttl) + 1)
        meta, first, _, _ = await pipe.execute()
        return meta, entry_seq(first[0][0])[0] if first else None

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` in a task of the store's, which `close` cancels."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def heard(self, kind: str, uid: str, arg: str) -> None:
        """A message from another process (`Bus`)."""
        if kind == "takeover":
            if self.on_takeover is not None:
                self.on_takeover(uid, arg)
        elif kind == ABANDONED:
            session = self.local.find(uid)
            if session is not None:
                session.cancel(abandoned())  # kept: a late repeat replays how it ended
        elif kind == "cancel":
            await self._cancel_local(uid)

    async def _cancel_local(self, uid: str) -> None:
        """A DELETE on another process: cancel the call if it runs here, and forget the
        session, so that a later GET here looks in Redis, finds it deleted, and is 404."""
        session = self.local.find(uid)
        if session is not None:
            session.cancel(RelayError(499, "cancelled", "the answer was cancelled by its owner"))
            await self.local.remove(uid)
