"""Sessions shared through Redis, so any process can serve any session's stream.

``--store`` names one Redis (``redis://``), a master followed through Sentinel
(``redis+sentinel://``) or a Redis Cluster (``redis+cluster://``); see
relay/storeurl.py. All three hold the same keys.

Per session, two keys, both expiring ``--session-ttl`` after the last activity
(Redis does the expiry). Both carry the uid as their hash tag, so a cluster
keeps them in one slot and every multi-key operation on a session (the
pipelines, the append script) stays on one node:

* ``relay:{<uid>}:meta`` - a hash: owner, robot, state, last_seq, the process
  that runs the answer (``proc``), and the error (code, status, message) of a
  failed session;
* ``relay:{<uid>}:events`` - a Redis Stream whose entry ``N-0`` holds the
  encoded frame of event N, and whose entry ``L-1`` marks the end after event L.
  Using the sequence number as the stream id makes a resume an ``XREAD`` from
  ``<Last-Event-ID>-0``. It keeps what the session keeps in memory (20,000
  events / 8 MiB): the append trims it to the oldest event kept in memory.

The process that created a session runs its upstream call and keeps its events
in memory (a normal `Session`); a `RedisWriter` copies them to Redis with one
script call per upstream read, off the hot path. The script appends only if the
stream still ends where the writer left it: after a failover to a replica that
had not received the last entries, the writer hears where it ends now and
rewrites the rest from memory, so readers see no gap and no duplicate. Readers
on that process read the local session; readers on other processes get a
`MirrorSession` that follows the stream with ``XREAD BLOCK``.

Messages between processes (a `Bus`): ``DELETE`` on any process cancels the
answer on the process running it; a keyed stream that takes an answer over
closes the older stream of it on another process; ``abandoned`` cancels an answer
whose client did not come back within ``--resume-grace``. With one Redis or
Sentinel they are published on ``relay:cancel`` and ``relay:takeover``, which
every process reads (one node: nothing to spread). In a cluster, classic pub/sub
would copy every message to every node, so each process reads a sharded channel
of its own, ``relay:inbox:{<proc>}`` (``SSUBSCRIBE``: the node that owns its slot
and that node's replicas only), and a message is ``SPUBLISH``ed to the one
process it concerns: the session's hash names the process that runs it, and the
Idempotency-Key index the process of the answer's latest keyed reader.

Keyed one-shot answers (``Idempotency-Key``) are sessions like these, indexed
in ``relay:idem:<index>`` (relay/idempotency.py), which expires with them; its
scripts touch that one key only, so it may live in any slot.

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

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from relay.errors import RelayError
from relay.idempotency import Entry, KeyedAsk, RedisIndex, redis_key
from relay.memory_store import MemoryStore, abandoned, not_attached
from relay.sessions import Session, SessionLimits, SessionState
from relay.storeurl import StoreURL, parse_store_url

log = logging.getLogger("relay.redis")

CANCEL_CHANNEL = "relay:cancel"
TAKEOVER_CHANNEL = "relay:takeover"
ABANDONED = "abandoned"  # a cancel message's reason: no client came back (relay.resume)
STORE_TIMEOUT = 3.0  # seconds before a store operation answers 503
# GET /readyz: a PING answered within PING_TIMEOUT (well inside a probe's usual 1-3 s
# timeout), and its answer reused for PING_TTL, so that a storm of probes costs Redis one
# PING a second per process.
PING_TIMEOUT = 1.0
PING_TTL = 1.0
BLOCK_MS = 1000
# A cluster's slot map is asked for again after a failure, at most this often (seconds).
_REFRESH_EVERY = 0.5
# How long a message to another process is sent again while nobody hears it (its
# process's listener may be between two nodes of a failover).
MESSAGE_RETRY = 10.0
_BACKOFF = (0.1, 0.25, 0.5, 1.0, 2.0)
# Kept a few seconds after DELETE so followers on other processes read the end.
_DELETED_LINGER = 5
# The connections one process may open to one node: every follower holds one while it
# waits in XREAD BLOCK, and every concurrent call one more (redis-py allows 100 by default,
# then fails at once with MaxConnectionsError).
_MAX_CONNECTIONS = 1 << 20

T = TypeVar("T")

# What a store operation may fail with: the clients' errors (a cluster's "no node
# reachable" and "slot not covered" are not RedisErrors), a socket's, the deadline.
STORE_ERRORS = (TimeoutError, RedisError, RedisClusterException, OSError)


def meta_key(uid: str) -> str:
    return f"relay:{{{uid}}}:meta"


def events_key(uid: str) -> str:
    return f"relay:{{{uid}}}:events"


def inbox(proc: str) -> str:
    """A process's sharded channel in a cluster (its id is the hash tag)."""
    return f"relay:inbox:{{{proc}}}"


