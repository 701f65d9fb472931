"""Chunk rules: which upstream chunks reach the client, and how the last one changes.

Input is the ``data`` of one upstream event (an OpenAI ``chat.completion.chunk``
as JSON text); output is the list of data texts to relay, in order. Forwarded
chunks keep the upstream's own text byte for byte (but for a removed ``role``
member); only the finishing chunk is re-serialised, because its delta is
replaced by the business node.

Rules (see docs/api.md):

* ``[DONE]`` is relayed and ends the stream.
* A chunk whose first choice's delta carries ``content`` (any non-empty string,
  whitespace-only too: a lone newline is a paragraph break), ``reasoning_content``
  or ``tool_calls`` is relayed as it is, without its delta's ``role`` member:
  clients that take any chunk with a role for the role announcement would drop
  its content (`strip_role`). Empty and role-only deltas are dropped.
* The chunk with a non-null ``finish_reason`` gets the business node
  ``{"userId", "aiId", "occurTime"}`` as its delta. If that chunk also carried
  content, the content goes first as its own chunk (finish_reason null), so no
  text is lost. The finishing chunk is held (`ChunkRules.holding`) until the
  usage, ``[DONE]`` or the end of the answer, so that it can carry the usage.
* Usage is never a chunk of its own: a usage chunk (``choices: []``, as OpenAI
  sends it, or an empty delta with ``usage``, as LiteLLM does) is merged into
  the finishing chunk as its top-level ``usage``.
* JSON with an ``error`` key becomes `RelayError` ``upstream_error``; data that
  is not a JSON object becomes ``upstream_bad_chunk``.
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Callable
from typing import Any, NamedTuple, TypeGuard

import ujson

from relay.errors import RelayError

DONE = "[DONE]"
_CARRIERS = ("content", "reasoning_content")


def _dumps(obj: Any) -> str:
    return ujson.dumps(obj, ensure_ascii=False, escape_forward_slashes=False)


def _carries_payload(delta: dict[str, Any]) -> bool:
    for key in _CARRIERS:
        value = delta.get(key)
        if isinstance(value, str) and value:
            return True
    return bool(delta.get("tool_calls"))


def error_message(doc: Any) -> str:
    """The human message of an OpenAI-style error document (or a short fallback)."""
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict) and isinstance(message := err.get("message"), str):
        return message[:500]
    if isinstance(err, str):
        return err[:500]
    return "the upstream reported an error"


def token_counts(usage: Any) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) of an OpenAI ``usage`` object, if it has both."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if _count(prompt) and _count(completion):
        return prompt, completion
    return None


def _count(n: object) -> TypeGuard[int]:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


# -- removing the role member from the upstream's own text ---------------------------

_WS = re.compile(r"[ \t\n\r]*")


def _skip_ws(text: str, i: int) -> int:
    """The index of the first character at or after ``i`` that is not JSON whitespace."""
    match = _WS.match(text, i)  # never None: the pattern matches the empty string
    return match.end() if match else i


# The standard library's C scanner: strings and whole values are skipped without a
# character loop in Python. Not strict: ujson, which parsed the chunk, is not either.
_DECODER = json.JSONDecoder(strict=False)
# The C string scanner, which typeshed does not declare.
_scan_string: Callable[[str, int, bool], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]


class _Member(NamedTuple):
    key: str
    key_start: int  # the key's opening quote
    value_start: int
    value_end: int  # just after the value


def _members(text: str, i: int) -> tuple[list[_Member], int]:
    """The members of the JSON object whose ``{`` is ``text[i]``, and the index of its ``}``.

    Raises ValueError (or IndexError) when the text is not a JSON object there.
    """
    if text[i] != "{":
        raise ValueError("not an object")
    members: list[_Member] = []
    i = _skip_ws(text, i + 1)
    if text[i] == "}":
        return members, i
    while True:
        if text[i] != '"':
            raise ValueError("not a key")
        key, after = _scan_string(text, i + 1, False)
        colon = _skip_ws(text, after)
        if text[colon] != ":":
            raise ValueError("no colon")
        value_start = _skip_ws(text, colon + 1)
        _, value_end = _DECODER.raw_decode(text, value_start)
        members.append(_Member(key, i, value_start, value_end))
        i = _skip_ws(text, value_end)
        if text[i] == "}":
            return members, i
        if text[i] != ",":
            raise ValueError("no comma")
        i = _skip_ws(text, i + 1)


def _last(members: list[_Member], key: str) -> _Member:
    """The member named ``key``; the last one if repeated, as parsers (ujson too) take it."""
    for member in reversed(members):
        if member.key == key:
            return member
    raise ValueError(f"no {key}")


def _role_span(text: str) -> tuple[int, int] | None:
    """The span to cut to remove one ``role`` member of ``choices[0].delta``, or None."""
    top, _ = _members(text, _skip_ws(text, 0))
    array = _last(top, "choices").value_start
    if text[array] != "[":
        raise ValueError("choices is not an array")
    choice, _ = _members(text, _skip_ws(text, array + 1))
    obj = _last(choice, "delta").value_start
    members, close = _members(text, obj)
    for k, member in enumerate(members):
        if member.key != "role":
            continue
        if k + 1 < len(members):  # the member and the separator after it
            return member.key_start, members[k + 1].key_start
        if k > 0:  # the last one: the separator before it and the member
            return members[k - 1].value_end, member.value_end
        return obj + 1, close  # the only one: the object becomes {}
    return None


def _scan_strip(text: str) -> str | None:
    """`strip_role` by walking the document's structure: the path to the delta, then its
    members. None when the text is not a JSON object with that path."""
    try:
        for _ in range(8):  # one member per pass; more than one is a repeated key
            span = _role_span(text)
            if span is None:
                return text
            text = text[: span[0]] + text[span[1] :]
            if '"role"' not in text:
                return text
    except (ValueError, IndexError):
        return None
    return None


def _span_at(text: str, i: int) -> tuple[int, int] | None:
    """If ``text[i:]`` starts a ``"role": value`` member, the span `_role_span` would cut
    for it: the member and the separator after it, or before it for a last member."""
    colon = _skip_ws(text, i + 6)
    if text[colon : colon + 1] != ":":
        return None
    try:
        _, value_end = _DECODER.raw_decode(text, _skip_ws(text, colon + 1))
    except ValueError:
        return None
    after = _skip_ws(text, value_end)
    close = text[after : after + 1]
    if close == ",":
        return i, _skip_ws(text, after + 1)
    if close != "}":
        return None
    before = i - 1
    while before >= 0 and text[before] in " \t\n\r":
        before -= 1
    if before < 0:
        return None
    if text[before] == "{":
        return before + 1, after
    if text[before] != ",":
        return None
    before -= 1
    while before >= 0 and text[before] in " \t\n\r":
        before -= 1
    return before + 1, value_end


def strip_role(text: str, doc: Any = None) -> str | None:
    """``text`` without the ``role`` member(s) of ``choices[0].delta``, every other byte kept.

    A member is removed with the separator on one side of it (the one after it,
    or for the last member the one before), so the rest keeps its own spacing:
    ``{"role": "assistant", "content": "x"}`` becomes ``{"content": "x"}``.
    ``doc`` is ``text`` parsed, if the caller has it; its role member is deleted.
    None when the text is not laid out as a JSON object with that path (the
    caller then re-serialises the parsed chunk).

    The usual case costs a few microseconds (Ollama sends a role on every chunk):
    each ``"role"`` key in the text is tried as the member to cut, and the first
    cut whose result parses to the chunk without the role is the one. Only when
    none does (a repeated key, JSON the scanner reads otherwise) is the document's
    structure walked (`_scan_strip`).
    """
    try:
        if doc is None:
            doc = ujson.loads(text)
        delta = doc["choices"][0]["delta"]
        if "role" not in delta:
            return text
        del delta["role"]  # now what the result must parse to
    except (ValueError, LookupError, TypeError):
        return None
    i = text.find('"role"')
    while i != -1:
        span = _span_at(text, i)
        if span is not None:
            cut = text[: span[0]] + text[span[1] :]
            try:
                if ujson.loads(cut) == doc:
                    return cut
            except ValueError:
                pass
        i = text.find('"role"', i + 1)
    return _scan_strip(text)


def _without_role(data: str, doc: dict[str, Any]) -> str:
    stripped = strip_role(data, doc)
    if stripped is not None:
        return stripped
    return _dumps(doc)  # strip_role deleted the member from it


class ChunkRules:
    """Applies the rules for one answer; ``user_id`` and ``ai_id`` fill the business node.

    State across chunks: ``finished`` once a chunk had a ``finish_reason``;
    ``holding`` while that chunk waits for its usage; ``usage`` the last usage
    seen (on the finishing chunk or in a usage chunk); ``done`` after ``[DONE]``
    or `complete`.
    """

    __slots__ = ("_held", "ai_id", "done", "finished", "usage", "user_id")

    def __init__(self, user_id: str, ai_id: str) -> None:
        self.user_id = user_id
        self.ai_id = ai_id
        self.finished = False
        self.done = False
        self.usage: dict[str, Any] | None = None
        self._held: dict[str, Any] | None = None

    @property
    def holding(self) -> bool:
        return self._held is not None

    def apply(self, data: str) -> list[str]:
        """The texts to relay for one upstream event; ``done`` tells whether it ended the answer."""
        if data == DONE:
            self.done = True
            return [*self._release(), DONE]
        try:
            doc = ujson.loads(data)
        except ValueError:
            raise RelayError(
                502, "upstream_bad_chunk", "the upstream sent a chunk that is not JSON"
            ) from None
        if not isinstance(doc, dict):
            raise RelayError(
                502,
                "upstream_bad_chunk",
                "the upstream sent a chunk that is not a JSON object",
            )
        if "error" in doc:
            raise RelayError(502, "upstream_error", error_message(doc))
        usage = doc.get("usage")
        choices = doc.get("choices")
        if not choices:
            return self._take_usage(usage)
        choice = choices[0]
        if not isinstance(choice, dict):
            raise RelayError(502, "upstream_bad_chunk", "the upstream sent a malformed choice")
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            delta = {}
        if choice.get("finish_reason") is None:
            if not _carries_payload(delta):
                return self._take_usage(usage)  # LiteLLM's usage chunk has an empty delta
            if "role" in delta:
                data = _without_role(data, doc)
            if self._held is None:
                return [data]
            # Whatever follows a held finishing chunk goes after it, in the upstream's order.
            return [*self._release(), data]
        out = self._release()
        if _carries_payload(delta):
            head = copy.deepcopy(doc)
            head_choice = head["choices"][0]
            head_choice["finish_reason"] = None
            head_choice["delta"].pop("role", None)
            out.append(_dumps(head))
        choice["delta"] = {
            "userId": self.user_id,
            "aiId": self.ai_id,
            "occurTime": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        if isinstance(usage, dict):
            self.usage = usage  # transformers serve sends it on the finishing chunk
        self.finished = True
        self._held = doc
        return out

    def complete(self) -> list[str]:
        """The texts that end a finished answer whose ``[DONE]`` did not come (the body
        ended, or the wait for it is over): the held finishing chunk and ``[DONE]``."""
        if not self.finished or self.done:
            return []
        self.done = True
        return [*self._release(), DONE]

    def _take_usage(self, usage: Any) -> list[str]:
        """A usage chunk: its usage goes on the finishing chunk, which may go now."""
        if not isinstance(usage, dict):
            return []
        self.usage = usage
        return self._release()

    def _release(self) -> list[str]:
        """The held finishing chunk, with the answer's usage, if one is held."""
        held = self._held
        if held is None:
            return []
        self._held = None
        if self.usage is not None:
            held["usage"] = self.usage
        return [_dumps(held)]
