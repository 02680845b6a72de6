"""The Microsoft 365 connector's mails to the admin (``[mail] admin_address``), each sent once.

Owns two notices and the record that they went out (rows of the ``meta`` table):

- **the expiry reminder**, 7 days before the credential expires — the delegated sign-in's refresh
  token (90 days after it was last redeemed) or the app's client secret/certificate; once per expiry
  date (``o365.reminder_sent_for`` = that date);
- **re-authorization needed**, when the connector enters ``needs-reauthorization`` (the sign-in was
  refused, or the credential expired): once until the connector is active again
  (``o365.reauthorization_mailed`` = ``"1"``; back to ``""`` when a check succeeds).

The periodic check, the outbox worker's re-check, the CLI and other nodes may all check at the same
moment: a notice is claimed with a conditional UPDATE of its row before it is sent (PostgreSQL
re-evaluates the second UPDATE's WHERE after the first commits; SQLite has one writer), and the claim
is given back when sending fails so that a later check tries again.  No secret or token is ever put
in a mail.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from twisted.logger import Logger

from ldapsync.directory.policy import format_time
from ldapsync.store import entries as store
from ldapsync.store.database import Database, Txn

if TYPE_CHECKING:
    from ldapsync.mail import Mailer

log = Logger()

META_REMINDER = "o365.reminder_sent_for"
META_REAUTH_MAILED = "o365.reauthorization_mailed"
REMINDER_BEFORE = timedelta(days=7)
NOTICE_KEYS = (META_REMINDER, META_REAUTH_MAILED)


def ensure_notice_rows_txn(txn: Txn) -> None:
    """The rows the claims update (created with the connector's entries at each start, before any
    check; two nodes starting at once may both try)."""
    for key in NOTICE_KEYS:
        txn.run("INSERT INTO meta (key, value) VALUES (?, '') ON CONFLICT (key) DO NOTHING", (key,))


def claim_txn(txn: Txn, key: str, value: str) -> tuple[bool, str]:
    """Set ``key`` to ``value`` unless it already is: (claimed, the previous value)."""
    ensure_notice_rows_txn(txn)
    previous = store.get_meta_txn(txn, key) or ""
    cur = txn.run("UPDATE meta SET value = ? WHERE key = ? AND value <> ?", (value, key, value))
    return int(cur.rowcount or 0) == 1, previous


def unclaim_txn(txn: Txn, key: str, value: str, previous: str) -> None:
    txn.run("UPDATE meta SET value = ? WHERE key = ? AND value = ?", (previous, key, value))


class AdminNotices:
    """Sends the connector's notices through ``mailer`` (nothing when it or the address is unset)."""

    def __init__(self, db: Database, mailer: Mailer | None, admin_address: str, *, delegated: bool) -> None:
        self.db = db
        self.mailer = mailer
        self.to = admin_address
        self.delegated = delegated

    @property
    def enabled(self) -> bool:
        return self.mailer is not None and bool(self.to)

    @property
    def credential(self) -> str:
        return "admin sign-in (refresh token)" if self.delegated else "client secret or certificate"

    @property
    def remedy(self) -> str:
        if self.delegated:
            return ("Run `ldapsync o365 authorize` and sign in again as a Microsoft 365 administrator "
                    "(the new sign-in lasts 90 days from its last use).\n")
        return ("Create a new client secret or certificate for the app in Entra, update the file named in "
                "[office365] of the ldapsync configuration, and run `ldapsync o365 authorize`.\n")

    async def remind(self, expiry: datetime | None, now: datetime) -> None:
        """The expiry reminder, when ``expiry`` is within 7 days of ``now`` (once per expiry date)."""
        if expiry is None or not self.enabled or now < expiry - REMINDER_BEFORE:
            return
        past = expiry <= now
        subject = f"ldapsync: the Microsoft 365 connector's {self.credential} {'has expired' if past else 'expires soon'}"
        text = (
            f"The {self.credential} the ldapsync Microsoft 365 connector uses {'expired' if past else 'expires'} "
            f"on {expiry.astimezone(timezone.utc):%Y-%m-%d %H:%M} UTC.\n\n" + self.remedy
            + ("Until then, changes for Microsoft 365 wait in the queue; nothing is lost.\n" if past else
               "Should it expire, changes for Microsoft 365 wait in the queue until then; nothing is lost.\n"))
        await self._send_once(META_REMINDER, format_time(expiry.timestamp()), subject, text, "the connector expiry reminder")

    async def reauthorization_needed(self, reason: str) -> None:
        """The connector entered ``needs-reauthorization`` (once until it is active again)."""
        if not self.enabled:
            return
        subject = "ldapsync: the Microsoft 365 connector needs " + (
            "an administrator to sign in again" if self.delegated else "a new client secret or certificate")
        text = (f"Microsoft 365 refused the ldapsync connector's {self.credential}:\n\n    {reason}\n\n"
                + self.remedy
                + "Until then, changes for Microsoft 365 wait in the queue (nothing is lost) and LDAP keeps "
                  "working. `ldapsync o365 status` shows the connector's state.\n")
        await self._send_once(META_REAUTH_MAILED, "1", subject, text, "the re-authorization notice")

    async def active(self) -> None:
        """The connector is active: a later refusal is mailed again."""
        if not self.enabled:
            return
        mailed = await self.db.run_interaction("reauthorization mailed?", store.get_meta_txn, META_REAUTH_MAILED,
                                               write=False)
        if mailed:
            await self.db.run_interaction("reauthorization resolved", unclaim_txn, META_REAUTH_MAILED, mailed, "")

    async def _send_once(self, key: str, value: str, subject: str, text: str, what: str) -> None:
        assert self.mailer is not None          # the callers check self.enabled first
        current = await self.db.run_interaction(f"{what}?", store.get_meta_txn, key, write=False)
        if current == value:
            return
        claimed, previous = await self.db.run_interaction(f"{what} claim", claim_txn, key, value)
        if not claimed:
            return
        try:
            await self.mailer.send(self.to, subject, text)
        except Exception as e:  # noqa: BLE001  (SMTP trouble: a later check tries again)
            log.warn("could not send {what}: {error}", what=what, error=str(e))
            await self.db.run_interaction(f"{what} unclaim", unclaim_txn, key, value, previous)
            return
        log.info("sent {what} to {to}", what=what, to=self.to)
