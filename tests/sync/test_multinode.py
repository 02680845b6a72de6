"""Several server processes on one PostgreSQL database (multi-node), end to end.

Two real ldapsync servers (twistd) share one database (``make_cluster``), one fake tenant
process, real ldap-utils.  What must hold:

- a shared backlog is delivered exactly once per queued change: the workers' own accounting
  (the "n change(s)" of each delivery log line, both nodes summed) equals the rows written, no
  UPN is POSTed twice, each user's PATCHes never go back to an older value, and the tenant ends
  equal to the directory, user by user; both nodes did part of the work;
- kill -9 of one node mid-churn: the other sees its heartbeat stop and takes over its users after
  ``[office365] node_timeout`` (not ``outbox_lease``) and finishes everything, without duplicate
  accounts;
- a node frozen past ``node_timeout`` is presumed dead and its users redone by the other; when it
  resumes, what it finishes is discarded (fencing token): no second account, no status written;
- a clean shutdown (SIGTERM) gives the node's leases back: the other node takes over at once;
- a node that stalled past its lease does not complete or fail rows another node re-claimed;
- every access token expiring mid-run loses nothing;
- the reconciler runs on one node at a time (its lease in ``meta``), from the log lines;
- LISTEN/NOTIFY: a commit elsewhere wakes the listener at once; rolled-back work does not;
  the listener survives its connection being killed.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import create_pg_database, drop_pg_database, office365_config  # type: ignore[import-not-found]
import helpers
from helpers import PEOPLE, SUFFIX, parse_ldif_output, unique

pytestmark = pytest.mark.e2e
CONNECTOR = f"cn=office365,ou=directories,{SUFFIX}"
DOMAIN = "contoso.com"
PASSWORD = "Corr3ct-Horse-Battery!"
ROUNDS = 3                   # modifications per user after its creation
DELIVERED = re.compile(r"\[ldapsync\.sync\.worker#info\] Microsoft 365: (\S+): .*\((\d+) change\(s\) in [\d.]+ ms\)")


# -- helpers ------------------------------------------------------------------------------

def wait_for(what: str, fn: Callable[[], Any], timeout: float = 15.0, interval: float = 0.2) -> Any:
    return helpers.wait_for(what, fn, timeout, interval)


def wait_active(srv, timeout: float = 30.0) -> None:
    def active() -> bool:
        p = srv.run("ldapsearch", "-LLL", "-b", CONNECTOR, "-s", "base", "(objectClass=*)", "o365ConnectorState")
        return p.returncode == 0 and "o365ConnectorState: active" in p.stdout
    wait_for(f"connector active on {srv.url}", active, timeout)


def sql(db_url: str, text: str, params: dict | None = None) -> list[tuple[Any, ...]]:
    import sqlalchemy as sa

    eng = sa.create_engine(db_url)
    try:
        with eng.connect() as c:
            return list(c.execute(sa.text(text), params or {}).fetchall())
    finally:
        eng.dispose()


def queued(db_url: str) -> int:
    return int(sql(db_url, "SELECT COUNT(*) FROM o365_outbox")[0][0])


def add_ldif(uid: str) -> str:
    return (f"dn: uid={uid},{PEOPLE}\nchangetype: add\nobjectClass: inetOrgPerson\nobjectClass: ldapsyncUser\n"
            f"uid: {uid}\ncn: {uid} Test\nsn: Test\ngivenName: {uid}\nmail: {uid}@{DOMAIN}\n"
            f"displayName: {uid} v0\nuserPassword: {PASSWORD}\nldapsyncDirectory: office365\n\n")


def modify_ldif(uid: str, rnd: int) -> str:
    text = f"dn: uid={uid},{PEOPLE}\nchangetype: modify\nreplace: displayName\ndisplayName: {uid} v{rnd}\n"
    if rnd == 2:
        text += f"-\nreplace: sn\nsn: Surname{rnd}\n"
    return text + "\n"


def write_backlog(nodes, uids: list[str]) -> int:
    """User i is written through node i % len(nodes): its add, then ROUNDS modifications, in order.

    The nodes' streams run concurrently (one ldapmodify each).  Returns the number of outbox rows
    this queues (one per operation: every one changes what Microsoft 365 should hold)."""
    streams = []
    for n, _ in enumerate(nodes):
        mine = uids[n::len(nodes)]
        text = "".join(add_ldif(u) for u in mine)
        for rnd in range(1, ROUNDS + 1):
            text += "".join(modify_ldif(u, rnd) for u in mine)
        streams.append(text)
    errors: list[str] = []

    def run(srv, text: str) -> None:
        p = srv.run("ldapmodify", input=text)
        if p.returncode != 0:
            errors.append(p.stderr[-2000:])
    threads = [threading.Thread(target=run, args=(srv, text)) for srv, text in zip(nodes, streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return len(uids) * (1 + ROUNDS)


def write_rounds(nodes, uids: list[str], rounds: list[int]) -> int:
    """More modifications (displayName v<round>), user i through node i % len(nodes), the nodes'
    streams concurrently; returns the number of outbox rows they queue."""
    errors: list[str] = []

    def run(srv, text: str) -> None:
        p = srv.run("ldapmodify", input=text)
        if p.returncode != 0:
            errors.append(p.stderr[-2000:])
    threads = [threading.Thread(target=run, args=(srv, "".join(modify_ldif(u, rnd) for rnd in rounds
                                                               for u in uids[n::len(nodes)])))
               for n, srv in enumerate(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return len(uids) * len(rounds)


def directory_users(srv, prefix: str) -> dict[str, dict[str, list[str]]]:
    p = srv.run("ldapsearch", "-LLL", "-o", "ldif-wrap=no", "-b", PEOPLE, f"(uid={prefix}*)", "*", "+")
    assert p.returncode == 0, p.stderr
    return {attrs["uid"][0]: attrs for attrs in parse_ldif_output(p.stdout).values()}


def deliveries(srv) -> list[tuple[str, int]]:
    """(UPN, rows) of each delivery this node logged."""
    return [(m.group(1), int(m.group(2))) for m in DELIVERED.finditer(srv.log.read_text(errors="replace"))]


def check_tenant_matches_directory(tenant, srv, prefix: str, uids: list[str]) -> None:
    """One account per UPN, created by one POST, equal to the directory entry; the entry is synced."""
    users = directory_users(srv, prefix)
    assert sorted(users) == sorted(uids)
    by_upn: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for u in tenant.admin.all_users():
        by_upn[u["userPrincipalName"].lower()].append(u)
    posts: dict[str, int] = defaultdict(int)
    for r in tenant.admin.requests(kind="graph", method="POST", path=r"/users$"):
        if 200 <= r["status"] < 300:
            posts[(r["body"] or {}).get("userPrincipalName", "").lower()] += 1
    problems = []
    for uid, e in sorted(users.items()):
        upn = e["mail"][0].lower()
        accounts = by_upn.get(upn, [])
        if len(accounts) != 1 or posts.get(upn, 0) != 1:
            problems.append(f"{upn}: {len(accounts)} account(s), {posts.get(upn, 0)} successful POST /users")
            continue
        a = accounts[0]
        want = {"displayName": e["displayName"][0], "givenName": e["givenName"][0], "surname": e["sn"][0],
                "mail": e["mail"][0], "mailNickname": uid, "accountEnabled": True}
        got = {k: a.get(k) for k in want}
        if got != want:
            problems.append(f"{upn}: tenant {got} != directory {want}")
        if e.get("o365ObjectId") != [a["id"]] or e.get("o365SyncState") != ["synced"]:
            problems.append(f"{upn}: entry {e.get('o365ObjectId')} {e.get('o365SyncState')} (tenant id {a['id']})")
    assert not problems, f"{len(problems)} user(s) differ:\n" + "\n".join(problems[:20])


def check_patch_order(tenant, prefix: str, last: int = ROUNDS) -> None:
    """Per user, the displayName versions PATCHed only ever go forward (coalescing may skip some),
    and they are there: a user created with an older version than ``last`` was PATCHed up to it."""
    seen: dict[str, list[int]] = defaultdict(list)
    ids = {u["id"]: u["mailNickname"] for u in tenant.admin.all_users() if (u.get("mailNickname") or "").startswith(prefix)}
    assert ids, f"no account of {prefix}* in the tenant"
    created: dict[str, int] = {}
    for r in tenant.admin.requests(kind="graph", method="POST", path=r"/users$"):
        body = r["body"] or {}
        if 200 <= r["status"] < 300 and str(body.get("mailNickname", "")).startswith(prefix) and body.get("displayName"):
            created[body["mailNickname"]] = int(body["displayName"].rsplit(" v", 1)[1])
    for r in tenant.admin.requests(kind="graph", method="PATCH", path=r"/users/"):
        if not 200 <= r["status"] < 300:
            continue
        oid = r["path"].rstrip("/").rsplit("/", 1)[-1]
        name = (r["body"] or {}).get("displayName")
        if oid in ids and name:
            seen[ids[oid]].append(int(name.rsplit(" v", 1)[1]))
    backwards = {uid: v for uid, v in seen.items() if v != sorted(set(v))}
    assert not backwards, f"PATCHes repeated or out of order: {dict(list(backwards.items())[:10])}"
    missing = {uid: (created.get(uid), seen.get(uid, [])) for uid in ids.values()
               if (seen[uid][-1] if seen.get(uid) else created.get(uid)) != last}
    assert not missing, (f"{len(missing)} user(s) never got version v{last} (created with, PATCHed): "
                         f"{dict(list(missing.items())[:10])}")


@contextlib.contextmanager
def workers_stopped(nodes: list) -> Iterator[None]:
    """SIGSTOP the nodes' Microsoft 365 worker processes (children of the LDAP process), SIGCONT after."""
    pids = [pid for srv in nodes for pid in srv.pids()[1:]]
    assert len(pids) >= len(nodes), f"no worker process found: {pids}"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def cluster_config(tenant, **extra: Any) -> str:
    extra.setdefault("reconcile_interval", "1h")     # drift passes stay out of the delivery accounting
    return office365_config(tenant.info, **extra)


