"""HTTP handlers: JSON endpoints, and the event-stream writer shared by both stream routes.

`EventStreamHandler` is the one place that writes an event stream: it reads a
session from a cursor and sends what is there in one write, from the session's
wake-up while its coroutine sleeps; what the socket does not take is awaited
(back-pressure). The app's watchdog tick calls `EventStreamHandler.check` for heartbeats
and the send timeout. ``streamAsk`` (relay/streamask.py) and
``GET /aianswer/stream/<uid>`` differ only in when the response is committed and
in what a disconnect does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from tornado.iostream import IOStream, SSLIOStream, StreamClosedError
from tornado.web import HTTPError, RequestHandler, StaticFileHandler, stream_request_body

from relay.admission import Refused
from relay.ask import MAX_BODY, parse_ask
from relay.chunks import token_counts
from relay.config import Robot
from relay.errors import RelayError
from relay.idempotency import KEY_HEADER, SESSION_HEADER
from relay.resources import STATIC_DIR
from relay.sessions import Session
from relay.sse import encode_comment, encode_event, encode_retry
from relay.upstream import build_payload
from relay.writer import SLICE, EventWriter

if TYPE_CHECKING:
    from relay.app import Relay

log = logging.getLogger("relay.stream")
access_log = logging.getLogger("relay.access")

RETRY_LINE = encode_retry(3000)
PING_LINE = encode_comment("ping")
ANONYMOUS = "anonymous"
TAKEN_OVER = RelayError(
    409, "taken_over", "a newer request with the same Idempotency-Key reads this answer now"
)
# On every response: no MIME sniffing (a JSON body is never taken for a script or a page)
# and no Referer sent on from the page.
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
# The page runs only its own script and style files (nothing inline), in no frame; its icon
# is a data: URL.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


class BaseHandler(RequestHandler):
    """JSON errors, auth, and access to the shared `Relay`."""

    @property
    def relay(self) -> Relay:
        return self.application.settings["relay"]

    def set_default_headers(self) -> None:
        set_security_headers(self)
        origin = self.request.headers.get("Origin")
        if origin and self._origin_allowed(origin):
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Access-Control-Expose-Headers", f"Retry-After, {SESSION_HEADER}")
            self.add_header("Vary", "Origin")

    def _origin_allowed(self, origin: str) -> bool:
        allowed = self.relay.settings.cors_origins
        return origin in allowed or "*" in allowed

    def options(self, *args: str) -> None:
        """CORS preflight: answered for allowed origins only (others get no CORS headers)."""
        if self._origin_allowed(self.request.headers.get("Origin", "")):
            self.set_header("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS")
            self.set_header(
                "Access-Control-Allow-Headers",
                f"Authorization, Content-Type, Last-Event-ID, {KEY_HEADER}",
            )
            self.set_header("Access-Control-Max-Age", "600")
        self.set_status(204)

    def send_relay_error(self, error: RelayError, retry_after: int | None = None) -> None:
        self.clear()
        self.set_status(error.status if error.status < 600 else 500)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        if retry_after is not None:
            self.set_header("Retry-After", str(retry_after))
        self.finish(error.body())

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, HTTPError) and exc.log_message and status_code < 500:
            message = exc.log_message
        else:
            message = self._reason
        code = {404: "not_found", 405: "method_not_allowed"}.get(status_code, "error")
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(RelayError(status_code, code, message).body())

    def user_id(self, required: bool = True) -> str | None:
        """The caller's user id from ``Authorization: Bearer``.

        With no ``--auth-tokens`` everyone is ``anonymous``. Tokens are compared
        in constant time, against every configured token.
        """
        tokens = self.relay.settings.auth_tokens
        if not tokens:
            return ANONYMOUS
        header = self.request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        found = None
        if scheme.lower() == "bearer" and presented:
            given = presented.strip().encode()
            for token, user in tokens.items():
                if hmac.compare_digest(given, token.encode()):
                    found = user
        if found is None and required:
            raise RelayError(401, "unauthorized", "token missing or wrong")
        return found


class IndexHandler(BaseHandler):
    """``GET /``: the chat page."""

    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("Content-Security-Policy", PAGE_CSP)
        with open(STATIC_DIR / "index.html", "rb") as f:
            self.write(f.read())

    head = get  # the same status and headers; Tornado sends no body for HEAD


class StaticHandler(StaticFileHandler):
    """The page's JS and CSS: revalidated on every load, so a deploy is seen at once."""

    def set_default_headers(self) -> None:
        set_security_headers(self)

    def set_extra_headers(self, path: str) -> None:
        self.set_header("Cache-Control", "no-cache")


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        # Not an HTTPError: Tornado would log it with the whole URI, which may hold a uid.
        self.send_relay_error(RelayError(404, "not_found", "no such path"))


