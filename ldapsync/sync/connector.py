"""The Microsoft 365 connector's lifecycle and the state admins see over LDAP.

Owns ``cn=office365,ou=directories,<suffix>`` (its operational ``o365*``
attributes are the connector's state), the system group
``cn=Provisioning - Office 365,ou=tags,<suffix>``, the persisted sign-in (the
MSAL token cache, encrypted with ``[secrets] key_file``) and the periodic
credential check, which asks ``connector_notices.py`` to mail the admin (expiry
reminder, re-authorization needed).  "Now" is the policy clock (``ldapsync/clock.py``).

A connector problem (wrong secret, tenant unreachable, expired sign-in) shows
on the connector entry and in the log; it never stops the LDAP server.

State machine (``o365ConnectorState``)::

    unauthorized ──authorize──▶ active ◀──check ok── error
         ▲                        │  └─sign-in refused / credential expired─▶ needs-reauthorization ──authorize──▶ active
         └──────── deactivate ────┴──────────────────────────▶ deactivated ──reactivate──▶ active
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import StrEnum
from typing import TYPE_CHECKING

from twisted.logger import Logger

from ldapsync.clock import Clock, system_clock
from ldapsync.directory.dn import DN
from ldapsync.directory.hooks import Origin, StatusValues
from ldapsync.directory.policy import format_time
from ldapsync.directory.writes import Write, now_generalized
from ldapsync.store import entries as store
from ldapsync.store.database import Database, Txn
from ldapsync.sync.connector_notices import AdminNotices, ensure_notice_rows_txn
from ldapsync.graph.client import GraphClient, PacingPolicy
from ldapsync.graph.clouds import endpoints_from_config
from ldapsync.graph.errors import AuthError, Forbidden, GraphError
from ldapsync.graph.token import ApplicationTokenProvider, DelegatedTokenProvider, token_provider_from_config
from ldapsync.secretbox import SecretBox, load_or_create_key
from twisted.internet import threads
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

if TYPE_CHECKING:
    from ldapsync.directory.facade import Directory
    from ldapsync.mail import Mailer

log = Logger()

TAG_CN = "Provisioning - Office 365"
DIRECTORY_VALUE = "office365"
META_TOKEN_CACHE = "o365.token_cache"
META_DEACTIVATED = "o365.deactivated"
REAUTHORIZE_HINT = ("queued changes wait; an administrator must sign in again with `ldapsync o365 authorize`, "
                    "then they are delivered")
RENEW_CREDENTIAL_HINT = ("queued changes wait; create a new client secret or certificate for the app in Entra, "
                         "update [office365] and run `ldapsync o365 authorize`")
STATUS_ATTRS = ("o365ConnectorState", "o365AuthMode", "o365VerifiedDomain", "o365CredentialExpiry",
                "o365QueueDepth", "o365LastSuccess", "o365LastError", "o365LastReconcile")


class ConnectorState(StrEnum):
    unauthorized = "unauthorized"
    active = "active"
    error = "error"
    needs_reauthorization = "needs-reauthorization"
    deactivated = "deactivated"


def connector_dn(d: "Directory") -> DN:
    return d.dn(f"cn=office365,ou=directories,{d.suffix}")


def tag_dn(d: "Directory") -> DN:
    return d.dn(f"cn={TAG_CN},ou=tags,{d.suffix}")


# -- entries -----------------------------------------------------------------------

def ensure_entries_txn(d: "Directory", txn: Txn) -> list[str]:
    """Create the connector entry and the provisioning tag if missing (connector enabled)."""
    done: list[str] = []
    w = Write(d, txn, str(d.admin_dn), "connector", Origin.CONNECTOR)
    for dn, attrs in (
        (d.dn(f"ou=directories,{d.suffix}"), {"objectClass": ["top", "organizationalUnit"], "ou": ["directories"]}),
        (d.dn(f"ou=tags,{d.suffix}"), {"objectClass": ["top", "organizationalUnit"], "ou": ["tags"]}),
        (connector_dn(d), {"objectClass": ["top", "ldapsyncConnector"], "cn": ["office365"],
                           "description": ["Microsoft 365 (Entra ID) connector"],
                           "o365ConnectorState": [ConnectorState.unauthorized.value]}),
        (tag_dn(d), {"objectClass": ["top", "ldapsyncTag"], "cn": [TAG_CN],
                     "description": ["Members are provisioned to Microsoft 365"]}),
    ):
        if w.get(dn) is None:
            attrs["structuralObjectClass"] = [d.schema.check_entry(attrs)]
            assert dn.parent is not None
            w.create(dn, attrs, w.get(dn.parent))
            done.append(f"created {dn}")
    w.finish()
    ensure_notice_rows_txn(txn)
    return done


def write_status_txn(d: "Directory", txn: Txn, values: StatusValues) -> None:
    """Set (list) or remove (None) operational status attributes on the connector entry."""
    w = Write(d, txn, str(d.admin_dn), "connector-status", Origin.CONNECTOR)
    st = w.get(connector_dn(d))
    if st is None or st.attrs is None:
        return
    if w.set_operational(st, values):
        w.finish()


def read_status_txn(d: "Directory", txn: Txn) -> dict[str, list[str]]:
    e = store.get_entry_txn(txn, connector_dn(d).norm)
    if e is None:
        return {}
    return {k: v for k, v in e.attrs.items() if k in STATUS_ATTRS}


def is_deactivated(db: Database) -> bool:
    return db.run_sync("o365 deactivated?", store.get_meta_txn, META_DEACTIVATED, write=False) == "1"


def set_deactivated_txn(txn: Txn, value: bool) -> None:
    store.set_meta_txn(txn, META_DEACTIVATED, "1" if value else "0")


def unbind_everyone_txn(d: "Directory", txn: Txn) -> int:
    """Remove every binding (direct value and tag membership); Microsoft 365 is left untouched."""
    w = Write(d, txn, str(d.admin_dn), "deactivate", Origin.DEACTIVATE)     # leaves Microsoft 365 untouched
    n = 0
    for e in store.entries_with_value_txn(txn, "ldapsyncdirectory", DIRECTORY_VALUE, for_update=True):
        st = w.track(e, locked=True)
        assert st.attrs is not None
        vals = [v for v in st.attrs.get("ldapsyncDirectory", []) if v.lower() != DIRECTORY_VALUE]
        attrs = dict(st.attrs)
        if vals:
            attrs["ldapsyncDirectory"] = vals
        else:
            attrs.pop("ldapsyncDirectory", None)
        w.update(st, attrs)
        n += 1
    tag = w.get(tag_dn(d))
    if tag is not None and tag.attrs is not None and tag.attrs.get("member"):
        n += len(tag.attrs["member"])
        attrs = dict(tag.attrs)
        attrs.pop("member")
        w.update(tag, attrs)
    w.finish()
    return n


# -- the token cache, persisted encrypted in the database ---------------------------------

class DBTokenCacheStore:
    """MSAL's serialized cache, already encrypted by the provider, kept in the ``meta`` table."""
    def __init__(self, db: Database) -> None:
        self.db = db

    def load(self) -> bytes | None:
        v = self.db.run_sync("token cache load", store.get_meta_txn, META_TOKEN_CACHE, write=False)
        return base64.b64decode(v) if v else None

    def save(self, blob: bytes) -> None:
        self.db.run_sync("token cache save", store.set_meta_txn, META_TOKEN_CACHE, base64.b64encode(blob).decode())


