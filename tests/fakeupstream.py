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
from tornado.iostream import StreamClosedError
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
    def initialize(self, fake: FakeUpstream) -> None:
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


class FakeUpstream:
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
