"""Several server processes on one PostgreSQL database (multi-node), end to end.

Two real ldapsync servers (twistd) share one database (``make_cluster``), one fake tenant
process, real ldap-utils.  What must hold:

- a shared backlog is delivered exactly once per queued change: the workers' own accounting
  (the "n change(s)" of each delivery log line, both nodes summed) equals the rows written, no
  UPN is POSTed twice, each user's PATCHes never go back to an older value, and the tenant ends
  equal to the directory, user by user; both nodes did part of the work;
- kill -9 of one node mid-backlog: the other takes over its users once their leases expire
  (``[office365] outbox_lease``, short here) and finishes everything, without duplicate accounts;
- a clean shutdown (SIGTERM) gives the node's leases back: the other node takes over at once;
- a node that stalled past its lease does not complete or fail rows another node re-claimed;
- every access token expiring mid-run loses nothing;
- the reconciler runs on one node at a time (its lease in ``meta``), from the log lines;
- LISTEN/NOTIFY: a commit elsewhere wakes the listener at once; rolled-back work does not;
  the listener survives its connection being killed.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable
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


def check_patch_order(tenant, prefix: str) -> None:
    """Per user, the displayName versions PATCHed only ever go forward (coalescing may skip some)."""
    seen: dict[str, list[int]] = defaultdict(list)
    ids = {u["id"]: u["mailNickname"] for u in tenant.admin.all_users() if (u.get("mailNickname") or "").startswith(prefix)}
    for r in tenant.admin.requests(kind="graph", method="PATCH", path=r"/users/"):
        if not 200 <= r["status"] < 300:
            continue
        oid = r["path"].rstrip("/").rsplit("/", 1)[-1]
        name = (r["body"] or {}).get("displayName")
        if oid in ids and name:
            seen[ids[oid]].append(int(name.rsplit(" v", 1)[1]))
    backwards = {uid: v for uid, v in seen.items() if v != sorted(set(v))}
    assert not backwards, f"PATCHes repeated or out of order: {dict(list(backwards.items())[:10])}"


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
        wait_for("listening", lambda: listener.connects == 1, 10, 0.05)
        assert woke.wait(5)                          # a catch-up wake right after LISTEN
        woke.clear()

        # A commit elsewhere: woken at once.  notify_txn is the planner's helper.
        t0 = time.monotonic()
        db.run_sync("test notify", lambda txn: notify_txn(txn))
        assert woke.wait(5)
        assert wakes[-1] - t0 < 0.5, wakes[-1] - t0
        woke.clear()

        # Inside a transaction that rolls back: nothing is delivered.
        class Rollback(Exception):
            pass

        def rolled_back(txn: Txn) -> None:
            notify_txn(txn)
            raise Rollback
        with pytest.raises(Rollback):
            db.run_sync("test rollback", rolled_back)
        assert not woke.wait(1.0)

        # The listener's connection is killed: it reconnects, wakes once, and hears the next NOTIFY.
        with psycopg.connect(**connect_kwargs(db.engine), autocommit=True) as admin:
            n = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query ILIKE %s"
                              " AND pid <> pg_backend_pid() AND datname = current_database()",
                              (f"%LISTEN {NOTIFY_CHANNEL}%",)).rowcount
            assert n == 1
        wait_for("listening again", lambda: listener.connects == 2, 10, 0.05)
        woke.wait(2)
        woke.clear()
        db.run_sync("test notify", lambda txn: notify_txn(txn))
        assert woke.wait(5)
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
    # Graph answers slowly while the changes come in (32 users in flight at most): a backlog
    # builds up in the shared outbox; then it drains at full speed on both nodes.
    fake_tenant.admin.set_latency(seconds=0.5)
    rows = write_backlog([a, b], uids)
    backlog = queued(a.db_url)
    fake_tenant.admin.set_latency(seconds=0)
    print(f"{backlog} of {rows} rows queued at the end of the writes")
    assert backlog >= 150, f"only {backlog} of {rows} rows were queued at the end of the writes"
    wait_for("the outbox drained", lambda: queued(a.db_url) == 0, 180, 0.5)

    check_tenant_matches_directory(fake_tenant, a, prefix, uids)
    check_patch_order(fake_tenant, prefix)
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


def test_kill_9_of_one_node_mid_backlog_the_other_finishes_after_the_lease(make_cluster, fake_tenant):
    lease = 4.0
    a, b = make_cluster(2, cluster_config(fake_tenant, outbox_lease=f"{lease:g}s"))
    wait_active(a)
    wait_active(b)
    prefix = unique("mk")
    uids = [f"{prefix}x{i:03d}" for i in range(120)]
    # A's POSTs in flight are performed by the tenant although A dies (lost replies); B then links
    # those accounts, recognises them as created after the changes were queued (so they already
    # have the password) and does not set it again: the tenant keeps its password-history rule.
    fake_tenant.admin.set_latency(seconds=1.0)
    write_backlog([a, b], uids)

    # A holds leases (users in flight, mid-request at the tenant) when it dies.
    def a_leases() -> list[str]:
        rows = sql(a.db_url, "SELECT entry_uuid, lease_owner FROM o365_outbox WHERE lease_until > :now",
                   {"now": time.time()})
        return [u for u, owner in rows if f"tcp:{a.port}:" in owner]
    held = wait_for("node A working on users", a_leases, 20, 0.05)
    a.stop(signal.SIGKILL)
    killed = time.time()
    held = sorted(set(held) | set(a_leases()))
    fake_tenant.admin.set_latency(seconds=0)

    # B takes them over only once the leases have expired, then finishes the whole backlog.
    wait_for("the outbox drained", lambda: queued(b.db_url) == 0, 180, 0.5)
    taken_over = time.time() - killed
    assert taken_over >= lease - 1.5, taken_over
    check_tenant_matches_directory(fake_tenant, b, prefix, uids)
    check_patch_order(fake_tenant, prefix)
    by_uuid = {e["entryUUID"][0]: e["mail"][0].lower() for e in directory_users(b, prefix).values()}
    b_done = {upn for upn, _ in deliveries(b)}
    assert {by_uuid[u] for u in held} <= b_done, "B did not deliver the users A held when it died"


def leases_of(srv, db_url: str) -> list[str]:
    """Users (entry UUIDs) whose head row is leased to ``srv`` (its node id names its LDAP port)."""
    rows = sql(db_url, "SELECT entry_uuid, lease_owner FROM o365_outbox WHERE lease_owner IS NOT NULL")
    return sorted({u for u, owner in rows if f"tcp:{srv.port}:" in owner})


def test_clean_shutdown_gives_the_leases_back_at_once(make_cluster, fake_tenant):
    """SIGTERM: deliveries in flight get a few seconds, the rest are cancelled, and the node's
    leases are released, so the other node takes its users over at once, not after the lease."""
    lease = 60.0
    a, b = make_cluster(2, cluster_config(fake_tenant, outbox_lease=f"{lease:g}s"))
    wait_active(a)
    wait_active(b)
    prefix = unique("ms")
    uids = [f"{prefix}x{i:03d}" for i in range(80)]
    # Every Graph request takes longer than the shutdown's grace period (5 s): A's deliveries in
    # flight cannot finish and are cancelled.
    fake_tenant.admin.set_latency(seconds=8.0)
    rows = write_backlog([a, b], uids)
    held = wait_for("node A working on users", lambda: leases_of(a, a.db_url), 20, 0.05)
    t0 = time.monotonic()
    a.stop(signal.SIGTERM)
    stopped_in = time.monotonic() - t0
    assert leases_of(a, a.db_url) == [], "A left leases behind at a clean shutdown"
    fake_tenant.admin.set_latency(seconds=0)
    text = a.log.read_text(errors="replace")
    assert "cancelling" in text and "lease(s) given back" in text, text[-3000:]
    assert "Traceback" not in text, text[text.index("Traceback") - 2000:][:6000]
    assert stopped_in < 15, stopped_in

    t1 = time.monotonic()
    wait_for("the outbox drained", lambda: queued(b.db_url) == 0, 120, 0.3)
    assert time.monotonic() - t1 < lease / 2, "B waited for A's leases to expire"
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
    held = wait_for("node A working on users", lambda: leases_of(a, a.db_url), 20, 0.05)
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
    wait_for("the outbox drained", lambda: queued(b.db_url) == 0, 120, 0.3)
    rows = 2 * len(uids)
    total = sum(n for srv in (a, b) for upn, n in deliveries(srv) if upn.startswith(prefix))
    assert total == rows, f"{total} changes completed for {rows} written: a node completed rows it no longer owned"
    # (Both nodes PATCHed the same values: a stalled node's requests in flight cannot be taken
    # back, which is why the PATCH order is not checked here, only the outcome.)
    check_tenant_matches_directory(fake_tenant, b, prefix, uids)
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
    fake_tenant.admin.set_latency(seconds=0.3)
    rows = write_backlog([a, b], uids)
    # Every token in use is rejected from now on (twice, further apart than one request's round
    # trip with its token refresh): each request concerned gets one 401, refreshes and goes on.
    expiries = []
    for _ in range(2):
        time.sleep(0.5)
        left = queued(a.db_url)
        fake_tenant.admin.expire_tokens()
        expiries.append(left)
        time.sleep(1.5)
    fake_tenant.admin.set_latency(seconds=0)
    wait_for("the outbox drained", lambda: queued(a.db_url) == 0, 120, 0.5)
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
    wait_for("the outbox drained", lambda: queued(a.db_url) == 0, 60, 0.3)
    # A slow tenant makes every pass last ~0.8 s of each node's 1 s turn: the nodes collide all the time.
    fake_tenant.admin.set_latency(seconds=0.8)
    drifted = fake_tenant.admin.portal_edit(key=f"{uids[0]}@{DOMAIN}", displayName="Portal Edit")
    time.sleep(10)
    fake_tenant.admin.set_latency(seconds=0)
    wait_for("the portal edit undone", lambda: fake_tenant.admin.get_user(key=drifted["id"])["displayName"]
             == f"{uids[0]} v{ROUNDS}", 30, 0.3)
    time.sleep(1.5)                                  # let passes in progress end and be logged
    (pa, sa), (pb, sb) = reconcile_passes(a.log), reconcile_passes(b.log)
    # Usually one node keeps winning (its turns come just after the other's): that is fine, what
    # matters is that a node whose turn comes while the other reconciles skips it.
    assert len(pa) + len(pb) >= 5, (len(pa), len(pb))
    assert sa + sb >= 3, f"the nodes hardly collided ({sa}+{sb} skipped turns): the test proves little"
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
    wait_for("the outbox drained", lambda: queued(a.db_url) == 0, 180, 0.5)
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
    assert rate >= 12.0, f"the nodes together wrote only {rate:.1f}/s of the 20/s budget"
    for srv in (a, b):
        mine = [upn for upn, _ in deliveries(srv) if upn.startswith(prefix)]
        assert len(mine) >= 20, f"node {srv.url} delivered for only {len(mine)} user(s)"
    check_tenant_matches_directory(fake_tenant, a, prefix, uids)
