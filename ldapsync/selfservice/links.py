"""One-time links by e-mail: activation of new users and forgotten-password resets.

Owns when a link is due (a user became bound to Microsoft 365 without a usable
password; an admin ran ``ldapsync user invite``; a user asked for a reset), the
mails, and using a link to set a password.  The rows live in
``selfservice_links`` (``ldapsync/store/links.py``); the password itself is set
by :meth:`Directory.set_password`, in the same transaction that marks the link
used, so the password, its Microsoft 365 outbox row and the used link commit
together or not at all.

::

    bind of an inactive user ──▶ ActivationHook.on_change_txn (a write hook: inside the write's transaction)
    `ldapsync user invite DN` ─┐        └─ INSERT selfservice_links (queued)
    forgotten-password page  ──┴──────────────┐   (active users; inactive ones only with a pending invitation)
                                              ▼
    LinkSender.send_due  (after COMMIT, and every few seconds: rows queued by the CLI)
       claim (lease) ─▶ new token, store sha256 ─▶ COMMIT ─▶ SMTP ─▶ state=sent, ldapsyncActivationExpires
    /activate?token=…  ─▶ LinkService.lookup (clear page for used / expired / forged)
       POST ─▶ Directory.set_password(in_txn=consume): link used + password + outbox row, one COMMIT

Tokens are 32 random bytes (URL-safe base64); only their SHA-256 is stored, so
a copy of the database cannot be turned into working links.  A token is never
logged.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.logger import Logger

from ldapsync.clock import Clock, system_clock
from ldapsync.directory.binding import is_bound
from ldapsync.directory.core import Actor
from ldapsync.directory.dn import DN
from ldapsync.directory.errors import LDAPError, ResultCode
from ldapsync.directory.hooks import ChangeSet, Origin
from ldapsync.directory.policy import format_time
from ldapsync.mail import Mailer, MailError
from ldapsync.store import entries as store
from ldapsync.store import links as links_q
from ldapsync.store.database import Txn
from ldapsync.store.entries import Attrs, StoredEntry, first
from ldapsync.sync.password_plan import POLICY_REASON, REFUSED_REASON
from ldapsync.sync.status import entry_by_uuid_txn, write_user_status_txn

if TYPE_CHECKING:
    from ldapsync.directory.facade import Directory
    from ldapsync.sync.planner import OutboxPlanner

log = Logger()

SEND_LEASE = 120.0          # a node mailing a link holds it this long
RETRY_DELAYS = (30.0, 120.0, 600.0, 1800.0, 3600.0)   # then give up (state failed, shown by the CLI)
MAX_ATTEMPTS = len(RETRY_DELAYS) + 1
RESETS_PER_HOUR = 3         # forgotten-password mails per user per hour
OPERATION = "selfservice"   # Write operation of the link bookkeeping on entries


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


def human_time(t: float) -> str:
    return time.strftime("%A %d %B %Y, %H:%M UTC", time.gmtime(t))


def is_person(attrs: Attrs) -> bool:
    return any(oc.lower() in ("person", "inetorgperson", "organizationalperson") for oc in attrs.get("objectClass", ()))


class LinkProblem(Exception):
    """Why a link cannot be used; ``kind`` picks the page (unknown, used, expired, revoked, failed)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


@dataclass(frozen=True)
class LinkInfo:
    """What the page shows about a valid link (never the token)."""

    link_id: int
    purpose: str
    dn: str
    uid: str
    display_name: str
    mail: str | None
    expires_at: float
    microsoft365: bool = False      # bound to Microsoft 365 (the page then names the sign-in there)


