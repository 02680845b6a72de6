"""Odds and ends: the demo sign-in page, TLS details, and keeping the fake out of production."""

import ast
import json
import socket
import ssl
from pathlib import Path

import pytest_twisted
from cryptography import x509
from twisted.internet import threads

import ldapsync

d = pytest_twisted.ensureDeferred


def test_production_code_does_not_import_the_fake_at_module_level():
    root = Path(ldapsync.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if "testing" in path.relative_to(root).parts:
            continue
        if path.relative_to(root).parts == ("demo.py",):
            continue   # `ldapsync demo` itself: the CLI imports it lazily, nothing else does (test_layering.py)
        tree = ast.parse(path.read_text(), str(path))
        for node in tree.body:               # module level only: a lazy demo-mode import is fine
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [("." * node.level) + (node.module or "")] if isinstance(node, ast.ImportFrom) else [])
            if any("testing" in n.split(".") for n in names):
                offenders.append(str(path))
    assert offenders == []


@d
async def test_server_certificate_names(fake_tenant):
    cert = x509.load_pem_x509_certificate((fake_tenant.state_dir / "tls" / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1"}
    # the stdlib trusts it too, even with strict X.509 checks (Python 3.13's default)
    ctx = ssl.create_default_context(cafile=str(fake_tenant.ca_file))
    ctx.verify_flags |= getattr(ssl, "VERIFY_X509_STRICT", 0)

    def handshake(host):
        with socket.create_connection(("127.0.0.1", fake_tenant.port), timeout=5) as sock:
            with ctx.wrap_socket(sock, server_hostname=host) as tls:
                return tls.version()

    for host in ("127.0.0.1", "localhost"):
        assert await threads.deferToThread(handshake, host)


@d
async def test_device_login_page(fake_tenant, fake_app, graph_http):
    form = f"client_id={fake_app['client_id']}&scope={fake_tenant.graph_scope}"
    resp = await graph_http.post(f"{fake_tenant.authority}/oauth2/v2.0/devicecode", data=form.encode(),
                                 headers={"Content-Type": ["application/x-www-form-urlencoded"]})
    flow = json.loads(await resp.content())
    page = await graph_http.get(flow["verification_uri"])
    assert page.code == 200 and b"<form" in await page.content()
    admin = "admin@contoso.onmicrosoft.com"
    bad = await graph_http.post(flow["verification_uri"],
                                data={"code": flow["user_code"], "username": admin, "password": "nope"})
    assert b"Wrong user name or password" in await bad.content()
    ok = await graph_http.post(flow["verification_uri"], data={
        "code": flow["user_code"], "username": admin, "password": fake_tenant.password_of(admin)})
    assert b"Signed in" in await ok.content()
    assert fake_tenant.pending_device_codes() == []
    assert "nope" not in json.dumps(fake_tenant.requests(None))
