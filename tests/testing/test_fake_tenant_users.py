"""Graph v1.0 user rules of the fake tenant, driven over HTTPS with treq."""

import pytest
import pytest_twisted

from ldapsync.testing.fixtures import new_user_body as new_user

PASSWORD_MESSAGE = ("The specified password does not comply with password complexity requirements. "
                    "Please provide a different password.")


def d(coro_fn):
    return pytest_twisted.ensureDeferred(coro_fn)


@d
async def test_create_read_patch_delete(fake_tenant, graph):
    res = await graph("POST", "/users", json_body=new_user(mail="new.user@contoso.com"))
    assert res.status == 201 and res.headers["request-id"]
    user_id = res.body["id"]
    assert res.body["userPrincipalName"] == "new.user@contoso.com"
    assert "accountEnabled" not in res.body and "passwordProfile" not in res.body
    assert fake_tenant.password_of("NEW.USER@contoso.com") == "Tr0ub4dor&3x"
    rec = fake_tenant.requests(method="POST", path="/v1.0/users$")[-1]
    assert rec["body"]["passwordProfile"]["password"] == "***REDACTED***" and rec["status"] == 201
    assert rec["body"]["passwordProfile"]["forceChangePasswordNextSignIn"] is False

    by_upn = await graph("GET", "/users/new.user@contoso.com")
    assert by_upn.body["id"] == user_id and "accountEnabled" not in by_upn.body
    sel = await graph("GET", f"/users/{user_id}",
                      params={"$select": "accountEnabled,passwordPolicies,usageLocation,userType,"
                                         "mailNickname,passwordProfile,proxyAddresses"})
    assert sel.body["accountEnabled"] is True and sel.body["userType"] == "Member"
    assert sel.body["mailNickname"] == "new.user" and sel.body["passwordProfile"] is None
    assert sel.body["proxyAddresses"] == ["SMTP:new.user@contoso.com"]
    assert "displayName" not in sel.body

    patch = await graph("PATCH", f"/users/{user_id}", json_body={"givenName": "Nina",
                                                                 "accountEnabled": False})
    assert patch.status == 204 and patch.body is None
    user = fake_tenant.get_user(user_id)
    assert user["givenName"] == "Nina" and user["accountEnabled"] is False
    assert user["displayName"] == "New User"          # untouched

    assert (await graph("DELETE", f"/users/{user_id}")).status == 204
    gone = await graph("GET", f"/users/{user_id}")
    assert gone.status == 404 and gone.error_code == "Request_ResourceNotFound"
    inner = gone.body["error"]["innerError"]
    assert inner["request-id"] == gone.headers["request-id"] and inner["date"]
    assert "client-request-id" in inner


@pytest.mark.parametrize("missing", ["accountEnabled", "displayName", "mailNickname",
                                     "userPrincipalName", "passwordProfile"])
@d
async def test_required_properties_on_create(graph, missing):
    body = new_user()
    del body[missing]
    res = await graph("POST", "/users", json_body=body)
    assert res.status == 400 and res.error_code == "Request_BadRequest"
    assert missing in res.body["error"]["message"]
    assert res.body["error"]["details"][0]["target"] == missing


@d
async def test_password_is_required_inside_password_profile(graph):
    res = await graph("POST", "/users", json_body=new_user(passwordProfile={
        "forceChangePasswordNextSignIn": False}))
    assert res.status == 400 and "passwordProfile.password" in res.body["error"]["message"]


@pytest.mark.parametrize("upn, why", [
    ("someone@fabrikam.com", "domain"),            # unverified
    ("someone@example.org", "domain"),             # not the tenant's
    ("some one@contoso.com", "syntax"),
    ("someone.@contoso.com", "syntax"),
    ("some(one)@contoso.com", "syntax"),
    ("j\u00f6rg@contoso.com", "syntax"),
    ("a" * 65 + "@contoso.com", "syntax"),
    ("no-at-sign.contoso.com", "syntax"),
])
@d
async def test_upn_rules(graph, upn, why):
    res = await graph("POST", "/users", json_body=new_user(upn=upn, mailNickname="nick"))
    assert res.status == 400 and res.error_code == "Request_BadRequest"
    assert res.body["error"]["details"][0]["target"] == "userPrincipalName"
    expected = "verified domain" if why == "domain" else "Invalid value specified"
    assert expected in res.body["error"]["message"]