# -- LISTEN/NOTIFY, without servers ----------------------------------------------------------------

class _ThreadReactor:
    """callFromThread runs the call right away (in the listener thread): enough to count wakes."""

    def callFromThread(self, fn: Callable[..., Any], *args: Any) -> None:
        fn(*args)


def test_listener_wakes_on_commit_not_on_rollback_and_reconnects():
    import psycopg

    from ldapsync.store.database import Database, Txn
    from ldapsync.store.outbox import NOTIFY_CHANNEL, notify_txn
    from ldapsync.sync.notify import OutboxListener, connect_kwargs

    url, name = create_pg_database()
    db = Database(url)
    wakes: list[float] = []
    woke = threading.Event()

    def wake() -> None:
        wakes.append(time.monotonic())
        woke.set()

    listener = OutboxListener.for_database(db, wake, reactor=_ThreadReactor(), timeout=0.2, backoff=(0.1, 0.5))
    try:
        listener.start()
        wait_for("listening", lambda: listener.connects == 1, 30, 0.05)
        assert woke.wait(30)                         # a catch-up wake right after LISTEN
        woke.clear()

        # A commit elsewhere: woken at once.  notify_txn is the planner's helper.
        db.run_sync("test notify", lambda txn: notify_txn(txn))
        assert woke.wait(30)
        woke.clear()

        # Inside a transaction that rolls back: nothing is delivered.
        class Rollback(Exception):
            pass

        def rolled_back(txn: Txn) -> None:
            notify_txn(txn)
            raise Rollback
        received = listener.received
        with pytest.raises(Rollback):
            db.run_sync("test rollback", rolled_back)
        # PostgreSQL delivers notifications in commit order: once a later commit's NOTIFY
        # arrived, one from the rolled-back transaction would have arrived before it.
        db.run_sync("test notify after the rollback", lambda txn: notify_txn(txn))
        assert woke.wait(30)
        wait_for("the later NOTIFY counted", lambda: listener.received > received, 30, 0.05)
        assert listener.received == received + 1, "the rolled-back transaction's NOTIFY was delivered"
        woke.clear()

        # The listener's connection is killed: it reconnects, wakes once, and hears the next NOTIFY.
        with psycopg.connect(**connect_kwargs(db.engine), autocommit=True) as admin:
            n = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query ILIKE %s"
                              " AND pid <> pg_backend_pid() AND datname = current_database()",
                              (f"%LISTEN {NOTIFY_CHANNEL}%",)).rowcount
            assert n == 1
        wait_for("listening again", lambda: listener.connects == 2, 30, 0.05)
        assert woke.wait(30)                         # the catch-up wake after reconnecting
        woke.clear()
        received = listener.received
        db.run_sync("test notify", lambda txn: notify_txn(txn))
        wait_for("the NOTIFY heard on the new connection", lambda: listener.received > received, 30, 0.05)
        assert woke.wait(30)
    finally:
        listener.join()
        assert listener._thread is None
        db.stop()
        drop_pg_database(name)


