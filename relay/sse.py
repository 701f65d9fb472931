"""Server-Sent Events wire format: an incremental parser and an encoder.

Pure, standard-library-only code with no I/O: bytes from upstream go into
`SSEParser.feed()` and complete `ServerSentEvent`s come out; `encode_event()`
builds event frames to send downstream, and `encode_comment()` and
`encode_retry()` build lines that open the next event's block.

The parser follows WHATWG HTML "9.2.5 Parsing an event stream" and "9.2.6
Interpreting an event stream"
(https://html.spec.whatwg.org/multipage/server-sent-events.html); comments
quote the rule each piece implements. Intentional divergences:

- Line length is bounded (`max_line`, in characters): the spec only says UAs
  "should ensure that appropriate buffering is used", but an unterminated line
  would otherwise buffer without limit, so a relay holding thousands of streams
  raises `LineTooLong` and lets the caller close that stream.
- The parser does not reconnect or fire DOM events: it only reports the
  reconnection time (`SSEParser.retry`) and the last event ID string
  (`SSEParser.last_event_id`). `ServerSentEvent.retry` is not in the spec; as
  in httpx-sse it carries a valid `retry` field from the event's own block.
- An empty `retry` value is ignored (there is no integer to interpret), and so
  is one with more digits than Python's `int()` accepts (4300 by default).
- The encoder writes for parsers that are less exact than the spec, in a layout
  that stays exact for a WHATWG parser. The openai SDK's decoder, httpx-sse and
  fetch-event-source dispatch an event at every blank line, even one with no
  data, so a comment or ``retry`` is never a block of its own: `encode_comment`
  and `encode_retry` give one line, which joins the block of the next event.
  fetch-event-source records an ``id:`` as soon as it reads the line, so the
  ``id:`` line comes last in an event, right before its blank line: a cut
  connection resumes from an event it has seen whole (the one-byte window
  between that line and the blank line excepted).
- The encoder cannot represent a CR inside data (a CR always ends a line), so
  CR and CRLF in data are written as line breaks and read back as LF. It
  rejects CR/LF in `event`/`id` and NULL in `id` instead of emitting a frame
  that would be misparsed or silently ignored.
"""

from __future__ import annotations

import codecs
from typing import NamedTuple

__all__ = [
    "EventTooLarge",
    "LineTooLong",
    "SSEParser",
    "ServerSentEvent",
    "encode_comment",
    "encode_event",
    "encode_retry",
]


class ServerSentEvent(NamedTuple):
    """One dispatched event: the MessageEvent's type, data and lastEventId.

    A named tuple rather than a frozen dataclass: one is built per upstream
    chunk, and a frozen dataclass's ``__init__`` costs several times more.
    """

    event: str = "message"
    data: str = ""
    id: str = ""
    retry: int | None = None


class LineTooLong(ValueError):
    """A line grew beyond the parser's `max_line` bound."""


class EventTooLarge(LineTooLong):
    """An event's data (many lines, no blank line yet) grew beyond `max_event`."""