class LinkService:
    """Queues, sends and consumes links (see the module docstring)."""

    def __init__(self, directory: Directory, mailer: Mailer | None, *, clock: Clock | None = None) -> None:
        self.directory = directory
        self.config = directory.config.selfservice
        self.mailer = mailer
        self.clock: Clock = clock or getattr(directory, "clock", None) or system_clock()
        self._sending = False
        self._again = False

    # -- helpers ------------------------------------------------------------------
    def now(self) -> float:
        return float(self.clock.now())

    def entry_by_uuid_txn(self, txn: Txn, entry_uuid: str) -> StoredEntry | None:
        return entry_by_uuid_txn(self.directory, txn, entry_uuid)

    def microsoft365_sign_in(self, attrs: Attrs) -> bool:
        """Whether the user signs in to Microsoft 365 (the mail and the page then say as whom)."""
        return self.directory.config.office365.enabled and is_bound(self.directory, attrs)

    def address_for(self, attrs: Attrs) -> str | None:
        """Link mails go to the alternate address when the entry has one (a new Microsoft 365
        mailbox cannot be read before the password exists, nor a forgotten one's), else to mail."""
        alt_attr = self.config.alternate_mail_attribute
        return (first(attrs, alt_attr) if alt_attr else None) or first(attrs, "mail")

    def find_login_txn(self, txn: Txn, login: str) -> StoredEntry | None:
        """The one person whose uid or mail is ``login`` (None when none or ambiguous)."""
        d = self.directory
        login = login.strip()
        if not login or len(login) > 256:
            return None
        found: dict[int, StoredEntry] = {}
        for attr in ("uid", "mail"):
            for key, norm in d.index_rows({attr: [login]}):
                for e in store.get_entries_by_id_txn(txn, store.ids_with_value_txn(txn, key, norm)):
                    if is_person(e.attrs) and any(v.lower() == login.lower() for v in e.attrs.get(attr, ())):
                        found[e.id] = e
        if len(found) != 1:
            return None
        e = next(iter(found.values()))
        if e.dn_norm == d.dn(d.config.admin_dn).norm:
            return None              # the directory admin has no self-service
        return e

    # -- queueing -------------------------------------------------------------------
    def queue_txn(self, txn: Txn, attrs: Attrs, purpose: str, requested_by: str) -> int:
        entry_uuid = first(attrs, "entryUUID")
        if not entry_uuid:
            raise LDAPError(ResultCode.unwillingToPerform, "the entry has no entryUUID")
        link_id = links_q.queue_txn(txn, entry_uuid, purpose, self.now(), requested_by)
        txn.call_after(self.wake)
        return link_id

    async def invite(self, dn_text: str, requested_by: str) -> str:
        """``ldapsync user invite``: queue (or re-send) the activation mail; returns the address."""
        d = self.directory
        dn = d.dn(dn_text)

        def run(txn: Txn) -> str:
            e = store.get_entry_txn(txn, dn.norm)
            if e is None:
                raise LDAPError(ResultCode.noSuchObject, f'no entry "{dn}"')
            if not is_person(e.attrs) or not first(e.attrs, "uid"):
                raise LDAPError(ResultCode.unwillingToPerform, f'"{dn}" is not a user with a uid')
            if e.attrs.get("userPassword"):
                raise LDAPError(ResultCode.unwillingToPerform,
                                f'"{dn}" already has a password (it is active); the user can use the '
                                "forgotten-password page instead")
            to = self.address_for(e.attrs)
            if not to:
                alt = self.config.alternate_mail_attribute
                raise LDAPError(ResultCode.unwillingToPerform,
                                f'"{dn}" has no mail{" or " + alt if alt else ""} to send the activation link to')
            self.queue_txn(txn, e.attrs, links_q.ACTIVATE, requested_by)
            return to

        return await d.db.run_interaction("invite", run)

    def pending_invitation_txn(self, txn: Txn, entry_uuid: str) -> bool:
        """Whether the user has an activation link that is still on its way or still works."""
        now = self.now()
        return any(row.purpose == links_q.ACTIVATE and (row.expires_at is None or row.expires_at > now)
                   for row in links_q.live_txn(txn, entry_uuid))

    async def request_reset(self, login: str, requested_by: str) -> bool:
        """The forgotten-password form: queue a link if ``login`` names an active user (the page
        says the same whatever the case).  A user without a password is inactive: only one with a
        pending invitation gets its activation link again; anyone else gets nothing, since a link
        would activate an account nobody invited."""

        def run(txn: Txn) -> bool:
            e = self.find_login_txn(txn, login)
            if e is None or not self.address_for(e.attrs):
                return False
            entry_uuid = first(e.attrs, "entryUUID") or ""
            if e.attrs.get("userPassword"):
                purpose = links_q.RESET
            elif entry_uuid and self.pending_invitation_txn(txn, entry_uuid):
                purpose = links_q.ACTIVATE
            else:
                log.info("forgotten-password request for {dn} ignored: the account is inactive and not invited",
                         dn=e.dn)
                return False
            if links_q.recent_count_txn(txn, entry_uuid, purpose, self.now() - 3600) >= RESETS_PER_HOUR:
                log.info("forgotten-password request for {dn} ignored: {n} links in the last hour",
                         dn=e.dn, n=RESETS_PER_HOUR)
                return False
            self.queue_txn(txn, e.attrs, purpose, requested_by)
            return True

        return await self.directory.db.run_interaction("reset request", run)

    async def pending(self) -> list[tuple[links_q.LinkRow, str | None]]:
        """Live links with the DN they belong to (for `ldapsync user invitations`)."""

        def run(txn: Txn) -> list[tuple[links_q.LinkRow, str | None]]:
            out = []
            for row in links_q.live_txn(txn):
                e = self.entry_by_uuid_txn(txn, row.entry_uuid)
                out.append((row, e.dn if e else None))
            return out

        return await self.directory.db.run_interaction("invitations", run, write=False)

    # -- sending ----------------------------------------------------------------------
    def wake(self) -> None:
        if self.mailer is None:
            return
        if self._sending:
            self._again = True
            return
        d = defer.ensureDeferred(self.send_due())
        d.addErrback(lambda f: log.failure("sending self-service links failed", f))

    async def send_due(self) -> int:
        """Mail every due link; returns how many were sent."""
        if self.mailer is None or self._sending:
            self._again = True
            return 0
        self._sending = True
        sent = 0
        try:
            while True:
                self._again = False
                ids = await self.directory.db.run_interaction("due links", links_q.due_ids_txn, self.now(), write=False)
                for link_id in ids:
                    sent += await self._send_one(link_id)
                if not ids and not self._again:
                    return sent
        finally:
            self._sending = False

    async def _send_one(self, link_id: int) -> int:
        token = secrets.token_urlsafe(32)
        now = self.now()

        def claim(txn: Txn) -> tuple[links_q.LinkRow, Attrs] | None:
            row = links_q.claim_txn(txn, link_id, now, SEND_LEASE)
            if row is None:
                return None
            e = self.entry_by_uuid_txn(txn, row.entry_uuid)
            if e is None:
                links_q.mark_failed_txn(txn, link_id, "the entry no longer exists", retry_at=None)
                return None
            if row.purpose != links_q.WELCOME:
                ttl = self.config.activation_ttl if row.purpose == links_q.ACTIVATE else self.config.reset_ttl
                links_q.issue_txn(txn, link_id, hash_token(token), now + ttl)
            return row, e.attrs

        got = await self.directory.db.run_interaction("claim link", claim)
        if got is None:
            return 0
        row, attrs = got
        to = self.address_for(attrs)
        ttl = self.config.activation_ttl if row.purpose == links_q.ACTIVATE else self.config.reset_ttl
        error: str | None = None
        permanent = False
        if not to:
            error, permanent = "the user has no e-mail address", True
        else:
            subject, text = self.compose(row.purpose, attrs, token, now + ttl, reason=row.requested_by or "")
            try:
                assert self.mailer is not None
                await self.mailer.send(to, subject, text)
            except MailError as e:
                error, permanent = str(e), not getattr(e, "transient", True)
            except ValueError as e:
                error, permanent = f"cannot mail {to!r}: {e}", True
        token = ""                     # the only copy is in the mail now
        if error is not None:
            retry_at = None if permanent or row.attempts >= MAX_ATTEMPTS else now + RETRY_DELAYS[row.attempts - 1]
            log.warn("{purpose} mail for {uuid} not sent: {error}{retry}", purpose=row.purpose, uuid=row.entry_uuid,
                     error=error, retry="" if retry_at is None else "; will retry")
            await self.directory.db.run_interaction("link failed", links_q.mark_failed_txn, link_id, error, retry_at=retry_at)
            return 0
        assert to is not None
        expires = now + ttl

        def done(txn: Txn) -> None:
            if row.purpose == links_q.WELCOME:
                links_q.mark_done_txn(txn, link_id, self.now(), to)
                return
            if not links_q.mark_sent_txn(txn, link_id, self.now(), to):
                return
            if row.purpose == links_q.ACTIVATE:
                write_user_status_txn(self.directory, txn, row.entry_uuid,
                                      {"ldapsyncActivationExpires": [format_time(expires)]}, OPERATION, Origin.LINKS)

        await self.directory.db.run_interaction("link sent", done)
        log.info("{purpose} link mailed for {uuid} to {to}", purpose=row.purpose, uuid=row.entry_uuid, to=to)
        return 1

    def compose(self, purpose: str, attrs: Attrs, token: str, expires_at: float, *, reason: str = "") -> tuple[str, str]:
        base = self.config.public_url.rstrip("/")
        name = first(attrs, "givenName") or first(attrs, "displayName") or first(attrs, "cn") or ""
        uid = first(attrs, "uid") or ""
        mail = first(attrs, "mail")
        admin = self.directory.config.mail.admin_address
        help_line = f"If it has expired, ask your IT team{f' ({admin})' if admin else ''} for a new one."
        if purpose == links_q.ACTIVATE:
            subject = "Activate your account"
            signin = (f" You will sign in to Microsoft 365 as {mail}."
                      if mail and self.microsoft365_sign_in(attrs) else "")
            text = (f"Hello {name},\n\n"
                    f"An account has been set up for you. Your user name is {uid}.{signin}\n\n"
                    "To choose your password and activate the account, open this link:\n\n"
                    f"{base}/activate?token={token}\n\n"
                    f"The link works once, until {human_time(expires_at)}. {help_line}\n\n"
                    "If you did not expect this message, you can ignore it.\n")
        elif purpose == links_q.WELCOME:
            subject = "Your Microsoft 365 account is ready"
            text = (f"Hello {name},\n\n"
                    f"Your Microsoft 365 account {mail or uid} has been created. It uses your usual password "
                    f"(user name {uid}), but Microsoft 365 does not have it yet.\n\n"
                    "Sign in once here, and your password goes to Microsoft 365 within a minute:\n\n"
                    f"{base}/signin\n\n"
                    "Until then, signing in to Microsoft 365 does not work. Signing in to any company "
                    "application that uses the directory does the same.\n")
        elif reason == POLICY_REASON:       # the directory's password cannot go to Microsoft 365
            subject = "Please choose a new password"
            text = (f"Hello {name},\n\n"
                    f"The password of your account {uid} does not meet the password rules, so it cannot be "
                    "used for Microsoft 365. Your account stays as it is until you choose a new one.\n\n"
                    "To choose a new password, open this link:\n\n"
                    f"{base}/reset?token={token}\n\n"
                    f"The link works once, until {human_time(expires_at)}. {help_line}\n")
        elif reason == REFUSED_REASON:      # Microsoft 365 refused it (its banned-password list)
            subject = "Please choose a new password"
            text = (f"Hello {name},\n\n"
                    f"Microsoft 365 refused the password of your account {uid}: it is on Microsoft's list of "
                    "passwords too easy to guess. Your account stays as it is until you choose a new one.\n\n"
                    "To choose a new password, open this link:\n\n"
                    f"{base}/reset?token={token}\n\n"
                    f"The link works once, until {human_time(expires_at)}. {help_line}\n")
        else:
            subject = "Reset your password"
            text = (f"Hello {name},\n\n"
                    f"Someone (hopefully you) asked to reset the password of the account {uid}.\n\n"
                    "To choose a new password, open this link:\n\n"
                    f"{base}/reset?token={token}\n\n"
                    f"The link works once, until {human_time(expires_at)}. "
                    "If you did not ask for it, ignore this message: your password stays as it is.\n")
        return subject, text

    # -- using a link -------------------------------------------------------------------
    def _check_txn(self, txn: Txn, token: str, purpose: str) -> tuple[links_q.LinkRow, StoredEntry]:
        if not token or len(token) > 200:
            raise LinkProblem("unknown")
        row = links_q.find_by_hash_txn(txn, hash_token(token))
        if row is None or row.purpose != purpose:
            raise LinkProblem("unknown")
        if row.state == links_q.USED:
            raise LinkProblem("used")
        if row.state not in links_q.USABLE:         # queued: mailed, its "sent" not yet recorded
            raise LinkProblem("revoked")
        if row.expires_at is None or row.expires_at <= self.now():
            raise LinkProblem("expired")
        e = self.entry_by_uuid_txn(txn, row.entry_uuid)
        if e is None:
            raise LinkProblem("unknown")
        return row, e

    async def lookup(self, token: str, purpose: str) -> LinkInfo:
        """The link's user, or :class:`LinkProblem`."""

        def run(txn: Txn) -> LinkInfo:
            row, e = self._check_txn(txn, token, purpose)
            return LinkInfo(row.id, row.purpose, e.dn, first(e.attrs, "uid") or "",
                            first(e.attrs, "displayName") or first(e.attrs, "cn") or "",
                            first(e.attrs, "mail"), row.expires_at or 0.0, self.microsoft365_sign_in(e.attrs))

        return await self.directory.db.run_interaction("link lookup", run, write=False)

    async def use(self, token: str, purpose: str, new_password: str) -> LinkInfo:
        """Set the password with a link: policy checks, the password, its Microsoft 365 outbox row
        and the link marked used, in one transaction.  Raises LinkProblem or LDAPError."""
        info = await self.lookup(token, purpose)
        d = self.directory
        dn = d.dn(info.dn)

        def consume(txn: Txn, entry: StoredEntry) -> None:
            row, e = self._check_txn(txn, token, purpose)     # again, inside the write transaction
            if row.id != info.link_id or e.dn_norm != dn.norm or not links_q.use_txn(txn, row.id, self.now()):
                raise LinkProblem("used")

        await d.set_password(Actor(dn, False), info.dn, new_password, in_txn=consume, operation=f"{purpose}-link",
                             origin=Origin.PAGES)
        return info