# -- two server processes ------------------------------------------------------------------------

def test_two_nodes_deliver_a_shared_backlog_exactly_once(make_cluster, fake_tenant):
    a, b = make_cluster(2, cluster_config(fake_tenant))
    wait_active(a)
    wait_active(b)
    for srv in (a, b):     # the worker process logs it (through the server's log) once connected
        wait_for(f"{srv.url} listening", lambda srv=srv: "outbox listener: listening on ldapsync_outbox" in srv.log.read_text())
    prefix = unique("mn")
    uids = [f"{prefix}x{i:03d}" for i in range(300)]
    # The worker processes are stopped while the changes come in: the whole backlog is in the
    # shared outbox, however slowly the writes went; then both nodes drain it (Graph answering
    # a little slowly, so neither node can take it all before the other has started).
    with workers_stopped([a, b]):
        rows = write_backlog([a, b], uids)
        backlog = queued(a.db_url)
        assert backlog == rows, f"{backlog} rows queued for {rows} changes written"
        fake_tenant.admin.set_latency(seconds=0.2)
    wait_for("the outbox drained", lambda: queued(a.db_url) == 0, 300, 0.5)
    # Each user's queued changes went out as one POST.  Two more rounds of changes, now with the
    # workers running, are PATCHes: each user's must arrive in order, up to the last round.
    rows += write_rounds([a, b], uids, [ROUNDS + 1, ROUNDS + 2])
    wait_for("the outbox drained", lambda: queued(a.db_url) == 0, 300, 0.5)
    fake_tenant.admin.set_latency(seconds=0)

    check_tenant_matches_directory(fake_tenant, a, prefix, uids)
    check_patch_order(fake_tenant, prefix, last=ROUNDS + 2)
    done = {srv.url: [(upn, n) for upn, n in deliveries(srv) if upn.startswith(prefix)] for srv in (a, b)}
    total = sum(n for d in done.values() for _, n in d)
    assert total == rows, f"the workers delivered {total} queued changes for {rows} written (double delivery?)"
    for url, d in done.items():
        assert len(d) >= 20, f"node {url} delivered for only {len(d)} user(s)"
    # A sample of passwords (queued by one node, encrypted with the shared key, delivered by either).
    for uid in uids[::50]:
        assert fake_tenant.admin.password_of(key=f"{uid}@{DOMAIN}") == PASSWORD
    for srv in (a, b):
        text = srv.log.read_text()
        assert PASSWORD not in text
        assert "Traceback" not in text, text[text.index("Traceback") - 2000:][:6000]


