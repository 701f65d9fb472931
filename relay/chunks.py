"""Chunk rules: which upstream chunks reach the client, and how the last one changes.

Input is the ``data`` of one upstream event (an OpenAI ``chat.completion.chunk``
as JSON text); output is the list of data texts to relay, in order. Forwarded
chunks keep the upstream's own text byte for byte; only the finishing chunk is
re-serialised, because its delta is replaced by the business node.

Rules (see docs/api.md):

* ``[DONE]`` is relayed and ends the stream.
* A chunk whose first choice's delta carries ``content`` (any non-empty string,
  whitespace-only too: a lone newline is a paragraph break), ``reasoning_content``
  or ``tool_calls`` is relayed as it is. Empty and role-only deltas are dropped.
* The chunk with a non-null ``finish_reason`` gets the business node
  ``{"userId", "aiId", "occurTime"}`` as its delta. If that chunk also carried
  content, the content goes first as its own chunk (finish_reason null), so no
  text is lost.
* A usage-only chunk (``choices: []`` with ``usage``) is relayed as it is.
* JSON with an ``error`` key becomes `RelayError` ``upstream_error``; data that
  is not a JSON object becomes ``upstream_bad_chunk``.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import ujson

from relay.errors import RelayError

DONE = "[DONE]"
_CARRIERS = ("content", "reasoning_content")


def _dumps(obj: Any) -> str:
    return ujson.dumps(obj, ensure_ascii=False, escape_forward_slashes=False)


def _carries_payload(delta: dict) -> bool:
    for key in _CARRIERS:
        value = delta.get(key)
        if isinstance(value, str) and value:
            return True
    return bool(delta.get("tool_calls"))


def error_message(doc: Any) -> str:
    """The human message of an OpenAI-style error document (or a short fallback)."""
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return err["message"][:500]
    if isinstance(err, str):
        return err[:500]
    return "the upstream reported an error"


class ChunkRules:
    """Applies the rules for one answer; ``user_id`` and ``ai_id`` fill the business node."""

    __slots__ = ("ai_id", "user_id")

    def __init__(self, user_id: str, ai_id: str) -> None:
        self.user_id = user_id
        self.ai_id = ai_id

    def apply(self, data: str) -> tuple[list[str], bool]:
        """Return (texts to relay, whether the stream is done)."""
        if data == DONE:
            return [DONE], True
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
        choices = doc.get("choices")
        if not choices:
            return ([data] if doc.get("usage") else []), False
        choice = choices[0]
        if not isinstance(choice, dict):
            raise RelayError(502, "upstream_bad_chunk", "the upstream sent a malformed choice")
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            delta = {}
        if choice.get("finish_reason") is None:
            return ([data] if _carries_payload(delta) else []), False
        out = []
        if _carries_payload(delta):
            head = copy.deepcopy(doc)
            head["choices"][0]["finish_reason"] = None
            out.append(_dumps(head))
        choice["delta"] = {
            "userId": self.user_id,
            "aiId": self.ai_id,
            "occurTime": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        out.append(_dumps(doc))
        return out, False
