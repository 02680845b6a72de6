"""Real MSAL Python and treq against the fake tenant's identity endpoints."""

import json

import jwt
import msal
import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater

from ldapsync.testing.fixtures import GraphCaller
from ldapsync.testing.tls import make_app_certificate, requests_session


def confidential(tenant, client_id, credential):
    return msal.ConfidentialClientApplication(
        client_id, client_credential=credential, authority=tenant.authority,
        instance_discovery=False, http_client=requests_session(tenant.ca_file))


def in_thread(fn, *args, **kwargs):
    return threads.deferToThread(fn, *args, **kwargs)


@pytest_twisted.ensureDeferred
async def test_discovery_document(fake_tenant, graph_http):
    for alias in ("contoso.onmicrosoft.com", fake_tenant.tenant_id, "contoso.com"):
        resp = await graph_http.get(f"{fake_tenant.base_url}/{alias}/v2.0/.well-known/openid-configuration")
        assert resp.code == 200
        doc = json.loads(await resp.content())
        for key in ("token_endpoint", "authorization_endpoint", "device_authorization_endpoint",
                    "issuer", "jwks_uri"):
            assert doc[key].startswith(fake_tenant.base_url)
    resp = await graph_http.get(f"{fake_tenant.base_url}/fabrikam.com/v2.0/.well-known/openid-configuration")
    assert resp.code == 400
    keys = json.loads(await (await graph_http.get(doc["jwks_uri"])).content())["keys"]
    assert keys[0]["kty"] == "RSA"


@pytest_twisted.ensureDeferred
async def test_msal_client_secret_token_works_on_graph(fake_tenant, fake_app, graph_http):
    app = await in_thread(confidential, fake_tenant, fake_app["client_id"], fake_app["secret"])
    result = await in_thread(app.acquire_token_for_client, scopes=[fake_tenant.graph_scope])
    assert result.get("token_type") == "Bearer", result
    assert result["expires_in"] > 3000
    claims = jwt.decode(result["access_token"], options={"verify_signature": False})
    assert "User.ReadWrite.All" in claims["roles"] and claims["appid"] == fake_app["client_id"]
    graph = GraphCaller(graph_http, fake_tenant, result["access_token"])
    assert (await graph("GET", "/users")).status == 200
    rec = fake_tenant.requests("identity", path="/oauth2/v2.0/token")[-1]
    assert rec["body"]["client_secret"] == "***REDACTED***"
    assert rec["body"]["grant_type"] == "client_credentials" and rec["status"] == 200


@pytest_twisted.ensureDeferred
async def test_msal_wrong_secret_and_expired_secret(fake_tenant, fake_app):
    app = await in_thread(confidential, fake_tenant, fake_app["client_id"], "not-the-secret")
    result = await in_thread(app.acquire_token_for_client, scopes=[fake_tenant.graph_scope])
    assert result["error"] == "invalid_client" and 7000215 in result["error_codes"]
    old = fake_tenant.register_app(secret_expires_at=fake_tenant.wall_time() - 10)
    app = await in_thread(confidential, fake_tenant, old["client_id"], old["secret"])
    result = await in_thread(app.acquire_token_for_client, scopes=[fake_tenant.graph_scope])
    assert result["error"] == "invalid_client" and 7000222 in result["error_codes"]
    unknown = await in_thread(confidential, fake_tenant, "00000000-0000-0000-0000-000000000001", "x")
    result = await in_thread(unknown.acquire_token_for_client, scopes=[fake_tenant.graph_scope])
    assert 700016 in result["error_codes"]


@pytest_twisted.ensureDeferred
async def test_client_credentials_needs_dot_default_scope(fake_tenant, fake_app):
    app = await in_thread(confidential, fake_tenant, fake_app["client_id"], fake_app["secret"])
    result = await in_thread(app.acquire_token_for_client,
                             scopes=[f"{fake_tenant.base_url}/User.Read.All"])
    assert result["error"] == "invalid_scope"
    result = await in_thread(app.acquire_token_for_client, scopes=["https://example.com/.default"])
    assert 500011 in result["error_codes"]


