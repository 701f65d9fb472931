"""Real Node clients against a real relay: Node's `eventsource` and
`@microsoft/fetch-event-source` (tests/node, installed with `npm ci` by a fixture).

Each test runs a small script from tests/node that prints one JSON line per thing
the library delivered; connections go through tests/cutproxy.py, which can cut one
inside an event's data line (FIN or RST) to check the resume.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from tests.conftest import ASK, NODE_DIR, create_session
from tests.cutproxy import CuttingProxy
from tests.fakeupstream import stream_tokens

RECORDINGS = Path(__file__).resolve().parent / "recordings"

TOKENS = [f"t{i} " for i in range(28)] + ["尊敬", "\n"]
TEXT = "".join(TOKENS)
N = len(TOKENS) + 2  # numbered events: the tokens, the business node, [DONE]
CUT_IN = 14


async def run_node(script: str, *args: str, timeout: float = 30) -> list[dict]:
    """Run ``tests/node/<script>`` to its end; the JSON lines it printed."""
    proc = await asyncio.create_subprocess_exec(
        "node",
        script,
        *args,
        cwd=NODE_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    records = [json.loads(line) for line in out.decode().splitlines()]
    assert proc.returncode == 0, (records, err.decode())
    return records


def messages(records: list[dict]) -> list[dict]:
    return [r for r in records if r["type"] == "message"]


def answer_text(data: list[str]) -> str:
    """The text of relayed chunks' data (``[DONE]`` excluded)."""
    chunks = [json.loads(d) for d in data if d != "[DONE]"]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def assert_whole_answer_once(records: list[dict]) -> None:
    """Events 1..N exactly once, in order, and the whole text: no gap, no duplicate."""
    got = messages(records)
    assert [m["id"] for m in got] == [str(i) for i in range(1, N + 1)], got
    assert answer_text([m["data"] for m in got]) == TEXT
    assert got[-1]["data"] == "[DONE]"


def assert_cut_inside_the_event(proxy: CuttingProxy) -> None:
    """One connection was cut inside event CUT_IN's data line; the client came back on a
    second one, asking for what follows event CUT_IN - 1."""
    assert proxy.cuts == 1
    first, second = proxy.connections
    assert first.cut and first.response.rsplit(b"\n", 1)[1].startswith(b"data: {")
    assert second.header("last-event-id") == str(CUT_IN - 1)


@pytest.fixture
def answer(fake) -> None:
    """The fake upstream's answer: N - 2 tokens, 10 ms apart."""
    fake.script = stream_tokens(TOKENS, delay=0.01)


@pytest.mark.parametrize("rst", [False, True], ids=["fin", "rst"])
@pytest.mark.gen_test(timeout=30)
async def test_eventsource_resumes_after_a_cut_inside_an_event(node_modules, relay, answer, rst):
    session = await create_session(relay)
    proxy = await CuttingProxy(port_of(relay.url), cut_in_event=CUT_IN, rst=rst).start()
    # It reconnects after the relay's `retry: 3000`.
    records = await run_node("eventsource.mjs", proxy.url + session["streamUrl"])
    proxy.close()
    assert_whole_answer_once(records)
    assert_cut_inside_the_event(proxy)
    assert [r["type"] for r in records if r["type"] != "message"] == [
        "open",
        "error",  # the cut: the library reconnects
        "open",
        "end",
    ]


@pytest.mark.parametrize("rst", [False, True], ids=["fin", "rst"])
@pytest.mark.gen_test(timeout=30)
async def test_fetch_event_source_resumes_after_a_cut_inside_an_event(
    node_modules, relay, answer, rst
):
    session = await create_session(relay)
    proxy = await CuttingProxy(port_of(relay.url), cut_in_event=CUT_IN, rst=rst).start()
    options = {"url": proxy.url + session["streamUrl"], "retryMs": 20}
    records = await run_node("fetch_event_source.mjs", json.dumps(options))
    proxy.close()
    assert_whole_answer_once(records)
    assert_cut_inside_the_event(proxy)
    # No empty message (the old framing's retry block and heartbeats were ones).
    assert all(m["data"] and m["event"] == "" for m in messages(records))
    kinds = [r["type"] for r in records if r["type"] != "message"]
    assert kinds == ["open", "error", "open", "end"]


