"""Which passwords may reach Microsoft 365, and what is kept or asked for when one cannot.

Owns the planner's password rules (``sync/planner.py`` calls these inside the LDAP write's
transaction, ``sync/graph_mapping.py`` and the worker when they pick the password to push):

- :func:`fit_for_microsoft365`: a cleartext that fails the password policy (or Microsoft 365's
  own complexity rule, which Graph enforces whatever ours says) is never sent to Graph, however
  it got into the directory (a hash loaded by ``ldif load`` and then captured at a bind);
- :func:`ask_for_new_password_txn`: the user is mailed a link to choose a new one instead (at
  most one such mail a day) — the entry is not put in ``o365SyncState: error`` for it;
- :func:`is_sync_user`: only ``ldapsyncUser`` entries have their unbound passwords kept
  (``store/unbound_passwords.py``; ``[office365] unbound_password_ttl``);
- :func:`current_secret`: of a user's queued rows, the sealed password that is the directory's
  *current* one (a later password change without a cleartext — a hash, or a password that
  failed the policy — makes an earlier queued cleartext stale: None then).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ldapsync.directory import policy as pp
from ldapsync.directory.passwords import check_complexity
from ldapsync.directory.hooks import StatusValues
from ldapsync.store import links as links_q
from ldapsync.store import outbox as outbox_q
from ldapsync.store import unbound_passwords as kept_q
from ldapsync.store.database import Txn
from ldapsync.store.entries import Attrs

if TYPE_CHECKING:
    from ldapsync.directory.facade import Directory
    from ldapsync.store.outbox import OutboxRow

# requested_by of the reset link mailed when the directory's password cannot go to Microsoft 365
# (selfservice/links.py words that mail for it)
POLICY_REASON = "password-policy"
# the reason of such a mail when Microsoft 365 itself refused the password (its banned-password list)
REFUSED_REASON = "password-refused"
ASK_AGAIN_AFTER = 24 * 3600.0      # at most one such mail a day per user
# reason of a queued row that says "the password changed, and there is no cleartext to push"
HASH_ONLY_CHANGE = "hash-only"


def is_sync_user(attrs: Attrs | None) -> bool:
    return bool(attrs) and any(v.lower() == "ldapsyncuser" for v in (attrs or {}).get("objectClass", ()))


def fit_for_microsoft365(directory: "Directory", password: str) -> bool:
    """The directory's password policy and Microsoft 365's complexity rule both accept it."""
    return pp.check_quality(directory.policy, password) is None and check_complexity(password) is None


def ask_for_new_password_txn(txn: Txn, entry_uuid: str, now: float, reason: str = POLICY_REASON) -> bool:
    """Mail the user a link to choose a new password (none if one went out in the last day)."""
    if not entry_uuid or links_q.recent_count_txn(txn, entry_uuid, links_q.RESET, now - ASK_AGAIN_AFTER):
        return False
    links_q.queue_txn(txn, entry_uuid, links_q.RESET, now, reason)
    return True


def current_secret(rows: Sequence["OutboxRow"]) -> str | None:
    """The newest queued sealed password, unless a later row says the password changed without one."""
    row = current_secret_row(rows)
    return row.secret if row is not None else None


def current_secret_row(rows: Sequence["OutboxRow"]) -> "OutboxRow | None":
    """The row of :func:`current_secret`."""
    for r in reversed(rows):
        if r.secret:
            return r
        if r.operation == HASH_ONLY_CHANGE:
            return None
    return None


def purge_kept_passwords_txn(txn: Txn, now: float) -> int:
    """Kept passwords of unbound users whose ``unbound_password_ttl`` is up are deleted (the
    worker runs this every few seconds; ``store.unbound_passwords.take_txn`` never hands one
    out past its time either)."""
    return kept_q.purge_txn(txn, now)


def password_fingerprint(attrs: Attrs | None) -> str | None:
    """A short digest of the entry's stored ``userPassword`` values (never the values themselves):
    each queued row carries the one it was planned with (``DesiredUser.password_fp``), so a
    delivery can tell whether the password it pushed is still the directory's."""
    values = (attrs or {}).get("userPassword")
    if not values:
        return None
    return hashlib.sha256("\n".join(sorted(values)).encode("utf-8")).hexdigest()[:16]


def pending_kept_txn(txn: Txn, status: StatusValues, entry_uuid: str, last_id: int,
                     current: Callable[[], Attrs | None] = lambda: None,
                     pushed_fp: str | None = None) -> StatusValues:
    """A delivery's status, without clearing ``o365PasswordPending`` when the user has newer
    queued rows: the planner set the flag for those changes (and cleared it itself when it
    queued a password), so the entry's value is the newer one.  Unless the password just pushed
    (``pushed_fp``) is still the entry's (``current()`` reads its attributes, only then): Microsoft 365 has the
    directory's password, whatever the planner could not know when it planned the newer rows
    (e.g. a binding planned while the create that carried the password was still in flight)."""
    if "o365PasswordPending" not in status or status["o365PasswordPending"] is not None:
        return status
    if pushed_fp is not None and password_fingerprint(current()) == pushed_fp:
        return status
    if not any(r.id > last_id for r in outbox_q.load_user_rows_txn(txn, entry_uuid)):
        return status
    return {k: v for k, v in status.items() if k != "o365PasswordPending"}
