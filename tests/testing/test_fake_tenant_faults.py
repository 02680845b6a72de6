"""Fault injection, outages, latency, throttling, the request record and the admin API."""

import json
import time

import msal
import pytest
import pytest_twisted
import requests
from twisted.internet import error, reactor
from twisted.internet.task import deferLater
from twisted.web._newclient import ResponseNeverReceived

from ldapsync.testing.client import FakeTenantProcess
from ldapsync.testing.fixtures import new_user_body as new_user
from ldapsync.testing.tls import requests_session

d = pytest_twisted.ensureDeferred


@d
async def test_next_n_requests_get_429_then_503(fake_tenant, graph):
    fake_tenant.inject_fault(429, count=2, retry_after=3)
    for _ in range(2):
        res = await graph("GET", "/users")
        assert res.status == 429 and res.headers["retry-after"] == "3"
        assert res.error_code == "TooManyRequests"
    assert (await graph("GET", "/users")).status == 200
    fake_tenant.inject_fault(503, count=1, retry_after=None, method="PATCH")
    assert (await graph("GET", "/users")).status == 200            # only PATCH is hit
    res = await graph("PATCH", "/users/AdeleV@contoso.com", json_body={"jobTitle": "x"})
    assert res.status == 503 and "retry-after" not in res.headers
    assert fake_tenant.get_user("AdeleV@contoso.com")["jobTitle"] is None   # not applied


@d
async def test_fault_after_the_operation_ran(fake_tenant, graph):
    fake_tenant.inject_fault(504, after=True, path="/v1.0/users$", method="POST")
    res = await graph("POST", "/users", json_body=new_user())
    assert res.status == 504
    assert fake_tenant.get_user("new.user@contoso.com") is not None       # but it was created
    again = await graph("POST", "/users", json_body=new_user())
    assert again.body["error"]["details"][0]["code"] == "ObjectConflict"


@d
async def test_dropped_connection(fake_tenant, graph):
    fake_tenant.inject_fault(drop=True, count=1)
    with pytest.raises(ResponseNeverReceived):
        await graph("GET", "/users")
    assert (await graph("GET", "/users")).status == 200


@d
async def test_latency(fake_tenant, graph):
    fake_tenant.set_latency(0.3)
    start = time.monotonic()
    assert (await graph("GET", "/users")).status == 200
    assert time.monotonic() - start >= 0.3
    fake_tenant.set_latency(0)


@d
async def test_outage_503_window(fake_tenant, graph):
    now = [fake_tenant.wall_time()]
    fake_tenant.wall_time = lambda: now[0]
    fake_tenant.outage(seconds=30)
    res = await graph("GET", "/users")
    assert res.status == 503 and res.error_code == "ServiceNotAvailable"
    now[0] += 29
    assert (await graph("GET", "/users")).status == 503
    now[0] += 1
    assert (await graph("GET", "/users")).status == 200


@d
async def test_outage_refuse_and_drop(fake_tenant, graph, graph_http):
    fake_tenant.outage(mode="refuse")
    with pytest.raises((error.ConnectionRefusedError, ResponseNeverReceived)):
        await graph("GET", "/users")
    fake_tenant.end_outage()
    while fake_tenant._listening is None:        # listening again once the old port has closed
        await deferLater(reactor, 0.01, lambda: None)
    assert (await graph("GET", "/users")).status == 200
    fake_tenant.outage(seconds=5, mode="drop")
    with pytest.raises(ResponseNeverReceived):
        await graph("GET", "/users")
    fake_tenant.end_outage()
    assert (await graph("GET", "/users")).status == 200


@d
async def test_write_budget_throttling(fake_tenant, graph):
    now = [1000.0]
    fake_tenant.wall_time = lambda: now[0]
    graph.token = fake_tenant.app_token(next(iter(fake_tenant.apps)))
    fake_tenant.configure_throttling(writes=10, window=150)
    seen = []
    for i in range(10):
        res = await graph("PATCH", "/users/AdeleV@contoso.com", json_body={"jobTitle": f"t{i}"})
        assert res.status == 204
        seen.append(res.headers.get("x-ms-throttle-limit-percentage"))
    assert seen[:8] == [None] * 8 and seen[8:] == ["0.9", "1.0"]
    res = await graph("PATCH", "/users/AdeleV@contoso.com", json_body={"jobTitle": "over"})
    assert res.status == 429 and res.error_code == "TooManyRequests"
    assert res.headers["retry-after"] == "150"
    assert res.headers["x-ms-throttle-information"] == "WriteLimitExceeded"
    assert res.headers["x-ms-throttle-scope"].startswith("Tenant_Application/ReadWrite/")
    assert (await graph("GET", "/users/AdeleV@contoso.com")).status == 200   # reads still fine
    now[0] += 100
    res = await graph("POST", "/users", json_body=new_user())
    assert res.status == 429 and res.headers["retry-after"] == "50"
    now[0] += 51
    assert (await graph("POST", "/users", json_body=new_user())).status == 201