def test_kill_9_of_one_node_mid_churn_the_other_takes_over_within_seconds(make_cluster, fake_tenant):
    """kill -9 of a node and its worker process while it holds claims and changes keep coming:
    the other node sees the dead node's heartbeat stop, takes its users over after
    ``[office365] node_timeout`` (15 s by default) rather than after ``outbox_lease`` (600 s
    here, so waiting the lease out cannot pass), and finishes everything, without duplicate
    accounts.  The time from the kill to the takeover is printed (README, multi-node section)."""
    a, b = make_cluster(2, cluster_config(fake_tenant, outbox_lease="600s"))
    wait_active(a)
    wait_active(b)
    for srv in (a, b):
        wait_for(f"{srv.url} sees two nodes", lambda srv=srv: "2 node(s) deliver" in srv.log.read_text(), 30)
    prefix = unique("mk")
    uids = [f"{prefix}x{i:03d}" for i in range(120)]
    # A's POSTs in flight are performed by the tenant although A dies (lost replies); B then links
    # those accounts, recognises them as created after the changes were queued (so they already
    # have the password) and does not set it again: the tenant keeps its password-history rule.
    fake_tenant.admin.set_latency(seconds=1.0)
    write_backlog([a, b], uids)

    def a_leases() -> list[str]:
        return leases_of(a, a.db_url)
    held = wait_for("node A working on users", a_leases, 30, 0.05)
    a.signal_all(signal.SIGKILL)                   # the node: its LDAP process and its worker process
    a.stop(signal.SIGKILL)
    killed = time.time()
    held = sorted(set(held) | set(a_leases()))
    # The churn goes on through B while it has yet to notice; Graph still slow, so B's claims of
    # A's users are seen (sampled) while it works on them.
    write_rounds([b], uids, [ROUNDS + 1])

    seen_by_b: dict[str, float] = {}

    def b_took_over() -> bool:
        now = time.time()
        for u in set(held) & set(leases_of(b, b.db_url)):
            seen_by_b.setdefault(u, now)
        return bool(seen_by_b)
    wait_for("B working on the users A held when it died", b_took_over, 240, 0.05)
    first = min(seen_by_b.values())
    took = first - killed

    def takeover_line() -> str:
        return next((x for x in b.log.read_text(errors="replace").splitlines() if "presumed dead" in x), "")
    # The worker process's log lines reach the log file through the server (a pipe): the line may
    # land a moment after the claims it preceded are visible in the database.
    line = wait_for("B's log line saying it presumed A dead", takeover_line, 10, 0.05)
    print(f"\nfailover: B claimed the first of A's {len(held)} claimed user(s) {took:.1f} s after the kill -9 "
          f"(node_timeout 15 s, outbox_lease 600 s); B logged: {line.split('] ', 1)[-1]}")
    logged = datetime.strptime(line[:24], "%Y-%m-%dT%H:%M:%S%z").timestamp()    # whole seconds
    assert logged <= first + 1.0, (f"B took A's users over {logged - first:.1f} s before it presumed A dead "
                                   "(its heartbeat stopped)")
    fake_tenant.admin.set_latency(seconds=0)

    wait_for("the outbox drained", lambda: queued(b.db_url) == 0, 300, 0.05)
    check_tenant_matches_directory(fake_tenant, b, prefix, uids)
    check_patch_order(fake_tenant, prefix, last=ROUNDS + 1)
    by_uuid = {e["entryUUID"][0]: e["mail"][0].lower() for e in directory_users(b, prefix).values()}
    b_done = {upn for upn, _ in deliveries(b)}
    assert {by_uuid[u] for u in held} <= b_done, "B did not deliver the users A held when it died"
    text = b.log.read_text(errors="replace")
    assert "Traceback" not in text, text[text.index("Traceback") - 2000:][:6000]


