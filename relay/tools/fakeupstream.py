"""A fake OpenAI-compatible streaming server for benchmarks: ``POST /v1/chat/completions``.

    python -m relay.tools.fakeupstream --port=9000 --tokens=200 --interval-ms=20

Every request gets the same deterministic answer of ``--tokens`` tokens (Chinese
and English, punctuation, quotes, an emoji and whitespace-only tokens such as
``"\\n\\n"``), one chat.completion.chunk per token, ``--interval-ms`` apart, then
the finishing chunk and ``data: [DONE]``. `expected_text` gives the exact answer
text, so a load test can check that the relay lost, duplicated or reordered nothing.

Each chunk's JSON starts with a top-level ``"t"`` field, the ``time.time()`` at
which this server wrote it. The relay forwards chunk JSON byte for byte, so the
load tester reads ``t`` back and computes lag (arrival time - send time) with a
prefix check instead of a full JSON parse.

It is built to cost as little as possible per token, so that thousands of
concurrent streams fit in one process and the relay, not this server, is what
a benchmark measures: a bare `asyncio.Protocol` HTTP/1.1 server (no framework),
chunk bytes assembled from precomputed pieces, and one shared timer (a timing
wheel of ``--tick-ms`` slots) that writes the next token of every stream due,
instead of a timer per stream per token. Measured with 2000 streams at 50
tokens/s: about 8 µs of CPU per token with the shared ticker, 12 µs with one
``loop.call_at`` per stream per token, 23 µs with one ``asyncio.sleep`` per
stream per token (see docs/loadtest.md). With ``--interval-ms=0`` tokens go out
as fast as the reader drains them (transport flow control).

Responses use chunked transfer encoding. The connection stays open for the next
request (keep-alive, as uvicorn, nginx or Go servers do) unless the request said
``Connection: close`` or came as HTTP/1.0. It listens on loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import math
import multiprocessing
import os
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import ujson

from relay.limits import raise_fd_limit

__all__ = ["Answer", "FakeUpstream", "expected_text", "is_loopback", "main", "token"]

# The vocabulary the answer cycles through. It holds what a relay can get wrong:
# multi-byte UTF-8 (Chinese, a 4-byte emoji), whitespace-only tokens (paragraph
# breaks, a lone space), and characters JSON must escape (quotes, backslash).
VOCAB = (
    "你好",
    "，",
    "这是",
    "一段",
    "用于",
    "压力测试",
    "的",
    "回答",
    "。",
    "\n\n",
    "Hello",
    ",",
    " this",
    " is",
    " a",
    " load",
    " test",
    " ",
    "🙂",
    "\n",
    ' "quoted"',
    " back\\slash",
    "中文",
    "与",
    " English",
    " mixed",
    "！",
    "\n\n",
)

MAX_HEADER = 64 << 10
MAX_BODY = 4 << 20
FAST_BATCH = 64  # frames one fast-mode stream writes before letting others run


def token(i: int) -> str:
    """Token number ``i`` (from 0) of every answer; every 10th carries its own number."""
    if i % 10 == 9:
        return f" [{i}]"
    return VOCAB[i % len(VOCAB)]


def expected_text(tokens: int) -> str:
    """The exact answer text of a ``tokens``-token answer: what the client must see."""
    return "".join(token(i) for i in range(tokens))


def is_loopback(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a loopback IP literal (no DNS lookup)."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Answer:
    """What every request gets: token count and timing (seconds)."""

    tokens: int = 200
    interval: float = 0.02
    first_token: float = 0.0  # delay before the first token (a model's prefill time)


def _http_chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


_TOKEN_JSON: list[bytes] = []  # token(i) as a JSON string, for i < len(_TOKEN_JSON)
_ROLE = b'{"role":"assistant","content":""}'
_DONE = _http_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
)
_KEEP = b"\r\n"
_CLOSE = b"Connection: close\r\n\r\n"


def _token_json(i: int) -> bytes:
    if i >= len(_TOKEN_JSON):
        _TOKEN_JSON.extend(
            ujson.dumps(token(j), ensure_ascii=False).encode()
            for j in range(len(_TOKEN_JSON), i + 1)
        )
    return _TOKEN_JSON[i]


class _Ticker:
    """One timer for every stream: a timing wheel of ``tick``-second slots.

    A stream due at loop time ``due`` goes into slot ``ceil(due / tick)`` and is
    written when that slot's time comes, so writes are at most one tick late and
    never early; due times are absolute, so the token rate does not drift.
    """

    def __init__(self, tick: float) -> None:
        self._tick = tick
        self._slots: defaultdict[int, list[_Stream]] = defaultdict(list)
        self._timer: asyncio.TimerHandle | None = None
        self._armed = 0

    def add(self, stream: _Stream, due: float) -> None:
        slot = math.ceil(due / self._tick)
        self._slots[slot].append(stream)
        if self._timer is None or slot < self._armed:
            self._arm(slot)

    def _arm(self, slot: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed = slot
        self._timer = asyncio.get_running_loop().call_at(slot * self._tick, self._run)

    def _run(self) -> None:
        self._timer = None
        now = asyncio.get_running_loop().time()
        current = math.floor(now / self._tick + 1e-9)
        for slot in sorted(s for s in self._slots if s <= current):
            for stream in self._slots.pop(slot):
                stream.send_next()
        if self._slots:
            self._arm(min(self._slots))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._slots.clear()


class _Stream(asyncio.Protocol):
    """One connection: read a request, answer it; then the next one, or close."""

    transport: asyncio.Transport  # set by connection_made

    def __init__(self, server: FakeUpstream) -> None:
        self.server = server
        self._buf = bytearray()
        self._head: tuple[str, str, dict[str, str]] | None = None
        self._body_len = 0
        self._next = 0  # index of the next token to send
        self._start = 0.0
        self._prefix = b""
        self._paused = False
        self._keep = False  # keep the connection for another request after this answer
        self.closed = False

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self.server.answer.interval == 0 and self._start:
            self._send_fast()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._start or self.closed:
            return  # the next request is read when this answer is done
        if self._head is None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEADER:
                    self._error(431, "request headers too large")
                return
            if not self._parse_head(bytes(self._buf[:end])):
                return
            del self._buf[: end + 4]
        if len(self._buf) >= self._body_len:
            body = bytes(self._buf[: self._body_len])
            del self._buf[: self._body_len]
            self._handle(body)

    # -- the request -----------------------------------------------------------

    def _parse_head(self, raw: bytes) -> bool:
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._error(400, "bad request line")
            return False
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                self._error(400, "bad header line")
                return False
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._error(411, "send the body with Content-Length")
            return False
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > MAX_BODY:
            self._error(413, "bad or too large Content-Length")
            return False
        self._body_len = int(length)
        self._head = (parts[0], parts[1].split("?", 1)[0], headers)
        self._keep = parts[2] == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        return True

    def _handle(self, body: bytes) -> None:
        if self._head is None:  # not reached: the body follows a parsed head
            return
        method, path, _ = self._head
        if path not in ("/v1/chat/completions", "/chat/completions"):
            self._error(404, f"no route for {path}")
            return
        if method != "POST":
            self._error(405, "use POST")
            return
        try:
            request = ujson.loads(body)
        except ValueError:
            request = None
        if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
            self._error(400, "the body must be a JSON object with messages")
            return
        if request.get("stream") is not True:
            self._error(400, "this fake upstream only streams: send stream=true")
            return
        model = request.get("model")
        self._start_answer(model if isinstance(model, str) else "fake-upstream")

    def _error(self, status: int, message: str) -> None:
        body = ujson.dumps(
            {"error": {"message": message, "type": "invalid_request_error", "code": status}}
        ).encode()
        self.transport.write(
            b"HTTP/1.1 %d Error\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (status, len(body), body)
        )
        self.transport.close()
        self.closed = True

    # -- the answer ------------------------------------------------------------

    def _start_answer(self, model: str) -> None:
        server = self.server
        server.served += 1
        loop = asyncio.get_running_loop()
        self._start = loop.time()
        created = int(time.time())
        # Everything of a chunk between the timestamp and the delta, fixed per stream.
        self._prefix = b',"id":"chatcmpl-fake-%d","object":"chat.completion.chunk",' % (
            server.served
        ) + b'"created":%d,"model":%s,"choices":[{"index":0,"delta":' % (
            created,
            ujson.dumps(model, ensure_ascii=False, escape_forward_slashes=False).encode(),
        )
        answer = server.answer
        head = _HEAD + (_KEEP if self._keep else _CLOSE)
        if answer.tokens == 0:
            self.transport.write(head + self._frame(_ROLE, b"null"))
            self._finish()
            return
        self.transport.write(head)
        if answer.interval == 0:
            if answer.first_token:
                loop.call_later(answer.first_token, self._send_fast)
            else:
                self._send_fast()
        elif answer.first_token:
            server.ticker.add(self, self._start + answer.first_token)
        else:
            self.send_next()

    def _frame(self, delta: bytes, finish: bytes) -> bytes:
        payload = b'data: {"t":%.6f%s%s,"finish_reason":%s}]}\n\n' % (
            time.time(),
            self._prefix,
            delta,
            finish,
        )
        return _http_chunk(payload)

    def _token_frame(self) -> bytes:
        i = self._next
        self._next += 1
        self.server.tokens_sent += 1
        # The role chunk goes with the first token, as a model server sends it after prefill.
        role = self._frame(_ROLE, b"null") if i == 0 else b""
        return role + self._frame(b'{"content":%s}' % _token_json(i), b"null")

    def _finish(self) -> None:
        self.transport.write(self._frame(b"{}", b'"stop"') + _DONE)
        if not self._keep:
            self.closed = True
            self.transport.close()
            return
        self._head = None
        self._body_len = self._next = 0
        self._start = 0.0
        if self._buf:
            self.data_received(b"")  # a request that came early

    def send_next(self) -> None:
        """Write the next token (the ticker calls this when it is due)."""
        if self.closed:
            return
        answer = self.server.answer
        self.transport.write(self._token_frame())
        if self._next >= answer.tokens:
            self._finish()
        else:
            due = self._start + answer.first_token + self._next * answer.interval
            self.server.ticker.add(self, due)

    def _send_fast(self) -> None:
        """``--interval-ms=0``: write until the transport pushes back or the answer ends."""
        if self.closed:
            return
        tokens = self.server.answer.tokens
        frames = []
        while self._next < tokens and len(frames) < FAST_BATCH:
            frames.append(self._token_frame())
        self.transport.write(b"".join(frames))
        if self._next >= tokens:
            self._finish()
        elif not self._paused:
            asyncio.get_running_loop().call_soon(self._send_fast)


class FakeUpstream:
    """The server: a listening socket, its open streams and the shared ticker.

    Use ``await FakeUpstream(answer).start(port=0)``; ``url`` is then the base URL
    to give the relay (``--upstream=``), ending in ``/v1``.
    """

    def __init__(self, answer: Answer, tick: float = 0.002) -> None:
        self.answer = answer
        self.ticker = _Ticker(tick)
        self.connections: set[_Stream] = set()
        self.server: asyncio.Server | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.served = 0
        self.tokens_sent = 0

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, reuse_port: bool = False
    ) -> FakeUpstream:
        if not is_loopback(host):
            raise ValueError(f"the fake upstream listens on loopback only, not {host!r}")
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _Stream(self), host, port, backlog=4096, reuse_port=reuse_port or None
        )
        self.host = host
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        """Stop listening and drop every open stream at once."""
        if self.server is not None:
            self.server.close()
        self.ticker.close()
        for stream in list(self.connections):
            stream.transport.abort()


async def _serve(args: argparse.Namespace) -> int:
    raise_fd_limit()
    answer = Answer(args.tokens, args.interval_ms / 1000, args.first_token_ms / 1000)
    fake = FakeUpstream(answer, tick=args.tick_ms / 1000)
    await fake.start(args.host, args.port, reuse_port=args.workers > 1)
    print(
        f"fakeupstream[{os.getpid()}]: listening on {fake.url}: {answer.tokens} tokens, "
        f"{args.interval_ms:g} ms apart",
        file=sys.stderr,
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    fake.close()
    print(
        f"fakeupstream[{os.getpid()}]: stopped after {fake.served} streams, "
        f"{fake.tokens_sent} tokens",
        file=sys.stderr,
        flush=True,
    )
    return 0


def _worker(args: argparse.Namespace) -> None:
    sys.exit(asyncio.run(_serve(args)))


def _supervise(args: argparse.Namespace) -> int:
    """``--workers=N``: N processes share the port (SO_REUSEPORT); stop them all on a signal."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(args,)) for _ in range(args.workers)]
    for proc in procs:
        proc.start()
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping and all(p.is_alive() for p in procs):
        time.sleep(0.2)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()  # SIGTERM: the worker's clean stop
    for proc in procs:
        proc.join(10)
    return 0 if stopping else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m relay.tools.fakeupstream",
        description="Fake OpenAI-compatible streaming server for relay benchmarks (loopback only).",
    )
    p.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    p.add_argument("--port", type=int, default=9000, help="port (0: any free port)")
    p.add_argument("--tokens", type=int, default=200, help="tokens per answer")
    p.add_argument(
        "--interval-ms", type=float, default=20.0, help="between tokens; 0 = as fast as read"
    )
    p.add_argument("--first-token-ms", type=float, default=0.0, help="delay before the first token")
    p.add_argument(
        "--tick-ms", type=float, default=2.0, help="timer resolution: writes are at most this late"
    )
    p.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGTERM or SIGINT; exit status 0 on a clean stop, 2 on bad flags."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not is_loopback(args.host):
        parser.error(f"--host must be a loopback address, not {args.host!r}")
    if args.tokens < 0 or args.interval_ms < 0 or args.first_token_ms < 0:
        parser.error("--tokens, --interval-ms and --first-token-ms must not be negative")
    if args.tick_ms <= 0 or args.workers < 1:
        parser.error("--tick-ms and --workers must be positive")
    if args.workers > 1:
        if args.port == 0:
            parser.error("--workers needs a fixed --port")
        return _supervise(args)
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
