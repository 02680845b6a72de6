"""$filter, $select, paging, delta and $batch on the fake tenant."""

from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_twisted

from ldapsync.testing.fixtures import new_user_body as new_user

d = pytest_twisted.ensureDeferred


def seed_many(tenant, n):
    for i in range(n):
        tenant.add_user(f"bulk{i:04d}@contoso.com", display_name=f"Bulk {i:04d}",
                        mail=f"bulk{i:04d}@contoso.com")


async def follow(graph, first, **kwargs):
    pages = [first]
    while "@odata.nextLink" in pages[-1].body:
        pages.append(await graph("GET", "", url=pages[-1].body["@odata.nextLink"], **kwargs))
        assert pages[-1].status == 200, pages[-1].body
    return pages


@pytest.mark.parametrize("flt, expected", [
    ("userPrincipalName eq 'adelev@contoso.com'", {"AdeleV@contoso.com"}),
    ("mail eq 'AlexW@contoso.com'", {"AlexW@contoso.com"}),
    ("startswith(displayName,'me')", {"MeganB@contoso.com"}),
    ("userType eq 'Guest'", {"jdoe_fabrikam.com#EXT#@contoso.onmicrosoft.com"}),
    ("startswith(displayName,'A') and accountEnabled eq true", {"AdeleV@contoso.com", "AlexW@contoso.com"}),
    ("userPrincipalName in ('AdeleV@contoso.com', 'MeganB@contoso.com')",
     {"AdeleV@contoso.com", "MeganB@contoso.com"}),
    ("proxyAddresses/any(p:p eq 'smtp:meganb@contoso.com')", {"MeganB@contoso.com"}),
    ("mail eq 'nobody@contoso.com' or (givenName eq 'Alex')", {"AlexW@contoso.com"}),
    ("displayName eq 'O''Brien'", set()),
])
@d
async def test_filters(graph, flt, expected):
    res = await graph("GET", "/users", params={"$filter": flt, "$select": "userPrincipalName"})
    assert res.status == 200, res.body
    assert {u["userPrincipalName"] for u in res.body["value"]} == expected


@pytest.mark.parametrize("flt, code", [
    ("endswith(mail,'@contoso.com')", "Request_UnsupportedQuery"),
    ("userType ne 'Guest'", "Request_UnsupportedQuery"),
    ("not (userType eq 'Guest')", "Request_UnsupportedQuery"),
    ("passwordProfile eq 'x'", "Request_UnsupportedQuery"),
    ("displayName ge 'A'", "Request_UnsupportedQuery"),
    ("userPrincipalName eq", "BadRequest"),
    ("userPrincipalName eq 'x' and", "BadRequest"),
    ("startswith(displayName 'x')", "BadRequest"),
])
@d
async def test_bad_or_advanced_filters(graph, flt, code):
    res = await graph("GET", "/users", params={"$filter": flt})
    assert res.status == 400 and res.error_code == code


@d
async def test_advanced_query_with_consistency_level(graph):
    res = await graph("GET", "/users", params={"$filter": "endswith(mail,'@contoso.com')",
                                               "$count": "true"},
                      headers={"ConsistencyLevel": "eventual"})
    assert res.status == 200 and res.body["@odata.count"] == 3
    res = await graph("GET", "/users", params={"$search": '"displayName:vance"'},
                      headers={"ConsistencyLevel": "eventual"})
    assert [u["userPrincipalName"] for u in res.body["value"]] == ["AdeleV@contoso.com"]
    assert (await graph("GET", "/users", params={"$search": '"displayName:vance"'})).status == 400
    count = await graph("GET", "/users/$count", headers={"ConsistencyLevel": "eventual"})
    assert count.body == 5


@d
async def test_select_rules(graph):
    res = await graph("GET", "/users", params={"$select": "id,accountEnabled,usageLocation"})
    assert set(res.body["value"][0]) == {"id", "accountEnabled", "usageLocation"}
    assert res.body["@odata.context"].endswith("users(id,accountEnabled,usageLocation)")
    plain = await graph("GET", "/users")
    assert "accountEnabled" not in plain.body["value"][0] and "id" in plain.body["value"][0]
    bad = await graph("GET", "/users", params={"$select": "id,shoeSize"})
    assert bad.status == 400 and "shoeSize" in bad.body["error"]["message"]