@d
async def test_resource_unit_throttling(fake_tenant, graph):
    fake_tenant.configure_throttling(resource_units=5, ru_window=10)
    res = await graph("GET", "/users")
    assert res.headers["x-ms-resource-unit"] == "2"
    assert (await graph("GET", "/users", params={"$select": "id"})).headers["x-ms-resource-unit"] == "1"
    assert (await graph("GET", "/users/AdeleV@contoso.com")).status == 200
    assert (await graph("GET", "/users/AdeleV@contoso.com")).status == 200      # 5 of 5 used
    res = await graph("GET", "/users/AdeleV@contoso.com")
    assert res.status == 429 and res.headers["x-ms-throttle-information"] == "ResourceUnitLimitExceeded"


@d
async def test_request_record(fake_tenant, graph):
    fake_tenant.clear_requests()
    await graph("POST", "/users", json_body=new_user(password="S3cret-Value!"))
    await graph("GET", "/users", params={"$filter": "mail eq 'x@contoso.com'", "$top": "5"})
    await graph("PATCH", "/users/new.user@contoso.com", json_body={
        "passwordProfile": {"password": "An0ther-Value!", "forceChangePasswordNextSignIn": False},
        "passwordPolicies": "DisablePasswordExpiration"})
    recs = fake_tenant.requests()
    assert [(r["method"], r["path"], r["status"]) for r in recs] == [
        ("POST", "/v1.0/users", 201), ("GET", "/v1.0/users", 200),
        ("PATCH", "/v1.0/users/new.user@contoso.com", 204)]
    assert recs[1]["query"] == {"$filter": "mail eq 'x@contoso.com'", "$top": "5"}
    assert recs[2]["body"]["passwordPolicies"] == "DisablePasswordExpiration"
    assert "S3cret" not in json.dumps(recs) and "An0ther" not in json.dumps(recs)
    assert all(r["client_id"] for r in recs)
    assert fake_tenant.password_of("new.user@contoso.com") == "An0ther-Value!"


@d
async def test_admin_http_api(fake_tenant, graph_http):
    url = f"{fake_tenant.base_url}/_fake/"
    denied = await graph_http.post(url + "password_of", json={"key": "AdeleV@contoso.com"})
    assert denied.code == 403
    hdrs = {"X-Fake-Admin-Token": [fake_tenant.admin_token]}
    resp = await graph_http.post(url + "add_user", json={"upn": "z@contoso.com", "password": "Zz345678!"},
                                 headers=hdrs)
    assert resp.code == 200
    resp = await graph_http.post(url + "password_of", json={"key": "z@contoso.com"}, headers=hdrs)
    assert json.loads(await resp.content()) == {"result": "Zz345678!"}
    resp = await graph_http.post(url + "no_such_thing", json={}, headers=hdrs)
    assert resp.code == 404


def test_subprocess_tenant_with_msal_and_admin_client(tmp_path):
    """The runnable demo: its own process, driven over the admin API; no reactor needed here."""
    with FakeTenantProcess(tmp_path / "proc") as fake:
        info = fake.info
        assert info["authority"].endswith("/contoso.onmicrosoft.com")
        session = requests_session(info["ca_file"])
        app = msal.ConfidentialClientApplication(
            info["client_id"], client_credential=info["client_secret"], authority=info["authority"],
            instance_discovery=False, http_client=session)
        token = app.acquire_token_for_client(scopes=[info["graph_scope"]])["access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        fake.admin.inject_fault(status=503, count=1)
        assert session.get(f"{info['graph_url']}/users", headers=auth).status_code == 503
        users = session.get(f"{info['graph_url']}/users", headers=auth).json()["value"]
        assert len(users) == 5
        created = session.post(f"{info['graph_url']}/users", headers=auth, json=new_user())
        assert created.status_code == 201
        assert fake.admin.password_of(key="new.user@contoso.com") == "Tr0ub4dor&3x"
        recs = fake.admin.requests(method="POST")
        assert recs[-1]["body"]["passwordProfile"]["password"] == "***REDACTED***"
        # trust: the fake's CA only, not the environment's bundle
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{info['graph_url']}/users", verify=True, timeout=5)