@pytest.mark.gen_test(timeout=30)
async def test_fetch_event_source_with_idempotency_key_retried_after_a_cut_calls_upstream_once(
    node_modules, relay, fake, answer
):
    """Issue 13, point 4: the retried POST attaches to the same answer after its
    Last-Event-ID; the upstream is called once (needs Idempotency-Key in the relay)."""
    key = str(uuid.uuid4())
    proxy = await CuttingProxy(port_of(relay.url), cut_in_event=CUT_IN).start()
    options = {
        "url": proxy.url + "/aianswer/streamAsk",
        "method": "POST",
        "headers": {"Content-Type": "application/json", "Idempotency-Key": key},
        "body": json.dumps(ASK),
        "retryMs": 20,
    }
    records = await run_node("fetch_event_source.mjs", json.dumps(options))
    proxy.close()
    assert_whole_answer_once(records)
    assert len(fake.requests) == 1
    assert_cut_inside_the_event(proxy)
    assert [c.header("idempotency-key") for c in proxy.connections] == [key, key]
    opens = [r for r in records if r["type"] == "open"]
    assert len(opens) == 2 and opens[0]["session"] and opens[0]["session"] == opens[1]["session"]


# -- the original page's reading logic over real servers' recorded answers ----------


def recording_text(body: bytes) -> tuple[str, bool]:
    """Every delta.content of a recorded body, joined; and whether it finished with "stop"."""
    text, stop = "", False
    for line in body.decode().split("\n"):
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        for choice in json.loads(line[5:])["choices"]:
            text += choice.get("delta", {}).get("content") or ""
            stop = stop or choice.get("finish_reason") == "stop"
    return text, stop


class RecordingUpstream:
    """Answers every request with a recorded status line, headers and body, verbatim
    (the body re-chunked, as the recorded headers say ``Transfer-Encoding: chunked``),
    then closes the connection."""

    def __init__(self, name: str) -> None:
        self.body = (RECORDINGS / f"{name}.body").read_bytes()
        headers = RECORDINGS / f"{name}.headers"
        # A recording of only an answer's last events has no headers of its own.
        self.head = (
            headers.read_bytes()
            if headers.exists()
            else b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        assert b"transfer-encoding: chunked\r\n" in self.head.lower()
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> RecordingUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        writer.write(self.head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(self.body), self.body))
        await writer.drain()
        writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.mark.parametrize("name", sorted(p.stem for p in RECORDINGS.glob("*.body")))
@pytest.mark.gen_test(timeout=30)
async def test_original_page_logic_gets_the_full_text_of_every_recording(
    node_modules, make_relay, name
):
    """Issue 13, point 5: empty data skipped, [DONE] finishes, a "stop" chunk is the
    business node, a chunk with delta.role is the role announcement (its content not
    shown), otherwise delta.content is appended."""
    upstream = await RecordingUpstream(name).start()
    rs = make_relay(upstream=upstream.url)
    records = await run_node(
        "original_page.mjs", rs.url + "/aianswer/streamAsk", json.dumps(ASK, ensure_ascii=False)
    )
    upstream.close()
    text, stop = recording_text(upstream.body)
    assert records[-1] == {
        "type": "result",
        "text": text,
        "node": records[-1]["node"],
        "done": True,
    }, records
    assert len(records) == 1, records  # no error
    node = records[-1]["node"]
    if stop:
        assert set(node) == {"userId", "aiId", "occurTime"}, node
    else:
        assert node is None  # other finish reasons ("length") are shown as text, of none