@pytest.mark.parametrize("sha256", [False, True], ids=["x5t-RS256", "x5t#S256-PS256"])
@pytest_twisted.ensureDeferred
async def test_msal_certificate_credential(fake_tenant, sha256):
    cert = make_app_certificate()
    reg = fake_tenant.register_app(secret=False, certificate_pem=cert.certificate_pem)
    assert fake_tenant.apps[reg["client_id"]].certificates[0].thumbprint == cert.sha1_thumbprint
    app = await in_thread(confidential, fake_tenant, reg["client_id"], cert.msal_credential(sha256=sha256))
    result = await in_thread(app.acquire_token_for_client, scopes=[fake_tenant.graph_scope])
    assert "access_token" in result, result
    rec = fake_tenant.requests("identity", path="token")[-1]
    assert rec["body"]["client_assertion"] == "***REDACTED***"


@pytest_twisted.ensureDeferred
async def test_certificate_not_registered_or_wrong_key(fake_tenant):
    registered, other = make_app_certificate(), make_app_certificate()
    reg = fake_tenant.register_app(secret=False, certificate_pem=registered.certificate_pem)
    app = await in_thread(confidential, fake_tenant, reg["client_id"], other.msal_credential())
    result = await in_thread(app.acquire_token_for_client, scopes=[fake_tenant.graph_scope])
    assert result["error"] == "invalid_client" and 700027 in result["error_codes"]
    # right thumbprint, wrong private key: the signature does not verify
    forged = {"private_key": other.private_key_pem, "thumbprint": registered.sha1_thumbprint}
    app = await in_thread(confidential, fake_tenant, reg["client_id"], forged)
    result = await in_thread(app.acquire_token_for_client, scopes=[fake_tenant.graph_scope])
    assert result["error"] == "invalid_client" and "invalid signature" in result["error_description"]


async def _device_flow(fake_tenant, client_id, approve):
    app = await in_thread(msal.PublicClientApplication, client_id, authority=fake_tenant.authority,
                          instance_discovery=False,
                          http_client=requests_session(fake_tenant.ca_file))
    flow = await in_thread(app.initiate_device_flow, scopes=[fake_tenant.graph_scope])
    assert flow["verification_uri"] == f"{fake_tenant.base_url}/devicelogin"
    assert flow["user_code"] in flow["message"]
    pending = in_thread(app.acquire_token_by_device_flow, flow)
    # let MSAL poll (and get authorization_pending) at least once before the admin signs in
    while not any(r["status"] == 400 for r in fake_tenant.requests("identity", path="token")):
        await deferLater(reactor, 0.05, lambda: None)
    approve(flow["user_code"])
    return app, await pending


@pytest_twisted.ensureDeferred
async def test_device_flow_then_refresh(fake_tenant, fake_app, graph_http):
    app, result = await _device_flow(fake_tenant, fake_app["client_id"], fake_tenant.approve_device_code)
    assert "access_token" in result, result
    assert result["id_token_claims"]["preferred_username"] == "admin@contoso.onmicrosoft.com"
    assert "refresh_token" in result
    pending = fake_tenant.requests("identity", path="token")[0]
    assert pending["status"] == 400
    accounts = await in_thread(app.get_accounts)
    assert accounts[0]["username"] == "admin@contoso.onmicrosoft.com"
    me = await GraphCaller(graph_http, fake_tenant, result["access_token"])("GET", "/me")
    assert me.body["userPrincipalName"] == "admin@contoso.onmicrosoft.com"
    fresh = await in_thread(app.acquire_token_silent, [fake_tenant.graph_scope], accounts[0],
                            force_refresh=True)
    assert fresh and "access_token" in fresh and fresh["access_token"] != result["access_token"]
    grants = [r["body"]["grant_type"] for r in fake_tenant.requests("identity", path="token")]
    assert grants[-1] == "refresh_token"
    # an admin revoking the sessions kills the refresh token
    fake_tenant.revoke_refresh_tokens("admin@contoso.onmicrosoft.com")
    fake_tenant.expire_tokens()
    dead = await in_thread(app.acquire_token_silent_with_error, [fake_tenant.graph_scope], accounts[0],
                           force_refresh=True)
    assert dead["error"] == "invalid_grant" and 50173 in dead["error_codes"]


