"""uid sessions: numbered events, subscribers, lifetime (the stores: relay/memory_store.py,
relay/redis_store.py).

A `Session` is one answer. The upstream call appends to it; subscribers (open
client streams) read from it by sequence number, so a reconnect with
``Last-Event-ID`` is just a read from an older cursor. A one-shot ``streamAsk``
is the same thing with ``replayable=False``: events are dropped once its one
reader has taken them, and the reader leaving cancels the upstream call.

Bounds: a replayable session keeps at most ``max_events`` events and
``max_bytes`` bytes, dropping the oldest (a resume from before them gets
``bad_last_event_id``, never a silent gap). When a reader lags more than
``high_water`` bytes, `Session.room` gives the upstream reader a future to
await, so a slow client slows its own upstream read instead of growing a buffer.

Across sessions, a store's `Ledger` adds up what they hold: admission slots
(`relay.admission`), running answers per client, and kept bytes, which past
their bound make the store evict its oldest finished sessions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from itertools import islice
from typing import Any, Protocol

from relay.errors import RelayError
from relay.sse import encode_event

log = logging.getLogger("relay.sessions")


class SessionState(StrEnum):
    """Where an answer is: its upstream call runs, or it ended with ``[DONE]`` or with an
    error. The values are what the Redis store writes."""

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """Per-session bounds on what is kept and on how far a reader may lag."""

    max_events: int = 20_000
    max_bytes: int = 8 << 20
    high_water: int = 256 << 10


class Ledger:
    """What the sessions of one store hold together: slots, running answers, kept bytes.

    ``slots`` is the relay's unit of capacity (``--max-streams``): a session
    counts one per reader, and one while its upstream call runs here with no
    reader (a paid call nobody reads still costs). ``answers`` counts running
    upstream calls per quota key (a user, or a client address). ``kept_bytes``
    is what the sessions keep in memory; past ``max_kept_bytes`` the store's
    ``evict`` drops the oldest of ``finished`` (replayable sessions, in the
    order they ended). Sessions keep these numbers; nothing here is per event.
    ``answer_ended`` is told of each session with a quota key that ends (the
    limits counted in Redis let its lease go: relay/shared_limits.py).
    """

    __slots__ = (
        "answer_ended",
        "answers",
        "evict",
        "finished",
        "kept_bytes",
        "max_kept_bytes",
        "slots",
    )

    def __init__(self, max_kept_bytes: int = 1 << 62) -> None:
        self.slots = 0
        self.answers: dict[str, int] = {}
        self.kept_bytes = 0
        self.max_kept_bytes = max_kept_bytes
        self.finished: dict[str, Session] = {}
        self.evict: Callable[[], None] | None = None
        self.answer_ended: Callable[[Session], None] | None = None

    def running(self, quota_key: str) -> int:
        """Running answers of ``quota_key``."""
        return self.answers.get(quota_key, 0)


class Subscriber(Protocol):
    """An open client stream; the session calls `wake` when there is news."""

    def wake(self) -> None: ...

    def drop(self) -> None:
        """Its `wake` raised: end this stream alone (the session has let go of it)."""


class Session:
    """One answer: its owner, its numbered event frames, its readers and its state.

    ``read`` and ``append`` work on encoded frames (``id: N`` + ``data:`` lines),
    so the per-event cost on the way out is a list slice and a join.
    """

    def __init__(
        self,
        uid: str,
        owner: str,
        robot_id: str,
        replayable: bool,
        limits: SessionLimits,
        ledger: Ledger | None = None,
        quota_key: str | None = None,
        runs_call: bool = True,
    ) -> None:
        """``runs_call``: this process runs the session's upstream call (not a mirror)."""
        self.uid = uid
        self.owner = owner
        self.robot_id = robot_id
        self.replayable = replayable
        self.limits = limits
        self.created = time.monotonic()
        self.last_activity = self.created
        self.state: SessionState = SessionState.RUNNING
        self.error: RelayError | None = None
        self._frames: deque[bytes] = deque()
        self._first_seq = 1  # sequence number of _frames[0]
        self.last_seq = 0
        self._kept_bytes = 0
        self.total_bytes = 0  # bytes ever appended: readers measure their lag against it
        self._error_frame = b""
        self._subscribers: dict[Subscriber, int] = {}  # subscriber -> total_bytes it has read
        self._room: asyncio.Future[None] | None = None
        self.on_cancel: Callable[[], None] | None = None
        # Told of every append and of the end, without counting as readers for
        # back-pressure (the Redis writer is one).
        self.observers: list[Callable[[], None]] = []
        self.attached = False  # whether a reader ever subscribed
        self.usage: dict[str, Any] | None = None  # the answer's usage, once the upstream sent it
        self.keyed: str | None = None  # its Idempotency-Key's index entry (relay.idempotency)
        self.reader = ""  # token of the keyed stream that read it last (relay.resume)
        self.runs_call = runs_call
        self.quota_key = quota_key
        self._ledger = ledger or Ledger()
        self._in_ledger = True  # kept bytes counted (until the store lets it go)
        self._slots = 0
        if quota_key is not None:
            self._ledger.answers[quota_key] = self._ledger.running(quota_key) + 1
        self._reweigh()

    # -- the upstream side -------------------------------------------------

    @property
    def running(self) -> bool:
        return self.state == SessionState.RUNNING

    def append(self, *texts: str) -> None:
        """Number and keep one event per text; then wake the readers, once."""
        if self.state != SessionState.RUNNING or not texts:
            return
        seq = self.last_seq
        self.push_frames([encode_event(text, id=seq + i) for i, text in enumerate(texts, 1)])

    def push_frames(self, frames: list[bytes]) -> None:
        """Keep already encoded frames as events ``last_seq + 1`` onwards; wake the readers.

        Readers are woken once per call, so what one upstream read delivered
        leaves in one write.
        """
        if not frames:
            return
        size = sum(map(len, frames))
        self.last_seq += len(frames)
        self._frames.extend(frames)
        self._keep(size)
        self.total_bytes += size
        self.last_activity = time.monotonic()
        if self.replayable:
            self._trim()
        ledger = self._ledger
        if ledger.kept_bytes > ledger.max_kept_bytes and ledger.evict is not None:
            ledger.evict()
        self._wake_all()

    def finish(self) -> None:
        """The answer is complete (``[DONE]`` was appended)."""
        if self.state == SessionState.RUNNING:
            self.state = SessionState.DONE
            self._end()

    def fail(self, error: RelayError) -> None:
        """End the session with an error; readers get ``event: error`` after the kept events."""
        if self.state == SessionState.RUNNING:
            self.state = SessionState.FAILED
            self.error = error
            self._error_frame = encode_event(error.body().decode(), event="error")
            self._end()

    def cancel(self, error: RelayError | None = None) -> None:
        """Stop the upstream call (if it still runs) and end the session."""
        if self.state != SessionState.RUNNING:
            return
        self.fail(error or RelayError(499, "cancelled", "the answer was cancelled"))
        if self.on_cancel is not None:
            self.on_cancel()

    def room(self) -> asyncio.Future[None] | None:
        """A future to await before reading more upstream, or None if readers keep up."""
        if not self._subscribers or self.lag() <= self.limits.high_water:
            return None
        if self._room is None or self._room.done():
            self._room = asyncio.get_running_loop().create_future()
        return self._room

    def lag(self) -> int:
        """Bytes appended that the slowest reader has not taken yet."""
        if not self._subscribers:
            return 0
        return self.total_bytes - min(self._subscribers.values())

    def _trim(self) -> None:
        limits = self.limits
        while self._frames and (
            len(self._frames) > limits.max_events or self._kept_bytes > limits.max_bytes
        ):
            self._keep(-len(self._frames.popleft()))
            self._first_seq += 1

    def _keep(self, size: int) -> None:
        self._kept_bytes += size
        if self._in_ledger:
            self._ledger.kept_bytes += size

    def renumber(self, after: int, last: int | None = None) -> None:
        """Drop every kept event; the next one kept is ``after + 1``, and ``last_seq`` is
        ``last`` (``after`` when None). For a session whose events are written elsewhere
        (`relay.redis_mirror.MirrorSession`): it reports the remote numbers before it holds
        any event, and restarts at a reader's cursor."""
        self._keep(-self._kept_bytes)
        self._frames.clear()
        self._first_seq = after + 1
        self.last_seq = after if last is None else last

    def release(self) -> None:
        """The store lets the session go: its kept bytes no longer count against the store."""
        if self._in_ledger:
            self._ledger.kept_bytes -= self._kept_bytes
            self._ledger.finished.pop(self.uid, None)
            self._in_ledger = False

    def _reweigh(self) -> None:
        """Bring the ledger's slot count up to date after a reader or the state changed."""
        slots = len(self._subscribers)
        if not slots and self.runs_call and self.state == SessionState.RUNNING:
            slots = 1
        self._ledger.slots += slots - self._slots
        self._slots = slots

    def reader_needs_slot(self) -> bool:
        """Whether one more reader adds a slot (the first reader of an answer running
        here takes over the slot its call holds)."""
        return bool(self._subscribers) or not (
            self.runs_call and self.state == SessionState.RUNNING
        )

    def _end(self) -> None:
        self.last_activity = time.monotonic()
        ledger = self._ledger
        if self.quota_key is not None:
            left = ledger.running(self.quota_key) - 1
            if left > 0:
                ledger.answers[self.quota_key] = left
            else:
                ledger.answers.pop(self.quota_key, None)
            if ledger.answer_ended is not None:
                ledger.answer_ended(self)
        if self.replayable and self.runs_call and self._in_ledger:
            ledger.finished[self.uid] = self
        self._reweigh()
        self._release_room()
        self._wake_all()

    def _release_room(self) -> None:
        if self._room is not None and not self._room.done():
            self._room.set_result(None)

    def _wake_all(self) -> None:
        failed: list[Subscriber] = []
        for sub in self._subscribers:
            try:
                sub.wake()
            except Exception:
                # It runs inside the upstream read: one broken reader must not end the
                # call, and with it the answer of every other reader.
                log.exception("a reader of session %s failed; it is dropped", self.uid[:8])
                failed.append(sub)
        for sub in failed:
            self.unsubscribe(sub)
            sub.drop()
        for observer in self.observers:
            observer()

    # -- the reader side ---------------------------------------------------

    def subscribe(self, sub: Subscriber, after: int) -> None:
        """Attach a reader whose cursor is ``after`` (validated with `check_cursor`)."""
        self._subscribers[sub] = self.total_bytes - self._bytes_after(after)
        self.last_activity = time.monotonic()
        self.attached = True
        self._reweigh()

    @property
    def readers(self) -> int:
        """Readers subscribed now (on this process)."""
        return len(self._subscribers)

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.pop(sub, None)
        self._reweigh()
        self._release_room()

    @property
    def first_seq(self) -> int:
        """The sequence number of the oldest kept event (``last_seq + 1`` when none)."""
        return self._first_seq

    def check_cursor(self, after: int) -> bool:
        """Whether events after ``after`` can be read with no gap: 0 <= after <= last_seq
        and nothing after it was dropped."""
        return self._first_seq - 1 <= after <= self.last_seq

    def take(self, sub: Subscriber, after: int, limit: int = 1 << 62) -> list[bytes]:
        """Take the frames numbered after ``after`` for ``sub``, as many as fit in
        ``limit`` bytes (at least one).

        Not a plain read: it moves ``sub``'s place, so the frames returned count as
        taken (a one-shot session drops them), which may release the upstream's
        back-pressure. Raises `RelayError` if frames after ``after`` were dropped.
        """
        if not self.check_cursor(after):
            raise RelayError(409, "bad_last_event_id", "events after that id are no longer kept")
        frames: list[bytes] = []
        taken = 0
        for frame in islice(self._frames, max(0, after - self._first_seq + 1), None):
            if frames and taken + len(frame) > limit:
                break
            frames.append(frame)
            taken += len(frame)
        if not self.replayable:
            # Its one reader has them now: let go at once, not at the next take, which
            # a reader whose cursor is at the end never makes (relay.eventstream). So its
            # cursor is always just before the first frame kept, and these are the first.
            for _ in frames:
                self._keep(-len(self._frames.popleft()))
            self._first_seq += len(frames)
        if taken and sub in self._subscribers:
            self._subscribers[sub] += taken
            if self._room is not None and self.lag() <= self.limits.high_water // 2:
                self._release_room()
        return frames

    def frames_after(self, after: int) -> list[bytes]:
        """The kept frames numbered after ``after`` (from the oldest kept one if it is older)."""
        start = max(0, after - self._first_seq + 1)
        return list(self._frames) if start == 0 else list(islice(self._frames, start, None))

    @property
    def error_frame(self) -> bytes:
        """The ``event: error`` frame of a failed session (b"" otherwise); it has no id."""
        return self._error_frame

    def _bytes_after(self, after: int) -> int:
        start = max(0, after - self._first_seq + 1)
        return sum(len(f) for f in islice(self._frames, start, None))
