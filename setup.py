from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="tornado-llm-relay",
    version="0.1.0",
    description="SSE relay for LLM chat streaming on Tornado",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["relay", "relay.*"]),
    py_modules=["server"],
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
            # Drives Debian's /usr/bin/chromium; never `playwright install`.
            "playwright>=1.40",
            # A throwaway CA and certificate for the HTTPS upstream tests.
            "trustme>=1.1",
            # Real clients read the relay's streams with their own parsers (tests/test_clients.py).
            "openai>=3.57",
            "httpx-sse>=0.4.3",
            # httpx-sse imports httpx but does not declare it (openai 3 runs on its fork, httpx2).
            "httpx>=0.28",
        ],
    },
)
