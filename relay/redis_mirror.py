"""Reading a session another process runs, from Redis (a `MirrorSession`).

Readers on the process that runs a session read its local `Session`; readers on
other processes get a `MirrorSession`, which follows the session's stream with
``XREAD BLOCK`` (relay/redis_keys.py says how the stream is laid out) and
retries by itself while Redis does not answer.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from relay.errors import RelayError
from relay.redis_client import BACKOFF, STORE_ERRORS
from relay.redis_keys import as_text, entry_seq, events_key, meta_key
from relay.sessions import Session, SessionState

if TYPE_CHECKING:
    from relay.redis_store import RedisStore


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
        self.proc = as_text(meta.get(b"proc"))  # the process that runs the answer
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
        self._task = self.store.spawn(self._follow(after))
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
                await asyncio.sleep(BACKOFF[min(attempt, len(BACKOFF) - 1)])
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
                seq, part = entry_seq(entry_id)
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
