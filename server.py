"""Entry point: read the configuration, build the app, listen, handle signals.

python server.py                       # embedded demo upstream
python server.py --upstream=http://127.0.0.1:9000/v1 --port=8888
"""

from __future__ import annotations

import sys

from relay.config import ConfigError, load_settings
from relay.serve import run


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"relay: {e}", file=sys.stderr)
        return 2
    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
