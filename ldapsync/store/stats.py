"""SQL for the numbers operators watch: the Microsoft 365 queue and bound users by sync state.

Read-only queries for ``/metrics`` and ``/readyz`` (``ldapsync/metrics.py``) and ``cn=Monitor``.
They run in read transactions; nothing here writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ldapsync.store.database import Txn
from ldapsync.store.outbox import queue_counts_txn


@dataclass(frozen=True)
class QueueStats:
    rows_by_state: dict[str, int] = field(default_factory=dict)   # ready, held, error → queued rows
    oldest_created_at: float | None = None                        # the oldest row not in error


def queue_stats_txn(txn: Txn) -> QueueStats:
    """The queue's rows per state (:func:`~ldapsync.store.outbox.queue_counts_txn`, as the worker's
    ``o365QueueDepth`` counts them) and the creation time of its oldest row not in error."""
    oldest = txn.rows("SELECT MIN(created_at) FROM o365_outbox WHERE state <> 'error'")
    return QueueStats(queue_counts_txn(txn), float(oldest[0][0]) if oldest and oldest[0][0] is not None else None)


def users_by_sync_state_txn(txn: Txn) -> dict[str, int]:
    """How many entries carry each ``o365SyncState`` value (a scan of the entries that have one)."""
    counts: dict[str, int] = {}
    for (raw,) in txn.rows("SELECT attrs FROM entries WHERE attrs LIKE '%\"o365SyncState\"%'"):
        for value in json.loads(raw).get("o365SyncState", []):
            counts[value] = counts.get(value, 0) + 1
    return counts


def ping_txn(txn: Txn) -> bool:
    return bool(txn.rows("SELECT 1")[0][0] == 1)