@d
async def test_upn_allowed_characters(graph):
    res = await graph("POST", "/users", json_body=new_user(upn="o'neil-x_y!#^~.z@contoso.com",
                                                           mailNickname="oneil"))
    assert res.status == 201, res.body
    res = await graph("POST", "/users", json_body=new_user(upn="a" * 64 + "@contoso.com",
                                                           mailNickname="long"))
    assert res.status == 201


@d
async def test_duplicate_upn_and_mail_conflict(graph):
    assert (await graph("POST", "/users", json_body=new_user(mail="new.user@contoso.com"))).status == 201
    dup = await graph("POST", "/users", json_body=new_user(upn="New.User@CONTOSO.com"))
    assert dup.status == 400 and dup.error_code == "Request_BadRequest"
    assert dup.body["error"]["details"] == [{"code": "ObjectConflict", "target": "userPrincipalName"}]
    assert "userPrincipalName already exists" in dup.body["error"]["message"]
    mail = await graph("POST", "/users", json_body=new_user(upn="other@contoso.com",
                                                            mail="adelev@contoso.com"))
    assert mail.body["error"]["details"] == [{"code": "ObjectConflict", "target": "proxyAddresses"}]
    # PATCH into a conflict, too
    patch = await graph("PATCH", "/users/new.user@contoso.com",
                        json_body={"userPrincipalName": "AlexW@contoso.com"})
    assert patch.body["error"]["details"][0]["code"] == "ObjectConflict"


@pytest.mark.parametrize("password", ["Sh0rt!", "alllowercase1", "ALLUPPER!!!!", "NoDigitsNoSym",
                                      "P\u00e4ssw0rd!x", "Aa1!" * 64 + "x"])
@d
async def test_password_complexity_rejected(graph, password):
    res = await graph("POST", "/users", json_body=new_user(password=password))
    assert res.status == 400 and res.error_code == "Request_BadRequest"
    assert res.body["error"]["message"] == PASSWORD_MESSAGE


@pytest.mark.parametrize("password", ["abcdefg1A", "abcdefgh1!", "ABCDEFGH1!", "Aa1!" * 64,
                                      "with space Aa"])
@d
async def test_password_complexity_accepted(graph, password):
    assert (await graph("POST", "/users", json_body=new_user(password=password))).status == 201


@pytest.mark.parametrize("password", ["P@ssw0rd1!", "Welcome1!", "Qwerty12!", "Passw0rd!1"])
@d
async def test_banned_password_rejected_even_when_complex(graph, password):
    # Entra Password Protection: a banned term plus fewer than four other characters is refused,
    # with the complexity message, whatever passwordPolicies says
    for policies in (None, "DisableStrongPassword"):
        body = new_user(password=password, **({"passwordPolicies": policies} if policies else {}))
        res = await graph("POST", "/users", json_body=body)
        assert res.status == 400 and res.body["error"]["message"] == PASSWORD_MESSAGE, (password, policies)


@pytest.mark.parametrize("password", ["Password123!", "Welcome-to-2026", "Tr0ub4dor&3x"])
@d
async def test_banned_term_with_enough_else_accepted(graph, password):
    assert (await graph("POST", "/users", json_body=new_user(password=password))).status == 201


@d
async def test_tenant_banned_terms(fake_tenant, graph):
    assert (await graph("POST", "/users", json_body=new_user(upn="a@contoso.com", password="Contoso1!"))).status == 201
    fake_tenant.banned_terms.append("contoso")
    res = await graph("POST", "/users", json_body=new_user(upn="b@contoso.com", password="C0nt0so1!"))
    assert res.status == 400 and res.body["error"]["message"] == PASSWORD_MESSAGE


