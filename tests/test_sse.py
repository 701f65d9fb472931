"""Tests for relay.sse, named after the WHATWG HTML 9.2 rules and examples."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.sse import (
    EventTooLarge,
    LineTooLong,
    ServerSentEvent,
    SSEParser,
    encode_comment,
    encode_event,
    encode_retry,
)

CHINESE = "你好，世界！流式响应"


def parse(*chunks: bytes, max_line: int = 1 << 20) -> list[ServerSentEvent]:
    parser = SSEParser(max_line=max_line)
    return [event for chunk in chunks for event in parser.feed(chunk)]


def datas(*chunks: bytes) -> list[str]:
    return [event.data for event in parse(*chunks)]


# --- WHATWG examples ---------------------------------------------------------


def test_whatwg_example_stock_ticker() -> None:
    assert parse(b"data: YHOO\ndata: +2\ndata: 10\n\n") == [ServerSentEvent(data="YHOO\n+2\n10")]


def test_whatwg_example_test_stream_with_comment_and_ids() -> None:
    stream = (
        b": test stream\n\n"
        b"data: first event\nid: 1\n\n"
        b"data:second event\nid\n\n"
        b"data:  third event\n\n"
    )
    assert parse(stream) == [
        ServerSentEvent(data="first event", id="1"),
        ServerSentEvent(data="second event", id=""),
        ServerSentEvent(data=" third event", id=""),
    ]


def test_whatwg_example_end_of_stream_does_not_dispatch_last_event() -> None:
    # "the end of the stream is not enough to trigger the dispatch"
    assert datas(b"data: first\n\ndata:  third event") == ["first"]


def test_whatwg_example_two_events_empty_and_newline_data() -> None:
    # The last block is discarded because it is not followed by a blank line.
    assert datas(b"data\n\ndata\ndata\n\ndata:") == ["", "\n"]


def test_whatwg_example_two_identical_events_space_after_colon_optional() -> None:
    assert datas(b"data:test\n\ndata: test\n\n") == ["test", "test"]


def test_whatwg_example_event_types_add_and_remove() -> None:
    stream = (
        b"event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\nevent: add\ndata: 113411\n\n"
    )
    assert [(e.event, e.data) for e in parse(stream)] == [
        ("add", "73857293"),
        ("remove", "2153"),
        ("add", "113411"),
    ]


# --- Line ends ---------------------------------------------------------------


@pytest.mark.parametrize(
    "stream",
    [
        b"data: a\ndata: b\n\ndata: c\n\n",
        b"data: a\rdata: b\r\rdata: c\r\r",
        b"data: a\r\ndata: b\r\n\r\ndata: c\r\n\r\n",
        b"data: a\rdata: b\n\r\ndata: c\r\n\r",
    ],
    ids=["lf", "cr", "crlf", "mixed"],
)
def test_line_ends_crlf_lf_and_cr(stream: bytes) -> None:
    assert datas(stream) == ["a\nb", "c"]


def test_cr_lf_split_across_chunks_is_one_line_end() -> None:
    assert datas(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == ["a\nb"]


def test_cr_at_chunk_end_then_lf_after_empty_chunks_is_one_line_end() -> None:
    assert datas(b"data: a\r", b"", b"\n", b"\n") == ["a"]


def test_cr_at_chunk_end_dispatches_without_waiting_for_next_chunk() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r\r") == [ServerSentEvent(data="a")]
    assert parser.feed(b"\ndata: b\r\n\r\n") == [ServerSentEvent(data="b")]


def test_cr_cr_lf_is_two_line_ends() -> None:
    assert datas(b"data: a\r\r\n") == ["a"]


def test_only_cr_and_lf_end_lines_not_other_unicode_breaks() -> None:
    text = "a\x0bb\x0cc\x1cd\x1de\x1ef\x85g\u2028h\u2029i"
    assert datas(f"data: {text}\n\n".encode()) == [text]


# --- Encoding and BOM --------------------------------------------------------


def test_leading_bom_is_stripped() -> None:
    assert datas(b"\xef\xbb\xbfdata: a\n\n") == ["a"]


@pytest.mark.parametrize("split", [1, 2])
def test_leading_bom_split_across_chunks_is_stripped(split: int) -> None:
    bom = b"\xef\xbb\xbf"
    assert datas(bom[:split], bom[split:], b"data: a\n\n") == ["a"]


def test_only_one_leading_bom_is_stripped() -> None:
    # The second BOM becomes part of the field name "\ufeffdata": ignored.
    assert datas(b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\ndata: b\n\n") == ["b"]


def test_bom_after_stream_start_is_kept_as_data() -> None:
    assert datas(b"data: a\n\ndata: \xef\xbb\xbfb\n\n") == ["a", "\ufeffb"]
    assert datas(b"data: \xef\xbb\xbfb\n\n") == ["\ufeffb"]


def test_bom_only_stripped_at_very_start_not_after_first_chunk() -> None:
    assert datas(b"data: a\n", b"\xef\xbb\xbfdata: b\n\n") == ["a"]


def test_split_utf8_chinese_at_every_byte_boundary() -> None:
    raw = f"event: 聊天\ndata: {CHINESE}\n\n".encode()
    expected = [ServerSentEvent(event="聊天", data=CHINESE)]
    for i in range(len(raw) + 1):
        for j in range(i, len(raw) + 1):
            assert parse(raw[:i], raw[i:j], raw[j:]) == expected, (i, j)


def test_utf8_chinese_fed_one_byte_at_a_time() -> None:
    raw = f"data: {CHINESE}\ndata: 🚀\n\n".encode()
    chunks = [raw[i : i + 1] for i in range(len(raw))]
    assert datas(*chunks) == [f"{CHINESE}\n🚀"]


def test_invalid_utf8_is_replaced_not_raised() -> None:
    assert datas(b"data: a\xffb\xf0\x9f\n\n") == ["a\ufffdb\ufffd"]


# --- Fields ------------------------------------------------------------------


def test_comment_lines_are_ignored() -> None:
    assert datas(b":\n: data: x\n:comment\ndata: a\n:\n\n") == ["a"]


def test_comment_only_block_dispatches_nothing() -> None:
    assert parse(b": keep-alive\n\n") == []


def test_blank_lines_without_data_dispatch_nothing() -> None:
    assert parse(b"\n\n\r\n\r\r") == []


def test_event_type_defaults_to_message() -> None:
    assert parse(b"data: a\n\n")[0].event == "message"


def test_empty_event_field_gives_message() -> None:
    assert parse(b"event:\ndata: a\n\n")[0].event == "message"


def test_event_type_reset_after_dispatch() -> None:
    events = parse(b"event: delta\ndata: a\n\ndata: b\n\n")
    assert [e.event for e in events] == ["delta", "message"]


def test_event_type_reset_by_blank_line_without_data() -> None:
    assert parse(b"event: delta\n\ndata: b\n\n")[0].event == "message"


def test_event_type_last_field_wins() -> None:
    assert parse(b"event: a\nevent: b\ndata: x\n\n")[0].event == "b"


def test_field_value_loses_only_one_leading_space() -> None:
    assert parse(b"event:  sp\ndata:   x \n\n") == [ServerSentEvent(event=" sp", data="  x ")]


def test_field_value_splits_on_first_colon_only() -> None:
    assert datas(b'data: {"a": "b:c"}\n\n') == ['{"a": "b:c"}']


def test_field_with_no_colon_has_empty_value() -> None:
    events = parse(b"id: 7\nevent: x\ndata\nevent\nid\n\n")
    assert events == [ServerSentEvent(event="message", data="", id="")]


def test_unknown_fields_are_ignored() -> None:
    assert parse(b"foo: bar\nDATA: x\nData: y\n data: z\ndata: a\n\n") == [
        ServerSentEvent(data="a")
    ]


def test_unknown_fields_only_dispatch_nothing() -> None:
    assert parse(b"foo: bar\n\n") == []


def test_data_with_empty_lines_inside() -> None:
    assert datas(b"data: a\ndata:\ndata\ndata: b\n\n") == ["a\n\n\nb"]


def test_id_persists_across_events() -> None:
    events = parse(b"id: 1\ndata: a\n\ndata: b\n\nid: 2\ndata: c\n\n")
    assert [e.id for e in events] == ["1", "1", "2"]


def test_id_reset_by_empty_value() -> None:
    events = parse(b"id: 1\ndata: a\n\nid:\ndata: b\n\nid: 3\ndata: c\n\nid\n\n")
    assert [e.id for e in events] == ["1", "", "3"]


def test_id_containing_null_is_ignored() -> None:
    parser = SSEParser()
    events = parser.feed(b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n")
    assert [e.id for e in events] == ["1", "1"]
    assert parser.last_event_id == "1"


def test_id_takes_effect_for_event_it_appears_in_regardless_of_order() -> None:
    assert parse(b"data: a\nid: 9\n\n")[0].id == "9"


def test_last_event_id_set_by_id_only_block() -> None:
    parser = SSEParser()
    assert parser.feed(b"id: 42\n\n") == []
    assert parser.last_event_id == "42"
    assert parser.feed(b"data: a\n\n") == [ServerSentEvent(data="a", id="42")]


def test_last_event_id_not_set_by_incomplete_block() -> None:
    parser = SSEParser()
    parser.feed(b"id: 1\ndata: a\n\nid: 2\ndata: b\n")
    assert parser.last_event_id == "1"


def test_last_event_id_initially_empty() -> None:
    assert SSEParser().last_event_id == ""


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"retry: 3000", 3000),
        (b"retry:0", 0),
        (b"retry: 007", 7),
        (b"retry: 10a", None),
        (b"retry:", None),
        (b"retry: ", None),
        (b"retry", None),
        (b"retry: -1", None),
        (b"retry: +1", None),
        (b"retry: 1.5", None),
        (b"retry:  10", None),
        (b"retry: 10 ", None),
        ("retry: ٣".encode(), None),
        ("retry: ²".encode(), None),
        (b"retry: " + b"9" * 5000, None),
        (b"Retry: 10", None),
    ],
)
def test_retry_only_ascii_digits(line: bytes, expected: int | None) -> None:
    parser = SSEParser()
    assert parser.feed(line + b"\n\n") == []
    assert parser.retry == expected


def test_retry_invalid_value_keeps_previous() -> None:
    parser = SSEParser()
    parser.feed(b"retry: 100\n\nretry: x\n\n")
    assert parser.retry == 100


def test_retry_set_before_blank_line_and_reported_on_its_event() -> None:
    parser = SSEParser()
    assert parser.feed(b"retry: 5\n") == []
    assert parser.retry == 5
    assert parser.feed(b"data: a\n\ndata: b\n\n") == [
        ServerSentEvent(data="a", retry=5),
        ServerSentEvent(data="b"),
    ]
    assert parser.retry == 5


def test_incomplete_event_at_end_of_stream_is_not_emitted() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\n\ndata: b\n") == [ServerSentEvent(data="a")]
    assert parser.feed(b"") == []


def test_events_are_returned_as_soon_as_complete() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a") == []
    assert parser.feed(b"bc\n") == []
    assert parser.feed(b"\ndata: d") == [ServerSentEvent(data="abc")]
    assert parser.feed(b"\n\n") == [ServerSentEvent(data="d")]


# --- Line length bound -------------------------------------------------------


def test_line_too_long_in_one_chunk() -> None:
    with pytest.raises(LineTooLong):
        SSEParser(max_line=10).feed(b"data: 0123456789\n\n")


def test_line_too_long_after_short_lines_in_one_chunk() -> None:
    with pytest.raises(LineTooLong):
        SSEParser(max_line=10).feed(b"data: a\n\ndata: 0123456789\n\n")


def test_line_too_long_unterminated_in_one_chunk() -> None:
    with pytest.raises(LineTooLong):
        SSEParser(max_line=10).feed(b"data: a\n\ndata: 0123456789")


def test_line_too_long_accumulated_over_many_chunks() -> None:
    parser = SSEParser(max_line=100)
    parser.feed(b"data: ")
    for _ in range(94):
        parser.feed(b"x")
    with pytest.raises(LineTooLong):
        parser.feed(b"x")


def test_line_too_long_completed_by_later_chunk() -> None:
    parser = SSEParser(max_line=10)
    parser.feed(b"data: 0123")
    with pytest.raises(LineTooLong):
        parser.feed(b"4\n\n")


def test_line_too_long_is_a_value_error() -> None:
    assert issubclass(LineTooLong, ValueError)


def test_line_exactly_max_line_is_allowed() -> None:
    assert parse(b"data: 0123\r\n\r\n", max_line=10) == [ServerSentEvent(data="0123")]


def test_line_bound_counts_characters_not_bytes() -> None:
    frame = f"data: {CHINESE}\n\n".encode()
    assert parse(frame, max_line=16) == [ServerSentEvent(data=CHINESE)]


def test_many_short_lines_exceeding_bound_in_total_are_fine() -> None:
    stream = b"data: 0123\n\n" * 1000
    parser = SSEParser(max_line=10)
    assert len(parser.feed(stream)) == 1000
    assert sum(len(parser.feed(b"data: 0123\n\n")) for _ in range(1000)) == 1000


# --- Encoder -----------------------------------------------------------------


def test_encode_event_simple() -> None:
    assert encode_event("hello") == b"data: hello\n\n"


def test_encode_event_field_order() -> None:
    # id last: fetch-event-source takes an id as soon as it reads the line.
    frame = encode_event("x", event="delta", id=7, retry=1000)
    assert frame == b"event: delta\nretry: 1000\ndata: x\nid: 7\n\n"
    assert encode_event("x", id=7) == b"data: x\nid: 7\n\n"  # the hot path agrees


def test_encode_event_multiline_data() -> None:
    assert encode_event("a\nb\r\nc\rd\n") == (b"data: a\ndata: b\ndata: c\ndata: d\ndata: \n\n")


def test_encode_event_empty_data_still_dispatches() -> None:
    frame = encode_event("")
    assert frame == b"data: \n\n"
    assert parse(frame) == [ServerSentEvent(data="")]


def test_encode_event_data_starting_with_space() -> None:
    frame = encode_event(" x\n  y")
    assert frame == b"data:  x\ndata:   y\n\n"
    assert datas(frame) == [" x\n  y"]


def test_encode_event_utf8() -> None:
    assert encode_event(CHINESE) == f"data: {CHINESE}\n\n".encode()


def test_encode_event_empty_id_resets_last_event_id() -> None:
    frames = encode_event("a", id="1") + encode_event("b", id="")
    assert [e.id for e in parse(frames)] == ["1", ""]


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\r\nb", "\n"])
def test_encode_event_rejects_line_break_in_event(bad: str) -> None:
    with pytest.raises(ValueError):
        encode_event("x", event=bad)


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\r\nb", "a\0b"])
def test_encode_event_rejects_line_break_or_null_in_id(bad: str) -> None:
    with pytest.raises(ValueError):
        encode_event("x", id=bad)


def test_encode_event_rejects_negative_retry() -> None:
    with pytest.raises(ValueError):
        encode_event("x", retry=-1)


def test_encode_comment() -> None:
    # A line, not a block: parsers that dispatch at every blank line see nothing.
    assert encode_comment("keep-alive") == b": keep-alive\n"
    assert encode_comment() == b": \n"
    frames = encode_comment("keep-alive") + encode_event("a", id=1)
    assert parse(frames) == [ServerSentEvent(data="a", id="1")]


@pytest.mark.parametrize("bad", ["a\nb", "a\rb"])
def test_encode_comment_rejects_line_break(bad: str) -> None:
    with pytest.raises(ValueError):
        encode_comment(bad)


def test_encode_retry() -> None:
    frame = encode_retry(2500)
    assert frame == b"retry: 2500\n"
    parser = SSEParser()
    assert parser.feed(frame) == []
    assert parser.retry == 2500
    # It opens the next event's block rather than dispatching one of its own.
    assert parser.feed(encode_event("a", id=1)) == [ServerSentEvent(data="a", id="1", retry=2500)]


def test_encode_retry_rejects_negative() -> None:
    with pytest.raises(ValueError):
        encode_retry(-5)


# --- Properties --------------------------------------------------------------

SSE_TOKENS = [
    ":",
    "data:",
    "data: ",
    "data",
    "id:",
    "id: ",
    "id",
    "event:",
    "event: ",
    "retry:",
    "retry: ",
    "12",
    "0",
    "x",
    " ",
    "\0",
    "\r",
    "\n",
    "\r\n",
    "\n\n",
    "\r\r",
    "\ufeff",
    "中文",
    "😀",
    "\u2028",
]
sse_ish_bytes = st.lists(
    st.one_of(st.sampled_from(SSE_TOKENS), st.text(max_size=3)), max_size=40
).map(lambda parts: "".join(parts).encode("utf-8"))
maybe_bom = st.sampled_from([b"", b"\xef\xbb\xbf"])


@st.composite
def chunked(draw: st.DrawFn, data: st.SearchStrategy[bytes]) -> tuple[bytes, list]:
    raw = draw(data)
    cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=12)))
    bounds = [0, *cuts, len(raw)]
    return raw, [raw[a:b] for a, b in itertools.pairwise(bounds)]


def run(chunks: list[bytes], max_line: int = 1 << 20) -> tuple:
    parser = SSEParser(max_line=max_line)
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    return events, parser.retry, parser.last_event_id


@given(chunked(st.binary(max_size=200)))
def test_property_chunking_invariant_for_arbitrary_bytes(case: tuple) -> None:
    raw, chunks = case
    assert run(chunks) == run([raw])


@given(chunked(st.tuples(maybe_bom, sse_ish_bytes).map(b"".join)))
def test_property_chunking_invariant_for_sse_like_streams(case: tuple) -> None:
    raw, chunks = case
    assert run(chunks) == run([raw])


@given(chunked(st.tuples(maybe_bom, sse_ish_bytes).map(b"".join)))
def test_property_line_too_long_raised_regardless_of_chunking(case: tuple) -> None:
    raw, chunks = case

    def outcome(chunks: list[bytes]) -> tuple | None:
        try:
            return run(chunks, max_line=8)
        except LineTooLong:
            return None

    whole, split = outcome([raw]), outcome(chunks)
    assert (whole is None) == (split is None)
    assert whole == split


no_line_break = st.text(st.characters(codec="utf-8", blacklist_characters="\r\n"))
frame_fields = st.fixed_dictionaries(
    {"data": st.text()},
    optional={
        "event": no_line_break,
        "id": st.one_of(
            st.text(st.characters(codec="utf-8", blacklist_characters="\r\n\0")), st.integers()
        ),
        "retry": st.integers(min_value=0, max_value=10**12),
    },
)


def expected_events(frames: list[dict]) -> list[ServerSentEvent]:
    expected, last_id = [], ""
    for frame in frames:
        if "id" in frame:
            last_id = str(frame["id"])
        expected.append(
            ServerSentEvent(
                event=frame.get("event") or "message",
                data=frame["data"].replace("\r\n", "\n").replace("\r", "\n"),
                id=last_id,
                retry=frame.get("retry"),
            )
        )
    return expected


@given(st.text())
def test_property_encode_parse_round_trips_any_text(data: str) -> None:
    expected = data.replace("\r\n", "\n").replace("\r", "\n")
    assert parse(encode_event(data)) == [ServerSentEvent(data=expected)]


@given(frame_fields)
def test_property_encode_parse_round_trips_one_event(frame: dict) -> None:
    assert parse(encode_event(**frame)) == expected_events([frame])


@given(st.lists(frame_fields, max_size=6), st.data())
def test_property_encode_parse_round_trips_several_events_in_chunks(
    frames: list[dict], data: st.DataObject
) -> None:
    stream = st.just(b"".join(encode_event(**frame) for frame in frames))
    _, chunks = data.draw(chunked(stream))
    events, retry, last_event_id = run(chunks)
    expected = expected_events(frames)
    assert events == expected
    retries = [frame["retry"] for frame in frames if "retry" in frame]
    assert retry == (retries[-1] if retries else None)
    assert last_event_id == (expected[-1].id if expected else "")


def test_event_too_large_for_many_short_data_lines_without_a_blank_line() -> None:
    parser = SSEParser(max_line=100, max_event=1000)
    with pytest.raises(EventTooLarge):
        for _ in range(200):
            parser.feed(b"data: " + b"x" * 50 + b"\n")


def test_event_data_bound_resets_after_each_dispatch() -> None:
    parser = SSEParser(max_line=100, max_event=1000)
    for _ in range(200):
        assert parser.feed(b"data: " + b"x" * 50 + b"\n\n") == [ServerSentEvent(data="x" * 50)]