@d
async def test_paging_default_and_top(fake_tenant, graph):
    seed_many(fake_tenant, 245)                       # + 5 demo users = 250
    pages = await follow(graph, await graph("GET", "/users", params={"$select": "id,mail"}))
    assert [len(p.body["value"]) for p in pages] == [100, 100, 50]
    ids = [u["id"] for p in pages for u in p.body["value"]]
    assert len(set(ids)) == 250
    link = urlsplit(pages[0].body["@odata.nextLink"])
    assert link.path == "/v1.0/users" and "$skiptoken" in parse_qs(link.query)
    assert set(pages[1].body["value"][0]) == {"id", "mail"}      # $select survives the nextLink
    big = await graph("GET", "/users", params={"$top": "999"})
    assert len(big.body["value"]) == 250 and "@odata.nextLink" not in big.body
    small = await follow(graph, await graph("GET", "/users", params={"$top": "120",
                                                                     "$filter": "startswith(mail,'bulk')"}))
    assert [len(p.body["value"]) for p in small] == [120, 120, 5]


@pytest.mark.parametrize("params", [{"$top": "1000"}, {"$top": "0"}, {"$top": "x"}, {"$skip": "10"},
                                    {"$skiptoken": "made-up"}])
@d
async def test_paging_errors(graph, params):
    res = await graph("GET", "/users", params=params)
    assert res.status == 400


@d
async def test_delta(fake_tenant, graph):
    seed_many(fake_tenant, 150)
    first = await graph("GET", "/users/delta", params={"$select": "displayName,accountEnabled"})
    pages = await follow(graph, first)
    assert "@odata.deltaLink" in pages[-1].body and len(pages) == 2
    items = [u for p in pages for u in p.body["value"]]
    assert len(items) == 155 and set(items[0]) == {"id", "displayName", "accountEnabled"}
    delta_link = pages[-1].body["@odata.deltaLink"]

    nothing = await graph("GET", "", url=delta_link)
    assert nothing.body["value"] == [] and "@odata.deltaLink" in nothing.body

    created = (await graph("POST", "/users", json_body=new_user())).body["id"]
    await graph("PATCH", "/users/AlexW@contoso.com", json_body={"accountEnabled": False})
    await graph("DELETE", "/users/bulk0003@contoso.com")
    bulk3 = [u["id"] for u in items if u.get("displayName") == "Bulk 0003"][0]
    fake_tenant.portal_edit("MeganB@contoso.com", displayName="Megan B. (edited in portal)")
    changes = await graph("GET", "", url=nothing.body["@odata.deltaLink"])
    by_id = {u["id"]: u for u in changes.body["value"]}
    assert set(by_id) == {created, fake_tenant.find_user_id("AlexW@contoso.com"), bulk3,
                          fake_tenant.find_user_id("MeganB@contoso.com")}
    assert by_id[bulk3] == {"id": bulk3, "@removed": {"reason": "deleted"}}
    assert by_id[fake_tenant.find_user_id("AlexW@contoso.com")]["accountEnabled"] is False
    assert by_id[fake_tenant.find_user_id("MeganB@contoso.com")]["displayName"].endswith("portal)")
    assert set(by_id[created]) == {"id", "displayName", "accountEnabled"}
    assert fake_tenant.portal_edits[-1]["changes"] == {"displayName": "Megan B. (edited in portal)"}

    fake_tenant.expire_delta_tokens()
    gone = await graph("GET", "", url=changes.body["@odata.deltaLink"])
    assert gone.status == 410 and gone.error_code == "syncStateNotFound"
    latest = await graph("GET", "/users/delta", params={"$deltatoken": "latest"})
    assert latest.body["value"] == [] and "@odata.deltaLink" in latest.body