def _seq(entry_id: bytes) -> tuple[int, int]:
    ms, _, part = entry_id.partition(b"-")
    return int(ms or 0), int(part or 0)


def unavailable() -> RelayError:
    return RelayError(503, "store_unavailable", "the session store is unreachable; retry shortly")


# The writer's append, atomic on one session's slot. KEYS: events, meta. ARGV: the id the
# stream should end with ('' = no entry yet), ttl, the oldest event kept in memory, the
# first frame's event number, the frame count n, the end entry's id ('' = not the end),
# its field count e; then the n frames, the e end fields, and the meta fields.
# Answers nil, or, when the stream does not end where the writer left it (a failover to a
# replica that missed the last writes, a restart, a timed-out call that did run), the id
# it ends with: the writer starts again from there.
_APPEND = """
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
local last = top and top[1] or ''
if last ~= ARGV[1] then return last end
local n, e, seq = tonumber(ARGV[5]), tonumber(ARGV[7]), tonumber(ARGV[4])
for i = 1, n do
  redis.call('XADD', KEYS[1], string.format('%d-0', seq + i - 1), 'f', ARGV[7 + i])
end
if ARGV[6] ~= '' then
  redis.call('XADD', KEYS[1], ARGV[6], unpack(ARGV, 8 + n, 7 + n + e))
end
if tonumber(ARGV[3]) > 1 then
  redis.call('XTRIM', KEYS[1], 'MINID', ARGV[3])
end
redis.call('HSET', KEYS[2], unpack(ARGV, 8 + n + e, #ARGV))
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return false
"""


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
        self._append = self.redis.register_script(_APPEND)
        self.index = RedisIndex(self.redis, ttl)
        # Told ``(uid, token)`` when a keyed stream on another process takes an answer over.
        self.on_takeover: Callable[[str, str], None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
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
        self._spawn(self.bus.listen())

    async def close(self) -> None:
        self._closed = True
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
            self._ping = self._spawn(self._ping_once())
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
            await self._call(writer.write_meta())
        except RelayError:
            await self.local.remove(session.uid)
            raise
        session.observers.append(writer.wake)
        self._spawn(writer.run())
        return session

    async def get(self, uid: str) -> Session | None:
        session = await self.local.get(uid)
        if session is not None:
            return session
        meta, first = await self._call(self._lookup(uid))
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
        *_, runs_on = await self._call(pipe.execute())
        if session is None:  # it runs on another process (if it still runs)
            await self.bus.post(_text(runs_on), "cancel", uid)

    # -- keyed sessions (relay.idempotency, relay.resume) ----------------------------

    async def keyed(self, index: str) -> Entry | None:
        return await self._call(self.index.get(index))

    async def claim(self, ask: KeyedAsk, uid: str, reader: str, stale: str = "") -> Entry | None:
        return await self._call(self.index.claim(ask, uid, reader, stale, self.proc))

    async def take_over(self, session: Session, reader: str) -> None:
        """Record ``reader`` as the keyed answer's reader and tell the process of the
        previous one, whose older stream of it ends."""
        session.reader = reader
        if session.keyed is None:  # not reached: only keyed answers have readers taken over
            return
        try:
            previous = await self._call(self.index.set_reader(session.keyed, reader, self.proc))
        except RelayError:
            log.warning("could not record a takeover in the store")
            return
        await self.bus.post(previous, "takeover", session.uid, reader)

    async def is_reader(self, session: Session, reader: str) -> bool:
        if session.keyed is None:  # not reached: only keyed answers have a recorded reader
            return False
        try:
            return await self._call(self.index.reader(session.keyed)) == reader
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
            self._spawn(self._cancel_unless_attached(late, grace))
        return len(late)

    def record_attach(self, uid: str) -> None:
        """Tell the process running the answer that a reader attached here."""
        self._spawn(self._record_attach(uid))

    async def _record_attach(self, uid: str) -> None:
        try:
            await self._call(self.redis.hset(meta_key(uid), "attached", 1))
        except RelayError:
            log.warning("could not record an attach in the store")

    async def _cancel_unless_attached(self, late: list[Session], grace: float) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for session in late:
            pipe.hget(meta_key(session.uid), "attached")
        try:
            attached = await self._call(pipe.execute())
        except RelayError:
            return  # unknown: let them run rather than cancel an answer someone reads
        for session, mark in zip(late, attached, strict=True):
            if not mark:
                session.cancel(not_attached(grace))

    # -- helpers --------------------------------------------------------------------------

    async def _call(self, aw: Awaitable[T]) -> T:
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
        self._refresh = self._spawn(self._refresh_map())

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
        return meta, _seq(first[0][0])[0] if first else None

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
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


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


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
        while not self.store._closed:
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
            await asyncio.sleep(_BACKOFF[min(attempt, len(_BACKOFF) - 1)])
            attempt += 1

    async def post(self, proc: str | None, kind: str, uid: str, arg: str = "") -> None:
        """Send a message to ``proc`` (None: unknown); if it fails or nobody hears it,
        log it and send it again in the background for up to `MESSAGE_RETRY` seconds."""
        if not self._needed(proc):
            return
        try:
            heard = await self.store._call(self._send(proc, kind, uid, arg))
        except RelayError:
            log.warning("could not send a %s message through the store (retrying)", kind)
            heard = False
        if not heard:
            self.store._spawn(self._resend(proc, kind, uid, arg))

    async def _resend(self, proc: str | None, kind: str, uid: str, arg: str) -> None:
        deadline = time.monotonic() + MESSAGE_RETRY
        for attempt in range(1 << 30):
            await asyncio.sleep(_BACKOFF[min(attempt, len(_BACKOFF) - 1)])
            with contextlib.suppress(RelayError):
                if await self.store._call(self._send(proc, kind, uid, arg)):
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


class RedisWriter:
    """Copies one local session's events to Redis, batching what arrived since the last write."""

    def __init__(self, store: RedisStore, session: Session) -> None:
        self.store = store
        self.session = session
        self.synced = 0  # the last event Redis has
        self.end_written = False
        self._changed = asyncio.Event()
        self._index_renewed = 0.0  # when the Idempotency-Key entry's lifetime was (monotonic)

    def wake(self) -> None:
        self._changed.set()

    def write_meta(self) -> Awaitable[Any]:
        pipe = self.store.redis.pipeline(transaction=False)
        pipe.hset(meta_key(self.session.uid), mapping=self._meta())
        ttl = int(self.store.ttl) + 1
        pipe.expire(meta_key(self.session.uid), ttl)
        pipe.expire(events_key(self.session.uid), ttl)
        if self.session.keyed is not None:
            self._index_renewed = time.monotonic()
            self.store.index.refresh(pipe, self.session.keyed)
        written: Awaitable[Any] = pipe.execute()
        return written

    def _meta(self) -> dict[str, Any]:
        s = self.session
        meta: dict[str, Any] = {
            "owner": s.owner,
            "robot": s.robot_id,
            "state": s.state,
            "last_seq": s.last_seq,
            "pid": self.store.pid,
            "proc": self.store.proc,
        }
        if s.error is not None:
            meta.update(code=s.error.code, status=s.error.status, message=s.error.message)
        if s.keyed is not None:
            meta["idem"] = s.keyed
        return meta

    async def run(self) -> None:
        attempt = 0
        while True:
            await self._changed.wait()
            self._changed.clear()
            while not self._caught_up():
                try:
                    await asyncio.wait_for(self._flush(), STORE_TIMEOUT)
                    attempt = 0
                except STORE_ERRORS:
                    self.store.troubled()
                    await asyncio.sleep(_BACKOFF[min(attempt, len(_BACKOFF) - 1)])
                    attempt += 1
            if self.end_written:
                self.session.observers.remove(self.wake)  # no session <-> writer cycle left
                return

    def _caught_up(self) -> bool:
        s = self.session
        return self.synced >= s.last_seq and (s.running or self.end_written)

    def _top(self) -> str:
        """The id Redis's stream ends with, as far as this writer knows."""
        if self.end_written:
            return f"{self.synced}-1"
        return f"{self.synced}-0" if self.synced else ""

    async def _flush(self) -> None:
        s = self.session
        start = max(self.synced + 1, s.first_seq)
        frames = s.frames_after(start - 1)
        upto = s.last_seq
        ending = not s.running
        end: list[Any] = []
        if ending:
            end = ["end", s.state]
            if s.error is not None:
                end += ["code", s.error.code, "status", s.error.status]
                end += ["message", s.error.message]
        meta = [item for pair in self._meta().items() for item in pair]
        args = [self._top(), int(self.store.ttl) + 1, s.first_seq, start, len(frames)]
        args += [f"{upto}-1" if ending else "", len(end), *frames, *end, *meta]
        pending = [self.store._append(keys=[events_key(s.uid), meta_key(s.uid)], args=args)]
        keyed = s.keyed
        renew = keyed is not None and (
            ending or time.monotonic() - self._index_renewed > self.store.ttl / 4
        )
        if renew and keyed is not None:
            # The entry is in another slot: renewed beside the append, not in it, and
            # not on every append (it need only outlive the session).
            pending.append(self.store.redis.expire(redis_key(keyed), self.store.index.ttl))
        found, *_ = await asyncio.gather(*pending)
        if renew:
            self._index_renewed = time.monotonic()
        if found is not None:
            # Redis's stream does not end where this writer left it: go on from its end.
            self.synced, part = _seq(found)
            self.end_written = part == 1
            return
        self.synced = upto
        self.end_written = ending


class MirrorSession(Session):
    """A session run by another process, read from its Redis stream.

    Before a reader attaches it reports the remote state (for cursor checks and
    the 204 of a finished session); `subscribe` then restarts its local buffer
    at the reader's cursor and a follower task fills it from ``XREAD BLOCK``.
    """

    def __init__(
        self, store: RedisStore, uid: str, meta: dict[bytes, bytes], first: int | None
    ) -> None:
        """The session ``uid`` as its Redis hash ``meta`` describes it; ``first`` is the
        oldest event its stream keeps (None: it keeps none)."""
        super().__init__(
            uid,
            meta.get(b"owner", b"").decode(),
            meta.get(b"robot", b"").decode(),
            replayable=True,
            limits=store.limits,
            ledger=store.ledger,
            runs_call=False,
        )
        self.store = store
        self.proc = _text(meta.get(b"proc"))  # the process that runs the answer
        keyed = meta.get(b"idem")
        self.keyed = keyed.decode() if keyed else None
        last = int(meta.get(b"last_seq", 0))
        self.renumber(first - 1 if first is not None else last, last)
        self._task: asyncio.Task[None] | None = None
        state = meta.get(b"state", b"running").decode()
        if state == SessionState.FAILED:
            self.fail(_error_from(meta))
        elif state == SessionState.DONE:
            self.state = SessionState.DONE

    def subscribe(self, sub: Any, after: int) -> None:
        self.renumber(after)
        self.state = SessionState.RUNNING
        self.error = None
        super().subscribe(sub, after)
        self._task = self.store._spawn(self._follow(after))
        self.store.record_attach(self.uid)

    def unsubscribe(self, sub: Any) -> None:
        super().unsubscribe(sub)
        self.release()  # a mirror serves one reader
        if self._task is not None:
            self._task.cancel()

    def cancel(self, error: RelayError | None = None) -> None:
        # The upstream call runs elsewhere: RedisStore.remove publishes the cancel.
        self.fail(error or RelayError(499, "cancelled", "the answer was cancelled"))

    async def _follow(self, cursor: int) -> None:
        key = events_key(self.uid)
        attempt = idle = 0
        while self.running:
            try:
                reply = await self.store.read_stream(key, cursor)
                attempt = 0
            except STORE_ERRORS:
                self.store.troubled()
                await asyncio.sleep(_BACKOFF[min(attempt, len(_BACKOFF) - 1)])
                attempt += 1
                continue
            if not reply:
                idle += 1
                if idle % 5 == 0 and not await self._still_there():
                    self.fail(RelayError(410, "expired", "the session expired"))
                continue
            idle = 0
            frames: list[bytes] = []
            for entry_id, fields in reply[0][1]:
                seq, part = _seq(entry_id)
                if part == 1:
                    self.push_frames(frames)
                    if fields.get(b"end") == SessionState.DONE.encode():
                        self.finish()
                    else:
                        self.fail(_error_from(fields))
                    return
                if seq != cursor + 1:
                    self.push_frames(frames)
                    self.fail(RelayError(409, "bad_last_event_id", "events were lost in the store"))
                    return
                frames.append(fields[b"f"])
                cursor = seq
            self.push_frames(frames)

    async def _still_there(self) -> bool:
        try:
            meta = await self.store.redis.hgetall(meta_key(self.uid))
        except STORE_ERRORS:
            return True  # unknown: keep following and retrying
        return bool(meta) and not meta.get(b"deleted")


def _error_from(meta: dict[bytes, bytes]) -> RelayError:
    """The error of a failed session, from its hash or its end entry."""
    if meta.get(b"deleted"):
        return RelayError(499, "cancelled", "the answer was cancelled by its owner")
    return RelayError(
        int(meta.get(b"status", 502)),
        meta.get(b"code", b"upstream_error").decode(),
        meta.get(b"message", b"the answer failed").decode(),
    )
