"""Real Python clients read relayed answers with their own parsers: the openai SDK's
`Stream` and httpx-sse (docs/api.md, "Framing, and why").

A short heartbeat and a slow upstream put ``: ping`` lines between events; every
client goes through a recording proxy (tests/cutproxy.py, cutting nothing) so each
test can also check that the bytes it read held the pings and the retry line.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse, connect_sse
from openai.types.chat import ChatCompletionChunk

from tests.conftest import ASK
from tests.cutproxy import CuttingProxy
from tests.fakeupstream import stream_tokens

TOKENS = ["尊敬", "的", "用户", "，", "\n\n", " ", "Hello", " world", "！", "\n"]
TEXT = "".join(TOKENS)
HEARTBEAT = 0.03  # seconds; the upstream waits 0.08 s between tokens
N = len(TOKENS) + 2  # numbered events: the tokens, the business node, [DONE]


@pytest.fixture
def slow_relay(make_relay, fake):
    """A relay with a short heartbeat in front of a slow upstream."""
    fake.script = stream_tokens(TOKENS, delay=0.08)
    return make_relay(upstream=fake.url, heartbeat=HEARTBEAT)


async def recording_proxy(rs) -> CuttingProxy:
    return await CuttingProxy(int(rs.url.rsplit(":", 1)[1])).start()


def assert_heartbeats_between_events(proxy: CuttingProxy) -> None:
    """The stream the client read held the retry line and pings between its events."""
    (conn,) = proxy.connections
    body = conn.response.partition(b"\r\n\r\n")[2]
    assert b"retry: 3000\ndata: " in body
    # About two per 80 ms gap; a loaded machine may tick late, so ask for a few.
    assert body.partition(b"\nid: 1\n\n")[2].count(b"\n: ping\n") >= 3, body


def read_sync(url: str, into: list[ChatCompletionChunk] | None = None) -> list[ChatCompletionChunk]:
    """The SDK's own `Stream` over a relayed answer; ``into`` keeps what came before an error."""
    chunks = [] if into is None else into
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
    with client:
        stream = client.post(
            "/aianswer/streamAsk",
            body=ASK,
            cast_to=ChatCompletionChunk,
            stream=True,
            stream_cls=openai.Stream[ChatCompletionChunk],
        )
        chunks.extend(stream)
    return chunks


async def read_async(url: str) -> list[ChatCompletionChunk]:
    async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0) as client:
        stream = await client.post(
            "/aianswer/streamAsk",
            body=ASK,
            cast_to=ChatCompletionChunk,
            stream=True,
            stream_cls=openai.AsyncStream[ChatCompletionChunk],
        )
        return [c async for c in stream]


async def openai_chunks(url: str, mode: str) -> list[ChatCompletionChunk]:
    """The SDK's chunks of one streamAsk answer, with the sync client (on a thread,
    so that the loop serves the relay) or the async one."""
    if mode == "sync":
        return await asyncio.to_thread(read_sync, url)
    return await read_async(url)


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.gen_test(timeout=30)
async def test_openai_stream_reads_every_chunk_through_heartbeats(slow_relay, mode):
    proxy = await recording_proxy(slow_relay)
    chunks = await openai_chunks(proxy.url, mode)
    proxy.close()
    assert_heartbeats_between_events(proxy)
    # Every relayed chunk and nothing else: [DONE] ends the SDK's iteration.
    assert [c.choices[0].delta.content for c in chunks[:-1]] == TOKENS
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == TEXT
    finish = chunks[-1].choices[0]
    assert finish.finish_reason == "stop"
    assert finish.delta.model_extra["userId"] == "anonymous"
    assert len(chunks) == N - 1


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.gen_test(timeout=30)
async def test_openai_stream_raises_api_error_on_a_relayed_error_event(relay, fake, mode):
    fake.script = stream_tokens(["Hello", ","], finish=False)  # ends without a finish
    got: list[ChatCompletionChunk] = []

    def collect_sync() -> None:
        read_sync(relay.url, got)

    async def collect_async() -> None:
        async with openai.AsyncOpenAI(base_url=relay.url, api_key="x", max_retries=0) as client:
            stream = await client.post(
                "/aianswer/streamAsk",
                body=ASK,
                cast_to=ChatCompletionChunk,
                stream=True,
                stream_cls=openai.AsyncStream[ChatCompletionChunk],
            )
            async for c in stream:
                got.append(c)

    with pytest.raises(openai.APIError) as caught:
        if mode == "sync":
            await asyncio.to_thread(collect_sync)
        else:
            await collect_async()
    error = caught.value
    assert type(error) is openai.APIError  # not a JSONDecodeError or a connection error
    assert error.body["code"] == "upstream_closed"
    assert error.message == error.body["message"] != ""
    assert [c.choices[0].delta.content for c in got] == ["Hello", ","]


def sse_sync(url: str) -> list[ServerSentEvent]:
    url += "/aianswer/streamAsk"
    with httpx.Client() as client, connect_sse(client, "POST", url, json=ASK) as source:
        return list(source.iter_sse())


async def sse_async(url: str) -> list[ServerSentEvent]:
    url += "/aianswer/streamAsk"
    async with (
        httpx.AsyncClient() as client,
        aconnect_sse(client, "POST", url, json=ASK) as source,
    ):
        return [e async for e in source.aiter_sse()]


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.gen_test(timeout=30)
async def test_httpx_sse_yields_no_empty_event_and_numbers_every_event(slow_relay, mode):
    proxy = await recording_proxy(slow_relay)
    if mode == "sync":
        events = await asyncio.to_thread(sse_sync, proxy.url)
    else:
        events = await sse_async(proxy.url)
    proxy.close()
    assert_heartbeats_between_events(proxy)
    assert [e.id for e in events] == [str(i) for i in range(1, N + 1)]
    assert all(e.event == "message" and e.data for e in events)
    assert [e.retry for e in events] == [3000] + [None] * (N - 1)  # from the first block
    assert events[-1].data == "[DONE]"
    chunks = [e.json() for e in events[:-1]]  # json.loads per event: every one is JSON
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == TEXT
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert json.loads(events[0].data)["choices"][0]["delta"] == {"content": TOKENS[0]}
