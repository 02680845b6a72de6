"""SQL for self-service one-time links (``selfservice_links``): activation and password reset.

SQL only: no mail, no HTTP, no tokens in clear.  A link's life::

    queue_txn      state=queued  (in the transaction that made it necessary: a bind, `user invite`,
                                  a forgotten-password request); earlier live links of the
                                  same purpose for that user are revoked
    claim_txn      queued + due → next_attempt_at pushed forward (a short lease: one node sends it)
    issue_txn      token_hash + expires_at set (a fresh token each attempt: a link is only ever
                   valid once it has been mailed)
    mark_sent_txn  state=sent          mark_failed_txn  back to queued later, or failed
    use_txn        state=used (the password was set in the same transaction); a queued link
                   with its token issued counts as sent: the mail can be read and the link
                   opened before the sender has recorded it (then mark_sent_txn finds it used)
    revoke_txn     state=revoked (a newer link, or the user got a password another way)

Only the SHA-256 of a token is stored (``token_hash``); the token itself exists
in the e-mail and, for the duration of a send, in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ldapsync.store.database import Txn

QUEUED = "queued"
SENT = "sent"
USED = "used"
REVOKED = "revoked"
FAILED = "failed"
LIVE = (QUEUED, SENT, FAILED)
USABLE = (QUEUED, SENT)          # with a token_hash: the token was issued for a mail

ACTIVATE = "activate"
RESET = "reset"
WELCOME = "welcome"     # no link: "sign in once so Microsoft 365 gets your password" (no token)

_COLS = ("id, entry_uuid, purpose, state, token_hash, created_at, expires_at, sent_at, used_at, sent_to, "
         "requested_by, attempts, next_attempt_at, last_error")


@dataclass(frozen=True)
class LinkRow:
    id: int
    entry_uuid: str
    purpose: str
    state: str
    token_hash: str | None
    created_at: float
    expires_at: float | None
    sent_at: float | None
    used_at: float | None
    sent_to: str | None
    requested_by: str | None
    attempts: int
    next_attempt_at: float
    last_error: str | None

    def __repr__(self) -> str:          # the hash is not a secret, but keep reprs short
        return f"LinkRow(id={self.id}, entry_uuid={self.entry_uuid!r}, purpose={self.purpose!r}, state={self.state!r})"


def _row(r: Sequence[Any]) -> LinkRow:
    return LinkRow(*r)


def queue_txn(txn: Txn, entry_uuid: str, purpose: str, now: float, requested_by: str = "") -> int:
    """A new link to send; earlier live links of this purpose for the user stop working."""
    revoke_txn(txn, entry_uuid, purpose)
    cur = txn.run("INSERT INTO selfservice_links (entry_uuid, purpose, state, created_at, requested_by, attempts, "
                  "next_attempt_at) VALUES (?, ?, ?, ?, ?, 0, ?) RETURNING id",
                  (entry_uuid, purpose, QUEUED, now, requested_by or None, now))
    return int(cur.fetchone()[0])


def revoke_txn(txn: Txn, entry_uuid: str, purpose: str | None = None) -> int:
    """Live links of the user (of one purpose, or all) stop working; returns how many.  The hash
    stays, so that the page can say "replaced" rather than "not valid"."""
    if purpose is None:
        cur = txn.run("UPDATE selfservice_links SET state = ? WHERE entry_uuid = ? "
                      "AND state IN (?, ?, ?)", (REVOKED, entry_uuid, *LIVE))
    else:
        cur = txn.run("UPDATE selfservice_links SET state = ? WHERE entry_uuid = ? AND purpose = ? "
                      "AND state IN (?, ?, ?)", (REVOKED, entry_uuid, purpose, *LIVE))
    return int(cur.rowcount or 0)


def due_ids_txn(txn: Txn, now: float, limit: int = 50) -> list[int]:
    return [int(r[0]) for r in txn.rows("SELECT id FROM selfservice_links WHERE state = ? AND next_attempt_at <= ? "
                                        "ORDER BY id LIMIT ?", (QUEUED, now, limit))]


def claim_txn(txn: Txn, link_id: int, now: float, lease: float) -> LinkRow | None:
    """Take a due link for ``lease`` seconds (so that exactly one node mails it)."""
    cur = txn.run("UPDATE selfservice_links SET next_attempt_at = ?, attempts = attempts + 1 "
                  "WHERE id = ? AND state = ? AND next_attempt_at <= ?", (now + lease, link_id, QUEUED, now))
    if not cur.rowcount:
        return None
    return get_txn(txn, link_id)


def get_txn(txn: Txn, link_id: int) -> LinkRow | None:
    rows = txn.rows(f"SELECT {_COLS} FROM selfservice_links WHERE id = ?", (link_id,))
    return _row(rows[0]) if rows else None


def issue_txn(txn: Txn, link_id: int, token_hash: str, expires_at: float) -> bool:
    cur = txn.run("UPDATE selfservice_links SET token_hash = ?, expires_at = ? WHERE id = ? AND state = ?",
                  (token_hash, expires_at, link_id, QUEUED))
    return bool(cur.rowcount)


def mark_sent_txn(txn: Txn, link_id: int, now: float, sent_to: str) -> bool:
    cur = txn.run("UPDATE selfservice_links SET state = ?, sent_at = ?, sent_to = ?, last_error = NULL "
                  "WHERE id = ? AND state = ?", (SENT, now, sent_to, link_id, QUEUED))
    return bool(cur.rowcount)


def mark_failed_txn(txn: Txn, link_id: int, error: str, *, retry_at: float | None) -> None:
    """A send failed: try again at ``retry_at``, or give up (None) and show the error."""
    if retry_at is None:
        txn.run("UPDATE selfservice_links SET state = ?, token_hash = NULL, last_error = ? WHERE id = ? AND state = ?",
                (FAILED, error[:500], link_id, QUEUED))
    else:
        txn.run("UPDATE selfservice_links SET token_hash = NULL, last_error = ?, next_attempt_at = ? "
                "WHERE id = ? AND state = ?", (error[:500], retry_at, link_id, QUEUED))


def mark_done_txn(txn: Txn, link_id: int, now: float, sent_to: str) -> bool:
    """A mail without a link (welcome) was sent: nothing is left to use."""
    cur = txn.run("UPDATE selfservice_links SET state = ?, sent_at = ?, used_at = ?, sent_to = ?, last_error = NULL "
                  "WHERE id = ? AND state = ?", (USED, now, now, sent_to, link_id, QUEUED))
    return bool(cur.rowcount)


def find_by_hash_txn(txn: Txn, token_hash: str) -> LinkRow | None:
    rows = txn.rows(f"SELECT {_COLS} FROM selfservice_links WHERE token_hash = ?", (token_hash,))
    return _row(rows[0]) if rows else None


def use_txn(txn: Txn, link_id: int, now: float) -> bool:
    """Mark a mailed link used; False when another request used it first."""
    cur = txn.run("UPDATE selfservice_links SET state = ?, used_at = ? WHERE id = ? AND state IN (?, ?) "
                  "AND token_hash IS NOT NULL", (USED, now, link_id, *USABLE))
    return bool(cur.rowcount)


def live_txn(txn: Txn, entry_uuid: str | None = None) -> list[LinkRow]:
    """Links not yet used, revoked or given up (for `ldapsync user invitations`)."""
    if entry_uuid is None:
        rows = txn.rows(f"SELECT {_COLS} FROM selfservice_links WHERE state IN (?, ?, ?) ORDER BY id", LIVE)
    else:
        rows = txn.rows(f"SELECT {_COLS} FROM selfservice_links WHERE entry_uuid = ? AND state IN (?, ?, ?) "
                        "ORDER BY id", (entry_uuid, *LIVE))
    return [_row(r) for r in rows]


def recent_count_txn(txn: Txn, entry_uuid: str, purpose: str, since: float) -> int:
    """Links of this purpose queued for the user since ``since`` (rate limit on reset requests)."""
    return int(txn.rows("SELECT COUNT(*) FROM selfservice_links WHERE entry_uuid = ? AND purpose = ? AND created_at >= ?",
                        (entry_uuid, purpose, since))[0][0])
