"""A fake Microsoft 365 tenant: Entra ID sign-in and Microsoft Graph v1.0 users, over HTTPS.

Test double for ldapsync's Graph client, token provider and connector; production code must never
import it. Real MSAL Python and treq talk to it unchanged (trusting the CA it writes out).

    tenant = FakeTenant(tmp_path / "tenant").seed_demo().start()     # on the running reactor
    tenant.authority   -> https://127.0.0.1:PORT/contoso.onmicrosoft.com   (MSAL, instance_discovery=False)
    tenant.graph_url   -> https://127.0.0.1:PORT/v1.0
    tenant.ca_file     -> PEM of the CA that signed the server certificate

Layout of a request (``serve``)::

    /_fake/<method>          admin API (JSON kwargs → {"result": ...}); needs X-Fake-Admin-Token
    outage? ── 503 / dropped connection
    /<tenant>/v2.0/.well-known/openid-configuration, /<tenant>/oauth2/v2.0/{token,devicecode}
    /v1.0/$batch ─┐
    /v1.0/...  ───┴─▶ operation: fault rules → bearer token (401) → throttling (429) → _graph handler
    every request (and $batch item) is recorded with passwords redacted

Python test controls (also reachable as ``POST /_fake/<name>``, see ``ldapsync.testing.client``):
seed (``add_domain``, ``add_user``, ``add_users`` in bulk, ``register_app``), inspect (``get_user``, ``password_of``,
``requests``), drive sign-in (``approve_device_code``, ``expire_tokens``), perturb
(``inject_fault``, ``set_latency``, ``outage``, ``configure_throttling``, ``portal_edit``).

Run alone: ``python -m ldapsync.testing.tenant --port 8443 --state-dir var/fake-tenant``.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import math
import os
import re
import secrets
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import parse_qsl, unquote, urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from . import _graph, _identity
from ._http import GraphError, OAuthError, Req, Resp, parse_json_body, redact_json
from ._identity import App, DeviceCode, RefreshInfo, Secret, TokenInfo, key_credential
from .tls import ensure_server_certificates

log = Logger()

DEFAULT_APP_PERMISSIONS = ("User.ReadWrite.All", "User-PasswordProfile.ReadWrite.All",
                           "Domain.Read.All", "Organization.Read.All", "Application.Read.All")
_WRITE_METHODS = {"POST", "PATCH", "DELETE", "PUT"}
_CONFIGURABLE = {"replication_delay", "password_history", "token_lifetime", "device_interval",
                 "device_auto_approve", "device_code_lifetime", "delta_page_size", "latency"}
ADMIN_API = {
    "add_domain", "set_domain", "add_user", "add_users", "get_user", "all_users", "delete_user", "portal_edit",
    "password_of", "register_app", "set_permissions", "add_app_secret", "add_app_certificate",
    "approve_device_code", "deny_device_code", "app_token", "pending_device_codes", "expire_tokens",
    "revoke_refresh_tokens", "inject_fault", "clear_faults", "set_latency", "outage", "end_outage",
    "configure_throttling", "reset_throttling", "requests", "clear_requests", "expire_delta_tokens",
    "configure", "info",
}


_SIGNING_KEYS: list[rsa.RSAPrivateKey] = []


def _signing_key() -> rsa.RSAPrivateKey:
    """The token-signing key, made once per process (RSA generation is slow)."""
    if not _SIGNING_KEYS:
        _SIGNING_KEYS.append(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return _SIGNING_KEYS[0]


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


@dataclass
class Fault:
    id: int
    status: int
    count: int | None                  # None: until cleared
    retry_after: float | None
    target: str                        # "graph" | "identity" | "any"
    method: str | None
    path: re.Pattern[str] | None
    after: bool                        # run the operation, then answer with the fault
    drop: bool                         # abort the connection instead of answering
    code: str | None
    message: str | None

    def matches(self, kind: str, req: Req) -> bool:
        return ((self.target in ("any", kind)) and (self.method is None or self.method == req.method)
                and (self.path is None or bool(self.path.search(req.path))))


_FAULT_CODES = {429: ("TooManyRequests", "Too many requests."),
                500: ("generalException", "An internal server error occurred."),
                502: ("BadGateway", "Bad gateway."),
                503: ("ServiceNotAvailable", "The service is temporarily unavailable. Please retry."),
                504: ("GatewayTimeout", "The gateway timed out."),
                401: ("InvalidAuthenticationToken", "Access token has expired or is not yet valid."),
                403: ("Authorization_RequestDenied", _graph.DENIED)}


class FakeTenant:
    """State, behaviour and test controls of one fake tenant. Runs on the Twisted reactor."""

    def __init__(self, state_dir: str | Path, *, domain: str = "contoso.onmicrosoft.com",
                 display_name: str = "Contoso", tenant_id: str | None = None,
                 host: str = "127.0.0.1", clock: Callable[[], float] = time.time, reactor: Any = None):
        self.state_dir = Path(state_dir)
        self.initial_domain = domain.lower()
        self.display_name = display_name
        self.tenant_id = tenant_id or str(uuid.uuid5(uuid.NAMESPACE_DNS, self.initial_domain))
        self.host = host
        self.clock = clock
        self._reactor = reactor
        self.port: int | None = None
        self._listening: Any = None
        self.admin_token = secrets.token_urlsafe(24)
        # directory
        self.domains: dict[str, dict[str, Any]] = {}
        self.users: dict[str, dict[str, Any]] = {}
        self.upn_index: dict[str, str] = {}        # casefold UPN → id
        self.proxy_index: dict[str, str] = {}      # casefold "smtp:addr" → id (mail, proxyAddresses)
        self.passwords: dict[str, str] = {}
        self.force_change: dict[str, bool] = {}
        self.created_at: dict[str, float] = {}
        self.user_roles: dict[str, set[str]] = {}
        self.seq = 0
        self.user_seq: dict[str, int] = {}
        self.tombstones: dict[str, int] = {}
        self.portal_edits: list[dict[str, Any]] = []
        # identity
        self.apps: dict[str, App] = {}
        self.access_tokens: dict[str, TokenInfo] = {}
        self.refresh_tokens: dict[str, RefreshInfo] = {}
        self.device_codes: dict[str, DeviceCode] = {}
        key = _signing_key()
        self.signing_key_pem = key.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption())
        self._signing_public = key.public_key()
        self.signing_kid = secrets.token_hex(8)
        # paging
        self.pages: dict[str, dict[str, Any]] = {}
        self.delta_tokens: dict[str, dict[str, Any]] = {}
        # behaviour knobs
        self.replication_delay = 0.0
        self.password_history = True
        self.token_lifetime = 3600
        self.device_interval = 5
        self.device_code_lifetime = 900
        self.device_auto_approve: bool | int = False   # True/N: approve on the first/N-th poll
        self.delta_page_size = 100
        self.latency = 0.0
        # faults and throttling
        self.faults: list[Fault] = []
        self._fault_ids = 0
        self._outage_until: float | None = None
        self._outage_mode = "503"
        self.throttling: dict[str, Any] = {"enabled": True, "writes": 3000, "window": 150.0,
                           "resource_units": None, "ru_window": 10.0}
        self._writes: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._units: dict[str, collections.deque[tuple[float, int]]] = collections.defaultdict(
            collections.deque)
        self._unit_sums: dict[str, int] = collections.defaultdict(int)
        self.records: list[dict[str, Any]] = []

    # --- addresses -----------------------------------------------------------------------------

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor
            self._reactor = reactor
        return self._reactor

    @property
    def base_url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def authority(self) -> str:
        return f"{self.base_url}/{self.initial_domain}"

    @property
    def graph_url(self) -> str:
        return f"{self.base_url}/v1.0"

    @property
    def graph_scope(self) -> str:
        return f"{self.base_url}/.default"

    @property
    def issuer(self) -> str:
        return f"{self.base_url}/{self.tenant_id}/v2.0"

    @property
    def ca_file(self) -> Path:
        return self.state_dir / "tls" / "ca.pem"

    def tenant_aliases(self) -> set[str]:
        return {self.tenant_id, *(d for d, v in self.domains.items() if v["isVerified"]),
                self.initial_domain}

    def graph_resources(self) -> set[str]:
        hosts = {self.host, "localhost", "127.0.0.1"}
        return ({f"https://{h}:{self.port}" for h in hosts} | {"https://graph.microsoft.com",
                                                               _identity.GRAPH_APP_ID})

    def token_endpoint_audiences(self) -> list[str]:
        hosts = {self.host, "localhost", "127.0.0.1"}
        return [f"https://{h}:{self.port}/{alias}/oauth2/v2.0/token"
                for h in hosts for alias in self.tenant_aliases()] + [self.issuer]

    def jwk(self) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self._signing_public))
        return {**jwk, "kid": self.signing_kid, "use": "sig", "alg": "RS256", "issuer": self.issuer}

    def info(self) -> dict[str, Any]:
        """Where things are: what a client (or another process) needs to talk to this fake."""
        return {"port": self.port, "base_url": self.base_url, "authority": self.authority,
                "tenant": self.initial_domain, "tenant_id": self.tenant_id,
                "graph_url": self.graph_url, "graph_scope": self.graph_scope,
                "ca_file": str(self.ca_file), "admin_url": f"{self.base_url}/_fake"}

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self, port: int = 0) -> FakeTenant:
        """Listen (TLS) on ``host:port`` on the reactor; port 0 picks one (see ``self.port``)."""
        certs = ensure_server_certificates(self.state_dir / "tls")
        site = _QuietSite(_TenantResource(self))
        self._site, self._tls = site, certs.server_options()
        self._listening = self.reactor.listenSSL(port, site, self._tls, interface=self.host)
        self.port = self._listening.getHost().port
        return self

    def stop(self) -> Deferred:
        listening, self._listening = self._listening, None
        return maybeDeferred(listening.stopListening) if listening else succeed(None)

    # --- seeding and inspection ----------------------------------------------------------------

    def add_domain(self, name: str, *, verified: bool = True, default: bool = False,
                   initial: bool = False, authentication_type: str = "Managed") -> dict[str, Any]:
        name = name.lower()
        if default:
            for d in self.domains.values():
                d["isDefault"] = False
        self.domains[name] = {
            "id": name, "authenticationType": authentication_type, "availabilityStatus": None,
            "isAdminManaged": True, "isDefault": default, "isInitial": initial, "isRoot": True,
            "isVerified": verified, "passwordNotificationWindowInDays": 14,
            "passwordValidityPeriodInDays": 2147483647,
            "supportedServices": ["Email", "OfficeCommunicationsOnline"] if verified else [],
            "state": None,
        }
        return dict(self.domains[name])

    def set_domain(self, name: str, *, verified: bool | None = None, default: bool | None = None,
                   authentication_type: str | None = None) -> dict[str, Any]:
        d = self.domains[name.lower()]
        if verified is not None:
            d["isVerified"] = verified
        if authentication_type is not None:
            d["authenticationType"] = authentication_type
        if default:
            for other in self.domains.values():
                other["isDefault"] = False
            d["isDefault"] = True
        return dict(d)

    def add_user(self, upn: str, password: str | None = None, *, display_name: str | None = None,
                 enabled: bool = True, roles: Iterable[str] = (), **props: Any) -> dict[str, Any]:
        """Seed a user directly (no Graph validation, not recorded). Returns ``get_user``."""
        local = upn.split("@")[0]
        body = {"userPrincipalName": upn, "displayName": display_name or local,
                "mailNickname": local, "accountEnabled": enabled, **props}
        user = self.insert_user(body, password=password or secrets.token_urlsafe(12) + "aA1!")
        if roles:
            self.user_roles[user["id"]] = set(roles)
        self.created_at[user["id"]] = 0.0          # seeded users are fully replicated
        return self.get_user(user["id"])  # type: ignore[return-value]

    def add_users(self, users: list[dict[str, Any]] | None = None, *, template: dict[str, Any] | None = None,
                  count: int = 0, start: int = 1, return_ids: bool = False) -> dict[str, Any]:
        """Seed many users in one call (benchmarks): each of ``users`` is ``add_user``'s keyword
        arguments; with ``template``, ``count`` users more are made from it, string values
        formatted with ``i`` = ``start``, ``start + 1``… (``{"upn": "u{i:06d}@contoso.com"}``).
        Same rules as ``add_user`` (no Graph validation, not recorded). Returns ``{"added": n}``
        (plus ``"ids"`` in order with ``return_ids``)."""
        if count < 0 or (count and template is None):
            raise ValueError("count needs a template (and must not be negative)")
        ids: list[str] = []

        def one(kwargs: dict[str, Any]) -> None:
            kwargs = dict(kwargs)
            roles = kwargs.pop("roles", ())
            upn = kwargs.pop("upn")
            local = upn.split("@")[0]
            body = {"userPrincipalName": upn, "displayName": kwargs.pop("display_name", None) or local,
                    "mailNickname": local, "accountEnabled": kwargs.pop("enabled", True), **kwargs}
            password = kwargs.get("password") or secrets.token_urlsafe(12) + "aA1!"
            body.pop("password", None)
            user = self.insert_user(body, password=password)
            if roles:
                self.user_roles[user["id"]] = set(roles)
            self.created_at[user["id"]] = 0.0
            if return_ids:
                ids.append(user["id"])

        for kwargs in users or ():
            one(kwargs)
        for i in range(start, start + count):
            assert template is not None
            one({k: v.format(i=i) if isinstance(v, str) else v for k, v in template.items()})
        out: dict[str, Any] = {"added": len(users or ()) + count}
        if return_ids:
            out["ids"] = ids
        return out

    def find_user_id(self, key: str) -> str | None:
        if key in self.users:
            return key
        return self.upn_index.get(key.casefold())

    def _index(self, user_id: str, add: bool) -> None:
        """Keep the UPN and proxy-address (``smtp:addr``, case-folded) indexes in step."""
        user = self.users[user_id]
        keys = [(self.upn_index, user["userPrincipalName"])]
        keys += [(self.proxy_index, p) for p in user["proxyAddresses"]]
        if user.get("mail"):
            keys.append((self.proxy_index, f"smtp:{user['mail']}"))
        for index, key in keys:
            if add:
                index.setdefault(key.casefold(), user_id)
            elif index.get(key.casefold()) == user_id:
                del index[key.casefold()]

    def get_user(self, key: str) -> dict[str, Any] | None:
        """Every stored property of a user (never the password), or None."""
        user_id = self.find_user_id(key)
        if user_id is None:
            return None
        out = copy.deepcopy(self.users[user_id])
        out["passwordProfile"] = {"forceChangePasswordNextSignIn": self.force_change.get(user_id, False)}
        out["roles"] = sorted(self.user_roles.get(user_id, ()))
        return out

    def all_users(self) -> list[dict[str, Any]]:
        return [self.get_user(i) for i in self.users]  # type: ignore[misc]

    def password_of(self, key: str) -> str | None:
        """The last password set for the user (never logged, never returned by Graph)."""
        user_id = self.find_user_id(key)
        return self.passwords.get(user_id) if user_id else None

    def delete_user(self, key: str) -> None:
        user_id = self.find_user_id(key)
        if user_id is None:
            raise KeyError(key)
        self.remove_user(user_id)

    def portal_edit(self, key: str, **changes: Any) -> dict[str, Any]:
        """An admin edits the user in the Microsoft 365 admin centre: applied and seen by delta."""
        user_id = self.find_user_id(key)
        if user_id is None:
            raise KeyError(key)
        unknown = [k for k in changes if k not in _graph.USER_PROPS or k in {"id", "proxyAddresses"}]
        if unknown:
            raise ValueError(f"not editable: {unknown}")
        self.update_user(user_id, changes)
        self.portal_edits.append({"id": user_id, "changes": redact_json(changes), "time": self.clock()})
        return self.get_user(user_id)  # type: ignore[return-value]

    # --- users: storage (used by the Graph handlers too) -----------------------------------------

    def _bump(self, user_id: str) -> None:
        self.seq += 1
        self.user_seq[user_id] = self.seq

    def insert_user(self, body: dict[str, Any], password: str) -> dict[str, Any]:
        user_id = str(uuid.uuid4())
        now = self.clock()
        user: dict[str, Any] = {p: None for p in _graph.USER_PROPS if p != "passwordProfile"}
        user.update({p: [] for p in _graph.LIST_PROPS})
        user.update({k: copy.deepcopy(v) for k, v in body.items() if k != "passwordProfile"})
        user.update(id=user_id, createdDateTime=_iso(now), lastPasswordChangeDateTime=_iso(now),
                    creationType=None, userType=body.get("userType") or "Member")
        if user.get("mail"):
            user["proxyAddresses"] = [f"SMTP:{user['mail']}"]
        self.users[user_id] = user
        self._index(user_id, add=True)
        self.passwords[user_id] = password
        self.force_change[user_id] = bool((body.get("passwordProfile") or {}).get(
            "forceChangePasswordNextSignIn", body.get("passwordProfile") is not None))
        self.created_at[user_id] = now
        self._bump(user_id)
        return user

    def update_user(self, user_id: str, changes: dict[str, Any]) -> None:
        user = self.users[user_id]
        self._index(user_id, add=False)
        for key, value in changes.items():
            if key == "passwordProfile":
                if value and value.get("password") is not None:
                    self.passwords[user_id] = value["password"]
                    user["lastPasswordChangeDateTime"] = _iso(self.clock())
                    self.force_change[user_id] = bool(value.get("forceChangePasswordNextSignIn", True))
                    self._revoke_refresh(user_id)
                elif value and "forceChangePasswordNextSignIn" in value:
                    self.force_change[user_id] = bool(value["forceChangePasswordNextSignIn"])
            elif key == "mail" and value and value != user.get("mail"):
                proxies = [("smtp:" + p[5:]) if p.startswith("SMTP:") else p
                           for p in user["proxyAddresses"] if p.casefold() != f"smtp:{value}".casefold()]
                user["proxyAddresses"] = [f"SMTP:{value}", *proxies]
                user["mail"] = value
            else:
                user[key] = copy.deepcopy(value)
        self._index(user_id, add=True)
        self._bump(user_id)

    def remove_user(self, user_id: str) -> None:
        self._index(user_id, add=False)
        del self.users[user_id]
        self.passwords.pop(user_id, None)
        self.user_seq.pop(user_id, None)
        self._revoke_refresh(user_id)
        self.seq += 1
        self.tombstones[user_id] = self.seq

    def revoke_sign_in_sessions(self, user_id: str) -> None:
        self.users[user_id]["signInSessionsValidFromDateTime"] = _iso(self.clock())
        self._revoke_refresh(user_id)

    def _revoke_refresh(self, user_id: str) -> None:
        for info in self.refresh_tokens.values():
            if info.user_id == user_id:
                info.revoked = True

    def default_admin_id(self) -> str:
        for user_id, roles in self.user_roles.items():
            if "Global Administrator" in roles and user_id in self.users:
                return user_id
        raise KeyError("no Global Administrator in the fake tenant; add_user(..., roles=[...])")

    def organization(self) -> dict[str, Any]:
        return {
            "id": self.tenant_id, "displayName": self.display_name, "tenantType": "AAD",
            "countryLetterCode": "US", "preferredLanguage": "en", "createdDateTime": _iso(0),
            "verifiedDomains": [{"capabilities": "Email, OfficeCommunicationsOnline",
                                 "isDefault": d["isDefault"], "isInitial": d["isInitial"],
                                 "name": d["id"], "type": d["authenticationType"]}
                                for d in self.domains.values() if d["isVerified"]],
        }

    def application_resource(self, app: App) -> dict[str, Any]:
        return {
            "id": app.object_id, "appId": app.client_id, "displayName": app.display_name,
            "passwordCredentials": [{
                "customKeyIdentifier": None, "displayName": s.display_name, "hint": s.value[:3],
                "keyId": s.key_id, "secretText": None, "startDateTime": _iso(0),
                "endDateTime": _iso(s.expires_at) if s.expires_at is not None else "2299-12-31T00:00:00Z",
            } for s in app.secrets],
            "keyCredentials": [{
                "customKeyIdentifier": c.thumbprint, "displayName": f"CN={app.display_name}",
                "endDateTime": c.certificate.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "startDateTime": c.certificate.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "key": None, "keyId": c.key_id, "type": "AsymmetricX509Cert", "usage": "Verify",
            } for c in app.certificates],
        }

    # --- apps and tokens -----------------------------------------------------------------------

    def register_app(self, client_id: str | None = None, *, secret: bool | str = True,
                     secret_expires_at: float | None = None, certificate_pem: str | None = None,
                     permissions: Iterable[str] = DEFAULT_APP_PERMISSIONS,
                     directory_roles: Iterable[str] = ("User Administrator",),
                     public_client: bool = False, display_name: str = "ldapsync") -> dict[str, Any]:
        """Register an app. Returns ``{"client_id", "secret", ...}`` (secret None if none)."""
        app = App(client_id or str(uuid.uuid4()), display_name, set(permissions), set(directory_roles),
                  public_client)
        self.apps[app.client_id] = app
        value = None
        if secret:
            value = self.add_app_secret(app.client_id, secret if isinstance(secret, str) else None,
                                        expires_at=secret_expires_at)
        if certificate_pem:
            self.add_app_certificate(app.client_id, certificate_pem)
        return {**app.public(), "secret": value}

    def add_app_secret(self, client_id: str, value: str | None = None, *,
                       expires_at: float | None = None) -> str:
        value = value or secrets.token_urlsafe(30)
        self.apps[client_id].secrets.append(Secret(value, str(uuid.uuid4()), expires_at))
        return value

    def add_app_certificate(self, client_id: str, certificate_pem: str) -> str:
        """Upload a certificate (public part) to the app; returns its SHA-1 thumbprint."""
        cred = key_credential(certificate_pem)
        self.apps[client_id].certificates.append(cred)
        return cred.thumbprint

    def set_permissions(self, client_id: str, permissions: Iterable[str],
                        directory_roles: Iterable[str] | None = None) -> dict[str, Any]:
        """Change an app's granted permissions; also applied to tokens it already holds."""
        app = self.apps[client_id]
        app.permissions = set(permissions)
        if directory_roles is not None:
            app.directory_roles = set(directory_roles)
        for info in self.access_tokens.values():
            if info.client_id == client_id and info.kind == "app":
                info.permissions, info.roles = frozenset(app.permissions), frozenset(app.directory_roles)
        return app.public()

    def issue_access_token(self, info: TokenInfo) -> tuple[str, int]:
        now = self.clock()
        lifetime = int(self.token_lifetime)
        info.expires_at = now + lifetime
        claims: dict[str, Any] = {
            "aud": self.base_url, "iss": f"https://sts.windows.net/{self.tenant_id}/",
            "iat": int(now), "nbf": int(now), "exp": int(now) + lifetime, "appid": info.client_id,
            "tid": self.tenant_id, "ver": "1.0", "uti": secrets.token_urlsafe(16),
        }
        if info.kind == "app":
            claims.update(roles=sorted(info.permissions), oid=self.apps[info.client_id].object_id,
                          idtyp="app")
        else:
            claims.update(scp=" ".join(sorted(info.permissions)), oid=info.user_id,
                          upn=self.users[info.user_id or ""]["userPrincipalName"])
        token = jwt.encode(claims, self.signing_key_pem, algorithm="RS256",
                           headers={"kid": self.signing_kid})
        self.access_tokens[token] = info
        return token, lifetime

    def app_token(self, client_id: str) -> str:
        """An app-only access token for ``client_id`` without going through the token endpoint."""
        app = self.apps[client_id]
        return self.issue_access_token(TokenInfo(app.client_id, "app", frozenset(app.permissions),
                                                 frozenset(app.directory_roles), 0.0))[0]

    def expire_tokens(self) -> int:
        """Every access token issued so far is expired from now on (Graph answers 401)."""
        now = self.clock()
        for info in self.access_tokens.values():
            info.expires_at = min(info.expires_at, now - 1)
        return len(self.access_tokens)

    def revoke_refresh_tokens(self, user: str | None = None) -> int:
        user_id = self.find_user_id(user) if user else None
        n = 0
        for info in self.refresh_tokens.values():
            if user is None or info.user_id == user_id:
                info.revoked, n = True, n + 1
        return n

    def pending_device_codes(self) -> list[str]:
        return [f.user_code for f in self.device_codes.values() if f.status == "pending"]

    def _device_flow(self, user_code: str) -> DeviceCode:
        code = user_code.replace("-", "").strip().upper()
        for flow in self.device_codes.values():
            if flow.user_code == code and flow.status == "pending" and flow.expires_at > self.clock():
                return flow
        raise KeyError(user_code)

    def approve_device_code(self, user_code: str, user: str | None = None) -> None:
        """The user (default: the tenant's Global Administrator) signs in with ``user_code``."""
        flow = self._device_flow(user_code)
        user_id = self.find_user_id(user) if user else self.default_admin_id()
        if user_id is None:
            raise KeyError(user)
        flow.status, flow.user_id = "approved", user_id

    def deny_device_code(self, user_code: str) -> None:
        self._device_flow(user_code).status = "declined"

    # --- faults, latency, outages, throttling --------------------------------------------------

    def inject_fault(self, status: int = 429, *, count: int | None = 1, retry_after: float | None = 1,
                     target: str = "graph", method: str | None = None, path: str | None = None,
                     after: bool = False, drop: bool = False, code: str | None = None,
                     message: str | None = None) -> int:
        """The next ``count`` matching operations (None: all until cleared) fail with ``status``.

        ``target``: "graph" (each Graph operation, including each $batch item), "identity" (token and
        discovery endpoints) or "any". ``path`` is a regex searched in the request path (e.g.
        ``/v1.0/users``). ``after=True`` performs the operation first, then fails (lost reply).
        ``drop=True`` aborts the TCP connection instead of answering (outer request only).
        """
        self._fault_ids += 1
        self.faults.append(Fault(self._fault_ids, status, count, retry_after, target,
                                 method.upper() if method else None,
                                 re.compile(path) if path else None, after, drop, code, message))
        return self._fault_ids

    def clear_faults(self) -> None:
        self.faults.clear()

    def set_latency(self, seconds: float) -> None:
        """Delay every answer (not the admin API) by ``seconds``."""
        self.latency = float(seconds)

    def outage(self, seconds: float | None = None, mode: str = "503") -> None:
        """Everything (sign-in and Graph) fails for ``seconds`` (None: until ``end_outage``).

        mode "503": answers 503; "drop": accepts and resets connections; "refuse": stops listening
        (connection refused) and listens again on the same port afterwards.
        """
        if mode not in ("503", "drop", "refuse"):
            raise ValueError(mode)
        self._outage_until = math.inf if seconds is None else self.clock() + seconds
        self._outage_mode = mode
        if mode == "refuse" and self._listening is not None:
            self._refused = self._listening.stopListening()
            self._listening = None
            for channel in list(getattr(self._site, "channels", ())):
                channel.transport.abortConnection()
            if seconds is not None:
                self.reactor.callLater(seconds, self.end_outage)

    def end_outage(self) -> None:
        self._outage_until = None
        if self._outage_mode == "refuse" and self._listening is None and self.port is not None:
            self._outage_mode = "503"

            def relisten(_: Any) -> None:
                self._listening = self.reactor.listenSSL(self.port, self._site, self._tls,
                                                         interface=self.host)
            self._refused.addCallback(relisten)

    def _in_outage(self) -> bool:
        if self._outage_until is None:
            return False
        if self.clock() >= self._outage_until:
            self._outage_until = None
            return False
        return True

    def configure_throttling(self, *, enabled: bool | None = None, writes: int | None = None,
                             window: float | None = None, resource_units: int | None = None,
                             ru_window: float | None = None) -> dict[str, Any]:
        """Directory throttling per app: ``writes`` per ``window`` s (3000/150 s), and resource units
        per ``ru_window`` s (default by tenant size: 3500 / 5000 / 8000)."""
        for key, value in (("enabled", enabled), ("writes", writes), ("window", window),
                           ("resource_units", resource_units), ("ru_window", ru_window)):
            if value is not None:
                self.throttling[key] = value
        return dict(self.throttling)

    def reset_throttling(self) -> None:
        self._writes.clear()
        self._units.clear()
        self._unit_sums.clear()

    def _throttle(self, token: TokenInfo, req: Req, rel: str) -> dict[str, str]:
        cfg = self.throttling
        cost = (2 - ("$select" in req.query)) if (req.method == "GET" and rel == "/users") else 1
        headers = {"x-ms-resource-unit": str(cost)}
        if not cfg["enabled"]:
            return headers
        now, app = self.clock(), token.client_id
        writes, units = self._writes[app], self._units[app]
        while writes and writes[0] <= now - cfg["window"]:
            writes.popleft()
        while units and units[0][0] <= now - cfg["ru_window"]:
            self._unit_sums[app] -= units.popleft()[1]
        n = len(self.users)
        ru_limit = cfg["resource_units"] or (3500 if n < 50 else 5000 if n <= 500 else 8000)
        scope = f"Tenant_Application/ReadWrite/{self.tenant_id}/{app}"
        is_write = req.method in _WRITE_METHODS
        if is_write and len(writes) >= cfg["writes"]:
            wait = max(1, math.ceil(writes[0] + cfg["window"] - now))
            raise GraphError(429, "TooManyRequests", "Too many requests. The write limit for this "
                             "application in this tenant was exceeded.",
                             headers={"Retry-After": str(wait), "x-ms-throttle-scope": scope,
                                      "x-ms-throttle-information": "WriteLimitExceeded"})
        if self._unit_sums[app] + cost > ru_limit:
            wait = max(1, math.ceil(units[0][0] + cfg["ru_window"] - now))
            raise GraphError(429, "TooManyRequests", "Too many requests. The resource unit limit "
                             "for this application in this tenant was exceeded.",
                             headers={"Retry-After": str(wait), "x-ms-throttle-scope": scope,
                                      "x-ms-throttle-information": "ResourceUnitLimitExceeded"})
        units.append((now, cost))
        self._unit_sums[app] += cost
        if is_write:
            writes.append(now)
        used = max(len(writes) / cfg["writes"], self._unit_sums[app] / ru_limit)
        if used > 0.8:
            headers["x-ms-throttle-limit-percentage"] = f"{min(used, 1.8):.1f}"
        return headers

    def configure(self, **settings: Any) -> dict[str, Any]:
        """Set behaviour knobs: replication_delay (s a new user answers 404 by id/UPN),
        password_history (refuse re-setting the current password), token_lifetime (s),
        device_interval (s), device_auto_approve (False/True/N-th poll), device_code_lifetime,
        delta_page_size, latency."""
        for key, value in settings.items():
            if key not in _CONFIGURABLE:
                raise ValueError(f"unknown setting {key!r}")
            setattr(self, key, value)
        return {k: getattr(self, k) for k in sorted(_CONFIGURABLE)}

    def expire_delta_tokens(self) -> None:
        """Every deltaLink handed out so far answers 410 syncStateNotFound."""
        for state in self.delta_tokens.values():
            state["expired"] = True

    # --- the request record --------------------------------------------------------------------

    def requests(self, kind: str | None = "graph", method: str | None = None,
                 path: str | None = None, batch_items: bool = True) -> list[dict[str, Any]]:
        """Recorded requests (passwords redacted): kind "graph"/"identity"/None for all; ``path`` is
        a regex searched in the path; ``batch_items=False`` leaves out the items of $batch."""
        pattern = re.compile(path) if path else None
        return [copy.deepcopy(r) for r in self.records
                if (kind is None or r["kind"] == kind) and (method is None or r["method"] == method)
                and (pattern is None or pattern.search(r["path"]))
                and (batch_items or r["batch"] is None)]

    def clear_requests(self) -> None:
        self.records.clear()

    def _record(self, kind: str, req: Req, resp: Resp) -> None:
        if kind == "identity":
            body: Any = _identity.recorded_form(req) if req.body else None
        else:
            try:
                body = redact_json(json.loads(req.body)) if req.body else None
            except ValueError:
                body = "<not JSON>"
        self.records.append({
            "seq": len(self.records) + 1, "time": self.clock(), "kind": kind, "method": req.method,
            "path": req.path, "query": dict(req.query), "body": body,
            "status": 0 if resp.drop else resp.status, "client_id": req.client_id,
            "batch": req.in_batch, "request_id": req.request_id,
        })

    # --- serving -------------------------------------------------------------------------------

    def serve(self, req: Req) -> Resp:
        """Answer one HTTP request (the twisted.web resource calls this)."""
        if req.path.startswith("/_fake/"):
            return self._admin(req)
        identity = _identity.IDENTITY_PATH.match(req.path)
        kind = "identity" if identity or req.path == "/devicelogin" else "graph"
        if self._in_outage():
            resp = (Resp(0, drop=True) if self._outage_mode != "503" else
                    self._fault_response(kind, req, 503, 5, None, None))
        elif identity:
            resp = self._identity_operation(req, identity["tenant"], identity["rest"])
        elif req.path == "/devicelogin":
            resp = _identity.device_login_page(self, req)
        elif req.path.startswith("/v1.0/"):
            if req.path == "/v1.0/$batch" and req.method == "POST":
                resp = self._batch(req)
            else:
                resp = self._graph_operation(req)
        else:
            resp = GraphError(400, "BadRequest", "Invalid version.").response(req)
        self._stamp(req, resp)
        self._record(kind, req, resp)
        return resp

    def _stamp(self, req: Req, resp: Resp) -> None:
        resp.headers.setdefault("request-id", req.request_id)
        resp.headers.setdefault("client-request-id", req.client_request_id)
        resp.headers.setdefault("x-ms-ags-diagnostic", json.dumps(
            {"ServerInfo": {"DataCenter": "Fake", "Slice": "E", "Ring": "0", "ScaleUnit": "000",
                            "RoleInstance": "FAKE01"}}))

    def _take_fault(self, kind: str, req: Req) -> Fault | None:
        for fault in self.faults:
            if fault.matches(kind, req):
                if fault.count is not None:
                    fault.count -= 1
                    if fault.count <= 0:
                        self.faults.remove(fault)
                return fault
        return None

    def _fault_response(self, kind: str, req: Req, status: int, retry_after: float | None,
                        code: str | None, message: str | None) -> Resp:
        headers = {"Retry-After": str(math.ceil(retry_after))} if retry_after is not None else {}
        if kind == "identity":
            error = "temporarily_unavailable" if status in (429, 503) else "server_error"
            return OAuthError(status, code or error, 50196 if status == 429 else 90033,
                              message or "The server is temporarily unable to handle the request.",
                              headers).response(req)
        default_code, default_message = _FAULT_CODES.get(status, ("UnknownError", "Fault injected."))
        return GraphError(status, code or default_code, message or default_message,
                          headers=headers).response(req)

    def _identity_operation(self, req: Req, tenant_segment: str, rest: str) -> Resp:
        req.client_id = _identity.form_of(req).get("client_id") if req.method == "POST" else None
        fault = self._take_fault("identity", req)
        if fault and not fault.after:
            return Resp(0, drop=True) if fault.drop else self._fault_response(
                "identity", req, fault.status, fault.retry_after, fault.code, fault.message)
        try:
            resp = _identity.handle_identity(self, req, tenant_segment, rest)
        except OAuthError as exc:
            resp = exc.response(req)
        if fault:
            return Resp(0, drop=True) if fault.drop else self._fault_response(
                "identity", req, fault.status, fault.retry_after, fault.code, fault.message)
        return resp

    def authenticate(self, req: Req) -> TokenInfo:
        headers = {"WWW-Authenticate": f'Bearer realm="", authorization_uri="{self.authority}'
                                       f'/oauth2/authorize", client_id="{_identity.GRAPH_APP_ID}"'}
        scheme, _, value = (req.header("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise GraphError(401, "InvalidAuthenticationToken", "Access token is empty.",
                             headers=headers)
        info = self.access_tokens.get(value.strip())
        if info is None:
            raise GraphError(401, "InvalidAuthenticationToken",
                             "Access token validation failure. Invalid audience.", headers=headers)
        req.client_id = info.client_id
        if info.expires_at <= self.clock():
            raise GraphError(401, "InvalidAuthenticationToken",
                             "Lifetime validation failed, the token is expired.", headers=headers)
        return info

    def _graph_operation(self, req: Req) -> Resp:
        rel = req.path[len("/v1.0"):]
        fault = self._take_fault("graph", req)
        if fault and not fault.after:
            if fault.drop and req.in_batch is None:
                return Resp(0, drop=True)
            resp = self._fault_response("graph", req, fault.status, fault.retry_after, fault.code,
                                        fault.message)
        else:
            try:
                token = self.authenticate(req)
                throttle_headers = self._throttle(token, req, rel)
                resp = _graph.handle_graph(self, req, rel, token)
                resp.headers.update(throttle_headers)
            except GraphError as exc:
                resp = exc.response(req)
            if fault:
                if fault.drop and req.in_batch is None:
                    return Resp(0, drop=True)
                resp = self._fault_response("graph", req, fault.status, fault.retry_after,
                                            fault.code, fault.message)
        if req.in_batch is not None:
            self._stamp(req, resp)
            self._record("graph", req, resp)
        return resp

    def _batch(self, req: Req) -> Resp:
        try:
            self.authenticate(req)
            return _graph.batch(self, req, self._graph_operation)
        except GraphError as exc:
            return exc.response(req)

    def _admin(self, req: Req) -> Resp:
        if not secrets.compare_digest((req.header("x-fake-admin-token") or "").encode(),
                                      self.admin_token.encode()):
            return Resp(403, {"error": "missing or wrong X-Fake-Admin-Token"})
        name = req.path[len("/_fake/"):]
        if name not in ADMIN_API:
            return Resp(404, {"error": f"no admin method {name!r}"})
        try:
            kwargs = parse_json_body(req) or {}
            result = getattr(self, name)(**kwargs)
        except (GraphError, KeyError, TypeError, ValueError) as exc:
            return Resp(400, {"error": f"{type(exc).__name__}: {exc}"})
        return Resp(200, {"result": result})

    # --- the demo tenant -----------------------------------------------------------------------

    def seed_demo(self) -> FakeTenant:
        """contoso.onmicrosoft.com (initial) and contoso.com (default) verified, fabrikam.com not;
        a Global Administrator, a few users and a guest."""
        self.add_domain(self.initial_domain, initial=True, default=True)
        self.add_domain("contoso.com", default=True)
        self.add_domain("fabrikam.com", verified=False)
        self.add_user(f"admin@{self.initial_domain}", display_name="MOD Administrator",
                      roles=["Global Administrator"], usageLocation="US")
        for upn, name, given, sn in (("AdeleV@contoso.com", "Adele Vance", "Adele", "Vance"),
                                     ("AlexW@contoso.com", "Alex Wilber", "Alex", "Wilber"),
                                     ("MeganB@contoso.com", "Megan Bowen", "Megan", "Bowen")):
            self.add_user(upn, display_name=name, givenName=given, surname=sn, mail=upn,
                          usageLocation="US", passwordPolicies="DisablePasswordExpiration")
        self.add_user(f"jdoe_fabrikam.com#EXT#@{self.initial_domain}", display_name="John Doe (guest)",
                      userType="Guest", mail="jdoe@fabrikam.com", mailNickname="jdoe_fabrikam.com#EXT#")
        return self


# --- twisted.web glue ------------------------------------------------------------------------------

class _QuietSite(Site):
    """No access log (request bodies carry passwords, URLs carry UPNs); tracks open channels."""

    def __init__(self, resource: Resource):
        super().__init__(resource)
        self.channels: set[Any] = set()

    def log(self, request: Any) -> None:
        pass

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channels = self.channels
        lost = channel.connectionLost

        def connection_lost(reason: Any) -> None:
            channels.discard(channel)
            lost(reason)
        channel.connectionLost = connection_lost
        channels.add(channel)
        return channel


class _TenantResource(Resource):
    isLeaf = True

    def __init__(self, tenant: FakeTenant):
        super().__init__()
        self.tenant = tenant

    def render(self, request: Any) -> Any:
        split = urlsplit(request.uri.decode("utf-8", "replace"))
        req = Req(
            method=request.method.decode(),
            path=unquote(split.path),
            query=dict(parse_qsl(split.query, keep_blank_values=True)),
            headers={k.decode().lower(): v[-1].decode("utf-8", "replace")
                     for k, v in request.requestHeaders.getAllRawHeaders()},
            body=request.content.read() if request.content else b"",
        )
        gone: list[bool] = []
        request.notifyFinish().addBoth(lambda _: gone.append(True))
        delay = 0.0 if req.path.startswith("/_fake/") else self.tenant.latency
        d = (deferLater(self.tenant.reactor, delay, self.tenant.serve, req) if delay > 0
             else maybeDeferred(self.tenant.serve, req))
        d.addCallback(self._write, request, gone)
        d.addErrback(self._crash, request, req, gone)
        return NOT_DONE_YET

    def _write(self, resp: Resp, request: Any, gone: list[bool]) -> None:
        if gone:
            return
        if resp.drop:
            request.channel.transport.abortConnection()
            return
        request.setResponseCode(resp.status)
        for name, value in resp.json_headers().items():
            request.setHeader(name, value)
        body = resp.encoded()
        if resp.status not in (204, 304):
            request.setHeader("Content-Length", str(len(body)))
        if body:
            request.write(body)
        request.finish()

    def _crash(self, failure: Any, request: Any, req: Req, gone: list[bool]) -> None:
        log.failure("fake tenant: unhandled error for {method} {path}", failure,
                    method=req.method, path=req.path)
        resp = GraphError(500, "generalException", "Internal error in the fake tenant.").response(req)
        self._write(resp, request, gone)


# --- python -m ldapsync.testing.tenant -----------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ldapsync.testing.tenant",
                                     description="Run a fake Microsoft 365 tenant (demo and tests).")
    parser.add_argument("--port", type=int, default=8443, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--state-dir", default="var/fake-tenant", type=Path)
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    parser.add_argument("--device-auto-approve", action="store_true",
                        help="approve device-code sign-ins without the /devicelogin page")
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    state = args.state_dir
    state.mkdir(parents=True, exist_ok=True)
    tenant = FakeTenant(state, host=args.host).seed_demo()
    if args.device_auto_approve:
        tenant.device_auto_approve = True
    app = tenant.register_app(display_name="ldapsync demo", public_client=True)
    tenant.start(args.port)

    def secret_file(name: str, value: str) -> Path:
        path = state / name
        path.write_text(value + "\n")
        path.chmod(0o600)
        return path

    secret_path = secret_file("client-secret", app["secret"])
    admin_path = secret_file("admin-token", tenant.admin_token)
    admin_upn = f"admin@{tenant.initial_domain}"
    admin_pw_path = secret_file("tenant-admin-password", tenant.password_of(admin_upn) or "")
    info = {**tenant.info(), "client_id": app["client_id"], "client_secret_file": str(secret_path),
            "admin_token_file": str(admin_path), "tenant_admin": admin_upn,
            "tenant_admin_password_file": str(admin_pw_path), "pid": os.getpid()}
    (state / "tenant.json").write_text(json.dumps(info, indent=2) + "\n")
    if args.json:
        print(json.dumps(info), flush=True)
    else:
        print(f"""Fake Microsoft 365 tenant '{tenant.display_name}' is listening.
  authority          {info['authority']}
  Graph              {info['graph_url']}
  CA certificate     {info['ca_file']}
  client id          {info['client_id']}
  client secret in   {secret_path}
  device sign-in     {tenant.base_url}/devicelogin as {admin_upn} (password in {admin_pw_path})
  admin API token in {admin_path}

ldapsync.toml:
  [office365]
  enabled = true
  tenant = "{tenant.initial_domain}"
  client_id = "{info['client_id']}"
  client_secret_file = "{secret_path}"
  authority = "{info['authority']}"
  graph_url = "{info['graph_url']}"
  ca_bundle = "{info['ca_file']}"
""", flush=True)
    reactor.run()  # type: ignore[attr-defined,misc]


if __name__ == "__main__":
    main(sys.argv[1:])
