"""The embedded demo upstream: an OpenAI-compatible streaming endpoint on the relay itself.

With no ``--upstream`` the server also serves ``POST /demo/v1/chat/completions``
and the relay calls it over real HTTP on loopback, so ``python server.py``
shows the true path with no API key and no network. Every question gets the
same canned answer (Chinese and English, a paragraph break, a few hundred
tokens), one token per ``--demo-token-delay`` seconds.
"""

from __future__ import annotations

import asyncio
import re
import time

import ujson
from tornado.iostream import StreamClosedError
from tornado.web import RequestHandler, stream_request_body

from relay.ask import MAX_BODY

MODEL = "relay-demo"
# The relay's own request: the client's body (at most MAX_BODY) re-encoded as
# messages, which can double it (ujson writes each "/" as two bytes), plus roles
# and the system prompt.
MAX_REQUEST = 4 * MAX_BODY

ANSWER = (
    "你好！这是中继服务器内置的演示模型给出的回答。"
    "它不调用任何外部接口，也不需要 API key，"
    "但每一个字都像真正的大模型那样，经过 Server-Sent Events 一个一个地流到你的浏览器。"
    "\n\n"
    "Hello! This answer comes from the relay's embedded demo model. "
    "It streams token by token over a real HTTP connection on loopback, "
    "exactly the way an OpenAI-compatible server such as vLLM, Ollama or llama.cpp would. "
    "Point the relay at a real model with --upstream=http://host:port/v1 and the same page "
    "shows real answers."
    "\n\n"
    "几个值得注意的地方：中文字符可能在网络分块时被从中间切开，换行本身也是一个词元，"
    "而每个事件都带有编号，断线重连后可以用 Last-Event-ID 从断点继续，既不重复也不遗漏。"
    "\n\n"
    "Enjoy the stream, and ask another question whenever you like."
)

# Whitespace-only tokens (the paragraph breaks), English words with their
# leading space, Chinese text in pieces of one or two characters, and any other
# character on its own.
_TOKEN = re.compile(r"\n+|[ ]?[A-Za-z0-9'\-./:=]+|[ ]?[\u4e00-\u9fff]{1,2}|[ ]?[^\n]")


def tokens(text: str = ANSWER) -> list[str]:
    """Split the canned answer into the tokens the demo streams; they join back exactly."""
    out = _TOKEN.findall(text)
    assert "".join(out) == text, "demo tokenizer must not lose characters"
    return out


TOKENS = tokens()


def answer_for(question: str) -> str:
    """The exact text the demo streams for any question."""
    return ANSWER


def _chunk(completion_id: str, created: int, delta: dict, finish: str | None) -> bytes:
    doc = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + ujson.dumps(doc, ensure_ascii=False).encode() + b"\n\n"


@stream_request_body
class DemoCompletionsHandler(RequestHandler):
    """``POST /demo/v1/chat/completions``: the canned answer as an OpenAI event stream.

    The request body is never used: it is streamed in and dropped, under a bound
    of its own above the server-wide one.
    """

    def initialize(self, token_delay: float) -> None:
        self.token_delay = token_delay

    def prepare(self) -> None:
        self.request.connection.set_max_body_size(MAX_REQUEST)

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
