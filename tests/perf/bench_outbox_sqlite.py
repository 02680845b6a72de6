"""What one queued change costs a SQLite write transaction, for candidate outbox layouts (issue 4).

    python tests/perf/bench_outbox_sqlite.py [--txns 20000] [--rounds 3]

Plain ``sqlite3`` with the server's PRAGMAs (WAL, synchronous=NORMAL), no ldapsync code: 2,000
entries, then ``--txns`` write transactions shaped like an LDAP modify of a bound user (BEGIN
IMMEDIATE, read the entry, UPDATE it, INSERT one ~450-byte outbox row, COMMIT), each on a random
user, into an outbox that is never drained (the "tenant stopped" phase of modify-cost).  Layouts:

``none``            no outbox row (the connector off)
``current``         what migration 0004 left: rowid table (INTEGER PRIMARY KEY) + index (entry_uuid, id)
``no-index``        the rowid table alone (what the index costs; the worker needs it to find a user's rows)
``autoincrement``   ``current`` with AUTOINCREMENT (sqlite_sequence is one more page per COMMIT)
``clustered``       one B-tree: WITHOUT ROWID, PRIMARY KEY (entry_uuid, id), ids given by the writer as
                    ``max(now_us, last id of the user + 1)`` (the layout session 4's note proposed)

Rounds alternate the layouts.  Prints a ``machine`` line, one JSON line per (round, layout) with
wall and CPU microseconds per transaction, and a summary line with the medians.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_graph  # (machine_info)

USERS = 2000
LAYOUTS = ("none", "current", "no-index", "autoincrement", "clustered")
COLS = ("created_at FLOAT NOT NULL, operation VARCHAR(32) NOT NULL, payload TEXT NOT NULL, secret TEXT,"
        " state VARCHAR(16) DEFAULT 'ready' NOT NULL, attempts INTEGER DEFAULT '0' NOT NULL,"
        " next_attempt_at FLOAT DEFAULT '0' NOT NULL, last_error TEXT, lease_owner VARCHAR(64), lease_until FLOAT")
DDL = {
    "none": [],
    "current": [f"CREATE TABLE o (id INTEGER NOT NULL, entry_uuid VARCHAR(64) NOT NULL, {COLS}, PRIMARY KEY (id))",
                "CREATE INDEX ix ON o (entry_uuid, id)"],
    "no-index": [f"CREATE TABLE o (id INTEGER NOT NULL, entry_uuid VARCHAR(64) NOT NULL, {COLS}, PRIMARY KEY (id))"],
    "autoincrement": [f"CREATE TABLE o (id INTEGER PRIMARY KEY AUTOINCREMENT, entry_uuid VARCHAR(64) NOT NULL, {COLS})",
                      "CREATE INDEX ix ON o (entry_uuid, id)"],
    "clustered": [(f"CREATE TABLE o (entry_uuid VARCHAR(64) NOT NULL, id INTEGER NOT NULL, {COLS},"
                   " PRIMARY KEY (entry_uuid, id)) WITHOUT ROWID")],
}
INSERT = ("INSERT INTO o (entry_uuid, created_at, operation, payload, secret, state, attempts, next_attempt_at)"
          " VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
INSERT_CLUSTERED = ("INSERT INTO o (id, entry_uuid, created_at, operation, payload, secret, state, attempts,"
                    " next_attempt_at) VALUES ((SELECT MAX(?1, COALESCE(MAX(id), 0) + 1) FROM o WHERE entry_uuid = ?2),"
                    " ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)")
PAYLOAD = json.dumps({
    "bound": True, "changed": ["displayName"], "deleted": False, "display_name": "Display Name 12345",
    "dn": "uid=u12345,ou=people,dc=example,dc=com", "entry_uuid": str(uuid.UUID(int=1)), "given_name": None,
    "has_password": True, "held": False, "mail": "u12345@example.com", "mail_nickname": "u12345",
    "object_id": str(uuid.UUID(int=2)), "reason": "update", "surname": "S", "upn": "u12345@example.com",
}, separators=(",", ":"))


def measure(layout: str, txns: int, work: Path) -> dict:
    import sqlite3

    path = work / f"{layout}.db"
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        p.unlink(missing_ok=True)
    con = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "cache_size=-65536", "temp_store=MEMORY"):
        con.execute(f"PRAGMA {pragma}")
    con.execute("CREATE TABLE entries (id INTEGER PRIMARY KEY, dn TEXT NOT NULL, attrs TEXT NOT NULL)")
    rnd = random.Random(1)
    uuids = [str(uuid.UUID(int=rnd.getrandbits(128))) for _ in range(USERS)]
    attrs = [json.dumps({"objectClass": ["inetOrgPerson", "ldapsyncUser"], "uid": [f"u{i}"], "cn": ["U"], "sn": ["S"],
                         "mail": [f"u{i}@example.com"], "entryUUID": [uuids[i]], "displayName": ["Display Name"],
                         "ldapsyncDirectory": ["office365"], "o365SyncState": ["pending"],
                         "userPassword": ["{ARGON2}" + "x" * 90]}) for i in range(USERS)]
    con.execute("BEGIN")
    con.executemany("INSERT INTO entries (id, dn, attrs) VALUES (?, ?, ?)",
                    [(i, f"uid=u{i},ou=people,dc=example,dc=com", attrs[i]) for i in range(USERS)])
    for ddl in DDL[layout]:
        con.execute(ddl)
    con.execute("COMMIT")
    wall = cpu = 0.0
    for k in range(txns):
        i = rnd.randrange(USERS)
        t0, c0 = time.perf_counter(), time.process_time()
        con.execute("BEGIN IMMEDIATE")
        con.execute("SELECT attrs FROM entries WHERE id = ?", (i,)).fetchall()
        con.execute("UPDATE entries SET attrs = ? WHERE id = ?", (attrs[i], i))
        if layout == "clustered":
            con.execute(INSERT_CLUSTERED, (int(time.time() * 1e6), uuids[i], time.time(), "update", PAYLOAD, None,
                                           "ready", 0, 0.0))
        elif layout != "none":
            con.execute(INSERT, (uuids[i], time.time(), "update", PAYLOAD, None, "ready", 0, 0.0))
        con.execute("COMMIT")
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
    con.close()
    return {"layout": layout, "txns": txns, "wall_us_per_txn": round(wall / txns * 1e6, 1),
            "cpu_us_per_txn": round(cpu / txns * 1e6, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--txns", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="comma list of " + ",".join(LAYOUTS))
    args = ap.parse_args()
    layouts = [x for x in args.layouts.split(",") if x]
    for x in layouts:
        if x not in DDL:
            ap.error(f"unknown layout {x!r}")
    print(json.dumps(bench_graph.machine_info()), flush=True)
    walls: dict[str, list[float]] = {x: [] for x in layouts}
    with tempfile.TemporaryDirectory(prefix="outboxsqlite-") as tmp:
        for r in range(args.rounds):
            for layout in layouts:
                line = measure(layout, args.txns, Path(tmp))
                line["round"] = r + 1
                walls[layout].append(line["wall_us_per_txn"])
                print(json.dumps(line), flush=True)
    print(json.dumps({"summary": "median wall us per write transaction",
                      **{x: round(statistics.median(v), 1) for x, v in walls.items()}}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
