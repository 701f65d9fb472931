"""The relay's error type and the one place that scrubs secrets from text.

Every failure the contract names is a `RelayError`: an HTTP status for when
the stream has not started yet, and a stable ``code`` for the JSON body or the
``event: error`` frame once it has.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from typing import TypeVar

import ujson


class RelayError(Exception):
    """A failure with a contract code, an HTTP status and a message safe to show."""

    def __init__(
        self, status: int, code: str, message: str, retry_after: int | None = None
    ) -> None:
        """``retry_after``: the seconds a refused client should wait (admission's 429s
        and 503s say how long)."""
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def retry_seconds(self) -> int | None:
        """The ``Retry-After`` of this error's response: its own, else 1 s for a 503."""
        if self.retry_after is not None:
            return self.retry_after
        return 1 if self.status == 503 else None

    def body(self) -> bytes:
        """The JSON error document: ``{"error": {"code": ..., "message": ...}}``."""
        doc = {"error": {"code": self.code, "message": self.message}}
        return ujson.dumps(doc, ensure_ascii=False).encode()

    def __repr__(self) -> str:
        return f"RelayError({self.status}, {self.code!r}, {self.message!r})"


# Secrets by their shape, whatever keys are configured: an ``sk-`` key (OpenAI's style,
# also as upstreams echo it, half masked with ``*``) and the word after ``Bearer``.
_SHAPED = re.compile(r"\b(sk-[\w*-]{4,})|\bbearer\s+([^\s\"',;]+)", re.IGNORECASE)
# Upstreams echo keys cut short, masked in the middle or upper-cased: any run this long
# shared with a configured key is masked.
SHARED_RUN = 8
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)  # keeps the length
MASK = "[redacted]"


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each secret-shaped word, and each run of ``SHARED_RUN`` or more
    characters that also occurs in one of ``secrets`` (ASCII case ignored; a shorter
    secret only whole), replaced by ``[redacted]``.

    It only runs on error messages, and is linear: one set lookup per position of the
    text for all keys of ``SHARED_RUN`` characters or more.
    """
    spans = [m.span(m.lastindex or 0) for m in _SHAPED.finditer(text)]
    runs: dict[int, set[str]] = {}  # length -> the keys' substrings of that length
    for secret in secrets:
        key = secret.translate(_ASCII_LOWER)
        size = min(SHARED_RUN, len(key))
        if size:
            runs.setdefault(size, set()).update(
                key[i : i + size] for i in range(len(key) - size + 1)
            )
    folded = text.translate(_ASCII_LOWER)
    for size, known in runs.items():
        spans += [
            (i, i + size) for i in range(len(folded) - size + 1) if folded[i : i + size] in known
        ]
    out: list[str] = []
    end = 0  # where the text not yet copied starts
    for start, stop in sorted(spans):
        if start > end or not out:
            out += (text[end:start], MASK)
        end = max(end, stop)
    out.append(text[end:])
    return "".join(out)


E = TypeVar("E", bound=BaseException)


def detached(error: E) -> E:
    """``error`` without its traceback or chained exceptions, to keep after the except block.

    Kept whole, an exception holds the frames it passed through, and they hold
    it back: a reference cycle that only a full GC pass frees, and the server
    runs those rarely (see relay/serve.py).
    """
    error.__traceback__ = None
    error.__context__ = None
    error.__cause__ = None
    return error


class ConfigError(Exception):
    """A configuration problem, with a message fit for one line on stderr."""
