"""The reconcile lease: one pass at a time across the processes and nodes on one database.

One row in ``meta`` (``o365.reconciler_lease``) reads ``"<pass> <node>@<until>"``: the pass that
holds it (a random id per pass), the worker node it runs on (``sync/worker.py:
default_node_id``; empty for a pass ``ldapsync o365 reconcile`` runs) and when it runs out
(seconds since the epoch).  A pass takes it when it is free or has run out, renews it while it
runs, and gives it back when it ends.  A node that dies mid-pass does not hold it until it runs
out: the node's worker gives it back when it starts again (:func:`release_node_txn` with its own
node id), and the nodes that presume it dead (its heartbeat stopped) give it back with its
outbox leases (``store/outbox.py: take_over_txn``).  PostgreSQL: the row is read ``FOR UPDATE``,
so of two nodes taking it at once one waits for the other's transaction.
"""

from __future__ import annotations

from ldapsync.store.database import Txn
from ldapsync.store.entries import set_meta_txn

META_LEASE = "o365.reconciler_lease"


def holder(pass_id: str, node: str | None) -> str:
    return f"{pass_id} {node or ''}"


def _read_txn(txn: Txn) -> tuple[str, str, float]:
    """(pass, node, until) of the lease; ("", "", 0.0) when free.  A value written before the node
    was part of it (a pass id alone) has no node."""
    lock = ""
    if txn.is_postgres:
        # The row must exist for FOR UPDATE to serialize two nodes (the first pass ever would
        # otherwise have both INSERT it: one reconciles, the other fails on the primary key).
        txn.run("INSERT INTO meta (key, value) VALUES (?, '') ON CONFLICT (key) DO NOTHING", (META_LEASE,))
        lock = " FOR UPDATE"
    rows = txn.rows("SELECT value FROM meta WHERE key = ?" + lock, (META_LEASE,))
    owner, _, until = (rows[0][0] if rows else "").rpartition("@")
    pass_id, _, node = owner.partition(" ")
    try:
        return pass_id, node, float(until) if pass_id else 0.0
    except ValueError:
        return "", "", 0.0


def take_txn(txn: Txn, pass_id: str, node: str | None, now: float, until: float) -> bool:
    """Take the lease for ``pass_id`` until ``until``, unless another pass holds it and it has not run out."""
    held_by, _, held_until = _read_txn(txn)
    if held_by and held_by != pass_id and held_until > now:
        return False
    set_meta_txn(txn, META_LEASE, f"{holder(pass_id, node)}@{until}")
    return True


def renew_txn(txn: Txn, pass_id: str, node: str | None, until: float) -> bool:
    """Extend the lease ``pass_id`` holds; False when it no longer holds it (taken over)."""
    held_by, _, _ = _read_txn(txn)
    if held_by != pass_id:
        return False
    set_meta_txn(txn, META_LEASE, f"{holder(pass_id, node)}@{until}")
    return True


def give_back_txn(txn: Txn, pass_id: str) -> None:
    if _read_txn(txn)[0] == pass_id:
        set_meta_txn(txn, META_LEASE, "")


def release_node_txn(txn: Txn, node: str) -> bool:
    """Free the lease if a pass on ``node`` holds it (the node restarted, or is presumed dead)."""
    held_by, held_node, _ = _read_txn(txn)
    if not held_by or not node or held_node != node:
        return False
    set_meta_txn(txn, META_LEASE, "")
    return True