def leases_of(srv, db_url: str) -> list[str]:
    """Users (entry UUIDs) whose head row is leased to ``srv`` (its node id names its LDAP port)."""
    rows = sql(db_url, "SELECT entry_uuid, lease_owner FROM o365_outbox WHERE lease_owner IS NOT NULL")
    return sorted({u for u, owner in rows if f"tcp:{srv.port}:" in owner})


def test_clean_shutdown_gives_the_leases_back_at_once(make_cluster, fake_tenant):
    """SIGTERM: deliveries in flight get a few seconds, the rest are cancelled, and the node's
    leases are released, so the other node takes its users over at once, not after the lease."""
    lease = 300.0
    a, b = make_cluster(2, cluster_config(fake_tenant, outbox_lease=f"{lease:g}s"))
    wait_active(a)
    wait_active(b)
    prefix = unique("ms")
    uids = [f"{prefix}x{i:03d}" for i in range(80)]
    # Every Graph request takes longer than the shutdown's grace period (5 s): A's deliveries in
    # flight cannot finish and are cancelled.
    fake_tenant.admin.set_latency(seconds=8.0)
    rows = write_backlog([a, b], uids)
    held = wait_for("node A working on users", lambda: leases_of(a, a.db_url), 30, 0.05)
    # when A's leases would end had they not been given back (A renews them: read the latest)
    ends = [float(t) for t, owner in sql(a.db_url, "SELECT lease_until, lease_owner FROM o365_outbox"
                                         " WHERE lease_owner IS NOT NULL") if f"tcp:{a.port}:" in owner]
    assert ends, "A's leases ended before the shutdown"
    proc = a.proc
    a.stop(signal.SIGTERM)
    assert proc is not None and proc.returncode != -signal.SIGKILL, "A did not stop on SIGTERM"
    assert leases_of(a, a.db_url) == [], "A left leases behind at a clean shutdown"
    fake_tenant.admin.set_latency(seconds=0)
    text = a.log.read_text(errors="replace")
    assert "cancelling" in text and "lease(s) given back" in text, text[-3000:]
    assert "Traceback" not in text, text[text.index("Traceback") - 2000:][:6000]

    wait_for("the outbox drained", lambda: queued(b.db_url) == 0, 240, 0.3)
    assert time.time() < min(ends), "B waited for A's leases to expire"
    check_tenant_matches_directory(fake_tenant, b, prefix, uids)
    check_patch_order(fake_tenant, prefix)
    by_uuid = {e["entryUUID"][0]: e["mail"][0].lower() for e in directory_users(b, prefix).values()}
    b_done = {upn for upn, _ in deliveries(b)}
    assert {by_uuid[u] for u in held} <= b_done, "B did not deliver the users A held when it stopped"
    total = sum(n for srv in (a, b) for upn, n in deliveries(srv) if upn.startswith(prefix))
    assert total == rows, f"{total} changes delivered for {rows} written"


def test_a_node_that_lost_its_lease_leaves_the_rows_to_the_new_owner(make_cluster, fake_tenant):
    """A node stalls (SIGSTOP) longer than its lease mid-delivery; the other node re-claims its
    users.  When the stalled node wakes up and its requests return, it must not complete (delete)
    or fail (un-lease) rows that are no longer its own: every queued change is accounted for once."""
    lease = 3.0
    a, b = make_cluster(2, cluster_config(fake_tenant, outbox_lease=f"{lease:g}s"), start=False)
    a.start()
    wait_active(a)
    prefix = unique("mw")
    uids = [f"{prefix}x{i:03d}" for i in range(40)]
    text = "".join(add_ldif(u) for u in uids)
    assert a.run("ldapmodify", input=text).returncode == 0
    wait_for("the adds delivered", lambda: queued(a.db_url) == 0, 60, 0.2)

    fake_tenant.admin.set_latency(seconds=2.0)
    text = "".join(modify_ldif(u, 1) for u in uids)
    assert a.run("ldapmodify", input=text).returncode == 0
    held = wait_for("node A working on users", lambda: leases_of(a, a.db_url), 30, 0.05)
    a.signal_all(signal.SIGSTOP)                   # the node: its LDAP and its worker process
    try:
        b.start()
        wait_active(b)
        # B takes over A's users once their leases have expired, and works on them (slowly)...
        wait_for("B working on A's users", lambda: set(held) & set(leases_of(b, b.db_url)), 30, 0.05)
    finally:
        a.signal_all(signal.SIGCONT)               # ...while A's replies arrive
    wait_for("A noticed", lambda: "has taken them over" in a.log.read_text(errors="replace"), 30, 0.2)
    fake_tenant.admin.set_latency(seconds=0)
    wait_for("the outbox drained", lambda: queued(b.db_url) == 0, 240, 0.3)
    rows = 2 * len(uids)
    total = sum(n for srv in (a, b) for upn, n in deliveries(srv) if upn.startswith(prefix))
    assert total == rows, f"{total} changes completed for {rows} written: a node completed rows it no longer owned"
    # (Both nodes PATCHed the same values: a stalled node's requests in flight cannot be taken
    # back, which is why the PATCH order is not checked here, only the outcome.)
    check_tenant_matches_directory(fake_tenant, b, prefix, uids)
    for srv in (a, b):
        text = srv.log.read_text(errors="replace")
        assert "Traceback" not in text, text[text.index("Traceback") - 2000:][:6000]


