"""CPU per LDAP modify inside the directory, with and without the Microsoft 365 outbox (issue 4).

    python tests/perf/bench_outbox_cpu.py [--modifies 3000] [--rounds 3]

The LDAP-level benchmark (``bench_propagation.py --scenarios modify-cost``) swings by ±10% between
runs on a shared 2-vCPU machine, as much as the effect it measures.  This one takes the network,
the client and the worker out: one process, a fresh SQLite database, 500 bound users, and
``Directory.modify`` (replace displayName) awaited one after another — the same code path an
LDAP modify takes after decoding — timing the process's CPU per modify:

``off``     no change hooks (the connector disabled)
``outbox``  the outbox planner (one ``o365_outbox`` row per modify, in the same transaction)
``all``     the planner and the self-service activation hook, as a server with the connector on
``all-synced``  the same, each user marked "synced" (untimed) before its modify, as the worker
            does after a delivery: the modify also writes ``o365SyncState: pending``

Rounds alternate the modes so that drift on the machine hits all of them alike.  Prints a
``machine`` line, one JSON line per (round, mode) and a summary line with the medians.

``--instructions`` counts instead of timing: the process under ``valgrind --tool=cachegrind``,
``off`` vs ``outbox``, instructions per modify (repeatable to ~1% on a noisy machine).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_graph  # noqa: E402  (machine_info)

USERS = 500


async def measure(mode: str, modifies: int, warmup: int = 300) -> dict:
    from ldapsync.config import AdminConfig, Config, DirectoryConfig, PasswordsConfig, SecretsConfig
    from ldapsync.directory.facade import Actor, Directory
    from ldapsync.store import entries as store
    from ldapsync.store.database import Database

    tmp = Path(tempfile.mkdtemp(prefix="outboxcpu-"))
    cfg = Config(directory=DirectoryConfig(database=f"sqlite:///{tmp}/x.db"),
                 secrets=SecretsConfig(key_file=str(tmp / "secret.key")),
                 passwords=PasswordsConfig(hash_time_cost=1, hash_memory_kib=8192),
                 admin=AdminConfig(password_file=str(tmp / "admin-password")))
    db = Database(cfg.directory.database)
    db.create_schema()
    db.start()
    hooks: list = []
    d = Directory(cfg, db, hooks=hooks)
    d.start()
    d.bootstrap_sync()
    try:
        if mode.startswith("all"):
            from ldapsync.services import office365_hooks

            hooks.extend(office365_hooks(d))
        elif mode != "off":
            from ldapsync.sync.planner import OutboxPlanner

            hooks.append(OutboxPlanner.from_config(d))
        admin = Actor(d.dn(cfg.admin_dn), True)
        for i in range(USERS):
            await d.add(admin, f"uid=u{i},ou=people,dc=example,dc=com", [
                ("objectClass", [b"inetOrgPerson", b"ldapsyncUser"]), ("uid", [f"u{i}".encode()]), ("cn", [b"U"]),
                ("sn", [b"S"]), ("mail", [f"u{i}@example.com".encode()]), ("ldapsyncDirectory", [b"office365"]),
                ("userPassword", [b"{SSHA}c2FsdGVkc2FsdGVkc2FsdGVkc2FsdA=="])])
        synced = mode.endswith("-synced")
        entry_uuids: dict[str, str] = {}
        if synced:
            from ldapsync.sync.status import write_user_status_txn

            for i in range(USERS):
                dn = f"uid=u{i},ou=people,dc=example,dc=com"
                e = await db.run_interaction("uuid", store.get_entry_txn, d.dn(dn).norm, write=False)
                entry_uuids[dn] = e.attrs["entryUUID"][0]
        for i in range(warmup):                                # warm-up
            await d.modify(admin, f"uid=u{i % USERS},ou=people,dc=example,dc=com", [("replace", "displayName", [b"w%d" % i])])
        cpu = wall = 0.0
        for i in range(modifies):
            dn = f"uid=u{i % USERS},ou=people,dc=example,dc=com"
            if synced:
                # what the worker does after a delivery (not timed): the next modify turns the
                # user back to "pending"
                await db.run_interaction("status", lambda txn, u=entry_uuids[dn]: write_user_status_txn(
                    d, txn, u, {"o365SyncState": ["synced"]}))
            c0, t0 = time.process_time(), time.perf_counter()
            await d.modify(admin, dn, [("replace", "displayName", [b"x%d" % i])])
            cpu += time.process_time() - c0
            wall += time.perf_counter() - t0
    finally:
        d.stop()
        db.stop()
    return {"mode": mode, "modifies": modifies, "cpu_us_per_modify": round(cpu / modifies * 1e6, 1),
            "wall_us_per_modify": round(wall / modifies * 1e6, 1)}


def instructions(modes: list[str], low: int, high: int) -> int:
    """Instructions per modify under ``valgrind --tool=cachegrind`` (user space, this process).

    Each mode runs twice, with ``low`` and ``high`` modifies after the same set-up (every user
    modified once first, so none writes its first ``pending``); the difference divided by
    ``high - low`` is one modify's instructions, the set-up cancelled out.  Repeatable to ~1%
    whatever else the machine does, unlike CPU time.  About two minutes (four valgrind runs, two
    at a time)."""
    import os
    import re
    import subprocess

    if not shutil.which("valgrind"):
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    runs = {}
    for mode in modes:
        for n in (low, high):
            cmd = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
                   sys.executable, __file__, "--one", mode, "--modifies", str(n), "--warmup", str(USERS)]
            # One hash seed for every run: with random ones, dict and set layouts differ from run to
            # run and the count per modify moved by up to ±20,000 instructions (2026-11-27).
            env = {**os.environ, "PYTHONHASHSEED": "0"}
            runs[(mode, n)] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
            if len([p for p in runs.values() if p.poll() is None]) >= 2:
                next(p for p in runs.values() if p.poll() is None).wait()
    per: dict[str, float] = {}
    for (mode, n), p in runs.items():
        err = p.communicate()[1]
        m = re.search(r"I\s+refs:\s+([\d,]+)", err)
        if p.returncode != 0 or not m:
            print(f"valgrind run {mode}/{n} failed:\n{err[-2000:]}", file=sys.stderr)
            return 1
        per[f"{mode}/{n}"] = int(m.group(1).replace(",", ""))
    out = {m: round((per[f"{m}/{high}"] - per[f"{m}/{low}"]) / (high - low)) for m in modes}
    line: dict[str, object] = {"summary": "instructions per modify (cachegrind)", **out}
    if "off" in out:
        for m in modes:
            if m != "off":
                line[f"{m}_extra_instructions"] = out[m] - out["off"]
                line[f"{m}_cost_pct"] = round(100 * (out[m] / out["off"] - 1), 1)
    print(json.dumps(line), flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modifies", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--instructions", action="store_true",
                    help="count instructions per modify under valgrind (off vs outbox) instead of timing CPU")
    ap.add_argument("--one", help=argparse.SUPPRESS)           # one mode, once (what --instructions runs)
    ap.add_argument("--warmup", type=int, default=300, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from twisted.internet import defer, task

    if args.instructions:
        return instructions(["off", "outbox"], 100, 600)
    if args.one:
        task.react(lambda reactor: defer.ensureDeferred(measure(args.one, args.modifies, args.warmup)))
        return 0
    print(json.dumps(bench_graph.machine_info()), flush=True)
    results: dict[str, list[float]] = {"off": [], "outbox": [], "all": [], "all-synced": []}

    async def run(reactor: object) -> None:
        for r in range(args.rounds):
            for mode in results:
                line = await measure(mode, args.modifies)
                line["round"] = r + 1
                results[mode].append(line["cpu_us_per_modify"])
                print(json.dumps(line), flush=True)
        med = {mode: statistics.median(v) for mode, v in results.items()}
        print(json.dumps({"summary": "median CPU per modify (us)", **med,
                          "outbox_cost_pct": round(100 * (med["outbox"] / med["off"] - 1), 1),
                          "all_hooks_cost_pct": round(100 * (med["all"] / med["off"] - 1), 1),
                          "all_synced_cost_pct": round(100 * (med["all-synced"] / med["off"] - 1), 1)}), flush=True)

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))    # exits the process when done
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
