"""The Microsoft 365 worker process (``ldapsync/worker_process.py``) under its supervisor.

A real server (twistd) with the connector on starts the worker as its child.  These tests check
the lifecycle an admin relies on: the child's log lines land in the server's log, it dies with a
server killed by kill -9 (no orphan that keeps delivering), a crashed child is started again and
delivers what was queued meanwhile, and SIGTERM, to the server or to the whole process group as a
service manager sends it, stops both cleanly.
"""

from __future__ import annotations

import os
import signal

import pytest
import pytest_twisted
from conftest import child_pids, office365_config  # type: ignore[import-not-found]
from helpers import add_user, alive, unique, wait_for
from sync.test_worker import DOMAIN, PASSWORD, entry, wait_active, wait_tenant  # type: ignore[import-not-found]

pytestmark = pytest.mark.e2e


def add_bound(srv, uid: str) -> None:
    add_user(srv, uid, bound=True, password=PASSWORD)


def leased_rows(srv) -> int:
    """Outbox rows a worker holds (claimed, being delivered), straight from SQL."""
    import sqlalchemy as sa

    eng = sa.create_engine(srv.db_url)
    try:
        with eng.connect() as c:
            return int(c.exec_driver_sql("SELECT COUNT(*) FROM o365_outbox WHERE lease_owner IS NOT NULL").scalar())
    finally:
        eng.dispose()


def log_with(srv, text: str) -> str | None:
    """The server's log, once it holds ``text``."""
    got = srv.log.read_text(errors="replace")
    return got if text in got else None


def worker_pid(srv) -> int:
    def find() -> int | None:
        for pid in child_pids(srv.proc.pid):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"ldapsync.worker_process" in f.read():
                    return pid
        return None
    return wait_for("the worker process", find, 20)


def test_the_worker_runs_in_its_own_process_and_logs_to_the_server_log(make_server, fake_tenant):
    srv = make_server("sqlite", office365_config(fake_tenant.info))
    wait_active(srv)
    pid = worker_pid(srv)
    assert pid != srv.proc.pid and alive(pid)
    uid = unique()
    add_bound(srv, uid)
    u = wait_tenant(fake_tenant, f"{uid}@{DOMAIN}")
    assert wait_for("synced", lambda: entry(srv, uid).get("o365SyncState") == ["synced"])
    assert entry(srv, uid)["o365ObjectId"] == [u["id"]]
    # The child's lines, under the child's namespaces, in the one server log.
    text = wait_for("the delivery logged", lambda: log_with(srv, f"{uid}@{DOMAIN}: created"))
    assert f"[ldapsync.sync.worker#info] Microsoft 365: {uid}@{DOMAIN}: created" in text
    assert f"Microsoft 365 worker process started (pid {pid})" in text
    assert PASSWORD not in text


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_kill_9_of_the_server_takes_the_worker_process_with_it(make_server, fake_tenant, backend):
    srv = make_server(backend, office365_config(fake_tenant.info))
    wait_active(srv)
    pid = worker_pid(srv)
    srv.stop(signal.SIGKILL)
    wait_for("the worker process gone", lambda: not alive(pid), 10)
    # and the restarted server has one worker process again, which delivers
    srv.start()
    wait_active(srv)
    assert worker_pid(srv) != pid
    uid = unique()
    add_bound(srv, uid)
    wait_tenant(fake_tenant, f"{uid}@{DOMAIN}", timeout=30)


def test_a_crashed_worker_process_is_started_again_and_delivers_what_was_queued(make_server, fake_tenant):
    srv = make_server("sqlite", office365_config(fake_tenant.info))
    wait_active(srv)
    first = worker_pid(srv)
    os.kill(first, signal.SIGKILL)
    # LDAP goes on while the worker is down; these changes wait in the outbox
    uids = [unique() for _ in range(3)]
    for uid in uids:
        add_bound(srv, uid)
    wait_for("the crash logged", lambda: "Microsoft 365 worker process ended unexpectedly (signal 9)"
             in srv.log.read_text(), 10)
    second = wait_for("a new worker process", lambda: next((p for p in child_pids(srv.proc.pid) if p != first), None), 20)
    assert alive(second)
    for uid in uids:
        wait_tenant(fake_tenant, f"{uid}@{DOMAIN}", timeout=30)
        assert fake_tenant.admin.password_of(key=f"{uid}@{DOMAIN}") == PASSWORD
    assert srv.run("ldapwhoami").returncode == 0


