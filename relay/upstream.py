"""The model-server client: one streaming ``POST {upstream}/chat/completions`` per session.

`relay.httpclient.StreamingHTTPClient` (an `AsyncHTTPClient`) delivers the
body in blocks to a ``streaming_callback`` that feeds `relay.sse.SSEParser`;
the parsed events go through `relay.chunks` into the session. Routing on the
status from the parsed head (``head_callback``) comes first: the callback also
receives the body of an error answer (a 401 or 429 JSON), which must never reach
the parser.

* **Timeouts for long answers.** Connect and total timeouts come from the flags
  (never Tornado's 20-second default). The total and the idle timeout are
  checked by a watchdog (`Upstream.check`, on the app's tick) rather than a
  timer per call; it counts only dispatched events as activity, so an upstream
  that sends nothing but comments is still silent.
* **Cancellation** closes the upstream socket at once, silent upstream or not
  (`relay.httpclient.CancelHandle`). After ``[DONE]`` the call only releases
  the response, so that the connection can serve the next call
  (``--upstream-keepalive``).
* **Back-pressure:** the callback returns the session's `room` future when a
  reader lags, and the client stops reading until it resolves.
* **A key pool.** A key answered 401/403/429 cools down and the next key is
  tried. Error statuses arrive before any body, so a retry can never follow
  relayed text.
* **Usage.** The request asks for it (``stream_options.include_usage``); a server
  that answers 400 naming ``stream_options`` gets the request once more without
  it, and the `Upstream` remembers not to send it again.
* **The end of an answer.** After the chunk with ``finish_reason``, ``[DONE]``,
  the end of the body (clean or not, or the idle timeout) or `USAGE_WAIT`
  seconds complete the answer; before it, an end is ``upstream_closed``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ujson
from tornado.simple_httpclient import HTTPTimeoutError

from relay.ask import Ask
from relay.chunks import ChunkRules, error_message, token_counts
from relay.config import Settings
from relay.errors import RelayError, detached, redact
from relay.http1 import ResponseHead
from relay.httpclient import CancelHandle, StreamingHTTPClient
from relay.keys import KeyPool
from relay.metrics import Metrics
from relay.robots import Robot
from relay.sessions import Session
from relay.sse import LineTooLong, SSEParser
from relay.streaming_request import StreamingRequest

log = logging.getLogger("relay.upstream")

RETRY_STATUSES = (401, 403, 429)
_ERROR_BODY_LIMIT = 64 << 10
# Seconds the finishing chunk waits for the usage chunk or [DONE] before the answer is
# completed without them. Both come in the same read or milliseconds after it; the bound
# is for a server that sends neither and keeps the body open.
USAGE_WAIT = 2.0


def build_payload(robot: Robot, default_model: str, ask: Ask, include_usage: bool = False) -> bytes:
    """The chat-completions request body: system prompt, history pairs, question; with
    ``include_usage``, the request for a usage chunk (``stream_options.include_usage``)."""
    messages = []
    if robot.system_prompt:
        messages.append({"role": "system", "content": robot.system_prompt})
    for question, answer in ask.history:
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": ask.question})
    body: dict[str, Any] = {
        "model": robot.model or default_model,
        "messages": messages,
        "stream": True,
    }
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    if robot.temperature is not None:
        body["temperature"] = robot.temperature
    if robot.top_p is not None:
        body["top_p"] = robot.top_p
    return ujson.dumps(body, ensure_ascii=False).encode()


class Upstream:
    """The app's link to the model server: HTTP client, key pool and running calls."""

    def __init__(self, settings: Settings, url: str, metrics: Metrics) -> None:
        self.settings = settings
        self.url = url.rstrip("/") + "/chat/completions"
        self.metrics = metrics
        self.keys = KeyPool(settings.api_keys, settings.key_strategy)
        self.client = StreamingHTTPClient(
            force_instance=True,
            keepalive=settings.upstream_keepalive,
            max_connections=settings.max_streams,
        )
        self.calls: set[UpstreamCall] = set()
        # Set when this server answered 400 to stream_options: it is not sent again.
        self.refuses_stream_options = False

    def asks_usage(self, robot: Robot) -> bool:
        """Whether a call for ``robot`` asks for usage: the robot's ``includeUsage`` when set,
        else ``--include-usage``; never for a server that refused ``stream_options``."""
        wanted = robot.include_usage
        if wanted is None:
            wanted = self.settings.include_usage
        return wanted and not self.refuses_stream_options

    def start(self, session: Session, payload: bytes) -> UpstreamCall:
        """Begin streaming the answer into ``session``: the request (``payload``, from
        `build_payload`) goes out now, and the call owns the session's end."""
        call = UpstreamCall(self, session, payload)
        self.calls.add(call)
        session.on_cancel = call.cancel
        call.attempt()
        return call

    def check(self, now: float) -> None:
        """Watchdog tick: let go of calls idle longer than ``--upstream-idle-timeout`` or
        older than ``--upstream-timeout`` (one tick for all calls instead of a timer each)."""
        idle = self.settings.upstream_idle_timeout
        born = now - self.settings.upstream_timeout
        for call in list(self.calls):
            if now - call.last_activity > idle or call.started < born:
                call.time_out()

    def close(self) -> None:
        for call in list(self.calls):
            call.cancel()
        self.client.close()