class RobotsHandler(BaseHandler):
    def get(self) -> None:
        try:
            self.user_id()
        except RelayError as e:
            return self.send_relay_error(e)
        robots = [{"robotId": r.robot_id, "robotName": r.name} for r in self.relay.settings.robots]
        self.write({"robots": robots})


class HealthHandler(BaseHandler):
    """``GET /healthz``: alive (a liveness probe). Still 200 while draining after SIGTERM,
    so that nothing kills the process before its streams have finished."""

    def get(self) -> None:
        self.write(
            {
                "status": "ok",
                "pid": os.getpid(),
                "streams": len(self.relay.streams),
                "sessions": len(self.relay.store),
                "draining": self.relay.draining,
            }
        )


class ReadyHandler(BaseHandler):
    """``GET /readyz``: whether to send this process new requests (a readiness probe):
    503 ``draining`` after SIGTERM, 503 ``store_unavailable`` while Redis does not answer."""

    async def get(self) -> None:
        error = await self.relay.not_ready()
        if error is not None:
            return self.send_relay_error(error)
        self.write({"status": "ready"})


class MetricsHandler(BaseHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.write(self.relay.metrics.render())


@stream_request_body
class AskMixin(BaseHandler):
    """Reads and validates the POST body of ``streamAsk`` and ``sessions``.

    The body is streamed in so that a POST may raise the server-wide body bound
    (`relay.connections.SMALL_BODY`) to its own, and one over it is refused with
    413 from its Content-Length, before it is read. Tornado refuses a chunked
    one as soon as its chunk sizes pass the bound (a bare 400 and a close).
    """

    def prepare(self) -> None:
        self._body = bytearray()
        if self.request.method != "POST":
            return
        length = self.request.headers.get("Content-Length")
        size = 0 if length is None else _decimal(length)
        if size is None:
            self.send_relay_error(RelayError(400, "bad_request", "bad Content-Length"))
        elif size > MAX_BODY:
            # Over the connection's bound, Tornado would add a bare 400 of its own
            # after this 413; at the declared length it drops what arrives instead,
            # until the close that follows a response sent before the body.
            self.request.connection.set_max_body_size(size)
            self.send_relay_error(_too_large())
        else:
            self.request.connection.set_max_body_size(MAX_BODY)

    def data_received(self, chunk: bytes) -> None:
        self._body += chunk

    def read_ask(self) -> tuple[Robot, bytes]:
        """The validated question's robot and upstream request body; raises `RelayError`."""
        ask = parse_ask(bytes(self._body))
        robot = self.relay.settings.robot(ask.robot_id)
        if robot is None:
            raise RelayError(400, "unknown_robot", "robotId names no configured robot")
        usage = self.relay.upstream.asks_usage(robot)
        return robot, build_payload(robot, self.relay.settings.model, ask, usage)

    async def start_answer(self, replayable: bool) -> Session | None:
        """Validate, admit, create and start an answer: its session, with the upstream
        request sent. None when there is none: the error was sent, or the client is gone.

        Nothing is created before every check has passed, and once a session
        exists its upstream call owns its end.
        """
        relay = self.relay
        try:
            user = self.user_id()
            robot, payload = self.read_ask()
            if peer_closed(self.request.connection.stream):
                # A pipelined request of a client that already left: no paid call for nobody.
                return None
            session = await self.new_session(user, robot, replayable)
        except RelayError as e:
            self.send_relay_error(e, retry_after=retry_after(e))
            return None
        relay.upstream.start(session, payload)
        return session

    async def new_session(
        self, user: str, robot: Robot, replayable: bool, keyed: str | None = None
    ) -> Session:
        """Admit a new answer and create its session (its call not started yet)."""
        admission = self.relay.admission
        quota = await admission.answer(user, self.address)
        try:
            session = await self.relay.store.create(
                user, robot.robot_id, replayable, quota and quota.key, keyed
            )
        except BaseException:
            admission.release(quota)
            raise
        admission.bind(session, quota)
        return session

    @property
    def address(self) -> str:
        """The client's address, as the rate limit and the per-address cap count it."""
        return self.request.remote_ip or "?"


class EventStreamHandler(AskMixin):
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
        # Tornado turns Nagle's algorithm off only when a response ends; an event
        # must not wait for the next one (measured: lag p99 20 ms -> 1.5 ms).
        self.request.connection.stream.set_nodelay(True)
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
                frames = session.read(self, self._after, SLICE)
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
            and self._session.running
        )

    def _push(self) -> bool:
        """Send what the session has now, a slice at a time; True when all of it went out."""
        session = self._session
        while frames := session.read(self, self._after, SLICE):
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
        stream = self.request.connection.stream
        self._writer = EventWriter(stream, chunked, self.flush())
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


