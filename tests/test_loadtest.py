"""The load-testing tools on loopback: relay.tools.fakeupstream alone, and relay.tools.loadtest
against a real relay in front of it (in this process, and as the CLI with worker processes)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import pytest

from relay.httpclient import StreamingHTTPClient
from relay.sse import SSEParser
from relay.streaming_request import StreamingRequest
from relay.tools import fakeupstream, loadtest
from relay.tools.fakeupstream import Answer, FakeUpstream, expected_text
from relay.tools.loadtest import Histogram, LoadConfig
from tests.conftest import eventually, fetch_stream

ROOT = Path(__file__).resolve().parent.parent
CHAT = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "stream": True}
SUMMARY_KEYS = {"count", "mean", "min", "p50", "p90", "p99", "max"}
RESULT_KEYS = {
    "config",
    "elapsed_s",
    "streams",
    "events",
    "ttft_s",
    "gap_s",
    "lag_s",
    "connect_s",
    "stream_s",
    "stream_events_per_s",
    "errors",
    "exactness",
    "cpu",
    "watched",
    "ok",
}


@pytest.fixture
def make_upstream(io_loop):
    """``await make_upstream(tokens=..., interval=...)``: a FakeUpstream on a free port."""
    started: list[FakeUpstream] = []

    async def start(**answer) -> FakeUpstream:
        fake = await FakeUpstream(Answer(**answer)).start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.close()


def assert_sane(summary: dict) -> None:
    assert set(summary) == SUMMARY_KEYS, summary
    assert 0 <= summary["min"] <= summary["p50"] <= summary["p90"] <= summary["p99"]
    assert summary["p99"] <= summary["max"]


# -- the fake upstream ------------------------------------------------------------------------


def test_expected_text_mixes_chinese_english_and_whitespace_tokens():
    text = expected_text(60)
    assert text == "".join(fakeupstream.token(i) for i in range(60))
    assert "你好" in text and " English" in text and "🙂" in text and ' "quoted"' in text
    assert "\n\n" in [fakeupstream.token(i) for i in range(60)]
    assert expected_text(0) == ""


@pytest.mark.gen_test(timeout=10)
async def test_fake_upstream_streams_timestamped_chunks_of_the_expected_text(make_upstream):
    fake = await make_upstream(tokens=30, interval=0.01)
    before = time.time()
    res = await fetch_stream(fake.url + "/chat/completions", CHAT)
    assert res.status == 200
    assert res.headers["content-type"].startswith("text/event-stream")
    assert res.data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in res.data[:-1]]
    assert len(chunks) == 1 + 30 + 1  # role, tokens, finish
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "bench" for c in chunks)
    # The send time comes first, so the load tester reads it without parsing JSON.
    assert all(d.startswith('{"t":') for d in res.data[:-1])
    stamps = [c["t"] for c in chunks]
    assert before <= stamps[0] and stamps == sorted(stamps) and stamps[-1] <= time.time()
    assert stamps[-2] - stamps[1] >= 29 * 0.01 * 0.9  # tokens really are spaced
    assert res.text() == expected_text(30)


@pytest.mark.gen_test(timeout=10)
async def test_fake_upstream_fast_mode_and_request_errors(make_upstream):
    fake = await make_upstream(tokens=3000, interval=0)
    res = await fetch_stream(fake.url + "/chat/completions", CHAT)
    assert res.text() == expected_text(3000)
    assert (await fetch_stream(fake.url + "/chat/completions", method="GET")).status == 405
    assert (await fetch_stream(fake.url + "/nope", CHAT)).status == 404
    not_streaming = await fetch_stream(fake.url + "/chat/completions", {**CHAT, "stream": False})
    assert not_streaming.status == 400
    assert "stream" in not_streaming.json()["error"]["message"]


@pytest.mark.gen_test
@pytest.mark.parametrize("keepalive", [5, 0])
async def test_fake_upstream_keeps_the_connection_unless_asked_to_close(make_upstream, keepalive):
    fake = await make_upstream(tokens=5, interval=0.001)
    client = StreamingHTTPClient(force_instance=True, keepalive=keepalive)
    try:
        for _ in range(3):
            got: list[bytes] = []
            request = StreamingRequest(
                fake.url + "/chat/completions",
                method="POST",
                body=json.dumps(CHAT),
                streaming_callback=got.append,
            )
            response = await client.fetch(request)
            assert response.code == 200
            assert SSEParser().feed(b"".join(got))[-1].data == "[DONE]"
        assert fake.served == 3
        await eventually(lambda: len(fake.connections) == (1 if keepalive else 0))
    finally:
        client.close()


def test_fake_upstream_listens_on_loopback_only(capsys):
    with pytest.raises(SystemExit) as exit_info:
        fakeupstream.main(["--host=0.0.0.0"])
    assert exit_info.value.code == 2
    assert "loopback" in capsys.readouterr().err


# -- the load tester ---------------------------------------------------------------------------


def test_histogram_percentiles_are_within_one_percent_and_merge():
    a, b = Histogram(), Histogram()
    for ms in range(1, 501):
        a.add(ms / 1000)
    for ms in range(501, 1001):
        b.add(ms / 1000)
    a.merge(b)
    summary = a.summary()
    assert summary["count"] == 1000 and summary["min"] == 0.001 and summary["max"] == 1.0
    for q, want in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        assert want <= summary[q] <= want * 1.01
    assert Histogram().summary() == {"count": 0}


def test_refuses_a_non_loopback_host_without_allow_host(capsys):
    for url in ("http://example.com:8888", "http://10.0.0.1:8888"):
        with pytest.raises(SystemExit) as exit_info:
            loadtest.main([f"--url={url}", "--streams=1", "--duration=1"])
        assert exit_info.value.code == 2
        assert "--allow-host" in capsys.readouterr().err
    # Named explicitly it is accepted (an IP literal: nothing is looked up or contacted).
    target = loadtest.resolve_target(
        LoadConfig(url="http://10.0.0.1:8888", allow_hosts=("10.0.0.1",))
    )
    assert target.address == ("10.0.0.1", 8888)


@pytest.mark.gen_test(timeout=10)
async def test_response_parser_takes_any_split_of_a_chunked_event_stream():
    frames = [b"retry: 3000\n"]
    frames += [
        b'data: {"t":%f,"choices":[{"delta":{"content":%s}}]}\nid: %d\n\n'
        % (time.time(), json.dumps(fakeupstream.token(i)).encode(), i + 1)
        for i in range(12)
    ]
    frames.append(b"data: [DONE]\nid: 13\n\n")
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(f), f) for f in frames) + b"0\r\n\r\n"
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked

    class Transport:
        def write(self, data: bytes) -> None:
            pass

    for step in (1, 7, len(wire)):
        worker = loadtest._Worker(LoadConfig(url="http://127.0.0.1:9", expect_tokens=12), 1)
        run = loadtest._StreamRun(worker, sampled=True)
        connection = loadtest._Connection(worker.stats)
        connection.connection_made(Transport())
        done = connection.request(b"", run)
        for i in range(0, len(wire), step):
            connection.data_received(wire[i : i + step])
        assert await done is True  # complete, and the connection may be reused
        assert run.outcome("") == ""
        assert loadtest._text_of(run.texts) == expected_text(12)
        assert worker.stats.events == 12 and worker.stats.lag.n == 12
        assert worker.stats.bytes == len(wire)


@pytest.mark.gen_test(timeout=30)
async def test_short_oneshot_run_against_a_real_relay(make_relay, make_upstream):
    fake = await make_upstream(tokens=20, interval=0.02)
    rs = make_relay(upstream=fake.url)
    cfg = LoadConfig(
        url=rs.url, streams=20, duration=2.0, ramp=0.5, expect_tokens=20, sample=1.0, quiet=True
    )
    result = await loadtest.run_async(cfg)
    assert set(result) == RESULT_KEYS
    assert result["ok"], loadtest.format_summary(result)
    assert result["errors"] == {"total": 0, "by_kind": {}}
    streams = result["streams"]
    assert streams["failed"] == 0 and streams["completed"] == streams["started"] >= 40
    assert streams["max_active"] == 20 and streams["connections"] == 20  # kept alive
    exact = result["exactness"]
    assert exact["checked"] == exact["exact"] == streams["completed"] and exact["mismatched"] == 0
    assert result["events"]["total"] == streams["completed"] * 21  # 20 tokens + finish
    for key in ("ttft_s", "gap_s", "lag_s", "stream_s"):
        assert_sane(result[key])
    assert result["lag_s"]["count"] == result["events"]["total"]
    assert 0.01 < result["gap_s"]["p50"] < 0.05  # the upstream's 20 ms, give or take
    assert result["ttft_s"]["p99"] < 1.0 and result["stream_s"]["p50"] >= 0.38
    assert result["cpu"]["processes"][0]["role"] == "worker"
    assert "OK" in loadtest.format_summary(result)


@pytest.mark.gen_test(timeout=30)
async def test_cli_session_mode_with_two_processes_writes_the_json_result(
    make_relay, make_upstream, tmp_path
):
    fake = await make_upstream(tokens=20, interval=0.01)
    rs = make_relay(upstream=fake.url)
    out = tmp_path / "result.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay.tools.loadtest",
        f"--url={rs.url}",
        "--mode=session",
        "--streams=10",
        "--duration=2",
        "--ramp=0.2",
        "--processes=2",
        "--expect-tokens=20",
        "--sample=0.5",
        f"--json={out}",
        f"--watch-pid={os.getpid()}",
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await proc.communicate()
    log = stderr.decode()
    assert proc.returncode == 0, log
    assert "events/s" in log.splitlines()[0]  # the live progress line
    assert log.rstrip().endswith("OK")
    result = json.loads(out.read_text())
    assert set(result) == RESULT_KEYS
    assert result["config"]["mode"] == "session" and result["config"]["processes"] == 2
    assert result["ok"] and result["streams"]["completed"] >= 20
    assert result["exactness"]["checked"] >= 10 and result["exactness"]["mismatched"] == 0
    assert len(rs.relay.store) == 0  # every finished session was deleted
    roles = sorted(p["role"] for p in result["cpu"]["processes"])
    assert roles == ["parent", "worker", "worker"]
    assert result["watched"][0]["pid"] == os.getpid() and result["watched"][0]["cpu_s"] > 0
