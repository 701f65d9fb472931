"""relay.http1: HTTP/1.1 response framing, any split of the same bytes gives the same result."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.http1 import ProtocolError, ResponseParser
from tests.conftest import chunked

BODY = "data: 尊敬的用户\n\n".encode() * 20


RESPONSES = {
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(BODY, 13),
    "length": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY),
    "interim": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
    % (len(BODY), BODY),
}


def run(wire: bytes, cuts: list[int]) -> tuple[bytes, ResponseParser]:
    parser = ResponseParser()
    body = b""
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    for a, b in itertools.pairwise(points):
        body += parser.feed(wire[a:b])
    return body, parser


@pytest.mark.parametrize("kind", sorted(RESPONSES))
@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
def test_any_split_gives_the_same_body_and_head(kind, cuts):
    body, parser = run(RESPONSES[kind], cuts)
    assert body == BODY
    assert parser.done and parser.extra == b""
    assert parser.head.status == 200 and parser.head.keep_alive


def test_until_close_body_and_bytes_after_a_response():
    parser = ResponseParser()
    assert parser.feed(b"HTTP/1.0 200 OK\r\n\r\nabc") == b"abc"
    assert parser.until_close and not parser.done and not parser.head.keep_alive
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 204 No Content\r\n\r\nextra")
    assert parser.done and parser.extra == b"extra"


@pytest.mark.parametrize(
    "wire",
    [
        b"HTTX/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        "HTTP/1.1 ²00 OK\r\n\r\n".encode("latin-1"),  # str.isdigit() takes "²"; int() does not
        "HTTP/1.1 200 OK\r\nContent-Length: ²\r\n\r\n".encode("latin-1"),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY",
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * (70 << 10),
    ],
)
def test_malformed_responses_raise(wire):
    with pytest.raises(ProtocolError):
        ResponseParser().feed(wire)
