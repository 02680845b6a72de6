"""Token provider units: credential files, memo/force-refresh, error mapping (MSAL faked)."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from ldapsync.graph.clouds import resolve_endpoints
from ldapsync.graph.errors import AuthError
from ldapsync.graph.token import (
    ApplicationTokenProvider,
    load_client_credential,
    make_requests_session,
)
from ldapsync.testing.tls import make_app_certificate


def test_secret_file_strips_one_trailing_newline(tmp_path) -> None:
    p = tmp_path / "secret"
    p.write_text("s3cr3t \n\n")
    cred = load_client_credential(client_secret_file=str(p))
    assert cred.kind == "secret" and cred.value == "s3cr3t \n"
    p.write_text("abc\r\n")
    assert load_client_credential(client_secret_file=str(p)).value == "abc"
    assert "abc" not in repr(load_client_credential(client_secret_file=str(p)))
    p.write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_client_credential(client_secret_file=str(p))
    with pytest.raises(ValueError, match="cannot read"):
        load_client_credential(client_secret_file=str(tmp_path / "nope"))


def test_pem_key_and_cert_thumbprint_computed(tmp_path) -> None:
    c = make_app_certificate()
    p = tmp_path / "app.pem"
    p.write_text(c.certificate_pem + c.private_key_pem)           # order does not matter
    cred = load_client_credential(certificate_file=str(p))
    assert cred.kind == "certificate"
    assert cred.value["thumbprint"] == c.sha1_thumbprint == cred.thumbprint
    assert "PRIVATE KEY" in cred.value["private_key"]
    assert cred.expires_at == c.not_after
    assert "PRIVATE" not in repr(cred)


def test_pem_key_only_needs_thumbprint(tmp_path) -> None:
    c = make_app_certificate()
    p = tmp_path / "key.pem"
    p.write_text(c.private_key_pem)
    with pytest.raises(ValueError, match="certificate_thumbprint"):
        load_client_credential(certificate_file=str(p))
    cred = load_client_credential(certificate_file=str(p), certificate_thumbprint="aa:bb:cc")
    assert cred.value["thumbprint"] == "AABBCC" and cred.expires_at is None


def test_pem_with_mismatched_cert_is_refused(tmp_path) -> None:
    a, b = make_app_certificate(), make_app_certificate()
    p = tmp_path / "app.pem"
    p.write_text(a.private_key_pem + b.certificate_pem)
    with pytest.raises(ValueError, match="matches"):
        load_client_credential(certificate_file=str(p))


def test_pfx_with_password_file(tmp_path) -> None:
    from cryptography import x509
    c = make_app_certificate()
    key = serialization.load_pem_private_key(c.private_key_pem.encode(), None)
    cert = x509.load_pem_x509_certificate(c.certificate_pem.encode())
    pfx = pkcs12.serialize_key_and_certificates(
        b"app", key, cert, None, serialization.BestAvailableEncryption(b"pfx-pass"))
    (tmp_path / "app.pfx").write_bytes(pfx)
    (tmp_path / "pw").write_text("pfx-pass\n")
    cred = load_client_credential(certificate_file=str(tmp_path / "app.pfx"),
                                  certificate_password_file=str(tmp_path / "pw"))
    assert cred.thumbprint == hashlib.sha1(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    (tmp_path / "pw").write_text("wrong\n")
    with pytest.raises(ValueError):
        load_client_credential(certificate_file=str(tmp_path / "app.pfx"),
                               certificate_password_file=str(tmp_path / "pw"))


def test_requests_session_ignores_environment(monkeypatch, tmp_path) -> None:
    import requests
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    monkeypatch.setenv("CURL_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    import conftest  # type: ignore[import-not-found]

    import http.server
    import ssl
    import threading

    ca, cert, key = conftest.make_cert(tmp_path / "tls")
    s = make_requests_session(str(ca))
    assert s.trust_env is False
    settings = s.merge_environment_settings("https://x.test/", {}, None, s.verify, None)
    assert settings["verify"] == s.verify
    # A real handshake with a server whose certificate only ca_bundle's CA signed: the system
    # bundle REQUESTS_CA_BUNDLE names does not hold it, so success means the environment lost.
    httpd = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        assert s.get(f"https://127.0.0.1:{httpd.server_address[1]}/", timeout=10).status_code == 200
        with pytest.raises(requests.exceptions.SSLError):    # another CA's session refuses it
            make_requests_session(str(conftest.make_cert(tmp_path / "other")[0])).get(
                f"https://127.0.0.1:{httpd.server_address[1]}/", timeout=10)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert make_requests_session(None) is None
    assert isinstance(s, requests.Session)


class FakeApp:
    def __init__(self, results: list[Any]) -> None:
        self.results = results
        self.calls = 0
        self.removed = 0
        self.kwargs: dict[str, Any] = {}

    def acquire_token_for_client(self, scopes: list[str]) -> Any:
        self.calls += 1
        r = self.results.pop(0)
        if isinstance(r, Exception):
            raise r
        return r

    def remove_tokens_for_client(self) -> None:
        self.removed += 1


def provider(app: FakeApp, **kw: Any) -> ApplicationTokenProvider:
    from ldapsync.graph.token import ClientCredential

    def factory(client_id: str, **kwargs: Any) -> FakeApp:
        app.kwargs = kwargs
        return app
    return ApplicationTokenProvider(
        "cid", resolve_endpoints("global", "contoso.com", **kw), ClientCredential("secret", "TopSecret"),
        app_factory=factory, ca_bundle=_test_ca())


def _test_ca() -> str:
    """A real CA file (ca_bundle is read: it is added to the public roots)."""
    import tempfile
    from pathlib import Path

    import conftest  # type: ignore[import-not-found]

    d = Path(tempfile.gettempdir()) / "ldapsync-test-token-ca"
    if not (d / "ca.pem").exists():
        conftest.make_cert(d)
    return str(d / "ca.pem")


@pytest_twisted.ensureDeferred
async def test_app_token_memoised_and_force_refresh() -> None:
    app = FakeApp([{"access_token": "A1", "expires_in": 3600}, {"access_token": "A2", "expires_in": 3600}])
    p = provider(app)
    assert await p.get_token() == "A1"
    assert await p.get_token() == "A1"
    assert app.calls == 1
    assert app.kwargs["http_client"].trust_env is False and "instance_discovery" not in app.kwargs
    assert await p.get_token(force_refresh=True, rejected_token="A1") == "A2"
    assert app.removed == 1
    # a second 401 for the old token does not refresh again
    assert await p.get_token(force_refresh=True, rejected_token="A1") == "A2"
    assert app.calls == 2


@pytest_twisted.ensureDeferred
async def test_non_microsoft_authority_disables_instance_discovery() -> None:
    app = FakeApp([{"access_token": "A1", "expires_in": 3600}])
    p = provider(app, authority="https://127.0.0.1:1/t")
    await p.get_token()
    assert app.kwargs["instance_discovery"] is False


@pytest_twisted.ensureDeferred
async def test_app_token_errors_are_typed_and_secret_free() -> None:
    import requests
    app = FakeApp([
        {"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided.\r\n"
                                                         "Trace ID: x", "correlation_id": "corr-1"},
        requests.exceptions.ConnectionError("connection refused"),
        {"error": "temporarily_unavailable", "error_description": "later"},
    ])
    p = provider(app)
    with pytest.raises(AuthError) as ei:
        await p.get_token()
    e = ei.value
    assert (e.code, e.request_id, e.transient, e.needs_reauthorization) == ("invalid_client", "corr-1", False, False)
    assert e.message == "AADSTS7000215: Invalid client secret provided." and "TopSecret" not in str(e)
    with pytest.raises(AuthError) as ei:
        await p.get_token()
    assert ei.value.code == "connection_error" and ei.value.transient
    with pytest.raises(AuthError) as ei:
        await p.get_token()
    assert ei.value.transient


@pytest_twisted.ensureDeferred
async def test_concurrent_callers_share_one_acquisition() -> None:
    from twisted.internet import defer
    app = FakeApp([{"access_token": "A1", "expires_in": 3600}])
    p = provider(app)
    tokens = await defer.gatherResults([defer.ensureDeferred(p.get_token()) for _ in range(5)])
    assert tokens == ["A1"] * 5 and app.calls == 1


def test_an_expired_client_secret_needs_reauthorization_a_wrong_one_does_not() -> None:
    """AADSTS7000222 (the app's secret expired) only an admin can fix: the connector shows
    needs-reauthorization. A wrong secret (7000215) is a plain error."""
    from ldapsync.graph.msal_thread import _auth_error_from_result

    expired = _auth_error_from_result({"error": "invalid_client", "error_codes": [7000222],
                                       "error_description": "AADSTS7000222: The provided client secret keys are expired."},
                                      delegated=False)
    wrong = _auth_error_from_result({"error": "invalid_client", "error_codes": [7000215],
                                     "error_description": "AADSTS7000215: Invalid client secret provided."},
                                    delegated=False)
    assert expired.needs_reauthorization is True and not expired.transient
    assert wrong.needs_reauthorization is False
    assert _auth_error_from_result({"error": "invalid_grant", "error_codes": [50173]}, delegated=True).needs_reauthorization
