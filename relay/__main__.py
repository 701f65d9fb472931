"""``python -m relay``: the same command as ``tornado-llm-relay`` and ``python server.py``."""

from relay.serve import main

raise SystemExit(main())