class ActivationHook:
    """Write hook (:class:`~ldapsync.directory.hooks.WriteHooks`, inside each write's transaction
    whose origin queues activation): a user who becomes bound to Microsoft 365 without a usable
    password gets an activation link; a user who gets a password any other way no longer needs
    one (its live activation link is revoked)."""

    def __init__(self, links: LinkService, planner: OutboxPlanner) -> None:
        self.links = links
        self.planner = planner

    async def on_bind(self, dn: DN, password: bytes) -> None:
        """Nothing to do at bind."""

    def on_change_txn(self, txn: Txn, cs: ChangeSet) -> None:
        if not cs.origin.queues_activation:
            return
        for ch in cs.changes:
            old, new = ch.old, ch.new
            if ch.kind == "delete":
                uuid = first(old, "entryUUID")
                if uuid:
                    links_q.revoke_txn(txn, uuid)
                continue
            if new is None:
                continue
            has_pw = bool(new.get("userPassword"))
            if has_pw and new.get("ldapsyncActivationExpires") and not (old or {}).get("userPassword"):
                links_q.revoke_txn(txn, first(new, "entryUUID") or "", links_q.ACTIVATE)
                cs.request_status(ch.dn_norm, {"ldapsyncActivationExpires": None})
                continue
            if (not has_pw and is_person(new) and self.planner.is_bound(new) and not self.planner.is_bound(old)
                    and (first(new, "mail") or first(new, self.links.config.alternate_mail_attribute or "mail"))):
                self.links.queue_txn(txn, new, links_q.ACTIVATE, cs.actor_dn or "")