class UpstreamCall:
    """One answer's upstream request, with key retries, parsing and the watchdog state.

    Driven by callbacks, not a task: `attempt` sends the request at once (no
    loop turn before it goes out) and `_fetched` takes the outcome, which is a
    retry (the next key, or the same one without ``stream_options``) or the end
    of the call.
    """

    __slots__ = (
        "_done",
        "_error_body",
        "_failure",
        "_handle",
        "_is_stream",
        "_key",
        "_parser",
        "_status",
        "_timed_out",
        "_tried",
        "_wait",
        "last_activity",
        "payload",
        "rules",
        "session",
        "started",
        "upstream",
    )

    def __init__(self, upstream: Upstream, session: Session, payload: bytes) -> None:
        self.upstream = upstream
        self.session = session
        self.payload = payload
        self.rules = ChunkRules(session.owner, session.uid)
        self.started = self.last_activity = time.monotonic()
        self._handle = CancelHandle()
        self._tried: set[str] = set()
        self._key: str | None = None
        self._timed_out = False
        self._failure: RelayError | None = None
        self._done = False
        self._wait: asyncio.TimerHandle | None = None

    # -- control ------------------------------------------------------------

    def cancel(self) -> None:
        """Close the upstream connection now (the session is ended by the caller)."""
        self._handle.cancel()

    def time_out(self) -> None:
        self._timed_out = True
        self._handle.cancel()

    # -- the call -----------------------------------------------------------

    def attempt(self, same_key: bool = False) -> None:
        """Send the request with the next key (the first call, or a retry), or again with
        the key of the last try."""
        if not same_key:
            key = self._key = self.upstream.keys.pick(self._tried)
            if key is not None:
                self._tried.add(key)
        self._parser = SSEParser()
        self._status = 0
        self._is_stream = True
        self._error_body = bytearray()
        try:
            fetched = self.upstream.client.fetch(self._request(self._key), raise_error=False)
        except Exception as e:  # noqa: BLE001 - any failure must end the session
            self._end(detached(e))
            return
        fetched.add_done_callback(self._fetched)

    def _fetched(self, fetched: Any) -> None:
        try:
            response = fetched.result()
            # The HTTPClientError of a non-2xx response holds the response in its
            # args: a cycle, and nothing here needs the error.
            response.error = None
            failure: Exception | None = None
        except Exception as e:  # noqa: BLE001 - any failure must end the session
            failure = detached(e)
        pool, key = self.upstream.keys, self._key
        if self._status:
            self.upstream.metrics.upstream_responses.labels(str(self._status)).inc()
        if self._status == 400 and not self._handle.cancelled and self._drop_stream_options():
            self._handle = CancelHandle()
            self.attempt(same_key=True)
            return
        if self._status in RETRY_STATUSES and key is not None:
            pool.cool(key)
            if len(self._tried) < len(pool.keys) and not self._handle.cancelled:
                self.upstream.metrics.key_retries.inc()
                log.warning("upstream answered %d; trying the next key", self._status)
                self._handle = CancelHandle()
                self.attempt()
                return
        self._end(failure)

    def _drop_stream_options(self) -> bool:
        """After a 400: if it names ``stream_options`` and the request had them, take them
        out of the request (once: the new one has none) and remember it for the server."""
        if not _names_stream_options(bytes(self._error_body)):
            return False
        body = ujson.loads(self.payload)
        if body.pop("stream_options", None) is None:
            return False
        self.payload = ujson.dumps(body, ensure_ascii=False).encode()
        upstream = self.upstream
        if not upstream.refuses_stream_options:
            upstream.refuses_stream_options = True
            log.warning("upstream refused stream_options; asking without them from now on")
        return True

    def _end(self, failure: Exception | None) -> None:
        try:
            self._finish(failure)
        finally:
            if self._wait is not None:
                self._wait.cancel()
                self._wait = None  # it holds a method of this call: a cycle otherwise
            self.upstream.calls.discard(self)
            self.session.on_cancel = None  # no session <-> call cycle left for the GC
            self._count_usage()

    def _request(self, key: str | None) -> StreamingRequest:
        s = self.upstream.settings
        headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
        }
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return StreamingRequest(
            self.upstream.url,
            method="POST",
            headers=headers,
            body=self.payload,
            connect_timeout=s.upstream_connect_timeout,
            request_timeout=0,  # not Tornado's 20 s default: `Upstream.check` times calls out
            head_callback=self._on_head,
            streaming_callback=self._on_chunk,
            cancel_handle=self._handle,
        )

    def _on_head(self, head: ResponseHead) -> None:
        self._status = head.status
        # A 200 with a JSON body is a non-streaming answer or an error, not a stream.
        self._is_stream = "application/json" not in head.headers.get("content-type", "").lower()

    def _on_chunk(self, chunk: bytes) -> Any:
        if self._status != 200 or not self._is_stream:
            if len(self._error_body) < _ERROR_BODY_LIMIT:
                self._error_body += chunk[: _ERROR_BODY_LIMIT - len(self._error_body)]
            return None
        if self._done:
            return None  # completed by the wait for usage; the rest only keeps the connection
        session = self.session
        try:
            events = self._parser.feed(chunk)
        except LineTooLong:
            self._fail_now(
                RelayError(502, "upstream_bad_chunk", "the upstream sent an over-long line")
            )
            return None
        if not events:
            return None
        self.last_activity = time.monotonic()
        # Everything this read completed goes to the session in one append, so
        # readers are woken once and send it in one write.
        out: list[str] = []
        failure = None
        rules = self.rules
        try:
            for event in events:
                out += rules.apply(event.data)
                if rules.done:
                    break
        except RelayError as e:
            failure = detached(e)
        self._done = rules.done
        if out:
            self._append(out)
        if failure is not None:
            self._fail_now(failure)
            return None
        if self._done:
            self._completed()
            return None
        if rules.finished and self._wait is None:
            loop = asyncio.get_running_loop()
            self._wait = loop.call_later(USAGE_WAIT, self._wait_over)
        return session.room()

    def _append(self, texts: list[str]) -> None:
        session = self.session
        if session.last_seq == 0:
            self.upstream.metrics.ttft.observe(time.monotonic() - session.created)
        session.usage = self.rules.usage  # before the end, for the stream's access line
        session.append(*texts)

    def _completed(self) -> None:
        self.session.finish()
        self._handle.release()  # the rest of the body only to keep the connection

    def _wait_over(self) -> None:
        """`USAGE_WAIT` after the finishing chunk, neither usage nor [DONE]: the answer is
        complete without them."""
        self._wait = None
        if self._done or not self.session.running:
            return
        self._append(self.rules.complete())
        self._done = True
        self._completed()

    def _fail_now(self, error: RelayError) -> None:
        self._failure = error
        self._handle.cancel()

    # -- the outcome ----------------------------------------------------------

    def _finish(self, failure: Exception | None) -> None:
        session = self.session
        if self._done:
            session.finish()
            return
        if not session.running:
            return  # cancelled from outside: the session already knows why
        if self._failure is None and self.rules.finished:
            # After the finishing chunk any end of the body (clean, reset, idle timeout)
            # completes the answer: transformers serve never sends [DONE].
            self._append(self.rules.complete())
            self._done = True
            session.finish()
            return
        error = self._failure or self._outcome_error(failure)
        # Upstream messages are shown to the client and some echo the key.
        error.message = redact(error.message, self.upstream.settings.api_keys)
        self.upstream.metrics.upstream_errors.labels(error.code).inc()
        log.info("upstream call for session %s ended: %s", session.uid[:8], error.code)
        session.fail(error)

    def _count_usage(self) -> None:
        counts = token_counts(self.rules.usage)
        if counts is None:
            return
        session, metrics = self.session, self.upstream.metrics
        labels = (session.robot_id, session.owner)
        metrics.prompt_tokens.labels(*labels).inc(counts[0])
        metrics.completion_tokens.labels(*labels).inc(counts[1])

    def _outcome_error(self, failure: Exception | None) -> RelayError:
        if self._timed_out or isinstance(failure, HTTPTimeoutError):
            return RelayError(504, "upstream_timeout", "the upstream did not answer in time")
        if self._status and (self._status != 200 or not self._is_stream):
            return self._status_error()  # an error, a redirect, or a 200 that is no stream
        if self._status == 0:
            return RelayError(502, "upstream_unavailable", "the upstream could not be reached")
        return RelayError(502, "upstream_closed", "the upstream ended the answer before its finish")

    def _status_error(self) -> RelayError:
        try:
            detail = error_message(ujson.loads(bytes(self._error_body)))
        except ValueError:
            detail = ""
        if self._status == 200:
            message = "the upstream answered 200 without an event stream"
        else:
            message = f"the upstream answered HTTP {self._status}"
        return RelayError(502, "upstream_error", f"{message}: {detail}" if detail else message)


def _names_stream_options(body: bytes) -> bool:
    """Whether an error answer's message names ``stream_options`` (OpenAI-style
    ``error.message``, vLLM's ``message``, FastAPI's ``detail``; a body that is not
    JSON is read as the message). The request itself is not echoed: a 400 for
    something else that quotes the request must not pass for a refusal."""
    text = body.decode("utf-8", "replace")
    try:
        doc = ujson.loads(text)
    except ValueError:
        return "stream_options" in text
    if not isinstance(doc, dict):
        return False
    err = doc.get("error")
    parts = [err.get("message") if isinstance(err, dict) else err]
    parts += [doc.get("message"), doc.get("detail")]
    return any("stream_options" in (p if isinstance(p, str) else _json(p)) for p in parts)


def _json(value: Any) -> str:
    return "" if value is None else ujson.dumps(value, ensure_ascii=False)
