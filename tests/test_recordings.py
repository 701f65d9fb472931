"""Real model servers' answers, replayed through the relay byte for byte (issue 13).

tests/recordings/ holds what llama.cpp's llama-server, llama-cpp-python's server, the
LiteLLM proxy and Hugging Face's ``transformers serve`` sent (its README says what is
particular about each). A `ReplayUpstream` serves each one verbatim, in one piece and
in pieces of 1, 3 and 7 bytes, to a real relay. The client's stream is read with
`relay.sse.SSEParser`: the assertions are about events, never the framing bytes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.sse import SSEParser
from tests.conftest import ASK, eventually, fetch_stream, nothing_left
from tests.fakeupstream import ReplayUpstream

RECORDINGS = Path(__file__).resolve().parent / "recordings"
NAMES = sorted(p.name.removesuffix(".body") for p in RECORDINGS.glob("*.body"))
# llama-server's role member is compact, llama-cpp-python's has spaces after ":" and ",".
ROLE_MEMBER = re.compile(r'"role": ?"assistant", ?')


@dataclass
class Recording:
    name: str
    head: bytes
    body: bytes
    data: list[str]  # the data of each upstream event

    @classmethod
    def load(cls, name: str) -> Recording:
        body = (RECORDINGS / f"{name}.body").read_bytes()
        headers = RECORDINGS / f"{name}.headers"
        if not headers.exists():  # the usage tail was cut from a LiteLLM answer
            headers = RECORDINGS / "litellm-proxy-mock.headers"
        events = SSEParser().feed(body)
        return cls(name, headers.read_bytes(), body, [e.data for e in events])

    def docs(self) -> list[dict]:
        return [json.loads(d) for d in self.data if d != "[DONE]"]

    def content_chunks(self) -> list[str]:
        """What the relay must send of the content chunks: each one's own text, without a
        role member."""
        out = []
        for text, doc in zip((d for d in self.data if d != "[DONE]"), self.docs(), strict=True):
            choices = doc.get("choices") or [{}]
            delta = choices[0].get("delta") or {}
            if choices[0].get("finish_reason") is None and delta.get("content"):
                if "role" in delta:
                    without, n = ROLE_MEMBER.subn("", text)
                    assert n == 1, text
                    out.append(without)
                else:
                    out.append(text)
        return out

    def finish(self) -> dict:
        (doc,) = [
            d for d in self.docs() if d.get("choices") and d["choices"][0].get("finish_reason")
        ]
        return doc

    def usage(self) -> dict | None:
        """The answer's usage: on the finish chunk, or in a chunk of its own after it."""
        found = [d["usage"] for d in self.docs() if d.get("usage")]
        return found[-1] if found else None

    def text(self) -> str:
        return "".join(
            json.loads(t)["choices"][0]["delta"]["content"] for t in self.content_chunks()
        )


def page_text(data: list[str]) -> tuple[str, dict | None]:
    """The reading logic of the Vue page the relay replaces (issue 13, point 5): empty data
    is skipped; [DONE] finishes; a chunk whose finish_reason is "stop" is the business
    node; a delta with a role is the role announcement and its content is not appended."""
    text, node = "", None
    for d in data:
        if not d:
            continue
        if d == "[DONE]":
            break
        choice = json.loads(d)["choices"][0]
        delta = choice["delta"]
        if choice.get("finish_reason") == "stop":
            node = delta
        elif "role" in delta:
            continue
        elif delta.get("content") is not None:
            text += delta["content"]
    return text, node


def test_every_recording_is_here_with_its_readme():
    assert NAMES == [
        "litellm-proxy-mock",
        "litellm-proxy-usage.tail",
        "llama-cpp-python-server",
        "llama-server",
        "transformers-serve",
    ]
    readme = (RECORDINGS / "README.md").read_text(encoding="utf-8")
    for name in NAMES:
        assert f"| {name} |" in readme, name


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("piece", [0, 1, 3, 7], ids=["whole", "1B", "3B", "7B"])
@pytest.mark.parametrize("name", NAMES)
async def test_recording_is_relayed_byte_for_byte_with_its_finish_and_done(make_relay, name, piece):
    rec = Recording.load(name)
    upstream = ReplayUpstream(rec.head, rec.body, piece, close_after=name == "llama-server")
    try:
        rs = make_relay(upstream=upstream.url)
        for _ in range(2):  # the second answer: a kept connection, or a new one after a close
            res = await fetch_stream(rs.url + "/aianswer/streamAsk", ASK)
            assert res.status == 200, res.raw
            assert not [e for e in res.events if e.event == "error"], res.raw
            data = [e.data for e in res.events]
            assert [e.id for e in res.events] == [str(i) for i in range(1, len(data) + 1)]
            # Every content chunk as the upstream wrote it (but for the role), in order.
            *content, finish, done = data
            assert content == rec.content_chunks()
            assert done == "[DONE]"
            # The finish chunk: the upstream's own, with the business node as its delta
            # and the answer's usage (where the recording has it) as its top-level usage.
            sent, got = rec.finish(), json.loads(finish)
            node = got["choices"][0].pop("delta")
            assert set(node) == {"userId", "aiId", "occurTime"} and node["userId"] == "anonymous"
            sent["choices"][0].pop("delta")
            usage = rec.usage()
            if usage is None:
                assert "usage" not in got
            else:
                sent["usage"] = usage
            assert got == sent
            # The original page's reading logic gets the whole text.
            text, page_node = page_text(data)
            assert text == rec.text()
            if sent["choices"][0]["finish_reason"] == "stop":
                assert page_node == node
        assert len(upstream.requests) == 2
        await eventually(lambda: nothing_left(rs))
    finally:
        upstream.stop()


def test_the_recordings_have_what_the_replay_test_relies_on():
    # So that the replay checks what it claims: role members, usage in both places,
    # and answers that end without [DONE].
    by_name = {name: Recording.load(name) for name in NAMES}
    assert by_name["litellm-proxy-mock"].content_chunks()[0] == by_name["litellm-proxy-mock"].data[
        0
    ].replace('"role":"assistant",', "")
    assert "usage" not in by_name["litellm-proxy-usage.tail"].finish()
    assert by_name["litellm-proxy-usage.tail"].usage()["cost"] == 0.0002913
    assert by_name["transformers-serve"].finish()["usage"]["prompt_tokens"] == 28
    assert by_name["transformers-serve"].data[-1] != "[DONE]"
    assert by_name["llama-server"].finish()["choices"][0]["finish_reason"] == "length"
    assert ", " in by_name["llama-cpp-python-server"].data[0]