@d
async def test_disable_strong_password_and_reuse(fake_tenant, graph):
    res = await graph("POST", "/users", json_body=new_user(password="weakweak",
                                                           passwordPolicies="DisableStrongPassword"))
    assert res.status == 201
    user = "/users/new.user@contoso.com"
    same = await graph("PATCH", user, json_body={"passwordProfile": {"password": "weakweak"}})
    assert same.status == 400 and same.body["error"]["message"] == PASSWORD_MESSAGE
    ok = await graph("PATCH", user, json_body={"passwordProfile": {
        "password": "N3w-Secret!", "forceChangePasswordNextSignIn": False}})
    assert ok.status == 204
    assert fake_tenant.password_of("new.user@contoso.com") == "N3w-Secret!"
    assert fake_tenant.get_user("new.user@contoso.com")["passwordProfile"] == {
        "forceChangePasswordNextSignIn": False}


@pytest.mark.parametrize("body, status, code", [
    ({"favouriteColour": "blue"}, 400, "Request_BadRequest"),
    ({"id": "abc"}, 400, "Request_BadRequest"),
    ({"proxyAddresses": ["SMTP:x@contoso.com"]}, 400, "Request_BadRequest"),
    ({"accountEnabled": "yes"}, 400, "BadRequest"),
    ({"displayName": None}, 400, "Request_BadRequest"),
    ({"displayName": ""}, 400, "Request_BadRequest"),
    ({"mail": None}, 400, "Request_BadRequest"),
    ({"mail": "not-an-address"}, 400, "Request_BadRequest"),
    ({"usageLocation": "usa"}, 400, "Request_BadRequest"),
    ({"passwordPolicies": "Whatever"}, 400, "Request_BadRequest"),
    ({"mailNickname": "has space"}, 400, "Request_BadRequest"),
    ({"userPrincipalName": "adele@fabrikam.com"}, 400, "Request_BadRequest"),
    ({"jobTitle": None, "surname": "Vance-Smith", "@odata.type": "#microsoft.graph.user"}, 204, None),
])
@d
async def test_patch_rules(graph, body, status, code):
    res = await graph("PATCH", "/users/AdeleV@contoso.com", json_body=body)
    assert res.status == status, res.body
    assert res.error_code == code


@d
async def test_patch_mail_updates_proxy_addresses(fake_tenant, graph):
    res = await graph("PATCH", "/users/AdeleV@contoso.com",
                      json_body={"mail": "adele.vance@contoso.com",
                                 "userPrincipalName": "adele.vance@contoso.com"})
    assert res.status == 204
    user = fake_tenant.get_user("adele.vance@contoso.com")
    assert user["proxyAddresses"] == ["SMTP:adele.vance@contoso.com", "smtp:AdeleV@contoso.com"]


@d
async def test_federated_domain_needs_immutable_id(fake_tenant, graph):
    fake_tenant.add_domain("corp.contoso.com", authentication_type="Federated")
    res = await graph("PATCH", "/users/AdeleV@contoso.com",
                      json_body={"userPrincipalName": "adelev@corp.contoso.com"})
    assert res.status == 400 and res.body["error"]["details"][0]["target"] == "onPremisesImmutableId"
    res = await graph("PATCH", "/users/AdeleV@contoso.com",
                      json_body={"userPrincipalName": "adelev@corp.contoso.com",
                                 "onPremisesImmutableId": "abc123=="})
    assert res.status == 204


@d
async def test_not_found_and_bad_route(graph):
    for method in ("GET", "PATCH", "DELETE"):
        res = await graph(method, "/users/nobody@contoso.com", json_body={} if method == "PATCH" else None)
        assert res.status == 404 and res.error_code == "Request_ResourceNotFound"
    res = await graph("GET", "/groupies")
    assert res.status == 400 and "groupies" in res.body["error"]["message"]
    res = await graph("POST", "/users", json_body=None, headers={"Content-Type": "application/json"})
    assert res.status == 400


