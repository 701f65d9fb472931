"""A fake OpenAI-compatible upstream for the tests: a real Tornado HTTP server on loopback.

Each test sets ``fake.script``: an async function ``script(handler, body, key)``
that writes whatever the scenario needs. Helpers below build the usual scripts.
The fake records every request and notices when the relay lets a connection go.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream, StreamClosedError
from tornado.tcpserver import TCPServer
from tornado.testing import bind_unused_port
from tornado.web import Application, RequestHandler

Script = Callable[["CompletionsHandler", dict, str | None], Awaitable[None]]


def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
    """One chat.completion.chunk as JSON text (compact, non-ASCII kept)."""
    doc = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "fake-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def answer_frames(tokens: Sequence[str], finish: bool = True) -> list[bytes]:
    """The SSE frames of a normal answer: role chunk, one chunk per token, finish, [DONE]."""
    frames = [chunk({"role": "assistant", "content": ""})]
    frames += [chunk({"content": t}) for t in tokens]
    if finish:
        frames.append(chunk({}, "stop"))
        frames.append("[DONE]")
    return [f"data: {f}\n\n".encode() for f in frames]


class CompletionsHandler(RequestHandler):
    def initialize(self, fake: ScriptedUpstream) -> None:
        self.fake = fake

    async def post(self) -> None:
        fake = self.fake
        auth = self.request.headers.get("Authorization", "")
        key = auth[7:] if auth.startswith("Bearer ") else None
        body = json.loads(self.request.body)
        fake.requests.append(
            {
                "key": key,
                "body": body,
                "headers": dict(self.request.headers),
                "peer": self.request.connection.context.address,  # one per upstream connection
            }
        )
        fake.active += 1
        fake.max_active = max(fake.max_active, fake.active)
        try:
            await fake.script(self, body, key)
        except StreamClosedError:
            pass
        finally:
            fake.active -= 1

    def on_connection_close(self) -> None:
        self.fake.disconnects.append(time.monotonic())
        self.fake.disconnected.set()

    async def send(self, data: bytes) -> None:
        self.write(data)
        await self.flush()


class ScriptedUpstream:
    """The tests' upstream: each request runs ``script`` (not the benchmark's fake,
    `relay.tools.fakeupstream.FakeUpstream`, which always sends one fixed answer)."""

    def __init__(self, ssl_options: ssl.SSLContext | None = None) -> None:
        sock, self.port = bind_unused_port()
        scheme = "https" if ssl_options else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}/v1"
        self.requests: list[dict] = []
        self.disconnects: list[float] = []
        self.disconnected = asyncio.Event()
        self.active = 0
        self.max_active = 0
        self.script: Script = stream_tokens(["Hello", ",", " world"])
        app = Application([(r"/v1/chat/completions", CompletionsHandler, {"fake": self})])
        self.server = HTTPServer(app, ssl_options=ssl_options)
        self.server.add_sockets([sock])

    def stop(self) -> None:
        self.server.stop()


def start_stream(handler: CompletionsHandler) -> None:
    handler.set_header("Content-Type", "text/event-stream")
    handler.set_header("Cache-Control", "no-cache")


def stream_tokens(tokens: Sequence[str], delay: float = 0.0, finish: bool = True) -> Script:
    """A normal answer, one frame per write."""
    return send_frames(answer_frames(tokens, finish), delay)


def send_frames(frames: Sequence[bytes], delay: float = 0.0, then_hang: float = 0.0) -> Script:
    """Write each byte string as its own write+flush, ``delay`` apart; then maybe hang."""

    async def script(handler: CompletionsHandler, body: dict, key: str | None) -> None:
        start_stream(handler)
        for frame in frames:
            await handler.send(frame)
            if delay:
                await asyncio.sleep(delay)
        if then_hang:
            await asyncio.sleep(then_hang)

    return script


def status(code: int, message: str = "upstream says no") -> Script:
    async def script(handler: CompletionsHandler, body: dict, key: str | None) -> None:
        handler.set_status(code)
        handler.set_header("Content-Type", "application/json")
        handler.write({"error": {"message": message, "type": "fake", "code": code}})

    return script


def hang(seconds: float) -> Script:
    """Accept the request and send nothing at all (not even headers) for ``seconds``."""

    async def script(handler: CompletionsHandler, body: dict, key: str | None) -> None:
        await asyncio.sleep(seconds)

    return script


def gated(
    tokens: Sequence[str],
    first: int,
    gate: asyncio.Event,
    finish: bool = True,
    delay: float = 0.0,
) -> Script:
    """The role chunk and ``first`` tokens, then (after ``gate``) the rest, ``delay``
    seconds apart; without ``finish`` it then hangs instead of finishing."""
    frames = answer_frames(tokens, finish)

    async def script(handler: CompletionsHandler, body: dict, key: str | None) -> None:
        start_stream(handler)
        for frame in frames[: first + 1]:
            await handler.send(frame)
        await gate.wait()
        for frame in frames[first + 1 :]:
            await handler.send(frame)
            if delay:
                await asyncio.sleep(delay)
        if not finish:
            await asyncio.sleep(30)

    return script


def by_key(scripts: dict[str | None, Script]) -> Script:
    """Pick the script by the API key the relay sent."""

    async def script(handler: CompletionsHandler, body: dict, key: str | None) -> None:
        await scripts[key](handler, body, key)

    return script


# vLLM's answer to a request field it does not know (the message names the field).
STREAM_OPTIONS_REFUSAL = (
    "[{'type': 'extra_forbidden', 'loc': ('body', 'stream_options'), "
    "'msg': 'Extra inputs are not permitted'}]"
)


def refuse_stream_options(then: Script, message: str = STREAM_OPTIONS_REFUSAL) -> Script:
    """A server that does not know ``stream_options``: 400 naming it, else ``then``."""

    async def script(handler: CompletionsHandler, body: dict, key: str | None) -> None:
        if "stream_options" in body:
            await status(400, message)(handler, body, key)
        else:
            await then(handler, body, key)

    return script


def usage_chunk(usage: dict, style: str = "openai") -> bytes:
    """The frame of a usage chunk as OpenAI (``choices: []``) or LiteLLM (an empty delta,
    no finish_reason key) send it after the finishing chunk."""
    choices: list = [] if style == "openai" else [{"index": 0, "delta": {}}]
    doc = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "choices": choices}
    return f"data: {json.dumps({**doc, 'usage': usage}, separators=(',', ':'))}\n\n".encode()


class ReplayUpstream(TCPServer):
    """Serves a recorded answer verbatim: ``head`` (status line and headers, as recorded)
    and ``body`` (the de-chunked event stream), to every request, on loopback.

    A raw TCP server rather than a Tornado app, so that no header is added or changed.
    With ``Transfer-Encoding: chunked`` in the head the body goes out as chunks of
    ``piece`` bytes (all of it in one when 0), each written, flushed and followed by a
    loop turn, so that the relay reads it in pieces that split lines, CRLFs and UTF-8
    characters; without it the body is written raw and ended by the close.
    ``close_after``: close the connection after each answer (llama-server does,
    although it advertises keep-alive); otherwise the next request may follow on it.
    """

    def __init__(self, head: bytes, body: bytes, piece: int = 0, close_after: bool = False) -> None:
        super().__init__()
        self.head, self.body, self.piece, self.close_after = head, body, piece, close_after
        self.requests: list[dict] = []
        sock, port = bind_unused_port()
        self.url = f"http://127.0.0.1:{port}/v1"
        self.add_sockets([sock])

    async def handle_stream(self, stream: IOStream, address: tuple) -> None:
        try:
            while True:
                head = (await stream.read_until(b"\r\n\r\n")).decode("latin-1")
                length = 0
                for line in head.split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                self.requests.append(json.loads(await stream.read_bytes(length)))
                await self._answer(stream)
                if self.close_after or not self.chunked:
                    stream.close()
                    return
        except StreamClosedError:
            pass

    @property
    def chunked(self) -> bool:
        return b"transfer-encoding: chunked" in self.head.lower()

    async def _answer(self, stream: IOStream) -> None:
        await stream.write(self.head)
        size = self.piece or len(self.body)
        for i in range(0, len(self.body), size):
            piece = self.body[i : i + size]
            await stream.write(b"%x\r\n%s\r\n" % (len(piece), piece) if self.chunked else piece)
            if self.piece:
                await asyncio.sleep(0)
        if self.chunked:
            await stream.write(b"0\r\n\r\n")
