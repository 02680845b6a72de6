"""How soon a SQLite write gets the write lock after another process releases it.

    python tests/perf/bench_sqlite_lock_wait.py [--rounds 20] [--hold 0.25]

Another connection (standing in for the Microsoft 365 worker process or the CLI) holds the
write lock (``BEGIN IMMEDIATE``) for ``--hold`` seconds; meanwhile one write waits for it, either
through ldapsync's writer (``store/database.py: _begin_write``, polling in steps of 0.1-2 ms, on
a thread named like the server's SQL writer) or through SQLite's own busy handler (a plain
``sqlite3`` connection with a timeout, which sleeps up to 50-100 ms between tries by then).
The lag is from the COMMIT that releases the lock to the end of the waiting write.

Prints one JSON line per (round, waiter) and a summary line per waiter with the median, p90
and max lag in milliseconds.  A benchmark, not a test: it never fails because of slow figures
(tests/store/test_database.py checks that the write waits and then goes through).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

WRITER_THREAD = "PoolThread-ldapsync-sql-write-0"     # the name the server's SQL writer thread has


def ldapsync_write(db: Any, k: int, out: dict[str, Any]) -> threading.Thread:
    def run() -> None:
        try:
            db._run("w", lambda txn: txn.run("INSERT INTO t VALUES (?, 'w')", (k,)), (), {}, True)
            out["at"] = time.monotonic()
        except Exception as e:  # noqa: BLE001 - reported
            out["error"] = repr(e)
    t = threading.Thread(target=run, name=WRITER_THREAD)
    t.start()
    return t


def sqlite_busy_write(path: Path, k: int, out: dict[str, Any]) -> threading.Thread:
    def run() -> None:
        c = sqlite3.connect(path, timeout=30, isolation_level=None)
        try:
            c.execute("BEGIN IMMEDIATE")
            c.execute("INSERT INTO t VALUES (?, 'b')", (k,))
            c.execute("COMMIT")
            out["at"] = time.monotonic()
        except Exception as e:  # noqa: BLE001 - reported
            out["error"] = repr(e)
        finally:
            c.close()
    t = threading.Thread(target=run)
    t.start()
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--hold", type=float, default=0.25, help="seconds the other connection holds the lock")
    args = ap.parse_args()

    from ldapsync.store.database import Database

    lags: dict[str, list[float]] = {"ldapsync": [], "sqlite-busy-handler": []}
    with tempfile.TemporaryDirectory(prefix="lockwait-") as tmp:
        path = Path(tmp) / "d.db"
        db = Database(f"sqlite:///{path}")
        try:
            db.create_schema()
            db.run_sync("table", lambda txn: txn.run("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)"))
            other = sqlite3.connect(path, isolation_level=None)
            k = 0
            for rnd in range(args.rounds):
                for waiter in lags:
                    k += 1
                    other.execute("BEGIN IMMEDIATE")
                    out: dict[str, Any] = {}
                    t = ldapsync_write(db, k, out) if waiter == "ldapsync" else sqlite_busy_write(path, k, out)
                    time.sleep(args.hold)
                    released = time.monotonic()
                    other.execute("COMMIT")
                    t.join(60)
                    if "at" not in out:
                        print(json.dumps({"round": rnd, "waiter": waiter, "error": out.get("error", "no answer")}))
                        continue
                    lag_ms = (out["at"] - released) * 1000
                    lags[waiter].append(lag_ms)
                    print(json.dumps({"round": rnd, "waiter": waiter, "lag_ms": round(lag_ms, 3)}))
            other.close()
        finally:
            db.stop()
    for waiter, got in lags.items():
        if not got:
            continue
        got.sort()
        print(json.dumps({"summary": waiter, "rounds": len(got), "hold_s": args.hold,
                          "median_ms": round(statistics.median(got), 3),
                          "p90_ms": round(got[min(len(got) - 1, int(0.9 * len(got)))], 3),
                          "max_ms": round(got[-1], 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
