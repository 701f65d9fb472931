"""A checkout's entry point; installed, the same command is ``tornado-llm-relay``.

python server.py                       # embedded demo upstream
python server.py --upstream=http://127.0.0.1:9000/v1 --port=8888
"""

import sys

from relay.serve import main

if __name__ == "__main__":
    sys.exit(main())
