from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="tornado-llm-relay",
    version="0.1.0",
    description="SSE relay for LLM chat streaming on Tornado",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    # The page and the default robots live at the repository's top level (static/, conf/),
    # where the layout keeps them; these mappings put them in the wheel as package data,
    # relay/static and relay/conf, with no copy and no build step (relay/resources.py finds
    # them in either place). server.py stays out of the wheel: it is the checkout's entry
    # point, and a top-level `server` module would clash with any other.
    packages=[*find_packages(include=["relay", "relay.*"]), "relay.static", "relay.conf"],
    package_dir={"relay.static": "static", "relay.conf": "conf"},
    package_data={"relay": ["py.typed"], "relay.static": ["**/*"], "relay.conf": ["relay.conf"]},
    entry_points={"console_scripts": ["tornado-llm-relay = relay.serve:main"]},
    python_requires=">=3.11",
    install_requires=[
        "tornado>=6.3",
        "ujson>=5.8",
        "prometheus-client>=0.17",
        "redis>=5",
        # A faster event loop; the relay falls back to asyncio's own without it.
        "uvloop>=0.19; sys_platform != 'win32'",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-tornado>=0.8.1",
            # pytest-tornado imports pkg_resources, which setuptools 81 removes.
            "setuptools<81",
            "hypothesis>=6.90",
            "ruff>=0.5",
            # tests/test_lint.py runs it strict on the product (mypy.ini).
            "mypy>=1.10",
            # Drives Debian's /usr/bin/chromium; never `playwright install`.
            "playwright>=1.40",
            # A throwaway CA and certificate for the HTTPS upstream tests.
            "trustme>=1.1",
            # tests/test_install.py builds the sdist and wheel as a user would.
            "build>=1",
            # The tiny random-weight llama that tests/test_llama_server.py writes for
            # llama-server (built by .ci/build-llama-server).
            "gguf>=0.17",
            "numpy>=1.24",
            # Real clients read the relay's streams with their own parsers
            # (tests/test_python_clients.py).
            "openai>=3.57",
            "httpx-sse>=0.4.3",
            # httpx-sse imports httpx but does not declare it (openai 3 runs on its fork, httpx2).
            "httpx>=0.28",
            # tests/test_deploy_files.py reads compose.yaml.
            "pyyaml>=6",
        ],
    },
)