@d
async def test_invalid_json_body(graph, graph_http, fake_tenant):
    resp = await graph_http.post(f"{fake_tenant.graph_url}/users", data=b"{not json",
                                 headers={"Authorization": [f"Bearer {graph.token}"],
                                          "Content-Type": ["application/json"]})
    assert resp.code == 400


@d
async def test_permissions(fake_tenant, fake_app, graph):
    cid = fake_app["client_id"]
    fake_tenant.set_permissions(cid, ["Domain.Read.All"])
    res = await graph("GET", "/users")
    assert res.status == 403 and res.error_code == "Authorization_RequestDenied"
    assert (await graph("GET", "/domains")).status == 200
    # User.ReadWrite.All without a directory role: users yes, password reset no
    fake_tenant.set_permissions(cid, ["User.ReadWrite.All"], directory_roles=[])
    assert (await graph("POST", "/users", json_body=new_user())).status == 201
    res = await graph("PATCH", "/users/new.user@contoso.com",
                      json_body={"passwordProfile": {"password": "An0ther-one!"}})
    assert res.status == 403
    fake_tenant.set_permissions(cid, ["User.ReadWrite.All"], directory_roles=["User Administrator"])
    res = await graph("PATCH", "/users/new.user@contoso.com",
                      json_body={"passwordProfile": {"password": "An0ther-one!"}})
    assert res.status == 204
    # a User Administrator may not reset a Global Administrator's password
    res = await graph("PATCH", "/users/admin@contoso.onmicrosoft.com",
                      json_body={"passwordProfile": {"password": "An0ther-one!"}})
    assert res.status == 403
    fake_tenant.set_permissions(cid, ["User.EnableDisableAccount.All", "User.Read.All"])
    assert (await graph("PATCH", "/users/AlexW@contoso.com",
                        json_body={"accountEnabled": False})).status == 204
    assert (await graph("PATCH", "/users/AlexW@contoso.com",
                        json_body={"jobTitle": "x"})).status == 403


@d
async def test_revoke_sign_in_sessions(fake_tenant, graph):
    res = await graph("POST", "/users/AdeleV@contoso.com/revokeSignInSessions")
    assert res.status == 200 and res.body["value"] is True
    assert fake_tenant.get_user("AdeleV@contoso.com")["signInSessionsValidFromDateTime"]


@d
async def test_replication_delay(fake_tenant, graph):
    fake_tenant.configure(replication_delay=60)
    created = await graph("POST", "/users", json_body=new_user())
    assert created.status == 201
    assert (await graph("GET", f"/users/{created.body['id']}")).status == 404
    fake_tenant.configure(replication_delay=0)
    assert (await graph("GET", f"/users/{created.body['id']}")).status == 200


@d
async def test_domains_and_organization(graph):
    domains = {d["id"]: d for d in (await graph("GET", "/domains")).body["value"]}
    assert domains["contoso.com"]["isVerified"] and domains["contoso.com"]["isDefault"]
    assert domains["contoso.onmicrosoft.com"]["isInitial"]
    assert not domains["fabrikam.com"]["isVerified"]
    assert domains["contoso.com"]["authenticationType"] == "Managed"
    org = (await graph("GET", "/organization")).body["value"][0]
    assert {v["name"] for v in org["verifiedDomains"]} == {"contoso.com", "contoso.onmicrosoft.com"}
    one = await graph("GET", "/domains/contoso.com")
    assert one.body["id"] == "contoso.com"


@d
async def test_application_credentials_end_date(fake_tenant, fake_app, graph):
    res = await graph("GET", f"/applications(appId='{fake_app['client_id']}')",
                      params={"$select": "passwordCredentials,keyCredentials"})
    assert res.status == 200 and res.body["passwordCredentials"][0]["endDateTime"]