def test_a_node_presumed_dead_cannot_complete_what_the_other_redid(make_cluster, fake_tenant):
    """Fencing.  A node is frozen (SIGSTOP: its LDAP and its worker process) mid-delivery for
    longer than ``node_timeout``; its lease (600 s) is far from over, so only its stopped
    heartbeat can give its users away.  The other node presumes it dead, redoes those users and
    completes them.  Then the frozen node resumes and its requests return: it must complete
    nothing (its claims' fencing tokens no longer match), write no status over the other's (the
    entries' sync status stays exactly as the other left it), and no account is created twice."""
    a, b = make_cluster(2, cluster_config(fake_tenant, outbox_lease="600s"), start=False)
    a.start()
    wait_active(a)
    prefix = unique("mf")
    uids = [f"{prefix}x{i:03d}" for i in range(40)]
    fake_tenant.admin.set_latency(seconds=2.0)     # creates in flight at the tenant when A freezes
    assert a.run("ldapmodify", input="".join(add_ldif(u) for u in uids)).returncode == 0
    held = wait_for("node A working on users", lambda: leases_of(a, a.db_url), 30, 0.05)
    a.signal_all(signal.SIGSTOP)
    frozen = time.time()
    try:
        held = sorted(set(held) | set(leases_of(a, a.db_url)))
        b.start()
        wait_active(b)
        wait_for("B working on A's users", lambda: set(held) & set(leases_of(b, b.db_url)), 240, 0.05)
        took = time.time() - frozen
        fake_tenant.admin.set_latency(seconds=0)
        wait_for("B delivered everything", lambda: queued(b.db_url) == 0, 240, 0.2)
        before = {uid: {k: e.get(k) for k in ("o365ObjectId", "o365SyncState", "o365SyncedAt", "o365LastError")}
                  for uid, e in directory_users(b, prefix).items()}
    finally:
        a.signal_all(signal.SIGCONT)
    print(f"\nfencing: B claimed A's users {took:.1f} s after A froze (node_timeout 15 s, outbox_lease 600 s)")
    by_uuid = {e["entryUUID"][0]: e["mail"][0].lower() for e in directory_users(b, prefix).values()}
    stale = {by_uuid[u] for u in held}

    def a_gave_up() -> set[str]:
        """The users whose delivery A ended by discarding its result (one warning each)."""
        lines = [x for x in a.log.read_text(errors="replace").splitlines() if "is no longer its own" in x]
        return {upn for upn in stale if any(f"Microsoft 365: {upn}: " in x for x in lines)}
    wait_for("A discarded its result for every user it was delivering when it froze",
             lambda: a_gave_up() == stale, 90, 0.3)
    wait_for("A noticed it had been presumed dead",
             lambda: "presumed this node dead" in a.log.read_text(errors="replace"), 30, 0.3)
    time.sleep(3.0)                 # anything A would still write, it has written by now
    after = {uid: {k: e.get(k) for k in ("o365ObjectId", "o365SyncState", "o365SyncedAt", "o365LastError")}
             for uid, e in directory_users(b, prefix).items()}
    changed = {uid: (before[uid], after[uid]) for uid in before if before[uid] != after[uid]}
    assert not changed, f"A wrote the status of users B had redone: {dict(list(changed.items())[:5])}"
    assert queued(b.db_url) == 0
    # one account per user, made by one successful POST; each change completed exactly once
    check_tenant_matches_directory(fake_tenant, b, prefix, uids)
    total = sum(n for srv in (a, b) for upn, n in deliveries(srv) if upn.startswith(prefix))
    assert total == len(uids), f"{total} changes completed for {len(uids)} written: A completed rows B had redone"
    assert stale <= {upn for upn, _ in deliveries(b)}, "B did not redo the users A was delivering"
    for srv in (a, b):
        text = srv.log.read_text(errors="replace")
        assert "Traceback" not in text, text[text.index("Traceback") - 2000:][:6000]