@pytest_twisted.ensureDeferred
async def test_device_flow_declined(fake_tenant, fake_app):
    _, result = await _device_flow(fake_tenant, fake_app["client_id"], fake_tenant.deny_device_code)
    assert result["error"] == "authorization_declined"


@pytest_twisted.ensureDeferred
async def test_device_flow_auto_approve(fake_tenant, fake_app):
    fake_tenant.configure(device_auto_approve=True)
    app = await in_thread(msal.PublicClientApplication, fake_app["client_id"],
                          authority=fake_tenant.authority, instance_discovery=False,
                          http_client=requests_session(fake_tenant.ca_file))
    flow = await in_thread(app.initiate_device_flow, scopes=[fake_tenant.graph_scope])
    result = await in_thread(app.acquire_token_by_device_flow, flow)
    assert "access_token" in result


@pytest_twisted.ensureDeferred
async def test_expired_and_bad_tokens_get_401(fake_tenant, fake_app, graph_http):
    graph = GraphCaller(graph_http, fake_tenant, fake_tenant.app_token(fake_app["client_id"]))
    assert (await graph("GET", "/users")).status == 200
    fake_tenant.expire_tokens()
    res = await graph("GET", "/users")
    assert res.status == 401 and res.error_code == "InvalidAuthenticationToken"
    assert "www-authenticate" in res.headers
    assert (await graph("GET", "/users", token="")).error_code == "InvalidAuthenticationToken"
    assert (await graph("GET", "/users", token="garbage")).status == 401
    graph.token = fake_tenant.app_token(fake_app["client_id"])
    assert (await graph("GET", "/users")).status == 200


@pytest_twisted.ensureDeferred
async def test_identity_fault_and_outage(fake_tenant, fake_app):
    fake_tenant.inject_fault(503, target="identity", path="/token$", retry_after=1)
    app = await in_thread(confidential, fake_tenant, fake_app["client_id"], fake_app["secret"])
    with pytest.raises(msal.exceptions.MsalServiceError, match="503"):
        await in_thread(app.acquire_token_for_client, scopes=[fake_tenant.graph_scope])
    # MSAL remembers a 5xx for its Retry-After: a new application object gets through
    app = await in_thread(confidential, fake_tenant, fake_app["client_id"], fake_app["secret"])
    result = await in_thread(app.acquire_token_for_client, scopes=[fake_tenant.graph_scope])
    assert "access_token" in result
    fake_tenant.outage(mode="503")
    with pytest.raises(msal.exceptions.MsalServiceError):  # discovery fails: no app object at all
        await in_thread(confidential, fake_tenant, fake_app["client_id"], fake_app["secret"])
    fake_tenant.end_outage()


@pytest_twisted.ensureDeferred
async def test_after_expire_tokens_msal_cache_must_be_bypassed(fake_tenant, fake_app, graph_http):
    """MSAL serves its cached app token until 5 min before *its* expiry: after ``expire_tokens`` a
    client gets 401 with the cached token and needs a cache-bypassing request (claims_challenge)."""
    app = await in_thread(confidential, fake_tenant, fake_app["client_id"], fake_app["secret"])
    first = await in_thread(app.acquire_token_for_client, scopes=[fake_tenant.graph_scope])
    fake_tenant.expire_tokens()
    cached = await in_thread(app.acquire_token_for_client, scopes=[fake_tenant.graph_scope])
    assert cached["access_token"] == first["access_token"] and cached["token_source"] == "cache"
    res = await GraphCaller(graph_http, fake_tenant, cached["access_token"])("GET", "/users")
    assert res.status == 401
    challenge = '{"access_token":{"nbf":{"essential":true,"value":"%d"}}}' % int(fake_tenant.wall_time())
    fresh = await in_thread(app.acquire_token_for_client, scopes=[fake_tenant.graph_scope],
                            claims_challenge=challenge)
    assert fresh["token_source"] == "identity_provider"
    res = await GraphCaller(graph_http, fake_tenant, fresh["access_token"])("GET", "/users")
    assert res.status == 200