class _LineDecoder:
    """Bytes in, complete lines out (9.2.5 Parsing an event stream)."""

    __slots__ = ("_at_start", "_decoder", "_max_line", "_pending", "_pending_len", "_skip_lf")

    def __init__(self, max_line: int) -> None:
        # "Streams must be decoded using the UTF-8 decode algorithm": the
        # incremental decoder holds back a character split across chunks, and
        # errors="replace" substitutes U+FFFD per maximal invalid subsequence,
        # as the Encoding Standard does.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._max_line = max_line
        self._at_start = True
        self._skip_lf = False
        self._pending: list[str] = []  # pieces of the unterminated line
        self._pending_len = 0

    def decode(self, data: bytes) -> list[str]:
        text = self._decoder.decode(data)
        if not text:
            return []
        if self._at_start:
            # "One leading U+FEFF BYTE ORDER MARK character must be ignored if
            # any are present." The decoder never yields half a character, so
            # the first non-empty text starts with the stream's first one.
            self._at_start = False
            if text[0] == "\ufeff":
                text = text[1:]
        if self._skip_lf:
            # The previous chunk ended in CR; an LF right after it completes
            # that CRLF rather than ending an empty line.
            self._skip_lf = False
            if text[0] == "\n":
                text = text[1:]
        if not text:
            return []
        if "\r" in text:
            # Lines end with "a U+000D CARRIAGE RETURN U+000A LINE FEED (CRLF)
            # character pair, a single U+000A LINE FEED (LF) character not
            # preceded by a U+000D CARRIAGE RETURN (CR) character, and a single
            # U+000D CARRIAGE RETURN (CR) character not followed by a U+000A
            # LINE FEED (LF) character". A trailing CR ends its line now, so
            # the event is not held back waiting to see whether LF follows.
            self._skip_lf = text[-1] == "\r"
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        # Not str.splitlines(): it also splits on \v, \f, \x1c-\x1e, \x85,
        # U+2028 and U+2029, which are ordinary characters in SSE.
        lines = text.split("\n")
        tail = lines.pop()
        limit = self._max_line
        if not lines:
            self._pending_len += len(tail)
            if self._pending_len > limit:
                raise LineTooLong(f"SSE line longer than {limit} characters")
            self._pending.append(tail)
            return []
        # Only scan line lengths when the chunk could hold an over-long line.
        if self._pending_len + len(text) > limit and (
            self._pending_len + len(lines[0]) > limit
            or len(tail) > limit
            or max(map(len, lines)) > limit
        ):
            raise LineTooLong(f"SSE line longer than {limit} characters")
        if self._pending:
            self._pending.append(lines[0])
            lines[0] = "".join(self._pending)
        self._pending = [tail] if tail else []
        self._pending_len = len(tail)
        return lines


class SSEParser:
    """Incremental event stream parser: `feed()` bytes, get events back.

    Events are returned as soon as their terminating blank line arrives. An
    incomplete event at the end of the stream is never returned: "If the file
    ends in the middle of an event, before the final empty line, the
    incomplete event is not dispatched." After `LineTooLong` the parser is in
    an unspecified state and must be discarded.
    """

    __slots__ = (
        "_data",
        "_data_len",
        "_event_retry",
        "_event_type",
        "_id_buffer",
        "_last_event_id",
        "_lines",
        "_max_event",
        "retry",
    )

    def __init__(self, max_line: int = 1 << 20, max_event: int = 4 << 20) -> None:
        self._lines = _LineDecoder(max_line)
        # The data buffer is bounded too: many short data lines with no blank
        # line would otherwise grow it without limit.
        self._max_event = max_event
        self._data_len = 0
        # "a data buffer, an event type buffer, and a last event ID buffer
        # must be associated with it. They must be initialized to the empty
        # string." Data lines are kept as a list and joined with LF at
        # dispatch, which equals appending value + LF and then removing the
        # final LF.
        self._data: list[str] = []
        self._event_type = ""
        self._id_buffer = ""
        self._last_event_id = ""
        self._event_retry: int | None = None
        #: The reconnection time in milliseconds from the last valid `retry`
        #: field, or None if there has been none.
        self.retry: int | None = None

    @property
    def last_event_id(self) -> str:
        """The source's "last event ID string", updated at each blank line.

        An `id` field takes effect when its block ends, so an id in an
        incomplete block at the end of the stream is not reported; this is the
        value an EventSource would send as `Last-Event-ID` when reconnecting.
        """
        return self._last_event_id

    def feed(self, data: bytes) -> list[ServerSentEvent]:
        """Parse the next chunk and return the events it completes."""
        events: list[ServerSentEvent] = []
        for line in self._lines.decode(data):
            if not line:
                # "If the line is empty (a blank line): Dispatch the event"
                event = self._dispatch()
                if event is not None:
                    events.append(event)
            elif line[0] != ":":
                # "If the line starts with a U+003A COLON character (:):
                # Ignore the line." Otherwise the field is everything before
                # the first colon and the value everything after it, or, with
                # no colon, the whole line and the empty string.
                field, _, value = line.partition(":")
                # "If value starts with a U+0020 SPACE character, remove it"
                if value[:1] == " ":
                    value = value[1:]
                self._process_field(field, value)
        return events

    def _process_field(self, field: str, value: str) -> None:
        # Field names are compared case-sensitively; any other field "is
        # ignored".
        if field == "data":
            # "Append the field value to the data buffer, then append a single
            # U+000A LINE FEED (LF) character to the data buffer."
            self._data.append(value)
            self._data_len += len(value) + 1
            if self._data_len > self._max_event:
                raise EventTooLarge(f"SSE event data longer than {self._max_event} characters")
        elif field == "event":
            # "Set the event type buffer to field value."
            self._event_type = value
        elif field == "id":
            # "If the field value does not contain U+0000 NULL, then set the
            # last event ID buffer to the field value. Otherwise, ignore the
            # field." An empty value therefore resets it.
            if "\0" not in value:
                self._id_buffer = value
        # "If the field value consists of only ASCII digits, then interpret the
        # field value as an integer in base ten, and set the event stream's
        # reconnection time to that integer." str.isdigit() alone would also
        # accept non-ASCII digits such as "٣" or "²".
        elif field == "retry" and value.isascii() and value.isdigit():
            try:
                retry = int(value)
            except ValueError:  # beyond sys.get_int_max_str_digits()
                return
            self.retry = self._event_retry = retry

    def _dispatch(self) -> ServerSentEvent | None:
        # "1. Set the last event ID string of the event source to the value of
        # the last event ID buffer. The buffer does not get reset".
        self._last_event_id = self._id_buffer
        retry, self._event_retry = self._event_retry, None
        # "2. If the data buffer is an empty string, set the data buffer and
        # the event type buffer to the empty string and return."
        if not self._data:
            self._event_type = ""
            return None
        # "3. If the data buffer's last character is a U+000A LINE FEED (LF)
        # character, then remove the last character from the data buffer."
        # Joining the data lines with LF gives exactly that. "5. Initialize
        # event's type attribute to "message" [...] 6. If the event type buffer
        # has a value other than the empty string, change the type of the newly
        # created event to equal the value".
        event = ServerSentEvent(
            self._event_type or "message",
            "\n".join(self._data),
            self._last_event_id,
            retry,
        )
        # "7. Set the data buffer and the event type buffer to the empty
        # string."
        self._data = []
        self._data_len = 0
        self._event_type = ""
        return event


