"""Fixtures: a fake upstream and relays, each a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.testing import bind_unused_port
from tornado.web import RequestHandler

from relay.app import Relay, make_app
from relay.chunks import ChunkRules
from relay.config import Settings
from relay.connections import ConnectionServer, make_http_server
from relay.errors import RelayError
from relay.http1 import ResponseParser
from relay.httpclient import CancelHandle, _ResponseReader
from relay.sessions import Session
from relay.sse import ServerSentEvent, SSEParser
from relay.upstream import UpstreamCall
from tests.browser import BrowserThread, ChatPage
from tests.fakeupstream import ScriptedUpstream
from tests.processes import RelayProcess
from tests.redis_servers import RedisServer

NODE_DIR = Path(__file__).resolve().parent / "node"


@dataclass
class RelayServer:
    url: str
    relay: Relay
    server: ConnectionServer


@pytest.fixture
def fake(io_loop) -> ScriptedUpstream:
    upstream = ScriptedUpstream()
    yield upstream
    upstream.stop()


@pytest.fixture
def make_relay(io_loop) -> Callable[..., RelayServer]:
    """Start a relay with ``Settings(**overrides)``; ``upstream=None`` means the demo."""
    started: list[RelayServer] = []

    def start(**overrides) -> RelayServer:
        sock, port = bind_unused_port()
        url = f"http://127.0.0.1:{port}"
        overrides.setdefault("demo_token_delay", 0.001)
        settings = dataclasses.replace(Settings(), port=port, **overrides)
        app = make_app(settings)
        server = make_http_server(app)
        server.add_sockets([sock])
        rs = RelayServer(url, app.relay, server)
        started.append(rs)
        return rs

    yield start
    for rs in started:
        rs.server.stop()
        io_loop.run_sync(rs.relay.shutdown, timeout=10)
        io_loop.run_sync(rs.server.close_all_connections, timeout=10)


@pytest.fixture
def relay(make_relay, fake) -> RelayServer:
    """A relay in front of the fake upstream."""
    return make_relay(upstream=fake.url)


@pytest.fixture
def relay_process(io_loop, tmp_path) -> Callable[..., Awaitable[RelayProcess]]:
    """Start ``server.py`` with flags: ``await relay_process(*args)``; stopped at teardown."""
    started: list[RelayProcess] = []

    async def start(*args: str, nofile: int | None = None) -> RelayProcess:
        rp = RelayProcess.start(list(args), tmp_path / f"relay{len(started)}.log", nofile)
        started.append(rp)
        await rp.ready()
        return rp

    yield start
    for rp in started:
        rp.stop()


@pytest.fixture
def redis_server(tmp_path) -> RedisServer:
    """A redis-server of the test's own on a free port (tests/redis_servers.py)."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def llama_model(tmp_path_factory) -> Path:
    """A tiny random-weight llama (``tests/llama.py``), written once per run. Fails, never
    skips, when ``.ci/build-llama-server`` has not built llama-server."""
    from tests import llama

    why = llama.missing()
    if why:
        pytest.fail(why, pytrace=False)
    vocab = llama.llama_dir() / "models" / llama.VOCAB
    return llama.write_model(tmp_path_factory.mktemp("llama") / "tiny.gguf", vocab)


def _llama_server(tmp_path_factory, model: Path, name: str, *args: str):
    from tests import llama

    binary = llama.llama_dir() / "bin" / "llama-server"
    log = tmp_path_factory.mktemp(name) / "llama-server.log"
    return llama.LlamaServer.start(binary, model, log, *args)


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory, llama_model):
    """A real llama-server with the tiny model; answers stop after 48 tokens."""
    server = _llama_server(tmp_path_factory, llama_model, "llama", "-n", "48")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def llama_server_endless(tmp_path_factory, llama_model):
    """A real llama-server whose answers go on (context shift, no end of text) for up to
    20,000 tokens: tens of seconds, time enough for a client to leave mid-answer."""
    server = _llama_server(
        tmp_path_factory,
        llama_model,
        "llama-endless",
        *("--context-shift", "--ignore-eos", "-n", "20000"),
    )
    yield server
    server.stop()


@dataclass
class StreamResult:
    status: int
    headers: dict[str, str]
    events: list[ServerSentEvent]
    raw: bytes
    body: bytes = b""
    retry: int | None = None
    chunks: list[bytes] = field(default_factory=list)

    def json(self) -> dict:
        return json.loads(self.body or self.raw)

    @property
    def data(self) -> list[str]:
        return [e.data for e in self.events if e.event == "message"]

    def text(self) -> str:
        """The answer text: the content of every relayed chunk, joined."""
        out = []
        for d in self.data:
            if d == "[DONE]":
                continue
            for choice in json.loads(d).get("choices", []):
                out.append(choice.get("delta", {}).get("content") or "")
        return "".join(out)


