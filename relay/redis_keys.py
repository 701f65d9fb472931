"""How a session lies in Redis: the names of its keys, and how their entries read.

Per session, two keys, both expiring ``--session-ttl`` after the last activity
(Redis does the expiry). Both carry the uid as their hash tag, so a cluster
keeps them in one slot and every multi-key operation on a session (the
pipelines, the append script) stays on one node:

* ``relay:{<uid>}:meta`` - a hash: owner, robot, state, last_seq, the process
  that runs the answer (``proc``), and the error (code, status, message) of a
  failed session;
* ``relay:{<uid>}:events`` - a Redis Stream whose entry ``N-0`` holds the
  encoded frame of event N, and whose entry ``L-1`` marks the end after event L.
  Using the sequence number as the stream id makes a resume an ``XREAD`` from
  ``<Last-Event-ID>-0``. It keeps what the session keeps in memory (20,000
  events / 8 MiB): the append trims it to the oldest event kept in memory.

Keyed one-shot answers (``Idempotency-Key``) are sessions like these, indexed
in ``relay:idem:<index>`` (relay/idempotency.py), which expires with them; its
scripts touch that one key only, so it may live in any slot.
"""

from __future__ import annotations


def meta_key(uid: str) -> str:
    return f"relay:{{{uid}}}:meta"


def events_key(uid: str) -> str:
    return f"relay:{{{uid}}}:events"


def entry_seq(entry_id: bytes) -> tuple[int, int]:
    """A stream entry's id as numbers: ``(N, 0)`` for event N, ``(L, 1)`` for the end."""
    ms, _, part = entry_id.partition(b"-")
    return int(ms or 0), int(part or 0)


def as_text(value: bytes | str | None) -> str | None:
    """A hash field's value (bytes, or None when it is missing) as text."""
    return value.decode() if isinstance(value, bytes) else value
