"""The request body of both POST endpoints, validated into an `Ask`.

``{"robotId": "1", "aiQuestion": "...", "aiQuestionHistory": [["q", "a"], ...]}``;
other fields are accepted and ignored. Each problem is a 400 `RelayError`
whose message names the field, and never echoes the body.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ujson

from relay.errors import RelayError

MAX_BODY = 1 << 20
MAX_QUESTION = 32_000  # characters; the body bound applies to the whole request
MAX_HISTORY = 200  # pairs


@dataclass(frozen=True, slots=True)
class Ask:
    """A validated question."""

    robot_id: str
    question: str
    history: tuple[tuple[str, str], ...] = ()


def _bad(code: str, message: str) -> RelayError:
    return RelayError(400, code, message)


def parse_ask(body: bytes) -> Ask:
    """Validate a POST body; raises `RelayError` (400) naming what is wrong."""
    try:
        doc: Any = ujson.loads(body)
    except ValueError:
        raise _bad("bad_json", "the request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise _bad("bad_json", "the request body must be a JSON object")
    robot_id = doc.get("robotId", "1")
    if isinstance(robot_id, int) and not isinstance(robot_id, bool):
        robot_id = str(robot_id)
    if not isinstance(robot_id, str):
        raise _bad("bad_request", "robotId must be a string")
    question = doc.get("aiQuestion")
    if not isinstance(question, str):
        raise _bad("bad_request", "aiQuestion is required and must be a string")
    if not question.strip():
        raise _bad("bad_request", "aiQuestion must not be empty")
    if len(question) > MAX_QUESTION:
        raise _bad("bad_request", f"aiQuestion is longer than {MAX_QUESTION} characters")
    _unicode(question, "aiQuestion")
    return Ask(robot_id, question, _history(doc.get("aiQuestionHistory")))


def _unicode(text: str, field: str) -> None:
    """JSON's ``\\ud800`` escapes decode to lone surrogates, which no UTF-8 request can carry."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise _bad("bad_request", f"{field} holds a lone surrogate (invalid Unicode)") from None


def _history(raw: Any) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_HISTORY:
        raise _bad(
            "bad_request",
            f"aiQuestionHistory must be a list of at most {MAX_HISTORY} pairs",
        )
    pairs = []
    for pair in raw:
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not all(isinstance(p, str) for p in pair)
        ):
            raise _bad(
                "bad_request",
                "aiQuestionHistory items must be [question, answer] strings",
            )
        _unicode(pair[0], "aiQuestionHistory")
        _unicode(pair[1], "aiQuestionHistory")
        pairs.append((pair[0], pair[1]))
    return tuple(pairs)
