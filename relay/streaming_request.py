"""What a caller hands to `relay.httpclient.StreamingHTTPClient`: a `StreamingRequest`,
checked against the options the client refuses (`UNSUPPORTED`), and its bytes on the wire."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tornado.httpclient import HTTPRequest

from relay.http1 import ResponseHead

if TYPE_CHECKING:
    from relay.httpclient import CancelHandle


class StreamingRequest(HTTPRequest):
    """An `HTTPRequest` with the two things `StreamingHTTPClient` adds to Tornado's.

    ``cancel_handle``: a `CancelHandle` that aborts this request at once.
    ``head_callback``: called once with the parsed `ResponseHead` (status, reason
    and headers) when the head is complete, before any of the body.
    Every other argument is `HTTPRequest`'s (see `UNSUPPORTED` for those refused).
    """

    # Every attribute Tornado's `HTTPRequest.__init__` sets (6.x), and ours: 34 are too
    # many for a compact instance dict, and a request lives as long as its call. In
    # slots it takes ~0.4 KB instead of ~1.9 (1.5 KB of an open stream's ~20). An
    # attribute a later Tornado adds goes to the instance dict (tests/test_httpclient.py
    # notices).
    __slots__ = (
        "_body",
        "_headers",
        "allow_ipv6",
        "allow_nonstandard_methods",
        "auth_mode",
        "auth_password",
        "auth_username",
        "body_producer",
        "ca_certs",
        "cancel_handle",
        "client_cert",
        "client_key",
        "connect_timeout",
        "decompress_response",
        "expect_100_continue",
        "follow_redirects",
        "head_callback",
        "header_callback",
        "max_redirects",
        "method",
        "network_interface",
        "prepare_curl_callback",
        "proxy_auth_mode",
        "proxy_host",
        "proxy_password",
        "proxy_port",
        "proxy_username",
        "request_timeout",
        "ssl_options",
        "start_time",
        "streaming_callback",
        "url",
        "user_agent",
        "validate_cert",
    )

    def __init__(
        self,
        url: str,
        *,
        cancel_handle: CancelHandle | None = None,
        head_callback: Callable[[ResponseHead], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(url, **kwargs)
        self.cancel_handle = cancel_handle
        self.head_callback = head_callback


# HTTPRequest options this client does not honour, and the value that asks for each
# (None: any value given). An option left unset asks for nothing: an unset
# follow_redirects or decompress_response, True in Tornado's defaults, is False here.
UNSUPPORTED: dict[str, object] = {
    "follow_redirects": True,
    "max_redirects": None,
    "decompress_response": True,
    "proxy_host": None,
    "proxy_port": None,
    "proxy_username": None,
    "proxy_password": None,
    "proxy_auth_mode": None,
    "auth_username": None,
    "auth_password": None,
    "auth_mode": None,
    "user_agent": None,
    "network_interface": None,
    "ca_certs": None,
    "client_key": None,
    "client_cert": None,
    "ssl_options": None,
    "prepare_curl_callback": None,
    "body_producer": None,
    "expect_100_continue": True,
    "allow_ipv6": False,
}


def refuse_unsupported(request: HTTPRequest) -> None:
    for name, asks in UNSUPPORTED.items():
        value = getattr(request, name, None)
        if value is not None and (asks is None or value == asks):
            raise ValueError(f"StreamingHTTPClient does not support {name}={value!r}")


# Headers this client writes itself, whatever the request says (Connection only to close).
_FRAMING = frozenset({"Accept-Encoding", "Content-Length"})
_FRAMING_CLOSE = _FRAMING | {"Connection"}


def request_bytes(request: Any, parsed: urllib.parse.SplitResult, keep: bool) -> bytes:
    path = parsed.path or "/"
    if parsed.query:
        path += "?" + parsed.query
    # `AsyncHTTPClient.fetch` made ``request.headers`` the request's own `HTTPHeaders`
    # (names normalised): written as they are, no second copy.
    headers = request.headers
    framing = _FRAMING if keep else _FRAMING_CLOSE
    lines = [f"{request.method} {path} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers.get_all() if name not in framing]
    if "Host" not in headers:
        lines.append(f"Host: {parsed.netloc.rpartition('@')[2]}")
    if not keep:
        lines.append("Connection: close")
    lines.append("Accept-Encoding: identity")
    body = request.body or b""
    if body or request.method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + body
