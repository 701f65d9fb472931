"""The one place that writes an event stream: `EventStreamHandler`.

It reads a session from a cursor and sends what is there in one write, from the
session's wake-up while its coroutine sleeps; what the socket does not take is
awaited (back-pressure). The app's watchdog tick calls `EventStreamHandler.check`
for heartbeats and the send timeout. ``streamAsk`` (relay/streamask.py) and
``GET /aianswer/stream/<uid>`` (`SessionStreamHandler`) differ only in when the
response is committed and in what a disconnect does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from tornado.iostream import StreamClosedError

from relay.chunks import token_counts
from relay.errors import RelayError
from relay.handlers import BaseHandler, ascii_decimal
from relay.sessions import Session
from relay.sse import encode_comment, encode_event, encode_retry
from relay.writer import SLICE, EventWriter

log = logging.getLogger("relay.stream")
access_log = logging.getLogger("relay.access")

RETRY_LINE = encode_retry(3000)
PING_LINE = encode_comment("ping")
TAKEN_OVER = RelayError(
    409, "taken_over", "a newer request with the same Idempotency-Key reads this answer now"
)


class EventStreamHandler(BaseHandler):
    """Writes one session's events to one client, from a cursor, until the session ends.

    ``wake()``, called by the session as events are appended, sends them at once
    while the coroutine sleeps: the first time with the headers through
    Tornado's ``flush()``, after that through the stream's `EventWriter`, with
    one ``send`` on the socket and no future, task step or Tornado write-path
    call. Reads from the session take at most `SLICE` bytes, and nothing more is
    read while the writer is blocked, so a client that does not read holds one
    slice at most; the coroutine awaits the writer's drain (back-pressure). The
    coroutine itself handles the rest: the end, errors, heartbeats and pacing.
    Tornado still owns the connection (disconnects, keep-alive, ``finish``).
    """

    def initialize(self) -> None:
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._committed = False
        self._ping_due = False
        self._pace = 0.0
        self._session: Session | None = None
        self._after = 0  # the cursor: the sequence number of the last event sent
        self._writer: EventWriter | None = None  # once the headers are out
        self._opened = time.monotonic()
        self._taken_over = False  # a newer keyed request reads the answer now
        self.end_logged = False  # the "stream end" access line replaces Tornado's

    # -- called by the session and the watchdog ------------------------------

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._can_push() and self._push():
            return  # sent in full: the coroutine sleeps on
        waiter.set_result(None)

    def check(self, now: float) -> None:
        settings = self.relay.settings
        writer = self._writer
        if writer is not None and writer.stalled(now, settings.send_timeout):
            log.info("client did not drain for %.0fs; disconnecting", settings.send_timeout)
            writer.close()
        elif self._committed and now - self._last_write() >= settings.heartbeat:
            self._ping_due = True
            self.wake()

    def drop(self) -> None:
        """`wake` raised, so the session let go of this stream: end it and close the
        connection, without `wake` (which failed) and without cancelling the answer."""
        self._closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self.connection.close()

    def on_connection_close(self) -> None:
        super().on_connection_close()  # ends Tornado's wait for a body that never came
        self._closed = True
        self.wake()
        if self._session is not None:
            self.client_gone(self._session)

    def client_gone(self, session: Session) -> None:
        """What a disconnect means for the session; one-shot streams cancel it."""

    def taken_over(self) -> None:
        """A newer request with the same Idempotency-Key reads this answer now: end this
        stream with `TAKEN_OVER` and close its connection (`relay.resume.Readers`)."""
        self._taken_over = True
        if self._writer is not None and self._writer.blocked:
            self._writer.close()  # it takes nothing: no goodbye gets through either
        else:
            self.wake()

    # -- the pump ----------------------------------------------------------

    def commit(self) -> None:
        """Start the 200 event-stream response (never compressed)."""
        self._committed = True
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        self.write(RETRY_LINE)

    async def pump(self, session: Session, after: int) -> None:
        """Relay ``session`` from cursor ``after`` until it ends or the client leaves.

        What the session has is written at once, a slice at a time. A client that
        does not read holds the pump on the writer's drain, and the session makes
        the upstream wait. Before the response is committed, a session that fails
        with nothing relayed becomes a plain HTTP error with the error's status.
        """
        relay = self.relay
        self._session = session
        if self._closed:
            self.client_gone(session)  # it left while the answer was being set up
        self._after = after
        self._pace = pace = relay.settings.pace_ms / 1000
        relay.streams.add(self)
        session.subscribe(self, after)
        started = time.monotonic()
        reason = "client_closed"
        try:
            if self._committed:
                # A stream attached before any event: the client gets its headers and
                # retry now, not with the first event or heartbeat.
                self._send([], 0)
            while not self._closed:
                if self._taken_over:
                    reason = TAKEN_OVER.code
                    self._send([encode_error(TAKEN_OVER)], 0)
                    await self._drain()
                    break
                if self._writer is not None and self._writer.blocked:
                    await self._writer.drain()
                    continue
                frames = session.take(self, self._after, SLICE)
                if frames:
                    self._after += len(frames)
                    if pace:
                        # The typewriter effect: one event per write, spaced without blocking.
                        for frame in frames:
                            self._send([frame], 1)
                            await self._drain()
                            await asyncio.sleep(pace)
                    else:
                        self._send(frames, len(frames))
                    continue
                if not session.running:
                    reason = session.error.code if session.error else "done"
                    if session.error is not None and not self._committed:
                        return self.send_relay_error(session.error)
                    self._send([session.error_frame], 0)
                    await self._drain()
                    break
                if self._ping_due:
                    self._ping_due = False
                    self._send([PING_LINE], 0)
                    continue
                self._waiter = asyncio.get_running_loop().create_future()
                await self._waiter
                self._waiter = None
        except StreamClosedError:
            pass
        except RelayError as e:  # a cursor overtaken by trimming: a gap we will not hide
            reason = e.code
            self._send([encode_error(e)], 0)
            await self._drain()
        finally:
            session.unsubscribe(self)
            relay.streams.discard(self)
            duration = time.monotonic() - started
            relay.metrics.stream_ended(reason, duration)
            self.end_logged = True
            tokens = token_counts(session.usage) or ("-", "-")
            access_log.info(
                "stream end uid=%s user=%s client=%s robot=%s status=%d events=%d duration=%.3f"
                " reason=%s prompt_tokens=%s completion_tokens=%s",
                session.uid[:8],  # the whole uid is a capability: never logged
                session.owner,
                self.request.remote_ip,
                session.robot_id,
                self.get_status(),
                self._after - after,
                duration,
                reason,
                *tokens,
            )
        if not self._closed:
            finished = self.finish()
            if self._writer is not None and (
                self.request.version != "HTTP/1.1" or self._taken_over
            ):
                # Ended by the close (see _open), or taken over: close once the last
                # bytes are out.
                with contextlib.suppress(StreamClosedError):
                    await finished
                self._writer.close()

    def _can_push(self) -> bool:
        """Whether wake() may send for the sleeping coroutine: nothing else is due."""
        writer = self._writer
        return (
            writer is not None
            and not (
                writer.blocked or self._pace or self._closed or self._ping_due or self._taken_over
            )
            and self._session is not None
            and self._session.running
        )

    def _push(self) -> bool:
        """Send what the session has now, a slice at a time; True when all of it went out."""
        session = self._session
        if session is None:  # not reached: _can_push came first
            return True
        # Compared first: a take that finds nothing still costs a call, a cursor check
        # and a slice (a lone event would pay it every time).
        while self._after < session.last_seq:
            frames = session.take(self, self._after, SLICE)
            if not frames:  # not reached while the session keeps its invariants
                break
            self._after += len(frames)
            try:
                if not self._send(frames, len(frames)):
                    return False
            except StreamClosedError:
                return False
        return True

    def _send(self, frames: list[bytes], events: int) -> bool:
        """Send ``frames`` now; True when all of it went out, else the writer is blocked.

        The first send carries the headers (committing if needed) through
        Tornado's ``flush()`` and creates the `EventWriter`; later ones are one
        body chunk each.
        """
        size = sum(map(len, frames))
        metrics = self.relay.metrics
        metrics.events += events
        metrics.bytes_out += size
        if self._writer is None:
            return self._open(frames)
        return self._writer.send(frames, size)

    def _open(self, frames: list[bytes]) -> bool:
        if not self._committed:
            self.commit()
        for frame in frames:
            self.write(frame)
        # Tornado chunks an HTTP/1.1 response that has no Content-Length; an HTTP/1.0
        # one is delimited by the close.
        chunked = self.request.version == "HTTP/1.1"
        if not chunked:
            # So the connection cannot be kept alive; but Tornado answers a 1.0
            # "Connection: keep-alive" with "Keep-Alive" (it reads the request's header
            # object as it writes ours) and keeps the connection open. Drop that header,
            # say close, and close when the stream ends (pump).
            self.request.headers.pop("Connection", None)
            self.set_header("Connection", "close")
        self._writer = EventWriter(self.connection, chunked, self.flush())
        return not self._writer.blocked

    def resume_cursor(self, session: Session, raw: str | None) -> int | None:
        """The cursor a ``Last-Event-ID`` of ``raw`` names; None once ``event: error``
        ``bad_last_event_id`` is sent for one that names no kept event."""
        after = _cursor(raw, session)
        if after is None or not session.check_cursor(after):
            self.commit()
            error = RelayError(400, "bad_last_event_id", "Last-Event-ID names no kept event")
            self.write(encode_error(error))
            return None
        return after

    async def _drain(self) -> None:
        if self._writer is not None:
            await self._writer.drain()

    def _last_write(self) -> float:
        return self._opened if self._writer is None else self._writer.last_write


class SessionStreamHandler(EventStreamHandler):
    """``GET /aianswer/stream/<uid>``: EventSource attach and resume with Last-Event-ID.

    The uid is the capability (EventSource cannot send headers); a request that
    does carry a token gets 404 unless it is the owner's.
    """

    async def get(self, uid: str) -> None:
        relay = self.relay
        try:
            session = await relay.store.get(uid)
            if session is None or not session.replayable or not self._may_read(session):
                raise RelayError(404, "not_found", "no such session")
            relay.admission.reader(session)
        except RelayError as e:
            return self.send_relay_error(e, retry_after=e.retry_seconds())
        raw = self.request.headers.get("Last-Event-ID")
        if raw is None:
            raw = self.get_query_argument("lastEventId", None)
        after = self.resume_cursor(session, raw)
        if after is None:
            return
        if raw and not session.running and after == session.last_seq:
            self.set_status(204)  # tells EventSource to stop reconnecting
            return
        self.commit()
        await self.pump(session, after)

    def _may_read(self, session: Session) -> bool:
        if "Authorization" not in self.request.headers:
            return True
        return self.presented_user() == session.owner


def encode_error(error: RelayError) -> bytes:
    return encode_event(error.body().decode(), event="error")


def _cursor(raw: str | None, session: Session) -> int | None:
    """The event to read after; with no Last-Event-ID (a first attach), just before
    the oldest one kept, which is not event 1 once a long session has dropped some."""
    if not raw:
        return session.first_seq - 1
    return ascii_decimal(raw.strip())
