"""Ready versus alive (issue 14, point 5), through real relay processes.

``/healthz`` says the process lives (a liveness probe); ``/readyz`` says whether to send it
new requests (a readiness probe): 503 ``draining`` after SIGTERM and 503
``store_unavailable`` while Redis does not answer a PING.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time

import pytest
from tornado.iostream import IOStream, StreamClosedError

from relay.config import ConfigError, load_settings
from tests.conftest import ASK, fetch_stream
from tests.fakeupstream import answer_frames, send_frames, stream_tokens
from tests.processes import RelayProcess

TOKENS = [f"t{i} " for i in range(20)]


async def probe(rp: RelayProcess, path: str) -> tuple[int, dict, float]:
    """Status, JSON body and seconds taken of ``GET path`` on a fresh connection."""
    began = time.monotonic()
    res = await fetch_stream(rp.url + path, timeout=10)
    return res.status, json.loads(res.raw), time.monotonic() - began


async def until_status(rp: RelayProcess, path: str, status: int, within: float) -> dict:
    """Probe ``path`` until it answers ``status``; fail after ``within`` seconds. A reset
    counts as no answer yet: with workers, one that stops resets what its socket queued."""
    deadline = time.monotonic() + within
    while True:
        try:
            got, body, _ = await probe(rp, path)
        except OSError as e:
            got, body = 0, {"reset": str(e)}
        if got == status:
            return body
        assert time.monotonic() < deadline, (path, got, body)
        await asyncio.sleep(0.05)


async def open_stream(rp: RelayProcess) -> IOStream:
    """A one-shot answer streaming on its own connection, read up to its first event."""
    stream = IOStream(socket.socket())
    await stream.connect(("127.0.0.1", rp.port))
    body = json.dumps(ASK).encode()
    await stream.write(
        b"POST /aianswer/streamAsk HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await stream.read_until(b"id: 1\n")
    return stream


async def rest_of(stream: IOStream) -> bytes:
    """Everything the stream sends until the relay closes it."""
    try:
        return await stream.read_until_close()
    except StreamClosedError:
        return b""


async def exit_code(rp: RelayProcess, within: float) -> int:
    deadline = time.monotonic() + within
    while rp.proc.poll() is None:
        assert time.monotonic() < deadline, "the relay did not exit"
        await asyncio.sleep(0.05)
    return rp.proc.returncode


@pytest.mark.gen_test(timeout=30)
async def test_readyz_is_200_and_healthz_alive_when_serving(relay_process, fake):
    rp = await relay_process(f"--upstream={fake.url}")
    assert (await probe(rp, "/readyz"))[:2] == (200, {"status": "ready"})
    status, body, _ = await probe(rp, "/healthz")
    assert status == 200 and body["status"] == "ok" and body["draining"] is False


@pytest.mark.gen_test(timeout=60)
async def test_sigterm_drains_not_ready_but_alive_while_open_streams_finish(relay_process, fake):
    rp = await relay_process(f"--upstream={fake.url}", "--drain-timeout=30")
    fake.script = stream_tokens(TOKENS, delay=0.1)  # about 2 s an answer
    stream = await open_stream(rp)
    rp.proc.send_signal(signal.SIGTERM)
    body = await until_status(rp, "/readyz", 503, within=2)
    assert body["error"]["code"] == "draining"
    status, health, _ = await probe(rp, "/healthz")
    assert status == 200 and health["status"] == "ok" and health["draining"] is True
    assert health["streams"] == 1
    # Still served while draining: a balancer may send a request before its probe fails.
    late = await fetch_stream(rp.url + "/aianswer/streamAsk", ASK)
    assert late.status == 200 and late.text() == "".join(TOKENS)
    # The open stream runs to its end instead of being cut; then the process exits at once.
    rest = await rest_of(stream)
    ended = time.monotonic()
    assert b"data: [DONE]" in rest and b"event: error" not in rest
    assert await exit_code(rp, within=5) == 0
    assert time.monotonic() - ended < 3


@pytest.mark.gen_test(timeout=30)
async def test_drain_timeout_tells_the_streams_left_shutdown_and_exits_0(relay_process, fake):
    rp = await relay_process(f"--upstream={fake.url}", "--drain-timeout=1")
    fake.script = send_frames(answer_frames(["never ends"], finish=False), then_hang=60)
    stream = await open_stream(rp)
    began = time.monotonic()
    rp.proc.send_signal(signal.SIGTERM)
    rest = await rest_of(stream)
    took = time.monotonic() - began
    assert b"event: error" in rest and b'"shutdown"' in rest
    assert 0.9 < took < 4, took
    assert await exit_code(rp, within=5) == 0


@pytest.mark.gen_test(timeout=30)
async def test_sigint_during_a_drain_shuts_down_at_once(relay_process, fake):
    rp = await relay_process(f"--upstream={fake.url}", "--drain-timeout=60")
    fake.script = send_frames(answer_frames(["never ends"], finish=False), then_hang=60)
    stream = await open_stream(rp)
    rp.proc.send_signal(signal.SIGTERM)
    await until_status(rp, "/readyz", 503, within=2)
    began = time.monotonic()
    rp.proc.send_signal(signal.SIGINT)
    rest = await rest_of(stream)
    assert b'"shutdown"' in rest
    assert await exit_code(rp, within=5) == 0
    assert time.monotonic() - began < 3


@pytest.mark.gen_test(timeout=30)
async def test_sigterm_with_nothing_open_exits_at_once(relay_process, fake):
    rp = await relay_process(f"--upstream={fake.url}", "--drain-timeout=60")
    began = time.monotonic()
    rp.proc.send_signal(signal.SIGTERM)
    assert await exit_code(rp, within=5) == 0
    assert time.monotonic() - began < 3


@pytest.mark.gen_test(timeout=60)
async def test_workers_drain_together_and_the_port_stays_not_ready(
    relay_process, fake, redis_server
):
    rp = await relay_process(
        f"--upstream={fake.url}", f"--store={redis_server.url}", "--workers=2", "--drain-timeout=30"
    )
    fake.script = stream_tokens(TOKENS, delay=0.1)
    stream = await open_stream(rp)
    rp.proc.send_signal(signal.SIGTERM)  # to the parent, which passes it on
    # The idle worker exits at once and closes its socket; the draining one answers.
    body = await until_status(rp, "/readyz", 503, within=2)
    assert body["error"]["code"] == "draining"
    assert (await until_status(rp, "/healthz", 200, within=2))["draining"] is True
    rest = await rest_of(stream)
    assert b"data: [DONE]" in rest and b"event: error" not in rest
    assert await exit_code(rp, within=5) == 0


@pytest.mark.gen_test(timeout=60)
async def test_readyz_is_503_while_redis_is_down_and_200_when_it_returns(
    relay_process, fake, redis_server
):
    rp = await relay_process(f"--upstream={fake.url}", f"--store={redis_server.url}")
    assert (await probe(rp, "/readyz"))[:2] == (200, {"status": "ready"})
    redis_server.stop()  # killed
    began = time.monotonic()
    body = await until_status(rp, "/readyz", 503, within=3)
    assert body["error"]["code"] == "store_unavailable"
    assert time.monotonic() - began < 2.5  # a refused PING, and at most a second of cache
    status, health, _ = await probe(rp, "/healthz")
    assert status == 200 and health["status"] == "ok"  # alive: nothing to restart
    redis_server.start()  # the same port
    began = time.monotonic()
    await until_status(rp, "/readyz", 200, within=5)
    assert time.monotonic() - began < 3
    log = rp.log.read_text()
    assert "does not answer a PING: not ready" in log and "answers again: ready" in log


@pytest.mark.gen_test(timeout=60)
async def test_readyz_answers_within_a_bound_while_redis_is_frozen(
    relay_process, fake, redis_server
):
    rp = await relay_process(f"--upstream={fake.url}", f"--store={redis_server.url}")
    assert (await probe(rp, "/readyz"))[0] == 200
    os.kill(redis_server.proc.pid, signal.SIGSTOP)  # accepts, never answers
    try:
        await asyncio.sleep(1.1)  # past the cached answer
        status, body, took = await probe(rp, "/readyz")
        assert status == 503 and body["error"]["code"] == "store_unavailable"
        assert took < 2, took  # the PING's own bound, not a hang
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    await until_status(rp, "/readyz", 200, within=5)


@pytest.mark.gen_test(timeout=60)
async def test_a_storm_of_readiness_probes_costs_redis_about_one_ping_a_second(
    relay_process, fake, redis_server
):
    rp = await relay_process(f"--upstream={fake.url}", f"--store={redis_server.url}")
    r = redis_server.client()

    def pings() -> int:
        return r.info("commandstats").get("cmdstat_ping", {}).get("calls", 0)

    before = pings()
    began = time.monotonic()
    results = await asyncio.gather(*(probe(rp, "/readyz") for _ in range(200)))
    seconds = time.monotonic() - began
    assert {status for status, _, _ in results} == {200}
    assert pings() - before <= seconds + 2, (pings() - before, seconds)


def test_a_negative_drain_timeout_is_refused():
    with pytest.raises(ConfigError, match="--drain-timeout must not be negative"):
        load_settings(["--drain-timeout=-1"], {})
    assert load_settings(["--drain-timeout=0"], {}).drain_timeout == 0