def test_lost_create_reply_keeps_the_user_deliverable(make_server, fake_tenant):
    """POST /users succeeds at Graph but the reply is lost (node killed mid-request, connection reset):
    the retry must end synced with one account, not stuck on 'password does not comply'."""
    srv = make_server("sqlite", office365_config(fake_tenant.info))
    wait_active(srv)
    uid = unique("ml")
    fake_tenant.admin.inject_fault(status=503, count=1, after=True, drop=True, method="POST", path=r"/users$")
    p = srv.run("ldapmodify", input=add_ldif(uid))
    assert p.returncode == 0, p.stderr

    def state() -> str | None:
        e = directory_users(srv, uid).get(uid, {})
        return next(iter(e.get("o365SyncState") or ()), None) if e.get("o365SyncState") != ["pending"] else None
    assert wait_for("a final state", state, 60) == "synced", directory_users(srv, uid)[uid].get("o365LastError")
    assert len([u for u in fake_tenant.admin.all_users() if u["userPrincipalName"] == f"{uid}@{DOMAIN}"]) == 1
    assert fake_tenant.admin.password_of(key=f"{uid}@{DOMAIN}") == PASSWORD


def test_expired_tokens_mid_run_lose_nothing(make_cluster, fake_tenant):
    a, b = make_cluster(2, cluster_config(fake_tenant))
    wait_active(a)
    wait_active(b)
    prefix = unique("mt")
    uids = [f"{prefix}x{i:03d}" for i in range(200)]
    # The whole backlog is queued before the workers run (stopped meanwhile), and Graph answers
    # slowly: the tokens expire while deliveries are under way, however loaded the machine is.
    with workers_stopped([a, b]):
        rows = write_backlog([a, b], uids)
        fake_tenant.admin.set_latency(seconds=1.0)
    # Every token in use is rejected from now on (twice, after deliveries went on in between):
    # each request concerned gets one 401, refreshes and goes on.
    def all_401s_retried(after_seq: int) -> bool:
        """Every request refused with 401 since ``after_seq`` was sent again and answered (so a
        second expiry cannot hit a retry: that would be a real sign-in problem)."""
        reqs = [r for r in fake_tenant.admin.requests(kind="graph") if r["seq"] > after_seq]
        key = lambda r: (r["method"], r["path"], repr(r["body"]))  # noqa: E731
        refused = [r for r in reqs if r["status"] == 401]
        return bool(refused) and all(any(key(x) == key(r) and x["seq"] > r["seq"] and x["status"] != 401
                                         for x in reqs) for r in refused)
    expiries = []
    for _ in range(2):
        before = queued(a.db_url)
        wait_for("deliveries under way", lambda: queued(a.db_url) < before, 60, 0.1)
        left = queued(a.db_url)
        assert left, "the backlog drained before the tokens expired mid-run"
        seq = max([r["seq"] for r in fake_tenant.admin.requests(kind=None)] or [0])
        fake_tenant.admin.expire_tokens()
        expiries.append(left)
        wait_for("the requests refused after the expiry answered on retry", lambda: all_401s_retried(seq), 60, 0.2)
    fake_tenant.admin.set_latency(seconds=0)
    wait_for("the outbox drained", lambda: queued(a.db_url) == 0, 240, 0.5)
    assert all(expiries), f"the backlog drained before the tokens expired mid-run: {expiries}"
    rejected = [r for r in fake_tenant.admin.requests(kind="graph") if r["status"] == 401]
    assert len(rejected) >= 2
    logs = [srv.log.read_text() for srv in (a, b)]
    assert sum(text.count("refreshing the token") for text in logs) >= 2
    # absorbed by the refresh: no delivery failed, nothing waited for the connector
    assert not [line for text in logs for line in text.splitlines() if "sign-in problem" in line]
    check_tenant_matches_directory(fake_tenant, a, prefix, uids)
    check_patch_order(fake_tenant, prefix)
    total = sum(n for srv in (a, b) for upn, n in deliveries(srv) if upn.startswith(prefix))
    assert total == rows
    for srv in (a, b):
        p = srv.run("ldapsearch", "-LLL", "-b", CONNECTOR, "-s", "base", "(objectClass=*)", "o365ConnectorState")
        assert "o365ConnectorState: active" in p.stdout


RECONCILE = re.compile(r"reconcile: (?:pass started on this node \(lease (\w+) until ([\d.]+)\)"
                       r"|pass ended after ([\d.]+)s .*; lease (\w+) given back"
                       r"|(another node holds the reconcile lease; skipped))")


def reconcile_passes(log: Path) -> tuple[list[tuple[float, float]], int]:
    """([(start, end)] of this node's passes, number of skipped turns) from its log."""
    starts: dict[str, float] = {}
    passes: list[tuple[float, float]] = []
    skipped = 0
    for m in RECONCILE.finditer(log.read_text(errors="replace")):
        if m.group(1):
            from ldapsync.sync.reconciler import LEASE_SECONDS

            starts[m.group(1)] = float(m.group(2)) - LEASE_SECONDS
        elif m.group(4):
            start = starts.pop(m.group(4))
            passes.append((start, start + float(m.group(3))))
        else:
            skipped += 1
    return passes, skipped