def set_security_headers(handler: RequestHandler) -> None:
    for name, value in SECURITY_HEADERS.items():
        handler.set_header(name, value)


def encode_error(error: RelayError) -> bytes:
    return encode_event(error.body().decode(), event="error")


class SessionsHandler(AskMixin):
    """``POST /aianswer/sessions``: start an answer, return its uid and stream URL."""

    async def post(self) -> None:
        session = await self.start_answer(replayable=True)
        if session is None:
            return
        self.set_status(201)
        self.write({"uid": session.uid, "streamUrl": f"/aianswer/stream/{session.uid}"})


class SessionHandler(BaseHandler):
    """``DELETE /aianswer/sessions/<uid>``: cancel the answer; open streams of it end."""

    async def delete(self, uid: str) -> None:
        try:
            user = self.user_id()
            session = await self.relay.store.get(uid)
            if session is None or session.owner != user:
                raise RelayError(404, "not_found", "no such session")
            session.cancel(RelayError(499, "cancelled", "the answer was cancelled by its owner"))
            await self.relay.store.remove(uid)
        except RelayError as e:
            return self.send_relay_error(e, retry_after=retry_after(e))
        self.set_status(204)


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
            return self.send_relay_error(e, retry_after=retry_after(e))
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
        return self.user_id(required=False) == session.owner


def peer_closed(stream: IOStream) -> bool:
    """Whether the client has closed its side, even with requests of it still buffered.

    Tornado notices a close only when nothing is buffered, so a pipelined
    request whose sender has gone would still be served: the socket is asked.
    A client that half-closes after its request counts as gone (nginx treats
    it so too).
    """
    if stream.closed():
        return True
    if isinstance(stream, SSLIOStream):
        return False  # TLS sockets cannot peek; Tornado reports the close later
    try:
        return stream.socket.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _cursor(raw: str | None, session: Session) -> int | None:
    """The event to read after; with no Last-Event-ID (a first attach), just before
    the oldest one kept, which is not event 1 once a long session has dropped some."""
    if not raw:
        return session.first_seq - 1
    return _decimal(raw.strip())


def _decimal(text: str) -> int | None:
    """``text`` as a number if it is 1 to 18 ASCII digits (so below 2**63), else None.

    Not ``str.isdigit()`` alone: it also accepts "²" or "①", which ``int()`` refuses.
    """
    if 0 < len(text) <= 18 and text.isascii() and text.isdigit():
        return int(text)
    return None


def _too_large() -> RelayError:
    return RelayError(413, "body_too_large", f"the request body is over {MAX_BODY} bytes")


def retry_after(error: RelayError) -> int | None:
    if isinstance(error, Refused):
        return error.retry_after
    return 1 if error.status == 503 else None
