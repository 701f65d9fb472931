"""HTTP handlers: the base every handler shares, the JSON endpoints, and `AskHandler`.

`AskHandler` is a handler that takes a question: the POST body streamed in under
its own bound, validated, admitted, and its answer's session created and started
(``POST /aianswer/sessions`` here, ``streamAsk`` in relay/streamask.py). The
event streams are written by relay/eventstream.py.
"""

from __future__ import annotations

import hmac
import logging
import os
from typing import TYPE_CHECKING, Any, cast

from tornado.web import HTTPError, RequestHandler, StaticFileHandler, stream_request_body

from relay.ask import MAX_BODY, parse_ask
from relay.errors import RelayError
from relay.http1server import ServerConnection
from relay.idempotency import KEY_HEADER, SESSION_HEADER
from relay.resources import STATIC_DIR
from relay.robots import Robot
from relay.sessions import Session
from relay.upstream import build_payload

if TYPE_CHECKING:
    from relay.app import Relay, RelayApplication

log = logging.getLogger("relay.stream")
access_log = logging.getLogger("relay.access")

ANONYMOUS = "anonymous"
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
        return cast("RelayApplication", self.application).relay

    @property
    def connection(self) -> ServerConnection:
        """The request's connection: always the relay's own (relay/http1server.py; never
        None while a handler runs)."""
        return cast(ServerConnection, self.request.connection)

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

    def user_id(self) -> str:
        """The caller's user id; raises `RelayError` 401 when a token is needed and none
        of the configured ones was presented."""
        user = self.presented_user()
        if user is None:
            raise RelayError(401, "unauthorized", "token missing or wrong")
        return user

    def presented_user(self) -> str | None:
        """The user of the ``Authorization: Bearer`` token presented, if any.

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
class AskHandler(BaseHandler):
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
        size = 0 if length is None else ascii_decimal(length)
        if size is None:
            self.send_relay_error(RelayError(400, "bad_request", "bad Content-Length"))
        elif size > MAX_BODY:
            # Over the connection's bound, Tornado would add a bare 400 of its own
            # after this 413; at the declared length it drops what arrives instead,
            # until the close that follows a response sent before the body.
            self.connection.set_max_body_size(size)
            self.send_relay_error(_too_large())
        else:
            self.connection.set_max_body_size(MAX_BODY)

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
            if peer_closed(self.connection):
                # A pipelined request of a client that already left: no paid call for nobody.
                return None
            session = await self.new_session(user, robot, replayable)
        except RelayError as e:
            self.send_relay_error(e, retry_after=e.retry_seconds())
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
                user, robot.robot_id, replayable, quota.key if quota else None, keyed
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


def set_security_headers(handler: RequestHandler) -> None:
    for name, value in SECURITY_HEADERS.items():
        handler.set_header(name, value)


class SessionsHandler(AskHandler):
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
            return self.send_relay_error(e, retry_after=e.retry_seconds())
        self.set_status(204)


def peer_closed(connection: ServerConnection) -> bool:
    """Whether the client has gone, even with a request of it still being served.

    The connection reads on while a request is served, so a pipelined request
    whose sender has left (or half-closed: nginx also counts that as gone) finds
    its connection closed here.
    """
    return connection.closed


def ascii_decimal(text: str) -> int | None:
    """``text`` as a number if it is 1 to 18 ASCII digits (so below 2**63), else None.

    Not ``str.isdigit()`` alone: it also accepts "²" or "①", which ``int()`` refuses.
    """
    if 0 < len(text) <= 18 and text.isascii() and text.isdigit():
        return int(text)
    return None


def _too_large() -> RelayError:
    return RelayError(413, "body_too_large", f"the request body is over {MAX_BODY} bytes")
