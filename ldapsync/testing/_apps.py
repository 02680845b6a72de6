"""The fake tenant's app registrations and the tokens it issues (``AppsMixin`` of ``FakeTenant``).

Owns: registering apps, their secrets, certificates and permissions, the Graph ``application``
resource, issuing and expiring access tokens, revoking refresh tokens, and approving or denying
device-code sign-ins. The identity endpoints that hand tokens out over HTTP are ``_identity.py``;
the state is made in ``FakeTenant.__init__`` (``tenant.py``). Test double only.
"""

from __future__ import annotations

import secrets
import uuid
from typing import Any, Iterable

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from ._directory import _iso
from ._identity import App, DeviceCode, Secret, TokenInfo, key_credential

DEFAULT_APP_PERMISSIONS = ("User.ReadWrite.All", "User-PasswordProfile.ReadWrite.All",
                           "Domain.Read.All", "Organization.Read.All", "Application.Read.All")

_SIGNING_KEYS: list[rsa.RSAPrivateKey] = []


def _signing_key() -> rsa.RSAPrivateKey:
    """The token-signing key, made once per process (RSA generation is slow)."""
    if not _SIGNING_KEYS:
        _SIGNING_KEYS.append(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return _SIGNING_KEYS[0]


class AppsMixin:
    """App registrations, tokens and device codes of ``FakeTenant``."""

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
        now = self.wall_time()
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
        now = self.wall_time()
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
            if flow.user_code == code and flow.status == "pending" and flow.expires_at > self.wall_time():
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
