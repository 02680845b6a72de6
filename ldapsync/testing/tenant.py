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

Code: this module holds ``FakeTenant`` (its state, addresses, lifecycle, knobs and the demo seed)
and ``main``; the methods come from mixins by responsibility: ``_directory.py`` (domains, users),
``_apps.py`` (app registrations, tokens, device codes), ``_faults.py`` (faults, latency, outages,
throttling) and ``_serving.py`` (the request pipeline, admin API, request record, twisted.web glue).

Run alone: ``python -m ldapsync.testing.tenant --port 8443 --state-dir var/fake-tenant``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import secrets
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from twisted.internet.defer import Deferred, maybeDeferred, succeed

from ldapsync.clock import Timer

from . import _identity
from ._apps import DEFAULT_APP_PERMISSIONS, AppsMixin, _signing_key
from ._directory import DirectoryMixin
from ._faults import Fault, FaultsMixin
from ._identity import App, DeviceCode, RefreshInfo, TokenInfo
from ._serving import ADMIN_API, ServingMixin, _QuietSite, _TenantResource
from .tls import ensure_server_certificates

__all__ = ["ADMIN_API", "DEFAULT_APP_PERMISSIONS", "FakeTenant", "Fault", "main"]

_CONFIGURABLE = {"replication_delay", "password_history", "token_lifetime", "device_interval",
                 "device_auto_approve", "device_code_lifetime", "delta_page_size", "latency"}


class FakeTenant(DirectoryMixin, AppsMixin, FaultsMixin, ServingMixin):
    """State, behaviour and test controls of one fake tenant. Runs on the Twisted reactor."""

    def __init__(self, state_dir: str | Path, *, domain: str = "contoso.onmicrosoft.com",
                 display_name: str = "Contoso", tenant_id: str | None = None,
                 host: str = "127.0.0.1", wall_time: Timer = time.time, reactor: Any = None):
        self.state_dir = Path(state_dir)
        self.initial_domain = domain.lower()
        self.display_name = display_name
        self.tenant_id = tenant_id or str(uuid.uuid5(uuid.NAMESPACE_DNS, self.initial_domain))
        self.host = host
        self.wall_time = wall_time      # the fake Microsoft's own time (tokens, codes, timestamps)
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
        self.banned_terms: list[str] = []    # the tenant's own banned passwords (Password Protection)
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

    # --- behaviour knobs -----------------------------------------------------------------------

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
