"""The embedded demo upstream: an OpenAI-compatible streaming endpoint in the relay's process.

With no ``--upstream`` each relay process (each worker) starts a `DemoServer`
serving ``POST /v1/chat/completions`` and calls it over real HTTP, so
``python server.py`` shows the true path with no API key and no network.
Every question gets the same canned answer (Chinese and English, in Markdown with a
heading, a list, a table and a code block, a few hundred tokens), one token per
``--demo-token-delay`` seconds.

Only that process's relay reaches it: it listens on 127.0.0.1 on a port of its
own (never the public one), and answers only requests that present the
process's random secret, which the relay sends as its upstream key. So the
demo is used through ``/aianswer`` or not at all, under its auth and limits.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import secrets
import time
from typing import Any, cast

import ujson
from tornado.http1connection import HTTP1Connection
from tornado.httpserver import HTTPServer
from tornado.iostream import StreamClosedError
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler, stream_request_body

from relay.ask import MAX_BODY

MODEL = "relay-demo"
# The relay's own request: the client's body (at most MAX_BODY) re-encoded as
# messages, which can double it (ujson writes each "/" as two bytes), plus roles
# and the system prompt.
MAX_REQUEST = 4 * MAX_BODY

ANSWER = (
    "## 你好！这是演示模型的回答\n\n"
    "它不调用任何外部接口，也不需要 API key，"
    "但每一个字都像真正的大模型那样，经过 Server-Sent Events 一个一个地流到你的浏览器。"
    "\n\n"
    "Hello! This answer comes from the relay's **embedded demo model**, streamed token by "
    "token over a real HTTP connection, the way vLLM, Ollama or llama.cpp would. Point the "
    "relay at a real model with `--upstream=http://host:port/v1` and the same page shows "
    "real answers.\n\n"
    "几个值得注意的地方：\n\n"
    "- 中文字符可能在网络分块时被从中间切开；\n"
    "- 换行本身也是一个词元；\n"
    "- every event is numbered: a reconnect resumes with `Last-Event-ID`, "
    "nothing repeated, nothing lost.\n\n"
    "| 模式 Mode | 接口 Endpoint | 断线以后 After a drop |\n"
    "|---|---|---|\n"
    "| one-shot | `POST /aianswer/streamAsk` | the same `Idempotency-Key` reads on |\n"
    "| resumable | `GET /aianswer/stream/<uid>` | `EventSource` resumes by itself |\n\n"
    "Reading the stream from Python:\n\n"
    "```python\n"
    "import json, urllib.request\n"
    "\n"
    "req = urllib.request.Request(\n"
    '    "http://127.0.0.1:8888/aianswer/streamAsk",\n'
    '    data=json.dumps({"aiQuestion": "你好"}).encode(),\n'
    '    headers={"Content-Type": "application/json"},\n'
    ")\n"
    "for line in urllib.request.urlopen(req):\n"
    '    if line.startswith(b"data: {"):  # then [DONE]\n'
    '        delta = json.loads(line[6:])["choices"][0]["delta"]\n'
    '        print(delta.get("content", ""), end="", flush=True)\n'
    "```\n\n"
    "Enjoy the stream, and ask another question whenever you like."
)

# Whitespace-only tokens (the paragraph breaks), a heading's marks, English words
# with their leading space, Chinese text in pieces of one or two characters, and
# any other character on its own.
_TOKEN = re.compile(r"\n+|#+ |[ ]?[A-Za-z0-9'\-./:=]+|[ ]?[\u4e00-\u9fff]{1,2}|[ ]?[^\n]")


def tokens(text: str = ANSWER) -> list[str]:
    """Split the canned answer into the tokens the demo streams; they join back exactly."""
    out: list[str] = _TOKEN.findall(text)
    if "".join(out) != text:
        raise ValueError("the demo tokenizer lost characters")
    return out


TOKENS = tokens()


def answer_for(question: str) -> str:
    """The exact text the demo streams for any question."""
    return ANSWER


def _chunk(completion_id: str, created: int, delta: dict[str, Any], finish: str | None) -> bytes:
    doc = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + ujson.dumps(doc, ensure_ascii=False).encode() + b"\n\n"


class DemoServer:
    """The demo upstream on 127.0.0.1, an ephemeral port, for this process's relay only."""

    def __init__(self, token_delay: float) -> None:
        self.secret = secrets.token_hex(16)
        app = Application(
            [
                (
                    r"/v1/chat/completions",
                    DemoCompletionsHandler,
                    {"token_delay": token_delay, "secret": self.secret},
                )
            ]
        )
        sockets = bind_sockets(0, "127.0.0.1")
        self.url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}/v1"
        self._server = HTTPServer(app)
        self._server.add_sockets(sockets)

    async def close(self) -> None:
        self._server.stop()
        await self._server.close_all_connections()


@stream_request_body
class DemoCompletionsHandler(RequestHandler):
    """``POST /v1/chat/completions``: the canned answer as an OpenAI event stream.

    The secret is checked on the headers, before any body is read; the body is
    never used: it is streamed in and dropped, under a bound of its own.
    """

    def initialize(self, token_delay: float, secret: str) -> None:
        self.token_delay = token_delay
        self.secret = secret

    def prepare(self) -> None:
        presented = self.request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(presented, f"Bearer {self.secret}".encode()):
            self.set_status(401)
            self.finish({"error": {"message": "the demo answers its own relay only"}})
            return
        cast(HTTP1Connection, self.request.connection).set_max_body_size(MAX_REQUEST)

    def data_received(self, chunk: bytes) -> None:
        pass

    async def post(self) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        completion_id = f"chatcmpl-demo{int(time.time() * 1000)}"
        created = int(time.time())
        try:
            self.write(_chunk(completion_id, created, {"role": "assistant", "content": ""}, None))
            await self.flush()
            for token in TOKENS:
                await asyncio.sleep(self.token_delay)
                self.write(_chunk(completion_id, created, {"content": token}, None))
                await self.flush()
            self.write(_chunk(completion_id, created, {}, "stop"))
            self.write(b"data: [DONE]\n\n")
            await self.flush()
        except StreamClosedError:
            return