# -- the live connector -------------------------------------------------------------------

@dataclass
class CheckResult:
    state: ConnectorState
    domains: list[str]
    expiry: datetime | None
    error: str | None


class Connector:
    """Signs in, checks the credential and the tenant's domains, keeps the state entry current."""

    def __init__(self, directory: "Directory", *, reactor: IReactorTime, mailer: Mailer | None = None,
                 check_interval: float = 300.0,
                 clock: Clock | None = None) -> None:

        self.d = directory
        self.db = directory.db
        self.config = directory.config
        self.reactor = reactor
        self.mailer = mailer
        self.check_interval = check_interval
        # "Has the credential expired / is it about to?" asks the policy clock (ldapsync/clock.py),
        # like every other expiry rule; so does the delegated sign-in's refresh-token age.
        self.clock = clock or system_clock()
        self.box = SecretBox(load_or_create_key(self.config.secrets.key_file))
        self.cache_store = DBTokenCacheStore(self.db)
        self.notices = AdminNotices(self.db, mailer, self.config.mail.admin_address,
                                    delegated=self.config.office365.auth == "delegated")
        self.provider: ApplicationTokenProvider | DelegatedTokenProvider | None = None   # build_client sets both
        self.client: GraphClient | None = None
        self._loop: LoopingCall | None = None
        self.state: ConnectorState = ConnectorState.unauthorized

    def build_client(self) -> None:
        """The token provider and the Graph client (``check`` builds them when missing; a
        delegated sign-in needs the provider before its first check)."""
        o = self.config.office365
        self.provider = token_provider_from_config(o, store=self.cache_store, box=self.box, reactor=self.reactor,
                                                   clock=self.clock)
        budget = o.write_budget
        pacing = PacingPolicy(writes_per_window=budget) if budget > 0 else PacingPolicy(enabled=False)
        self.client = GraphClient(self.provider, endpoints_from_config(o).graph_url, reactor=self.reactor,
                                  ca_bundle=o.ca_bundle or None, pacing=pacing)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.now(), timezone.utc)

    @property
    def auth_mode(self) -> str:
        o = self.config.office365
        return f"{o.auth} ({o.cloud if not o.authority else 'custom authority'})"

    async def start(self) -> None:
        """Start the periodic check.  The connector entry and the tag group exist already: the LDAP
        process creates them before it starts the worker process this runs in (and the CLI before
        it uses a connector)."""
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self._loop.start(self.check_interval, now=True)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _tick(self) -> Deferred[CheckResult]:
        d = ensureDeferred(self.check())
        d.addErrback(lambda f: log.failure("connector check failed", f))
        return d

    async def check(self) -> CheckResult:
        """Sign in, read the verified domains and the credential's end date; record the outcome."""

        o = self.config.office365
        domains: list[str] = []
        expiry: datetime | None = None
        error: str | None = None
        if await threads.deferToThread(is_deactivated, self.db):
            if self.state != ConnectorState.deactivated:
                log.info("Microsoft 365 connector is deactivated; `ldapsync o365 reactivate` resumes it")
            self.state = ConnectorState.deactivated
            await self._write(ConnectorState.deactivated, None, None, None)
            return CheckResult(self.state, [], None, None)
        if self.provider is not None and self.state in (ConnectorState.needs_reauthorization, ConnectorState.error):
            # What an admin fixes (a new secret or certificate in the file, a new sign-in in the
            # database) is read again, by a new MSAL application (MSAL replays a refusal for 60 s).
            retired, self.provider = self.client, None
        else:
            retired = None
        if self.provider is None:
            try:
                self.build_client()
            except Exception as e:  # unreadable secret file, bad certificate...
                self.state = ConnectorState.error
                error = f"cannot set up the connector: {e}"
                await self._write(ConnectorState.error, None, None, error)
                log.error("Microsoft 365 connector: {error}", error=error)
                return CheckResult(self.state, [], None, error)
        if retired is not None and retired is not self.client:
            await retired.close()
        provider, client = self.provider, self.client
        try:
            assert provider is not None and client is not None    # build_client set both, or we returned
            if o.auth == "delegated":
                assert isinstance(provider, DelegatedTokenProvider)     # what token_provider_from_config makes
                await provider.load()
            await provider.get_token()
            for dom in await client.list_domains():
                if dom.get("isVerified"):
                    domains.append(dom["id"])
            expiry = await self._credential_expiry(client)
            now = self.now()
            if expiry is not None and expiry <= now:
                state = ConnectorState.needs_reauthorization
                error = f"the {'sign-in' if o.auth == 'delegated' else 'client credential'} expired on {expiry:%Y-%m-%d}; " + (
                    REAUTHORIZE_HINT if o.auth == "delegated" else RENEW_CREDENTIAL_HINT)
            else:
                state = ConnectorState.active
        except AuthError as e:
            error = f"sign-in failed: {e}"
            if o.auth == "delegated" and await self._no_sign_in_yet():
                state = ConnectorState.unauthorized
                error = "no admin has signed in yet: run `ldapsync o365 authorize`"
            elif getattr(e, "needs_reauthorization", False):
                state = ConnectorState.needs_reauthorization
                error = f"{error}; {REAUTHORIZE_HINT if o.auth == 'delegated' else RENEW_CREDENTIAL_HINT}"
            else:
                state = ConnectorState.error
        except Forbidden as e:
            state = ConnectorState.error
            error = f"Microsoft Graph refused ({e.code}): {e.message}. Grant Domain.Read.All and User.ReadWrite.All to the app"
        except GraphError as e:
            state = ConnectorState.error
            error = f"Microsoft Graph error {e.code}: {e.message}"
        except Exception as e:  # network trouble
            state = ConnectorState.error
            error = f"Microsoft 365 is unreachable: {e}"
        await self._write(state, domains or None, expiry, error, success=state == ConnectorState.active)
        if state != self.state:
            log.info("Microsoft 365 connector: {old} → {new}{why}", old=self.state.value, new=state.value,
                     why=f" ({error})" if error else "")
        self.state = state
        if state == ConnectorState.needs_reauthorization:
            await self.notices.reauthorization_needed(error or state.value)
        else:
            if state == ConnectorState.active:
                await self.notices.active()
            await self.notices.remind(expiry, self.now())
        return CheckResult(state, domains, expiry, error)

    async def _no_sign_in_yet(self) -> bool:
        return await threads.deferToThread(self.cache_store.load) is None

    async def _credential_expiry(self, client: GraphClient) -> datetime | None:
        p = self.provider
        if self.config.office365.auth == "delegated":
            return getattr(p, "refresh_token_expires_at", None)
        expiry = getattr(p, "credential_expires_at", None)
        if expiry is not None:
            return expiry
        if self.config.office365.client_secret_expires:
            try:
                given = datetime.fromisoformat(self.config.office365.client_secret_expires)
                return given if given.tzinfo else given.replace(tzinfo=timezone.utc)
            except ValueError:
                log.warn("[office365] client_secret_expires is not an ISO date; ignoring it")
        # A client secret's end date is only known to Entra: ask for it (needs Application.Read.All; optional).
        try:
            app = await client.get(f"/applications(appId='{self.config.office365.client_id}')",
                                   {"$select": "passwordCredentials"})
        except GraphError:
            return None
        ends = [c.get("endDateTime") for c in app.get("passwordCredentials", []) if c.get("endDateTime")]
        if not ends:
            return None
        try:
            return max(datetime.fromisoformat(e.replace("Z", "+00:00")) for e in ends)
        except ValueError:
            return None

    async def _write(self, state: ConnectorState, domains: list[str] | None, expiry: datetime | None,
                     error: str | None, *, success: bool = False) -> None:
        values: StatusValues = {
            "o365ConnectorState": [state.value],
            "o365AuthMode": [self.auth_mode],
            "o365LastError": [error] if error else None,
        }
        if domains is not None:
            values["o365VerifiedDomain"] = domains
        if expiry is not None:
            values["o365CredentialExpiry"] = [format_time(expiry.timestamp())]
        if success:
            values["o365LastSuccess"] = [now_generalized()]
        await self.db.run_interaction("connector status", lambda txn: write_status_txn(self.d, txn, values))
