"""Write the flags tables of README.md and docs/api.md from relay/config.py's declaration.

    python -m relay.tools.flagdocs           # rewrite both tables in place
    python -m relay.tools.flagdocs --check   # exit 1 when either differs from the declaration

Each table sits between a ``<!-- flags:begin ... -->`` and a ``<!-- flags:end -->``
line; everything outside the markers is left as it is. tests/test_config.py
fails when a table drifts.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from relay.config import flags_markdown

ROOT = Path(__file__).resolve().parents[2]
DOCS = (ROOT / "README.md", ROOT / "docs" / "api.md")
COMMAND = "python -m relay.tools.flagdocs"
BEGIN = f"<!-- flags:begin: generated from relay/config.py by {COMMAND}; edit there -->"
END = "<!-- flags:end -->"


def rewritten(text: str) -> str:
    """``text`` with the table between its markers replaced by the generated one."""
    head, begin, rest = text.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError(f"no {BEGIN} ... {END} lines")
    # Blank lines around the table: a comment line next to it would end or join it.
    return f"{head}{BEGIN}\n\n{flags_markdown()}\n{END}{tail}"


def main(argv: Sequence[str], docs: Sequence[Path] = DOCS) -> int:
    check = list(argv) == ["--check"]
    if argv and not check:
        print(f"usage: {COMMAND} [--check]", file=sys.stderr)
        return 2
    drifted = []
    for doc in docs:
        text = doc.read_text(encoding="utf-8")
        new = rewritten(text)
        if new != text:
            drifted.append(doc)
            if not check:
                doc.write_text(new, encoding="utf-8")
    for doc in drifted:
        verb = "differs from relay/config.py; run " + COMMAND if check else "rewritten"
        print(f"{doc}: flags table {verb}")
    return 1 if check and drifted else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
