"""Real MSAL and the real GraphClient (treq, TLS) against the fake tenant over HTTPS.

Runs on the reactor pytest-twisted drives; MSAL runs in the reactor's thread pool.  Each test runs
with REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE both set (to a bundle that does not hold the fake's CA) and
unset, so nothing depends on the machine's environment.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

from ldapsync.graph.client import BatchItem, GraphClient, PacingPolicy, RetryPolicy
from ldapsync.graph.clouds import CloudEndpoints, resolve_endpoints
from ldapsync.secretbox import SecretBox, load_or_create_key
from ldapsync.graph.errors import (
    AuthError,
    BadRequest,
    DeltaExpired,
    NotFound,
    ObjectConflict,
)
from ldapsync.graph.token import (
    ApplicationTokenProvider,
    DelegatedTokenProvider,
    FileTokenCacheStore,
    load_client_credential,
)
from ldapsync.testing.tls import make_app_certificate

FAST = RetryPolicy(base_delay=0.05, max_delay=0.5, not_found_delay=0.1)


@pytest.fixture(params=["env-set", "env-unset"], autouse=True)
def ca_env(request: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        if request.param == "env-set":
            monkeypatch.setenv(var, "/etc/ssl/certs/ca-certificates.crt")
        else:
            monkeypatch.delenv(var, raising=False)
    yield


def endpoints(tenant: Any) -> CloudEndpoints:
    return resolve_endpoints("global", authority=tenant.authority, graph_url=tenant.graph_url)


def secret_provider(tenant: Any, app: dict[str, Any], tmp_path: Path) -> ApplicationTokenProvider:
    f = tmp_path / "client-secret"
    f.write_text(app["secret"] + "\n")
    return ApplicationTokenProvider(app["client_id"], endpoints(tenant),
                                    load_client_credential(client_secret_file=str(f)),
                                    ca_bundle=str(tenant.ca_file))


class Clients:
    def __init__(self) -> None:
        self.clients: list[GraphClient] = []

    def make(self, tenant: Any, tokens: Any, **kw: Any) -> GraphClient:
        kw.setdefault("retry", FAST)
        c = GraphClient(tokens, tenant.graph_url, reactor=reactor, ca_bundle=str(tenant.ca_file),
                        timeout=10, **kw)
        self.clients.append(c)
        return c


@pytest.fixture
def clients() -> Iterator[Clients]:
    c = Clients()
    yield c
    for client in c.clients:
        pytest_twisted.blockon(defer.ensureDeferred(client.close()))


@pytest.fixture
def app_client(fake_tenant: Any, fake_app: dict[str, Any], tmp_path: Path, clients: Clients) -> GraphClient:
    return clients.make(fake_tenant, secret_provider(fake_tenant, fake_app, tmp_path))


def new_user(upn: str, password: str = "Tr0ub4dor&3x") -> dict[str, Any]:
    return {"accountEnabled": True, "displayName": upn.split("@")[0], "mailNickname": upn.split("@")[0],
            "userPrincipalName": upn, "passwordPolicies": "DisablePasswordExpiration",
            "passwordProfile": {"password": password, "forceChangePasswordNextSignIn": False}}


# --------------------------------------------------------------------------- application sign-in

@pytest_twisted.ensureDeferred
async def test_client_secret(fake_tenant: Any, fake_app: dict[str, Any], app_client: GraphClient) -> None:
    domains = {d["id"]: d for d in await app_client.list_domains()}
    assert domains["contoso.com"]["isVerified"] is True
    assert domains["fabrikam.com"]["isVerified"] is False
    adele = await app_client.get_user("AdeleV@contoso.com")
    assert adele["displayName"] == "Adele Vance" and adele["accountEnabled"] is True
    assert fake_tenant.requests("identity", method="POST")
    assert (await app_client.get_organization())["id"] == fake_tenant.tenant_id
    app = await app_client.get_application(fake_app["client_id"])
    assert app["appId"] == fake_app["client_id"] and app["passwordCredentials"][0]["endDateTime"]
    assert all("$select" in r["query"] for r in fake_tenant.requests("graph", method="GET"))


@pytest_twisted.ensureDeferred
async def test_wrong_client_secret_is_auth_error(fake_tenant: Any, fake_app: dict[str, Any], tmp_path: Path,
                                                 clients: Clients) -> None:
    f = tmp_path / "bad-secret"
    f.write_text("not-the-secret-value\n")
    tokens = ApplicationTokenProvider(fake_app["client_id"], endpoints(fake_tenant),
                                      load_client_credential(client_secret_file=str(f)),
                                      ca_bundle=str(fake_tenant.ca_file))
    client = clients.make(fake_tenant, tokens)
    with pytest.raises(AuthError) as ei:
        await client.get_user("AdeleV@contoso.com")
    assert ei.value.code == "invalid_client" and not ei.value.transient
    assert "not-the-secret-value" not in str(ei.value) and "AADSTS" in ei.value.message


@pytest_twisted.ensureDeferred
async def test_client_certificate_pem(fake_tenant: Any, tmp_path: Path, clients: Clients) -> None:
    cert = make_app_certificate()
    app = fake_tenant.register_app(secret=False, certificate_pem=cert.certificate_pem)
    pem = tmp_path / "app.pem"
    pem.write_text(cert.private_key_pem + cert.certificate_pem)
    cred = load_client_credential(certificate_file=str(pem))
    tokens = ApplicationTokenProvider(app["client_id"], endpoints(fake_tenant), cred,
                                      ca_bundle=str(fake_tenant.ca_file))
    assert tokens.credential_expires_at == cert.not_after
    client = clients.make(fake_tenant, tokens)
    assert (await client.get_user("AlexW@contoso.com"))["surname"] == "Wilber"


@pytest_twisted.ensureDeferred
async def test_client_certificate_pfx(fake_tenant: Any, tmp_path: Path, clients: Clients) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    cert = make_app_certificate()
    app = fake_tenant.register_app(secret=False, certificate_pem=cert.certificate_pem)
    key = serialization.load_pem_private_key(cert.private_key_pem.encode(), None)
    pfx = pkcs12.serialize_key_and_certificates(
        b"app", key, x509.load_pem_x509_certificate(cert.certificate_pem.encode()), None,
        serialization.BestAvailableEncryption(b"hunter22"))
    (tmp_path / "app.pfx").write_bytes(pfx)
    (tmp_path / "pfx-pass").write_text("hunter22\n")
    cred = load_client_credential(certificate_file=str(tmp_path / "app.pfx"),
                                  certificate_password_file=str(tmp_path / "pfx-pass"))
    tokens = ApplicationTokenProvider(app["client_id"], endpoints(fake_tenant), cred,
                                      ca_bundle=str(fake_tenant.ca_file))
    client = clients.make(fake_tenant, tokens)
    assert len(await client.list_domains()) >= 2


# --------------------------------------------------------------------------- delegated sign-in

@pytest_twisted.ensureDeferred
async def test_device_flow_then_silent_refresh_from_encrypted_cache(
        fake_tenant: Any, fake_app: dict[str, Any], tmp_path: Path, clients: Clients) -> None:
    key = load_or_create_key(tmp_path / "var" / "secret.key")
    store = FileTokenCacheStore(tmp_path / "var" / "token-cache.bin")
    ep = endpoints(fake_tenant)
    first = DelegatedTokenProvider(fake_app["client_id"], ep, store, SecretBox(key),
                                   ca_bundle=str(fake_tenant.ca_file))
    flow = await first.initiate_device_flow()
    assert flow.user_code in flow.message and flow.verification_uri

    async def approve_later() -> None:
        await deferLater(reactor, 0.3)
        fake_tenant.approve_device_code(flow.user_code)
    defer.ensureDeferred(approve_later())
    username = await first.complete_device_flow(flow)
    assert username.lower() == f"admin@{fake_tenant.initial_domain}"
    expiry = first.refresh_token_expires_at
    assert expiry is not None and abs(expiry.timestamp() - (time.time() + 90 * 86400)) < 60

    blob = store.load()
    assert blob and b"refresh_token" not in blob and b"secret" not in blob.lower()
    for rt in fake_tenant.refresh_tokens:
        assert rt.encode() not in blob

    # "restart": a new provider from the persisted cache only
    second = DelegatedTokenProvider(fake_app["client_id"], ep, store, SecretBox(key),
                                    ca_bundle=str(fake_tenant.ca_file))
    await second.load()
    assert second.refresh_token_expires_at == expiry
    client = clients.make(fake_tenant, second)
    assert (await client.get_user("MeganB@contoso.com"))["givenName"] == "Megan"

    # the access token dies: 401 → silent refresh with the refresh token → retry
    before = second.refresh_token_expires_at
    fake_tenant.expire_tokens()
    await deferLater(reactor, 1.1)
    assert (await client.get_user("MeganB@contoso.com"))["surname"] == "Bowen"
    assert client.stats["token_refreshes"] == 1
    assert second.refresh_token_expires_at > before
    grants = [r["body"].get("grant_type") for r in fake_tenant.requests("identity", method="POST")
              if isinstance(r["body"], dict)]
    assert "refresh_token" in grants

    # an admin revokes the sessions: the refresh token is refused → re-authorization needed
    fake_tenant.revoke_refresh_tokens()
    fake_tenant.expire_tokens()
    with pytest.raises(AuthError) as ei:
        await client.get_user("MeganB@contoso.com")
    assert ei.value.needs_reauthorization and ei.value.code == "invalid_grant"


@pytest_twisted.ensureDeferred
async def test_delegated_without_sign_in_needs_authorization(fake_tenant: Any, fake_app: dict[str, Any],
                                                             tmp_path: Path) -> None:
    p = DelegatedTokenProvider(fake_app["client_id"], endpoints(fake_tenant),
                               FileTokenCacheStore(tmp_path / "empty.bin"), SecretBox(os.urandom(32)),
                               ca_bundle=str(fake_tenant.ca_file))
    with pytest.raises(AuthError) as ei:
        await p.get_token()
    assert ei.value.needs_reauthorization
    assert p.refresh_token_expires_at is None


# --------------------------------------------------------------------------- users

@pytest_twisted.ensureDeferred
async def test_create_get_patch_user_and_conflict(fake_tenant: Any, app_client: GraphClient) -> None:
    fake_tenant.configure(replication_delay=0.5)          # reads 404 for a moment after the create
    user = await app_client.create_user(new_user("jane.doe@contoso.com"))
    assert user["id"]
    got = await app_client.get_user(user["id"], ["id", "userPrincipalName", "accountEnabled"])
    assert got["userPrincipalName"] == "jane.doe@contoso.com" and got["accountEnabled"] is True
    await app_client.update_user(user["id"], {"displayName": "Jane Doe", "accountEnabled": False})
    got = await app_client.find_user_by_upn("jane.doe@contoso.com")
    assert got is not None and got["displayName"] == "Jane Doe" and got["accountEnabled"] is False
    await app_client.revoke_sessions(user["id"])
    with pytest.raises(ObjectConflict) as ei:
        await app_client.create_user(new_user("Jane.Doe@contoso.com"))
    assert ei.value.status == 400 and "ObjectConflict" in ei.value.details and ei.value.request_id
    assert await app_client.find_user_by_upn("nobody@contoso.com") is None
    with pytest.raises(NotFound):
        await app_client.update_user("00000000-0000-0000-0000-000000000000", {"displayName": "x"})
    with pytest.raises(BadRequest) as ei2:
        await app_client.create_user(new_user("weak@contoso.com", password="short"))
    assert "short" not in str(ei2.value)
    # passwords never reach the request record in clear
    assert "Tr0ub4dor&3x" not in repr(fake_tenant.requests())


@pytest_twisted.ensureDeferred
async def test_paging_with_top(fake_tenant: Any, app_client: GraphClient) -> None:
    for i in range(7):
        fake_tenant.add_user(f"pager{i}@contoso.com", display_name=f"Pager {i}")
    fake_tenant.clear_requests()
    users = [u async for u in app_client.list_users(["id", "userPrincipalName"], top=3)]
    upns = {u["userPrincipalName"].lower() for u in users}
    assert {f"pager{i}@contoso.com" for i in range(7)} <= upns
    assert len(users) == len(fake_tenant.all_users())
    pages = fake_tenant.requests("graph", method="GET", path="/users$")
    assert len(pages) == -(-len(users) // 3)
    assert all("$select" in r["query"] for r in pages)


@pytest_twisted.ensureDeferred
async def test_delta_round_trip(fake_tenant: Any, app_client: GraphClient) -> None:
    q = app_client.delta(["id", "userPrincipalName", "displayName"])
    first = await q.collect()
    assert len(first) == len(fake_tenant.all_users()) and q.delta_link
    await app_client.create_user(new_user("delta.new@contoso.com"))
    q2 = app_client.delta(delta_link=q.delta_link)
    changed = await q2.collect()
    assert "delta.new@contoso.com" in {(u.get("userPrincipalName") or "").lower() for u in changed}
    assert q2.delta_link
    fake_tenant.expire_delta_tokens()
    with pytest.raises(DeltaExpired):
        await app_client.delta(delta_link=q2.delta_link).collect()


@pytest_twisted.ensureDeferred
async def test_batch_with_throttled_item(fake_tenant: Any, app_client: GraphClient) -> None:
    created = [await app_client.create_user(new_user(f"batch{i}@contoso.com")) for i in range(23)]
    fake_tenant.clear_requests()
    fake_tenant.inject_fault(429, count=2, retry_after=1, method="PATCH")
    items = [BatchItem("PATCH", f"/users/{u['id']}", {"jobTitle": f"T{i}"}) for i, u in enumerate(created)]
    items.append(BatchItem("GET", f"/users/{created[0]['id']}?$select=id,jobTitle"))
    t0 = time.monotonic()
    results = await app_client.batch(items)
    assert all(r.ok for r in results), [(r.status, r.body) for r in results if not r.ok]
    assert time.monotonic() - t0 >= 0.9
    outer = fake_tenant.requests("graph", method="POST", path=r"/\$batch$", batch_items=False)
    assert len(outer) == 3                       # 20 + 4, then the two throttled items again
    assert fake_tenant.get_user(created[22]["id"])["jobTitle"] == "T22"


# --------------------------------------------------------------------------- faults

@pytest_twisted.ensureDeferred
async def test_429_retry_after_is_waited_out(fake_tenant: Any, app_client: GraphClient) -> None:
    fake_tenant.inject_fault(429, count=1, retry_after=1)
    t0 = time.monotonic()
    assert (await app_client.get_user("AdeleV@contoso.com"))["givenName"] == "Adele"
    assert time.monotonic() - t0 >= 0.95
    assert app_client.stats["throttled"] == 1


@pytest_twisted.ensureDeferred
async def test_503_outage_then_recovery(fake_tenant: Any, app_client: GraphClient) -> None:
    fake_tenant.inject_fault(503, count=2, retry_after=None)
    assert (await app_client.get_user("AdeleV@contoso.com"))["id"]
    assert app_client.stats["retries"] == 2


@pytest_twisted.ensureDeferred
async def test_401_after_token_expiry_refreshes_and_retries(fake_tenant: Any, app_client: GraphClient) -> None:
    assert (await app_client.get_user("AdeleV@contoso.com"))["id"]
    fake_tenant.expire_tokens()
    await deferLater(reactor, 1.1)
    assert (await app_client.get_user("AdeleV@contoso.com"))["id"]
    assert app_client.stats["token_refreshes"] == 1
    statuses = [r["status"] for r in fake_tenant.requests("graph")]
    assert statuses[-2:] == [401, 200]


@pytest_twisted.ensureDeferred
async def test_dropped_connection_is_retried(fake_tenant: Any, app_client: GraphClient) -> None:
    assert (await app_client.get_user("AdeleV@contoso.com"))["id"]
    fake_tenant.inject_fault(503, count=1, drop=True)
    assert (await app_client.get_user("AlexW@contoso.com"))["id"]
    assert app_client.stats["retries"] == 1


@pytest_twisted.ensureDeferred
async def test_pacing_avoids_write_throttling(fake_tenant: Any, fake_app: dict[str, Any], tmp_path: Path,
                                              clients: Clients) -> None:
    fake_tenant.configure_throttling(enabled=True, writes=10, window=2.0)
    client = clients.make(fake_tenant, secret_provider(fake_tenant, fake_app, tmp_path),
                          pacing=PacingPolicy(writes_per_window=10, window=2.0, target=0.8,
                                                       shortest_window=2.0))
    ds = [defer.ensureDeferred(client.update_user("AdeleV@contoso.com", {"jobTitle": f"J{i}"}))
          for i in range(25)]
    await defer.gatherResults(ds)
    assert client.stats["throttled"] == 0
