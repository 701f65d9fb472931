"""An HTTPS model server (the usual case: OpenAI and most hosted APIs), with a throwaway CA."""

from __future__ import annotations

import ssl

import pytest
import trustme

from tests.conftest import ASK, fetch_stream
from tests.fakeupstream import ScriptedUpstream, stream_tokens

TOKENS = ["你好", "，", "\n\n", " TLS", " world"]


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_fake(io_loop, ca):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    upstream = ScriptedUpstream(ssl_options=context)
    upstream.script = stream_tokens(TOKENS)
    yield upstream
    upstream.stop()


@pytest.mark.gen_test
async def test_https_upstream_streams_exact_and_reuses_its_tls_connection(
    make_relay, tls_fake, ca, tmp_path, monkeypatch
):
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # read when the TLS settings are made
    rs = make_relay(upstream=tls_fake.url)
    for _ in range(3):
        res = await fetch_stream(rs.url + "/aianswer/streamAsk", ASK)
        assert res.status == 200 and res.text() == "".join(TOKENS)
    assert len({r["peer"] for r in tls_fake.requests}) == 1  # one handshake for three answers


@pytest.mark.gen_test
async def test_https_upstream_with_an_untrusted_certificate_is_a_clear_502(make_relay, tls_fake):
    rs = make_relay(upstream=tls_fake.url)
    res = await fetch_stream(rs.url + "/aianswer/streamAsk", ASK)
    assert res.status == 502
    assert res.json()["error"]["code"] == "upstream_unavailable"
    assert not tls_fake.requests
