"""The self-service part of the twistd service tree: pages, link mails, expiry warnings.

::

    SelfServiceService (MultiService)
      ├─ the pages on [selfservice] listen   (web.py; none when listen = "")
      ├─ every few seconds + after COMMIT:   LinkService.send_due   (links.py)
      └─ every expiry_check_interval:        ExpiryWarner.run_once  (mails "your password expires on …")

The activation hook (``links.py: ActivationHook``) is not installed here: the
wiring hands it to the directory with the outbox planner
(``ldapsync/services.py: office365_hooks``), in the server with this service's
:class:`LinkService` (so a link queued by an LDAP write is mailed right after
COMMIT) and in the CLI too (so a user bound by ``ldapsync ldif load`` gets an
activation link just like one bound over LDAP).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ldapsync.directory import policy as pp
from ldapsync.directory.hooks import Origin
from ldapsync.selfservice.links import (
    OPERATION,
    LinkService,
    human_time,
)
from ldapsync.listeners import Listener
from ldapsync.store import entries as store
from ldapsync.store.entries import first
from ldapsync.sync.status import write_user_status_txn
from ldapsync.secretbox import load_or_create_key
from ldapsync.mail import MailError, Mailer
from ldapsync.selfservice.web import make_site

if TYPE_CHECKING:
    from ldapsync.config import PolicyConfig
    from ldapsync.directory.facade import Directory
    from ldapsync.store.database import Txn

log = Logger()

SEND_POLL = 3.0            # seconds: links queued by another process (the CLI, another node)
SCAN_BATCH = 1000


def due_warnings_txn(txn: Txn, after_path: str, limit: int, policy: PolicyConfig, now: float,
                     admin_norm: str) -> tuple[str | None, list[tuple[str, dict[str, list[str]], float]]]:
    """One batch of the expiry scan: ``(path to continue after, or None at the end, [(dn, attrs,
    expires_at)] of the entries due a warning)``.

    Due: a password with a pwdChangedTime that expires within ``expire_warning`` from ``now``
    and was not warned about yet (``ldapsyncExpiryWarned`` holds the pwdChangedTime warned
    for).  The admin is exempt from expiry.  Pure (runs on a pool thread): no directory state.
    """
    batch = store.all_entries_txn(txn, after_path, limit)
    if not batch:
        return None, []
    due = []
    for e in batch:
        attrs = e.attrs
        changed = first(attrs, "pwdChangedTime")
        if not attrs.get("userPassword") or not changed:
            continue
        exp = pp.expires_at(policy, attrs, exempt=e.dn_norm == admin_norm)
        if exp is None or not (now < exp <= now + policy.expire_warning):
            continue
        if first(attrs, "ldapsyncExpiryWarned") == changed:
            continue
        due.append((e.dn, attrs, exp))
    return batch[-1].path, due


class ExpiryWarner:
    """Mails each user once per password, ``expire_warning`` before it expires."""

    def __init__(self, directory: Directory, links: LinkService) -> None:
        self.directory = directory
        self.links = links

    async def run_once(self) -> int:
        d = self.directory
        policy = d.policy
        if not getattr(policy, "max_age", 0) or not getattr(policy, "expire_warning", 0) or self.links.mailer is None:
            return 0
        now = self.links.now()
        due: list[tuple[str, dict[str, list[str]], float]] = []
        after = ""
        while True:
            # The per-entry test runs in the scan's transaction, on the pool thread: with 10,000
            # users it took over a second of the reactor's time, and LDAP answers waited for it.
            after, found = await d.db.run_interaction(
                "expiry scan", due_warnings_txn, after, SCAN_BATCH, policy, now, d.admin_dn.norm, write=False)
            due.extend(found)
            if after is None:
                break
        sent = 0
        for dn, attrs, exp in due:
            to = self.links.address_for(attrs)
            if not to:
                continue
            try:
                await self.links.mailer.send(to, *self.compose(attrs, exp))  # type: ignore[union-attr]
            except Exception as e:      # noqa: BLE001 - a bad address must not stop the others
                log.warn("password-expiry warning for {dn} not sent: {error}", dn=dn, error=str(e))
                continue
            warned = {"ldapsyncExpiryWarned": [first(attrs, "pwdChangedTime") or ""]}
            await d.db.run_interaction("expiry warned", lambda txn, a=attrs, v=warned: write_user_status_txn(
                d, txn, first(a, "entryUUID") or "", v, OPERATION, Origin.LINKS))
            sent += 1
        if sent:
            log.info("sent {n} password-expiry warning(s)", n=sent)
        return sent

    def compose(self, attrs: dict[str, list[str]], expires_at: float) -> tuple[str, str]:
        base = self.links.config.public_url.rstrip("/")
        name = first(attrs, "givenName") or first(attrs, "displayName") or first(attrs, "cn") or ""
        days = max(1, round((expires_at - self.links.now()) / 86400))
        return (f"Your password expires in {days} day{'s' if days != 1 else ''}",
                (f"Hello {name},\n\n"
                 f"The password of your account {first(attrs, 'uid') or ''} expires on {human_time(expires_at)}.\n\n"
                 f"Choose a new one before then at {base}/signin (sign in, then \"Change your password\").\n"
                 "The new password is used for Microsoft 365 too.\n\n"
                 "After it has expired you can still sign in there once to choose a new one.\n"))


class SelfServiceService(service.MultiService):
    def __init__(self, directory: Directory, *, reactor: Any = None) -> None:
        super().__init__()

        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.directory = directory
        cfg = directory.config
        try:
            mailer: Any = Mailer(cfg.mail, reactor=reactor, attempts=2)
        except (MailError, ValueError) as e:
            log.error("[mail] is not usable, so activation and password mails cannot be sent: {error}", error=str(e))
            mailer = None
        self.links = LinkService(directory, mailer)
        self.warner = ExpiryWarner(directory, self.links)
        if cfg.selfservice.listen:

            site = make_site(directory, self.links, load_or_create_key(cfg.secrets.key_file))
            Listener(cfg.selfservice.listen, site, "[selfservice] listen").setServiceParent(self)
        self._loops: list[LoopingCall] = []

    def startService(self) -> None:
        super().startService()
        for fn, interval in ((self._send, SEND_POLL), (self._warn, self.directory.config.selfservice.expiry_check_interval)):
            loop = LoopingCall(fn)
            loop.clock = self.reactor
            loop.start(interval, now=True).addErrback(lambda f: log.failure("self-service loop stopped", f))
            self._loops.append(loop)
        if self.directory.config.selfservice.listen:
            log.info("self-service pages at {url}", url=self.directory.config.selfservice.public_url)

    def _send(self) -> Any:
        d = defer.ensureDeferred(self.links.send_due())
        d.addErrback(lambda f: log.failure("sending self-service links failed", f))
        return d

    def _warn(self) -> Any:
        d = defer.ensureDeferred(self.warner.run_once())
        d.addErrback(lambda f: log.failure("password-expiry warnings failed", f))
        return d

    def stopService(self) -> Any:
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops.clear()
        if self.links.mailer is not None:
            self.links.mailer.stop()
        return super().stopService()