def assert_every_block_is_an_event(raw: bytes) -> None:
    """The framing every popular parser reads right (docs/api.md, "The event stream").

    The openai SDK's decoder, httpx-sse and fetch-event-source dispatch at every
    blank line, so each block must hold data; fetch-event-source takes an id as
    soon as it reads the line, so the id must be the block's last line.
    """
    *blocks, _tail = raw.replace(b"\r\n", b"\n").split(b"\n\n")
    for i, block in enumerate(blocks):
        lines = [line for line in block.split(b"\n") if not line.startswith(b":")]
        assert any(line.startswith(b"data:") for line in lines), block
        ids = [n for n, line in enumerate(lines) if line.startswith(b"id:")]
        assert ids in ([], [len(lines) - 1]), block
        assert i == 0 or not any(line.startswith(b"retry:") for line in lines), block


async def fetch_stream(
    url: str,
    body: dict | bytes | None = None,
    method: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> StreamResult:
    """Run a request to its end, parsing an event stream as it arrives."""
    parser = SSEParser()
    events: list[ServerSentEvent] = []
    raw = bytearray()
    chunks: list[bytes] = []
    resp_headers: dict[str, str] = {}

    def on_chunk(chunk: bytes) -> None:
        raw.extend(chunk)
        chunks.append(chunk)
        events.extend(parser.feed(chunk))

    def on_header(line: str) -> None:
        name, sep, value = line.partition(":")
        if sep:
            resp_headers[name.strip().lower()] = value.strip()

    if isinstance(body, dict):
        body = json.dumps(body, ensure_ascii=False).encode()
    client = AsyncHTTPClient(force_instance=True)
    try:
        response = await client.fetch(
            HTTPRequest(
                url,
                method=method or ("POST" if body is not None else "GET"),
                body=body,
                headers={"Content-Type": "application/json", **(headers or {})},
                streaming_callback=on_chunk,
                header_callback=on_header,
                request_timeout=timeout,
                allow_nonstandard_methods=True,
            ),
            raise_error=False,
        )
    finally:
        client.close()
    # Tornado's error for a non-2xx response holds the response: a cycle the
    # tests of the relay's own cycles must not see.
    response.error = None
    return StreamResult(
        response.code, resp_headers, events, bytes(raw), bytes(raw), parser.retry, chunks
    )


ASK = {"robotId": "1", "aiQuestion": "你好"}


async def create_session(server, headers: dict[str, str] | None = None) -> dict:
    """POST /aianswer/sessions on ``server`` (anything with a ``url``); the 201 body."""
    res = await fetch_stream(server.url + "/aianswer/sessions", ASK, headers=headers)
    assert res.status == 201, res.raw
    return res.json()


async def eventually(predicate: Callable[[], object], timeout: float = 2.0) -> None:
    """Wait until ``predicate()`` is true, checking every 20 ms; fail after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.02)


def nothing_left(rs: RelayServer) -> bool:
    """Whether the relay holds no session, stream, upstream call or upstream socket."""
    relay = rs.relay
    return not (
        len(relay.store) or relay.streams or relay.upstream.calls or relay.upstream.client.active
    )


# What one stream allocates (app-wide objects such as a relay torn down by an
# earlier test's fixture are not the question here).
PER_STREAM = (
    Session,
    UpstreamCall,
    ChunkRules,
    SSEParser,
    CancelHandle,
    ResponseParser,
    RelayError,
    RequestHandler,
    _ResponseReader,
)


@pytest.fixture
def clean_gc():
    """Start from no garbage (an earlier test's torn-down relay is garbage too)."""
    gc.collect()
    gc.garbage.clear()
    yield
    gc.set_debug(0)


def cyclic_stream_garbage() -> list[str]:
    """Collect; the per-stream objects that were only reachable through cycles."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return sorted({type(o).__qualname__ for o in gc.garbage if isinstance(o, PER_STREAM)})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.collect()  # saved objects keep their cycles: free them for real now


def chunked(body: bytes, size: int) -> bytes:
    """``body`` in HTTP/1.1 chunked framing, ``size`` bytes a chunk, with extensions and a
    trailer."""
    out = b""
    for i in range(0, len(body), size):
        piece = body[i : i + size]
        out += b"%x;ext=1\r\n%s\r\n" % (len(piece), piece)
    return out + b"0\r\nX-Trailer: 1\r\n\r\n"


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium per test module (tests/browser.py)."""
    bt = BrowserThread()
    yield bt
    bt.close()


@pytest.fixture
def open_chat(browser, make_relay, fake):
    """``open_chat(**context_options)`` -> a fresh ChatPage (own localStorage).

    It depends on the relay fixtures so that pages close before the servers stop.
    """
    pages: list[ChatPage] = []

    def new(**options) -> ChatPage:
        options.setdefault("viewport", {"width": 900, "height": 760})
        chat = browser.new_page(**options)
        pages.append(chat)
        return chat

    yield new
    errors = [e for chat in pages for e in chat.errors]
    for chat in pages:
        chat.close()
    assert not errors, errors


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """tests/node/node_modules as the lock file pins it (``npm ci`` when missing or older):
    the Node clients of tests/test_node_clients.py, and axe-core for the page."""
    # Not a skip: .ci/run installs Debian's nodejs and npm where they are missing.
    assert shutil.which("node") and shutil.which("npm"), "node and npm are missing (see .ci/run)"
    modules = NODE_DIR / "node_modules"
    lock = NODE_DIR / "package-lock.json"
    if not modules.exists() or modules.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            check=True,
            capture_output=True,
            timeout=300,
        )
    return modules