def _check_no_line_break(name: str, value: str) -> None:
    if "\r" in value or "\n" in value:
        raise ValueError(f"SSE {name} must not contain CR or LF: {value!r}")


def encode_event(
    data: str,
    *,
    event: str | None = None,
    id: str | int | None = None,
    retry: int | None = None,
) -> bytes:
    """Encode one complete event frame as UTF-8, ending with a blank line.

    Fields come in the order ``event``, ``retry``, ``data`` lines, ``id`` (the
    module docstring says why ``id`` is last). Each line of `data` (split on
    CRLF, CR or LF) becomes its own `data:` line, always written with one space
    after the colon so that a line which itself starts with a space survives
    the parser's space stripping. Empty data gives one empty `data:` line,
    which still dispatches an event.
    """
    if (
        event is None
        and retry is None
        and type(id) is int
        and "\n" not in data
        and "\r" not in data
    ):
        # The relay's hot path: a numbered one-line event (an upstream JSON chunk).
        return b"data: %s\nid: %d\n\n" % (data.encode(), id)
    parts: list[str] = []
    if event is not None:
        _check_no_line_break("event", event)
        parts.append(f"event: {event}\n")
    if retry is not None:
        parts.append(_retry_line(retry))
    for line in data.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        parts.append(f"data: {line}\n")
    if id is not None:
        id = str(id)
        _check_no_line_break("id", id)
        if "\0" in id:
            # The receiver would ignore the whole field.
            raise ValueError(f"SSE id must not contain NULL: {id!r}")
        parts.append(f"id: {id}\n")
    parts.append("\n")
    return "".join(parts).encode("utf-8")


def encode_comment(text: str = "") -> bytes:
    """Encode a comment line (e.g. a keep-alive); receivers ignore it.

    No blank line follows: the comment joins the next event's block, where
    every parser skips it, instead of being a block that some parsers dispatch
    as an event with empty data.
    """
    _check_no_line_break("comment", text)
    return f": {text}\n".encode()


def encode_retry(ms: int) -> bytes:
    """Encode a ``retry`` line (the reconnection time, in milliseconds).

    Like `encode_comment`, a line that opens the next event's block, never a
    block of its own.
    """
    return _retry_line(ms).encode()


def _retry_line(ms: int) -> str:
    # The receiver ignores any value that is not only ASCII digits.
    if ms < 0:
        raise ValueError(f"SSE retry must not be negative: {ms}")
    return f"retry: {ms}\n"
