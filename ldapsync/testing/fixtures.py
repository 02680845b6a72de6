"""pytest fixtures for the fake Microsoft 365 tenant (needs pytest-twisted; test double only).

Use from a conftest.py::

    from ldapsync.testing.fixtures import fake_tenant, fake_app, graph_http, GraphCaller  # noqa: F401

``fake_tenant`` listens on 127.0.0.1:<free port> on the reactor pytest-twisted runs; blocking
clients (MSAL) must run in a thread (``twisted.internet.threads.deferToThread``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool

from .tenant import FakeTenant
from .tls import client_tls_policy


@pytest.fixture
def fake_tenant(tmp_path):
    """The demo tenant (contoso), started; device-code polling interval 1 s."""
    tenant = FakeTenant(tmp_path / "fake-tenant").seed_demo()
    tenant.device_interval = 1
    tenant.start()
    yield tenant
    pytest_twisted.blockon(tenant.stop())


@pytest.fixture
def fake_app(fake_tenant):
    """A confidential app with the default permissions: ``{"client_id", "secret", ...}``."""
    return fake_tenant.register_app(public_client=True)


@pytest.fixture
def graph_http(fake_tenant):
    """A treq ``HTTPClient`` trusting the fake's CA, with a persistent pool closed afterwards."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    client = treq.client.HTTPClient(Agent(reactor, contextFactory=client_tls_policy(fake_tenant.ca_file),
                                          pool=pool))
    yield client
    pytest_twisted.blockon(pool.closeCachedConnections())


@dataclass
class GraphResult:
    status: int
    headers: dict[str, str]        # lower-case names, last value
    body: Any                      # parsed JSON, text, or None when empty

    @property
    def error_code(self) -> str | None:
        return (self.body or {}).get("error", {}).get("code") if isinstance(self.body, dict) else None


class GraphCaller:
    """Tiny async helper for tests: ``await g("GET", "/users", params=...)`` → GraphResult."""

    def __init__(self, http: Any, tenant: FakeTenant, token: str | None):
        self.http, self.tenant, self.token = http, tenant, token

    async def __call__(self, method: str, path: str, *, json_body: Any = None,
                       params: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
                       url: str | None = None, token: str | None = None) -> GraphResult:
        hdrs = {"Accept": "application/json", **(headers or {})}
        bearer = token if token is not None else self.token
        if bearer:
            hdrs["Authorization"] = f"Bearer {bearer}"
        data = None
        if json_body is not None:
            hdrs["Content-Type"] = "application/json"
            data = json.dumps(json_body).encode()
        resp = await self.http.request(
            method, url or f"{self.tenant.graph_url}{path}", params=params, data=data,
            headers={k: [v] for k, v in hdrs.items()})
        raw = await resp.content()
        text = raw.decode()
        try:
            body = json.loads(text) if text else None
        except ValueError:
            body = text
        headers_out = {k.decode().lower(): v[-1].decode()
                       for k, v in resp.headers.getAllRawHeaders()}
        return GraphResult(resp.code, headers_out, body)


def new_user_body(upn: str = "new.user@contoso.com", password: str = "Tr0ub4dor&3x",
                  **extra: Any) -> dict[str, Any]:
    """A valid ``POST /users`` body (override or add properties with keywords)."""
    body: dict[str, Any] = {
        "accountEnabled": True, "displayName": "New User", "mailNickname": upn.split("@")[0],
        "userPrincipalName": upn,
        "passwordProfile": {"password": password, "forceChangePasswordNextSignIn": False}}
    body.update(extra)
    return body
