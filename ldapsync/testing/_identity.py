"""The fake tenant's identity platform (Entra ID v2.0 endpoints, as MSAL Python 1.39 uses them).

Owns: app registrations, OIDC discovery, JWKS, the token endpoint (client_credentials with a
secret or a certificate assertion, refresh_token, device code), the device-code endpoint and a
tiny ``/devicelogin`` page, and the tokens it issues. Test double only.

MSAL with ``instance_discovery=False`` fetches ``<authority>/v2.0/.well-known/openid-configuration``
and then POSTs forms to ``token_endpoint`` / ``device_authorization_endpoint``; it sends
``client_info=1`` and expects ``client_info`` (base64url JSON ``{uid, utid}``) and an ``id_token``
whose ``iss`` equals the discovery ``issuer`` for user sign-ins.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import html
import json
import re
import secrets
import string
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ._http import OAuthError, Req, Resp, redact_form

if TYPE_CHECKING:
    from .tenant import FakeTenant

GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
RESERVED_SCOPES = {"openid", "profile", "offline_access", "email"}
ADMIN_ROLES = {"Global Administrator", "User Administrator", "Privileged Authentication Administrator"}
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
REFRESH_TOKEN_LIFETIME = 90 * 86400


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Secret:
    value: str
    key_id: str
    expires_at: float | None
    display_name: str = "ldapsync"


@dataclass
class KeyCredential:
    certificate: x509.Certificate
    key_id: str
    x5t: str            # base64url SHA-1 of the DER, unpadded
    x5t_s256: str
    thumbprint: str     # SHA-1 hex upper-case, as the portal shows it


@dataclass
class App:
    client_id: str
    display_name: str
    permissions: set[str]                 # application permissions (roles claim), e.g. User.ReadWrite.All
    directory_roles: set[str]             # e.g. {"User Administrator"} assigned to the service principal
    public_client: bool = False           # "Allow public client flows" (device code without a secret)
    secrets: list[Secret] = field(default_factory=list)
    certificates: list[KeyCredential] = field(default_factory=list)
    object_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def public(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "display_name": self.display_name,
                "permissions": sorted(self.permissions), "directory_roles": sorted(self.directory_roles),
                "public_client": self.public_client,
                "thumbprints": [c.thumbprint for c in self.certificates]}


@dataclass
class TokenInfo:
    client_id: str
    kind: str                      # "app" | "delegated"
    permissions: frozenset[str]
    roles: frozenset[str]          # directory roles (admin role of the app or the signed-in user)
    expires_at: float
    user_id: str | None = None


@dataclass
class RefreshInfo:
    client_id: str
    user_id: str
    scopes: list[str]
    expires_at: float
    revoked: bool = False


@dataclass
class DeviceCode:
    device_code: str
    user_code: str
    client_id: str
    scopes: list[str]
    expires_at: float
    status: str = "pending"        # pending | approved | declined | redeemed
    user_id: str | None = None
    polls: int = 0


def key_credential(cert_pem: str | bytes) -> KeyCredential:
    cert = x509.load_pem_x509_certificate(cert_pem.encode() if isinstance(cert_pem, str) else cert_pem)
    der = cert.public_bytes(serialization.Encoding.DER)
    sha1 = hashlib.sha1(der).digest()  # noqa: S324 - x5t is defined as SHA-1
    return KeyCredential(cert, str(uuid.uuid4()), b64url(sha1), b64url(hashlib.sha256(der).digest()),
                         sha1.hex().upper())


# --- discovery ---------------------------------------------------------------------------------

def openid_configuration(t: FakeTenant) -> dict[str, Any]:
    base = f"{t.base_url}/{t.tenant_id}"
    return {
        "token_endpoint": f"{base}/oauth2/v2.0/token",
        "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt",
                                                  "client_secret_basic"],
        "jwks_uri": f"{base}/discovery/v2.0/keys",
        "response_modes_supported": ["query", "fragment", "form_post"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
        "issuer": t.issuer,
        "request_uri_parameter_supported": False,
        "userinfo_endpoint": f"{t.base_url}/oidc/userinfo",
        "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
        "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
        "http_logout_supported": True,
        "frontchannel_logout_supported": True,
        "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "acr", "nonce",
                             "preferred_username", "name", "tid", "ver", "at_hash", "c_hash", "email"],
        "tenant_region_scope": "EU",
        "cloud_instance_name": "fake.ldapsync.test",
        "cloud_graph_host_name": "graph.windows.net",
        "msgraph_host": t.base_url.split("://", 1)[1],
        "rbac_url": "https://pas.windows.net",
    }


def handle_identity(t: FakeTenant, req: Req, tenant_segment: str, rest: str) -> Resp:
    if tenant_segment.lower() not in t.tenant_aliases():
        raise OAuthError(400, "invalid_tenant", 90002,
                         f"Tenant '{tenant_segment}' not found. Check to make sure you have the "
                         "correct tenant ID and are signing into the correct cloud.")
    if rest == "v2.0/.well-known/openid-configuration" and req.method == "GET":
        return Resp(200, openid_configuration(t))
    if rest == "discovery/v2.0/keys" and req.method == "GET":
        return Resp(200, {"keys": [t.jwk()]})
    if rest == "oauth2/v2.0/token" and req.method == "POST":
        return token_endpoint(t, req, form_of(req))
    if rest == "oauth2/v2.0/devicecode" and req.method == "POST":
        return device_code_endpoint(t, req, form_of(req))
    if rest == "oauth2/v2.0/authorize":
        raise OAuthError(400, "unsupported_response_type", 900144,
                         "The fake tenant supports device code sign-in only.")
    return Resp(404, {"error": "not_found", "error_description": "No such endpoint."})


def form_of(req: Req) -> dict[str, str]:
    return dict(parse_qsl(req.body.decode("utf-8", "replace"), keep_blank_values=True))


def recorded_form(req: Req) -> dict[str, str]:
    return redact_form(form_of(req))


# --- client authentication ---------------------------------------------------------------------

def _app_for(t: FakeTenant, client_id: str | None) -> App:
    app = t.apps.get(client_id or "")
    if app is None:
        raise OAuthError(400, "unauthorized_client", 700016,
                         f"Application with identifier '{client_id}' was not found in the directory "
                         f"'{t.display_name}'. This can happen if the application has not been "
                         "installed by the administrator of the tenant or consented to by any user in "
                         "the tenant. You may have sent your authentication request to the wrong tenant.")
    return app


def authenticate_client(t: FakeTenant, req: Req, form: dict[str, str], *, required: bool) -> App:
    """The app the form authenticates as. ``required=False`` lets public clients through."""
    client_id, secret = form.get("client_id"), form.get("client_secret")
    auth = req.header("authorization") or ""
    if auth.lower().startswith("basic "):
        try:
            client_id, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise OAuthError(401, "invalid_client", 7000216, "Malformed basic authorization.") from None
    app = _app_for(t, client_id)
    now = t.wall_time()
    if form.get("client_assertion"):
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise OAuthError(400, "invalid_request", 50027, "Invalid client_assertion_type.")
        _verify_assertion(t, app, form["client_assertion"], now)
        return app
    if secret:
        for s in app.secrets:
            if secrets.compare_digest(s.value.encode(), secret.encode()):
                if s.expires_at is not None and s.expires_at <= now:
                    raise OAuthError(401, "invalid_client", 7000222,
                                     f"The provided client secret keys for app '{app.client_id}' are "
                                     "expired. Visit the Azure portal to create new keys for your app.")
                return app
        raise OAuthError(401, "invalid_client", 7000215,
                         "Invalid client secret provided. Ensure the secret being sent in the request "
                         f"is the client secret value, not the client secret ID, for a secret added to "
                         f"app '{app.client_id}'.")
    if required or not app.public_client:
        raise OAuthError(401, "invalid_client", 7000218,
                         "The request body must contain the following parameter: 'client_assertion' "
                         "or 'client_secret'.")
    return app


def _verify_assertion(t: FakeTenant, app: App, assertion: str, now: float) -> None:
    try:
        header = jwt.get_unverified_header(assertion)
    except jwt.PyJWTError:
        raise OAuthError(401, "invalid_client", 50027, "JWT token is invalid or malformed.") from None
    x5t, x5t_s256 = (header.get("x5t") or "").rstrip("="), (header.get("x5t#S256") or "").rstrip("=")
    cred = next((c for c in app.certificates
                 if (x5t and c.x5t == x5t) or (x5t_s256 and c.x5t_s256 == x5t_s256)), None)
    if cred is None:
        raise OAuthError(401, "invalid_client", 700027,
                         "The certificate with identifier used to sign the client assertion is not "
                         f"registered on application. [Reason - The key was not found., Thumbprint of "
                         f"key used by client: '{x5t or x5t_s256}'].")
    if cred.certificate.not_valid_after_utc.timestamp() < now:
        raise OAuthError(401, "invalid_client", 700027,
                         "Client assertion failed signature validation: the certificate has expired.")
    try:
        claims = jwt.decode(
            assertion, cast(Any, cred.certificate.public_key()), algorithms=["RS256", "PS256"],
            audience=t.token_endpoint_audiences(), issuer=app.client_id,
            options={"require": ["exp", "aud", "iss", "sub"]}, leeway=300)
    except jwt.InvalidSignatureError:
        raise OAuthError(401, "invalid_client", 700027,
                         "Client assertion contains an invalid signature.") from None
    except jwt.ExpiredSignatureError:
        raise OAuthError(401, "invalid_client", 700024,
                         "Client assertion is not within its valid time range.") from None
    except jwt.InvalidAudienceError:
        raise OAuthError(401, "invalid_client", 700212,
                         "No matching federated identity record found for presented assertion "
                         "audience.") from None
    except jwt.PyJWTError as exc:
        raise OAuthError(401, "invalid_client", 50027, f"Invalid JWT token. {exc}") from None
    if claims.get("sub") != app.client_id:
        raise OAuthError(401, "invalid_client", 700021,
                         "Client assertion application identifier doesn't match 'client_id' parameter.")


# --- scopes ------------------------------------------------------------------------------------

def _resource_scopes(t: FakeTenant, scope: str) -> tuple[list[str], set[str] | None]:
    """(requested non-reserved scopes, explicit permission names or None for ``.default``)."""
    requested = [s for s in scope.split() if s.lower() not in RESERVED_SCOPES]
    named: set[str] = set()
    default = False
    for s in requested:
        resource, _, perm = s.rpartition("/") if "://" in s or s.startswith(GRAPH_APP_ID) else ("", "", s)
        if resource and resource.rstrip("/").lower() not in t.graph_resources():
            raise OAuthError(400, "invalid_resource", 500011,
                             f"The resource principal named {resource} was not found in the tenant "
                             f"named {t.display_name}. This can happen if the application has not been "
                             "installed by the administrator of the tenant or consented to by any user "
                             "in the tenant. You might have sent your authentication request to the "
                             "wrong tenant.")
        if perm == ".default":
            default = True
        else:
            named.add(perm)
    return requested, (None if default else named)


# --- token endpoint ----------------------------------------------------------------------------

def token_endpoint(t: FakeTenant, req: Req, form: dict[str, str]) -> Resp:
    grant = form.get("grant_type", "")
    if grant == "client_credentials":
        return _client_credentials(t, req, form)
    if grant == DEVICE_GRANT:
        return _device_code_grant(t, req, form)
    if grant == "refresh_token":
        return _refresh_grant(t, req, form)
    raise OAuthError(400, "unsupported_grant_type", 70003,
                     f"The app requested an unsupported grant type '{grant}'.")


def _client_credentials(t: FakeTenant, req: Req, form: dict[str, str]) -> Resp:
    app = authenticate_client(t, req, form, required=True)
    scope = form.get("scope", "")
    requested, named = _resource_scopes(t, scope)
    if not requested or named is not None:
        raise OAuthError(400, "invalid_scope", 1002012,
                         f"The provided value for scope {scope} is not valid. Client credential flows "
                         "must have a scope value with /.default suffixed to the resource identifier "
                         "(application ID URI).")
    token, lifetime = t.issue_access_token(TokenInfo(
        app.client_id, "app", frozenset(app.permissions), frozenset(app.directory_roles), 0.0))
    return Resp(200, {"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime,
                      "access_token": token})


def _user_tokens(t: FakeTenant, app: App, user_id: str, scopes: list[str]) -> Resp:
    requested, named = _resource_scopes(t, " ".join(scopes))
    if named is None:
        permissions = set(app.permissions)
    else:
        missing = named - app.permissions
        if missing:
            raise OAuthError(400, "invalid_grant", 65001,
                             f"The user or administrator has not consented to use the application with "
                             f"ID '{app.client_id}'. Send an interactive authorization request for this "
                             f"user and resource. Missing: {' '.join(sorted(missing))}.")
        permissions = named
    user = t.users[user_id]
    roles = frozenset(t.user_roles.get(user_id, set()))
    token, lifetime = t.issue_access_token(TokenInfo(
        app.client_id, "delegated", frozenset(permissions), roles, 0.0, user_id))
    refresh = secrets.token_urlsafe(48)
    t.refresh_tokens[refresh] = RefreshInfo(app.client_id, user_id, list(scopes),
                                            t.wall_time() + REFRESH_TOKEN_LIFETIME)
    now = int(t.wall_time())
    id_token = jwt.encode({
        "aud": app.client_id, "iss": t.issuer, "iat": now, "nbf": now, "exp": now + 3600,
        "name": user.get("displayName"), "oid": user_id, "preferred_username": user["userPrincipalName"],
        "sub": b64url(hashlib.sha256(f"{user_id}:{app.client_id}".encode()).digest()),
        "tid": t.tenant_id, "ver": "2.0",
    }, t.signing_key_pem, algorithm="RS256", headers={"kid": t.signing_kid})
    client_info = b64url(json.dumps({"uid": user_id, "utid": t.tenant_id}).encode())
    return Resp(200, {
        "token_type": "Bearer", "scope": " ".join(requested), "expires_in": lifetime,
        "ext_expires_in": lifetime, "access_token": token, "refresh_token": refresh,
        "refresh_token_expires_in": REFRESH_TOKEN_LIFETIME, "id_token": id_token,
        "client_info": client_info,
    })


def _device_code_grant(t: FakeTenant, req: Req, form: dict[str, str]) -> Resp:
    app = authenticate_client(t, req, form, required=False)
    flow = t.device_codes.get(form.get("device_code", ""))
    if flow is None or flow.client_id != app.client_id or flow.status == "redeemed":
        raise OAuthError(400, "invalid_grant", 70000, "The provided value for the 'device_code' is "
                         "not valid.")
    if flow.expires_at <= t.wall_time():
        raise OAuthError(400, "expired_token", 70019,
                         "Verification code expired. Please try again.")
    flow.polls += 1
    auto = t.device_auto_approve
    if flow.status == "pending" and auto is not False and auto is not None and flow.polls >= int(auto):
        flow.status, flow.user_id = "approved", t.default_admin_id()
    if flow.status == "declined":
        raise OAuthError(400, "authorization_declined", 70002, "The user declined the sign-in.")
    if flow.status == "pending":
        raise OAuthError(400, "authorization_pending", 70016,
                         "OAuth 2.0 device flow error. Authorization is pending. Continue polling.")
    flow.status = "redeemed"
    assert flow.user_id is not None
    return _user_tokens(t, app, flow.user_id, flow.scopes)


def _refresh_grant(t: FakeTenant, req: Req, form: dict[str, str]) -> Resp:
    app = authenticate_client(t, req, form, required=False)
    info = t.refresh_tokens.get(form.get("refresh_token", ""))
    if info is None or info.client_id != app.client_id:
        raise OAuthError(400, "invalid_grant", 9002313, "Invalid request. Request is malformed or "
                         "invalid.")
    if info.revoked or info.user_id not in t.users:
        raise OAuthError(400, "invalid_grant", 50173,
                         "The provided grant has expired due to it being revoked, a fresh auth token "
                         "is needed. The user might have changed or reset their password.")
    if info.expires_at <= t.wall_time():
        raise OAuthError(400, "invalid_grant", 700082,
                         "The refresh token has expired due to inactivity. The token was issued on a "
                         "date more than 90 days ago.")
    scopes = form.get("scope", "").split() or info.scopes
    return _user_tokens(t, app, info.user_id, scopes)


# --- device code -------------------------------------------------------------------------------

def device_code_endpoint(t: FakeTenant, req: Req, form: dict[str, str]) -> Resp:
    app = _app_for(t, form.get("client_id"))
    scopes = form.get("scope", "").split()
    _resource_scopes(t, " ".join(scopes))
    alphabet = string.ascii_uppercase + string.digits
    user_code = "".join(secrets.choice(alphabet) for _ in range(9))
    flow = DeviceCode(secrets.token_urlsafe(48), user_code, app.client_id, scopes,
                      t.wall_time() + t.device_code_lifetime)
    t.device_codes[flow.device_code] = flow
    uri = f"{t.base_url}/devicelogin"
    return Resp(200, {
        "user_code": user_code, "device_code": flow.device_code, "verification_uri": uri,
        "expires_in": t.device_code_lifetime, "interval": t.device_interval,
        "message": f"To sign in, use a web browser to open the page {uri} and enter the code "
                   f"{user_code} to authenticate.",
    })


_LOGIN_PAGE = """<!doctype html><title>Fake tenant sign-in</title>
<h1>{tenant}: device sign-in (fake)</h1><p>{message}</p>
<form method="post"><p><label>Code <input name="code" value="{code}"></label></p>
<p><label>User <input name="username" value="{user}"></label></p>
<p><label>Password <input name="password" type="password"></label></p>
<p><button>Sign in</button></p></form>"""


def device_login_page(t: FakeTenant, req: Req) -> Resp:
    """A browser page for the demo: enter the code and a tenant user's password to approve."""
    message, code, user = "Enter the code shown by the application.", "", ""
    if req.method == "POST":
        form = form_of(req)
        code, user = form.get("code", "").strip().upper(), form.get("username", "").strip()
        user_id = t.find_user_id(user)
        if user_id is None or t.passwords.get(user_id) != form.get("password"):
            message = "Wrong user name or password."
        else:
            try:
                t.approve_device_code(code, user)
                message = "Signed in. You can close this window and return to the application."
            except KeyError:
                message = "That code is unknown or has expired."
    return Resp(200, _LOGIN_PAGE.format(tenant=html.escape(t.display_name), message=html.escape(message),
                                        code=html.escape(code), user=html.escape(user)),
                {"Content-Type": "text/html; charset=utf-8"})


IDENTITY_PATH = re.compile(r"^/(?P<tenant>[^/]+)/(?P<rest>v2\.0/\.well-known/openid-configuration|"
                           r"oauth2/v2\.0/[a-z]+|discovery/v2\.0/keys)$")
