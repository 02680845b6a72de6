"""SQL for the passwords of unbound users kept for a while (``o365_unbound_passwords``).

SQL only: no encryption (the planner, ``sync/planner.py``, hands in the sealed value and says
when; the worker purges), no Graph.  One row per user (``entry_uuid``), only the latest password::

    put_txn      a password was set on an ldapsyncUser entry that is not bound: (re)place its row,
                 sealed like a queued password, valid until ``expires_at``
    take_txn     the user is being bound: the row's secret, if not expired, moves into the bind's
                 outbox row (which is deleted once delivered); the row goes either way
    delete_txn   the entry was deleted, or its password changed without a cleartext (a hash)
    purge_txn    rows past ``expires_at`` (run by the worker every few seconds)

The sealed value is AES-GCM with the entry's UUID as associated data (``ldapsync/secretbox.py``),
so a row moved onto another user cannot be opened.
"""

from __future__ import annotations

from ldapsync.store.database import Txn


def put_txn(txn: Txn, entry_uuid: str, secret: str, now: float, expires_at: float) -> None:
    """Keep ``secret`` (sealed, hex) for ``entry_uuid`` until ``expires_at``; replaces an older one."""
    txn.run("INSERT INTO o365_unbound_passwords (entry_uuid, secret, set_at, expires_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (entry_uuid) DO UPDATE SET secret = excluded.secret, set_at = excluded.set_at, "
            "expires_at = excluded.expires_at", (entry_uuid, secret, now, expires_at))


def keep_unless_newer_txn(txn: Txn, entry_uuid: str, secret: str, now: float, expires_at: float) -> None:
    """Keep ``secret`` again (a queued password that never reached Microsoft 365) unless the user
    has a kept one already, which is newer."""
    txn.run("INSERT INTO o365_unbound_passwords (entry_uuid, secret, set_at, expires_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (entry_uuid) DO NOTHING", (entry_uuid, secret, now, expires_at))


def take_txn(txn: Txn, entry_uuid: str, now: float) -> str | None:
    """The user's kept secret if it has not expired (None otherwise); the row is deleted."""
    cur = txn.run("DELETE FROM o365_unbound_passwords WHERE entry_uuid = ? RETURNING secret, expires_at",
                  (entry_uuid,))
    row = cur.fetchone()
    if row is None or float(row[1]) <= now:
        return None
    return str(row[0])


def delete_txn(txn: Txn, entry_uuid: str) -> None:
    txn.run("DELETE FROM o365_unbound_passwords WHERE entry_uuid = ?", (entry_uuid,))


def purge_txn(txn: Txn, now: float) -> int:
    """Delete every row whose time is up; returns how many."""
    cur = txn.run("DELETE FROM o365_unbound_passwords WHERE expires_at <= ?", (now,))
    return int(cur.rowcount or 0)


def count_txn(txn: Txn) -> int:
    return int(txn.run("SELECT COUNT(*) FROM o365_unbound_passwords").fetchone()[0])