@pytest.mark.parametrize("group", [False, True], ids=["server", "process-group"])
def test_sigterm_stops_both_processes_cleanly(make_server, fake_tenant, group):
    srv = make_server("sqlite", office365_config(fake_tenant.info))
    wait_active(srv)
    pid = worker_pid(srv)
    # a delivery in flight at the stop gets its grace period
    fake_tenant.admin.set_latency(seconds=1.0)
    uid = unique()
    add_bound(srv, uid)
    wait_for("the delivery in flight (its row leased)", lambda: leased_rows(srv), 30, 0.02)
    proc = srv.proc
    if group:          # what systemd does by default: SIGTERM to every process of the unit
        for p in (proc.pid, pid):
            os.kill(p, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    # twistd ends a clean SIGTERM stop by re-raising the signal on itself: -15 is its normal exit
    assert proc.wait(timeout=120) in (0, -signal.SIGTERM)
    fake_tenant.admin.set_latency(seconds=0)
    wait_for("the worker process gone", lambda: not alive(pid), 30)
    text = srv.log.read_text()
    assert "Traceback" not in text, text[text.index("Traceback") - 2000:][:6000]
    assert "ended unexpectedly" not in text
    srv.proc = None
    # what was in flight or queued is delivered after the restart, once
    srv.start()
    wait_tenant(fake_tenant, f"{uid}@{DOMAIN}", timeout=30)
    assert wait_for("synced", lambda: entry(srv, uid).get("o365SyncState") == ["synced"], 30)
    assert len([x for x in fake_tenant.admin.all_users() if x["userPrincipalName"] == f"{uid}@{DOMAIN}"]) == 1


def test_worker_process_lines_outside_the_log_reach_the_server_log(make_server, fake_tenant):
    """What the child writes outside its log (here its interpreter's complaint about a bad
    warnings filter; a crash at import would look the same) shows in the server's log."""
    srv = make_server("sqlite", office365_config(fake_tenant.info), start=False)
    srv.env["PYTHONWARNINGS"] = "error::NotAWarningClass"       # the child's interpreter complains on stderr
    srv.start()
    text = wait_for("the child's complaint", lambda: log_with(srv, "ldapsync.o365-worker#error"), 20)
    assert "NotAWarningClass" in text
    assert srv.run("ldapwhoami").returncode == 0


# -- the wake protocol, against a stand-in child (a real process on real pipes) -------------------


def stand_in_service(tmp_path, script):
    """A WorkerProcessService whose child is ``script`` (a stand-in worker), without a directory."""
    import sys

    from twisted.internet import reactor

    from ldapsync.worker_process import WorkerProcessService

    class Dirsvc:
        class config:
            source = str(tmp_path / "unused.toml")
        planner = None

    svc = WorkerProcessService(Dirsvc(), argv=[sys.executable, str(script)])
    svc.reactor = reactor
    return svc


CHILD = r'''
import json, os, sys, time

def say(text):
    sys.stdout.write(json.dumps(["test.child", "info", time.time(), text]) + "\n")
    sys.stdout.flush()

say("hello from the child")
sys.stdout.write("c\n"); sys.stdout.flush()          # caught up: wake me at the next COMMIT
n = 0
while True:
    data = os.read(0, 100)
    if not data or b"q" in data:
        break
    n += data.count(b"w")
    say(f"wakes {n}")
    time.sleep(0.3)                                   # a drain that claims what was there...
    sys.stdout.write("c\n"); sys.stdout.flush()      # ...and finds nothing more
say("bye")
'''


@pytest_twisted.ensureDeferred
async def test_wakes_go_only_to_a_caught_up_child_and_none_is_lost(tmp_path):

    from twisted.internet import reactor, task
    from twisted.logger import globalLogPublisher


    script = tmp_path / "child.py"
    script.write_text(CHILD)
    seen: list[tuple[str, str]] = []

    def observer(event):
        if event.get("log_namespace") == "test.child":
            seen.append((event["log_level"].name, event["log_child_text"]))
    globalLogPublisher.addObserver(observer)

    svc = stand_in_service(tmp_path, script)
    try:
        svc._spawn()

        async def until(what, cond, timeout=10.0):
            for _ in range(int(timeout / 0.02)):
                if cond():
                    return
                await task.deferLater(reactor, 0.02, lambda: None)
            raise AssertionError(what)

        # Rows may have been queued before the child started: its first "caught up" is answered
        # with a wake at once; the second leaves it waiting for a COMMIT.
        await until("the start-up wake", lambda: ("info", "wakes 1") in seen)
        await until("the child caught up", lambda: svc._hungry)
        assert ("info", "hello from the child") in seen          # its log, under its namespace and level
        for _ in range(3):                                        # three COMMITs: one byte
            svc.wake()
        await until("the wake", lambda: ("info", "wakes 2") in seen)
        # The child says "caught up" again 0.3 s later; two COMMITs came after the byte it got (its
        # claim may have run before them), so it is woken again at once...
        await until("the catch-up wake", lambda: ("info", "wakes 3") in seen)
        # ...and after that, with no COMMIT since, it is left to wait for the next one: the child
        # counts the bytes it got, so an unwanted wake in between would make the next one "wakes 5".
        await until("caught up again", lambda: svc._hungry)
        svc.wake()
        await until("the next wake", lambda: any(t.startswith("wakes") and t not in ("wakes 1", "wakes 2", "wakes 3")
                                                 for _, t in seen))
        await svc.stopService()                                   # "q": the child ends on its own
        assert ("info", "bye") in seen                            # every line it wrote is in
        assert [t for _, t in seen if t.startswith("wakes")] == ["wakes 1", "wakes 2", "wakes 3", "wakes 4"]
        assert "ended unexpectedly" not in " ".join(t for _, t in seen)
    finally:
        globalLogPublisher.removeObserver(observer)
        if svc.pid is not None:
            svc.proto.transport.signalProcess("KILL")
