"""Sessions shared through Redis, so any process can serve any session's stream.

Per session, two keys, both expiring ``--session-ttl`` after the last activity
(Redis does the expiry):

* ``relay:session:<uid>`` - a hash: owner, robot, state, last_seq, and the
  error (code, status, message) of a failed session;
* ``relay:session:<uid>:events`` - a Redis Stream whose entry ``N-0`` holds the
  encoded frame of event N, and whose entry ``L-1`` marks the end after event L.
  Using the sequence number as the stream id makes a resume an ``XREAD`` from
  ``<Last-Event-ID>-0``.

The process that created a session runs its upstream call and keeps its events
in memory (a normal `Session`); a `RedisWriter` copies them to Redis in one
pipeline per upstream read, off the hot path. Readers on that process read the
local session; readers on other processes get a `MirrorSession` that follows the
stream with ``XREAD BLOCK``. ``DELETE`` on any process publishes the uid on
``relay:cancel``; the owner cancels the call.

Keyed one-shot answers (``Idempotency-Key``) are sessions like these, indexed
in ``relay:idem:<index>`` (relay/idempotency.py), which expires with them. A
keyed stream that takes an answer over records its token there and publishes
``<uid> <token>`` on ``relay:takeover``, so an older stream of that answer on
another process is closed; ``<uid> abandoned`` on ``relay:cancel`` cancels an
answer whose client did not come back within ``--resume-grace``.

Failure handling: one-shot sessions never touch Redis, so they keep streaming
while Redis is down. Creating or looking up a session with Redis unreachable is
503 ``store_unavailable`` within ``STORE_TIMEOUT`` seconds. The writer and the
followers retry by themselves; after Redis comes back (possibly empty, after a
restart) the writer resynchronises from the last entry Redis still has and
rewrites what is missing from memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from relay.errors import RelayError
from relay.idempotency import Entry, KeyedAsk, RedisIndex
from relay.sessions import (
    DONE,
    FAILED,
    RUNNING,
    MemoryStore,
    Session,
    SessionLimits,
    abandoned,
    not_attached,
)

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
_BACKOFF = (0.1, 0.25, 0.5, 1.0, 2.0)
# Kept a few seconds after DELETE so followers on other processes read the end.
_DELETED_LINGER = 5

T = TypeVar("T")


def _meta_key(uid: str) -> str:
    return f"relay:session:{uid}"


def _events_key(uid: str) -> str:
    return f"relay:session:{uid}:events"


def _seq(entry_id: bytes) -> tuple[int, int]:
    ms, _, part = entry_id.partition(b"-")
    return int(ms), int(part or 0)


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
        self.redis = aioredis.from_url(
            url,
            socket_timeout=STORE_TIMEOUT,
            socket_connect_timeout=STORE_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        )
        self.index = RedisIndex(self.redis, ttl)
        # Told ``(uid, token)`` when a keyed stream on another process takes an answer over.
        self.on_takeover: Callable[[str, str], None] | None = None
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        self.pid = os.getpid()
        self._ping: asyncio.Task[bool] | None = None
        self._pinged_at = 0.0  # when the last PING's answer came (monotonic)
        self._reached = True  # what the last PING found, to log each change once

    # -- the store interface ----------------------------------------------------

    def __len__(self) -> int:
        return len(self.local)

    def __iter__(self) -> Iterator[Session]:
        return iter(self.local)

    def start(self) -> None:
        self._spawn(self._listen())

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await self.redis.aclose()

    async def reachable(self) -> bool:
        """Whether Redis answers a PING within `PING_TIMEOUT` (``GET /readyz``).

        Concurrent callers share one PING, and its answer stands for `PING_TTL` seconds.
        """
        fresh = time.monotonic() - self._pinged_at < PING_TTL
        if self._ping is None or (self._ping.done() and not fresh):
            self._ping = self._spawn(self._ping_once())
        # Shielded: a caller that goes away must not cancel the PING the others wait for.
        return await asyncio.shield(self._ping)

    async def _ping_once(self) -> bool:
        try:
            await asyncio.wait_for(self.redis.ping(), PING_TIMEOUT)
            reached = True
        except (TimeoutError, RedisError, OSError):
            reached = False
        self._pinged_at = time.monotonic()
        if reached != self._reached:
            self._reached = reached
            if reached:
                log.info("the session store answers again: ready")
            else:
                log.warning("the session store does not answer a PING: not ready")
        return reached

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
        return MirrorSession.from_meta(self, uid, meta, first)

    async def remove(self, uid: str) -> None:
        """Remove a session everywhere; the process running it cancels its upstream call."""
        session = self.local.find(uid)
        await self.local.remove(uid)
        if session is not None and not session.replayable:
            return  # one-shot: never in Redis, so its end needs no Redis either
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(_meta_key(uid), "deleted", 1)
        pipe.expire(_meta_key(uid), _DELETED_LINGER)
        pipe.expire(_events_key(uid), _DELETED_LINGER)
        pipe.publish(CANCEL_CHANNEL, uid)
        await self._call(pipe.execute())

    # -- keyed sessions (relay.idempotency, relay.resume) ----------------------------

    async def keyed(self, index: str) -> Entry | None:
        return await self._call(self.index.get(index))

    async def claim(self, ask: KeyedAsk, uid: str, reader: str, stale: str = "") -> Entry | None:
        return await self._call(self.index.claim(ask, uid, reader, stale))

    async def take_over(self, session: Session, reader: str) -> None:
        """Record ``reader`` as the keyed answer's reader and tell the other processes,
        whose older streams of it end."""
        session.reader = reader
        pipe = self.redis.pipeline(transaction=False)
        self.index.set_reader(pipe, session.keyed, reader)
        pipe.publish(TAKEOVER_CHANNEL, f"{session.uid} {reader}")
        try:
            await self._call(pipe.execute())
        except RelayError:
            log.warning("could not record a takeover in the store")

    async def is_reader(self, session: Session, reader: str) -> bool:
        try:
            return await self._call(self.index.reader(session.keyed)) == reader
        except RelayError:
            return False  # unknown: let it run rather than cancel an answer someone reads

    async def abandon(self, session: Session) -> None:
        """Cancel the answer here if it runs here, else ask the process that runs it."""
        if self.local.find(session.uid) is session:
            session.cancel(abandoned())
            return
        try:
            await self._call(self.redis.publish(CANCEL_CHANNEL, f"{session.uid} {ABANDONED}"))
        except RelayError:
            log.warning("could not cancel an abandoned answer through the store")

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
            await self._call(self.redis.hset(_meta_key(uid), "attached", 1))
        except RelayError:
            log.warning("could not record an attach in the store")

    async def _cancel_unless_attached(self, late: list[Session], grace: float) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for session in late:
            pipe.hget(_meta_key(session.uid), "attached")
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
        except (TimeoutError, RedisError, OSError):
            raise unavailable() from None

    async def _lookup(self, uid: str) -> tuple[dict[bytes, bytes], int | None]:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(_meta_key(uid))
        pipe.xrange(_events_key(uid), "-", "+", count=1)
        pipe.expire(_meta_key(uid), int(self.ttl) + 1)
        pipe.expire(_events_key(uid), int(self.ttl) + 1)
        meta, first, _, _ = await pipe.execute()
        return meta, _seq(first[0][0])[0] if first else None

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _listen(self) -> None:
        """Cancel and drop local sessions whose uid is published on the cancel channel;
        pass takeovers on to `on_takeover`."""
        attempt = 0
        while not self._closed:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(CANCEL_CHANNEL, TAKEOVER_CHANNEL)
                attempt = 0
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                    if message is not None:
                        await self._heard(message["channel"].decode(), message["data"].decode())
            except (RedisError, OSError):
                await asyncio.sleep(_BACKOFF[min(attempt, len(_BACKOFF) - 1)])
                attempt += 1
            finally:
                await pubsub.aclose()

    async def _heard(self, channel: str, data: str) -> None:
        uid, _, rest = data.partition(" ")
        if channel == TAKEOVER_CHANNEL:
            if self.on_takeover is not None:
                self.on_takeover(uid, rest)
        elif rest == ABANDONED:
            session = self.local.find(uid)
            if session is not None:
                session.cancel(abandoned())  # kept: a late repeat replays how it ended
        else:
            await self._cancel_local(uid)

    async def _cancel_local(self, uid: str) -> None:
        """A DELETE on another process: cancel the call if it runs here, and forget the
        session, so that a later GET here looks in Redis, finds it deleted, and is 404."""
        session = self.local.find(uid)
        if session is not None:
            session.cancel(RelayError(499, "cancelled", "the answer was cancelled by its owner"))
            await self.local.remove(uid)


class RedisWriter:
    """Copies one local session's events to Redis, batching what arrived since the last write."""

    def __init__(self, store: RedisStore, session: Session) -> None:
        self.store = store
        self.session = session
        self.synced = 0  # the last event Redis has
        self.end_written = False
        self._resync = False
        self._changed = asyncio.Event()

    def wake(self) -> None:
        self._changed.set()

    def write_meta(self) -> Awaitable[Any]:
        pipe = self.store.redis.pipeline(transaction=False)
        self._meta(pipe)
        return pipe.execute()

    def _meta(self, pipe: Any) -> None:
        s = self.session
        ttl = int(self.store.ttl) + 1
        meta: dict[str, Any] = {
            "owner": s.owner,
            "robot": s.robot_id,
            "state": s.state,
            "last_seq": s.last_seq,
            "pid": self.store.pid,
        }
        if s.error is not None:
            meta.update(code=s.error.code, status=s.error.status, message=s.error.message)
        if s.keyed is not None:
            meta["idem"] = s.keyed
            self.store.index.refresh(pipe, s.keyed)  # the key lives as long as its answer
        pipe.hset(_meta_key(s.uid), mapping=meta)
        pipe.expire(_meta_key(s.uid), ttl)
        pipe.expire(_events_key(s.uid), ttl)

    async def run(self) -> None:
        attempt = 0
        while True:
            await self._changed.wait()
            self._changed.clear()
            while not self._caught_up():
                try:
                    if self._resync:
                        await asyncio.wait_for(self._find_synced(), STORE_TIMEOUT)
                    await asyncio.wait_for(self._flush(), STORE_TIMEOUT)
                    attempt = 0
                except (TimeoutError, RedisError, OSError):
                    self._resync = True
                    await asyncio.sleep(_BACKOFF[min(attempt, len(_BACKOFF) - 1)])
                    attempt += 1
            if self.end_written:
                self.session.observers.remove(self.wake)  # no session <-> writer cycle left
                return

    def _caught_up(self) -> bool:
        s = self.session
        return self.synced >= s.last_seq and (s.running or self.end_written)

    async def _flush(self) -> None:
        s = self.session
        key = _events_key(s.uid)
        start = max(self.synced + 1, s.first_seq)
        frames = s.frames_after(start - 1)
        ending = not s.running
        pipe = self.store.redis.pipeline(transaction=False)
        for offset, frame in enumerate(frames):
            pipe.xadd(key, {"f": frame}, id=f"{start + offset}-0", maxlen=s.limits.max_events)
        last = start + len(frames) - 1 if frames else self.synced
        if ending:
            end: dict[str, Any] = {"end": s.state}
            if s.error is not None:
                end.update(code=s.error.code, status=s.error.status, message=s.error.message)
            pipe.xadd(key, end, id=f"{max(last, s.last_seq)}-1")
        self._meta(pipe)
        await pipe.execute()
        self.synced = max(last, self.synced)
        self.end_written = ending

    async def _find_synced(self) -> None:
        """After a Redis failure: start again from the last entry Redis still has."""
        newest = await self.store.redis.xrevrange(_events_key(self.session.uid), "+", "-", count=1)
        seq, part = _seq(newest[0][0]) if newest else (0, 0)
        self.synced = seq
        self.end_written = part == 1
        self._resync = False