def test_the_reconciler_runs_on_one_node_at_a_time(make_cluster, fake_tenant):
    a, b = make_cluster(2, cluster_config(fake_tenant, reconcile_interval="1s"))
    wait_active(a)
    wait_active(b)
    prefix = unique("mr")
    uids = [f"{prefix}x{i}" for i in range(4)]
    write_backlog([a, b], uids)
    wait_for("the outbox drained", lambda: queued(a.db_url) == 0, 120, 0.3)
    # A slow tenant makes every pass last ~0.8 s of each node's 1 s turn: the nodes collide all the time.
    fake_tenant.admin.set_latency(seconds=0.8)
    drifted = fake_tenant.admin.portal_edit(key=f"{uids[0]}@{DOMAIN}", displayName="Portal Edit")

    # Usually one node keeps winning (its turns come just after the other's): that is fine, what
    # matters is that a node whose turn comes while the other reconciles skips it.  Wait until
    # there is enough to judge (passes that have not ended yet are left out).
    def evidence() -> bool:
        (pa, sa), (pb, sb) = reconcile_passes(a.log), reconcile_passes(b.log)
        return len(pa) + len(pb) >= 5 and sa + sb >= 3
    wait_for("5 reconcile passes and 3 turns skipped because the other node held the lease", evidence, 120, 0.5)
    fake_tenant.admin.set_latency(seconds=0)
    wait_for("the portal edit undone", lambda: fake_tenant.admin.get_user(key=drifted["id"])["displayName"]
             == f"{uids[0]} v{ROUNDS}", 60, 0.3)
    (pa, _), (pb, _) = reconcile_passes(a.log), reconcile_passes(b.log)
    overlaps = [(x, y) for x in pa for y in pb if x[0] < y[1] - 0.2 and y[0] < x[1] - 0.2]
    assert not overlaps, f"passes of both nodes overlapped: {overlaps[:5]}"


def test_two_nodes_share_the_write_budget(make_cluster, fake_tenant):
    """Graph's write budget is per app and tenant: two nodes each pacing to 95% of it would
    overrun it twice over.  They heartbeat in ``meta`` and each paces to 1/2 of it, so a shared
    backlog drains at ~19 writes/s in all with (almost) no 429s.  The fake counts the budget
    over 15 s (300 writes, Graph's 20 writes/s), so an overrun shows within seconds."""
    a, b = make_cluster(2, cluster_config(fake_tenant))
    wait_active(a)
    wait_active(b)
    for srv in (a, b):
        wait_for(f"{srv.url} sees two nodes", lambda srv=srv: "2 node(s) deliver" in srv.log.read_text(), 30)
    fake_tenant.admin.configure_throttling(enabled=True, writes=300, window=15.0)
    fake_tenant.admin.reset_throttling()
    fake_tenant.admin.clear_requests()
    prefix = unique("bg")
    uids = [f"{prefix}x{i:03d}" for i in range(240)]
    streams = ["".join(add_ldif(u) for u in uids[n::2]) + "".join(modify_ldif(u, 1) for u in uids[n::2])
               for n in range(2)]
    threads = [threading.Thread(target=srv.run, args=("ldapmodify",), kwargs={"input": text, "check": True})
               for srv, text in zip((a, b), streams)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_for("the outbox drained", lambda: queued(a.db_url) == 0, 300, 0.5)
    drain = time.monotonic() - t0

    reqs = fake_tenant.admin.requests(kind="graph")
    writes = sorted(r["time"] for r in reqs if r["method"] in ("POST", "PATCH") and 200 <= r["status"] < 300)
    throttled = [r for r in reqs if r["status"] == 429]
    span = writes[-1] - writes[0]
    rate = (len(writes) - 1) / span if span > 0 else 0.0
    worst = max(sum(1 for u in writes if t <= u < t + 15.0) for t in writes)
    print(f"{len(writes)} writes in {span:.1f}s = {rate:.1f}/s (drain {drain:.1f}s), most in 15 s: {worst}, "
          f"429s: {len(throttled)} of {len(reqs)} requests")
    assert len(writes) >= len(uids), "fewer writes than accounts created"
    assert len(throttled) <= 0.01 * len(reqs), f"{len(throttled)} 429s of {len(reqs)} requests"
    assert worst <= 300
    # how close to the budget they get is a figure, not a test: tests/perf/bench_propagation.py
    # --scenarios budget --nodes 2 measures it
    for srv in (a, b):
        mine = [upn for upn, _ in deliveries(srv) if upn.startswith(prefix)]
        assert len(mine) >= 20, f"node {srv.url} delivered for only {len(mine)} user(s)"
    check_tenant_matches_directory(fake_tenant, a, prefix, uids)