@d
async def test_delta_page_size_from_prefer_header(fake_tenant, graph):
    res = await graph("GET", "/users/delta", headers={"Prefer": "odata.maxpagesize=2"})
    pages = await follow(graph, res, headers={"Prefer": "odata.maxpagesize=2"})
    assert [len(p.body["value"]) for p in pages] == [2, 2, 1]


@d
async def test_batch(fake_tenant, graph):
    json_h = {"Content-Type": "application/json"}
    res = await graph("POST", "/$batch", json_body={"requests": [
        {"id": "1", "method": "POST", "url": "/users", "headers": json_h, "body": new_user()},
        {"id": "2", "method": "GET", "url": "/users/new.user@contoso.com?$select=accountEnabled",
         "dependsOn": ["1"]},
        {"id": "3", "method": "PATCH", "url": "users/AdeleV@contoso.com", "headers": json_h,
         "body": {"jobTitle": "CEO"}},
        {"id": "4", "method": "POST", "url": "/users", "headers": json_h,
         "body": new_user(upn="x@fabrikam.com")},
        {"id": "5", "method": "GET", "url": "/users/nobody@contoso.com"},
        {"id": "6", "method": "GET", "url": "/users?$filter=userType eq 'Guest'&$select=id"},
        {"id": "7", "method": "PATCH", "url": "/users/AlexW@contoso.com", "body": {"jobTitle": "x"}},
        {"id": "8", "method": "GET", "url": "/users/nobody@contoso.com/x", "dependsOn": ["5"]},
    ]})
    assert res.status == 200
    out = {r["id"]: r for r in res.body["responses"]}
    assert out["1"]["status"] == 201 and out["1"]["body"]["id"]
    assert out["2"]["status"] == 200 and out["2"]["body"]["accountEnabled"] is True
    assert out["3"]["status"] == 204 and "body" not in out["3"]
    assert out["4"]["status"] == 400 and out["4"]["body"]["error"]["code"] == "Request_BadRequest"
    assert out["5"]["status"] == 404 and out["5"]["headers"]["request-id"]
    assert len(out["6"]["body"]["value"]) == 1
    assert out["7"]["status"] == 400                        # body without Content-Type
    assert out["8"]["status"] == 424
    assert fake_tenant.get_user("AdeleV@contoso.com")["jobTitle"] == "CEO"
    items = [r for r in fake_tenant.requests() if r["batch"]]
    assert items[0]["body"]["passwordProfile"]["password"] == "***REDACTED***"
    assert [r["path"] for r in fake_tenant.requests(batch_items=False)][-1] == "/v1.0/$batch"


@d
async def test_batch_limits(graph):
    too_many = [{"id": str(i), "method": "GET", "url": "/users"} for i in range(21)]
    res = await graph("POST", "/$batch", json_body={"requests": too_many})
    assert res.status == 400
    assert (await graph("POST", "/$batch", json_body={"requests": too_many[:20]})).status == 200
    dup = [{"id": "1", "method": "GET", "url": "/users"}] * 2
    assert (await graph("POST", "/$batch", json_body={"requests": dup})).status == 400
    absolute = [{"id": "1", "method": "GET", "url": "https://graph.microsoft.com/v1.0/users"}]
    assert (await graph("POST", "/$batch", json_body={"requests": absolute})).status == 400
    assert (await graph("POST", "/$batch", json_body={"requests": too_many[:1]}, token="")).status == 401


@d
async def test_batch_items_are_throttled_one_by_one(fake_tenant, graph):
    fake_tenant.inject_fault(429, count=2, retry_after=7, path="/users/")
    res = await graph("POST", "/$batch", json_body={"requests": [
        {"id": str(i), "method": "GET", "url": f"/users/{u}"}
        for i, u in enumerate(["AdeleV@contoso.com", "AlexW@contoso.com", "MeganB@contoso.com"])]})
    statuses = [r["status"] for r in res.body["responses"]]
    assert statuses == [429, 429, 200]
    assert res.body["responses"][0]["headers"]["Retry-After"] == "7"
    assert res.body["responses"][0]["body"]["error"]["code"] == "TooManyRequests"