class MirrorSession(Session):
    """A session run by another process, read from its Redis stream.

    Before a reader attaches it reports the remote state (for cursor checks and
    the 204 of a finished session); `subscribe` then restarts its local buffer
    at the reader's cursor and a follower task fills it from ``XREAD BLOCK``.
    """

    @classmethod
    def from_meta(
        cls, store: RedisStore, uid: str, meta: dict[bytes, bytes], first: int | None
    ) -> MirrorSession:
        mirror = cls(
            uid,
            meta.get(b"owner", b"").decode(),
            meta.get(b"robot", b"").decode(),
            replayable=True,
            limits=store.limits,
            ledger=store.ledger,
            runs_call=False,
        )
        mirror.store = store
        keyed = meta.get(b"idem")
        mirror.keyed = keyed.decode() if keyed else None
        mirror.last_seq = int(meta.get(b"last_seq", 0))
        mirror._first_seq = first if first is not None else mirror.last_seq + 1
        state = meta.get(b"state", b"running").decode()
        if state == FAILED:
            mirror.fail(_error_from(meta))
        elif state == DONE:
            mirror.state = DONE
        mirror._task = None
        return mirror

    def subscribe(self, sub: Any, after: int) -> None:
        self._keep(-self._kept_bytes)
        self._frames.clear()
        self._first_seq = after + 1
        self.last_seq = after
        self.state = RUNNING
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
        redis = self.store.redis
        key = _events_key(self.uid)
        attempt = idle = 0
        while self.running:
            try:
                reply = await redis.xread({key: f"{cursor}-0"}, count=1000, block=BLOCK_MS)
                attempt = 0
            except (RedisError, OSError):
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
                    if fields.get(b"end") == DONE.encode():
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
            meta = await self.store.redis.hgetall(_meta_key(self.uid))
        except (RedisError, OSError):
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
