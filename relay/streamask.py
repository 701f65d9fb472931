"""``POST /aianswer/streamAsk``: one-shot streams, and idempotent ones with a key.

Without an ``Idempotency-Key`` the answer is a one-shot session that only this
request reads: nothing is kept, and the client leaving cancels the upstream call.
With one (relay/idempotency.py) it is a replayable session kept under (user,
key), shared through the Redis store; relay/resume.py decides who reads it and
when an abandoned one is cancelled.
"""

from __future__ import annotations

from relay.errors import RelayError
from relay.eventstream import EventStreamHandler
from relay.handlers import AskHandler, peer_closed
from relay.idempotency import KEY_HEADER, SESSION_HEADER, KeyedAsk, find_or_start, parse_key
from relay.resume import new_token
from relay.sessions import Session


class StreamAskHandler(AskHandler, EventStreamHandler):
    """``POST /aianswer/streamAsk``: a one-shot session with this request as its reader.

    With a key, a repeat reads the kept answer after its ``Last-Event-ID`` and
    takes it over from an older stream, and every response names the session in
    ``X-Relay-Session`` (so that the client can DELETE it).
    """

    def initialize(self) -> None:
        super().initialize()
        self.token = ""  # a keyed stream's reader token; "" without a key
        self._keyed_uid = ""

    def set_default_headers(self) -> None:
        super().set_default_headers()
        # Here, so that an error response, whose clear() resets the headers, keeps it.
        if getattr(self, "_keyed_uid", ""):
            self.set_header(SESSION_HEADER, self._keyed_uid)

    async def post(self) -> None:
        try:
            key = parse_key(self.request.headers.get_list(KEY_HEADER))
        except RelayError as e:
            return self.send_relay_error(e)
        if key is not None:
            return await self._keyed(key)
        session = await self.start_answer(replayable=False)
        if session is None:
            return
        try:
            await self.pump(session, 0)
        finally:
            await self.relay.store.remove(session.uid)

    async def _keyed(self, key: str) -> None:
        relay = self.relay
        try:
            user = self.user_id()
            robot, payload = self.read_ask()
            if peer_closed(self.connection):
                return
            # Anonymous clients all have one user name: their keys are scoped by address.
            scope = f"user:{user}" if relay.settings.auth_tokens else f"addr:{self.address}"
            ask = KeyedAsk.of(scope, key, bytes(self._body))
            self.token = new_token()
            session, new = await find_or_start(
                relay.store, ask, self.token, lambda: self.new_session(user, robot, True, ask.index)
            )
            self._keyed_uid = session.uid
            self.set_header(SESSION_HEADER, session.uid)
            if not new:
                relay.admission.reader(session)  # a repeat reads: no new answer is charged
        except RelayError as e:
            return self.send_relay_error(e, retry_after=e.retry_seconds())
        relay.readers.enter(session.uid, self)
        try:
            if new:
                session.reader = self.token
                relay.upstream.start(session, payload)
                await self.pump(session, 0)
            else:
                await relay.store.take_over(session, self.token)
                await self._repeat(session)
        finally:
            relay.readers.leave(session.uid, self)

    async def _repeat(self, session: Session) -> None:
        raw = self.request.headers.get("Last-Event-ID")
        after = self.resume_cursor(session, raw)
        if after is None:
            return
        if raw:
            # The client had this answer's stream: the rest of it starts at once, and
            # one with nothing left ends at once (200, never 204, which
            # fetch-event-source treats as an error and retries).
            self.commit()
        await self.pump(session, after)

    def client_gone(self, session: Session) -> None:
        if not self.token:
            session.cancel()
        elif not self._taken_over and session.running:
            self.relay.graces.start(session, self.token)
