"""``[ldap] processes = 2``: a real server (twistd) whose LDAP connections are answered by two
processes, the server's and one it starts (``ldapsync/ldap_processes.py``), on one database.

Which process holds a connection is read from /proc (the server side of the TCP connection and
the process that has its socket open), so the tests pick connections on each process on purpose:
writes through one are read through the other at once, wrong passwords through both add up to a
lock, and the lifecycle an admin relies on holds (SIGTERM stops all, kill -9 of the server takes
the others with it, a killed LDAP process is started again while the others go on answering).
"""

from __future__ import annotations

import os
import signal
import ssl

import pytest
from conftest import child_pids, office365_config  # type: ignore[import-not-found]
from helpers import ADMIN_DN, PEOPLE, alive, unique, user_ldif, wait_for
from ldap3 import BASE, MODIFY_REPLACE, Connection, Server, Tls

pytestmark = pytest.mark.e2e

TWO = "[ldap]\nprocesses = 2\n"


def ldap_pids(srv) -> list[int]:
    """The server's process and its LDAP processes (not the Microsoft 365 worker)."""
    out = [srv.proc.pid]
    for pid in child_pids(srv.proc.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"ldapsync.ldap_processes" in f.read():
                    out.append(pid)
        except OSError:
            pass
    return out


def wait_ldap_children(srv, count: int = 1, timeout: float = 30) -> list[int]:
    """The LDAP processes' pids once ``count`` of them answer on their sockets (they log it)."""
    def ready() -> list[int] | None:
        pids = ldap_pids(srv)[1:]
        text = srv.log.read_text(errors="replace")
        return pids if len(pids) == count and all(f"(pid {p}) answering" in text for p in pids) else None
    return wait_for("the LDAP processes answering", ready, timeout, 0.1)


def _socket_inodes(pid: int) -> set[int]:
    out = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                out.add(int(link[8:-1]))
    except OSError:
        pass
    return out


def _tcp_rows() -> list[tuple[int, int, int, int]]:
    """(local port, remote port, state, inode) of every TCP socket (IPv4 and IPv6)."""
    rows = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(name).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            rows.append((int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16), int(f[3], 16), int(f[9])))
    return rows


def process_of(srv, conn: Connection) -> int | None:
    """The pid of the server process that holds ``conn``'s server side."""
    client_port = conn.socket.getsockname()[1]
    inodes = {inode for lport, rport, state, inode in _tcp_rows()
              if rport == client_port and lport in (srv.port, srv.ldaps_port) and state == 0x01}
    for pid in ldap_pids(srv):
        if inodes & _socket_inodes(pid):
            return pid
    return None


def connect(srv, *, user: str = ADMIN_DN, password: str | None = None, ldaps: bool = False,
            starttls: bool = False) -> Connection:
    tls = Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(srv.ca)) if ldaps or starttls else None
    server = Server("127.0.0.1", port=srv.ldaps_port if ldaps else srv.port, use_ssl=ldaps, tls=tls)
    conn = Connection(server, user=user, password=srv.admin_password if password is None else password)
    conn.open()
    if starttls:
        assert conn.start_tls()
    return conn


def on_each_process(srv, n: int = 2, **kw) -> dict[int, Connection]:
    """One open connection on each of the server's ``n`` LDAP processes (bounded: 200 tries)."""
    found: dict[int, Connection] = {}
    spare: list[Connection] = []
    for _ in range(200):
        conn = connect(srv, **kw)
        pid = process_of(srv, conn)
        if pid is not None and pid not in found:
            found[pid] = conn
        else:
            spare.append(conn)
        if len(found) == n:
            break
    for conn in spare:
        conn.unbind()
    assert len(found) == n, f"connections landed on {list(found)} only"
    return found


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_connections_spread_over_both_processes_and_writes_are_read_at_once_by_the_other(make_server, backend):
    srv = make_server(backend, TWO)
    wait_ldap_children(srv)
    # many connections: both processes get a fair share (the kernel spreads them, SO_REUSEPORT)
    conns = [connect(srv) for _ in range(40)]
    counts: dict[int | None, int] = {}
    for conn in conns:
        pid = process_of(srv, conn)
        counts[pid] = counts.get(pid, 0) + 1
    assert None not in counts and len(counts) == 2, counts
    assert min(counts.values()) >= 5, counts
    for conn in conns:
        assert conn.bind()
    by_pid: dict[int, Connection] = {}
    for conn in conns:
        by_pid.setdefault(process_of(srv, conn), conn)
    a, b = by_pid.values()
    # a write through one process is there for a search through the other, with no wait
    for writer, reader in ((a, b), (b, a)):
        uid = unique("mp")
        dn = f"uid={uid},{PEOPLE}"
        assert writer.add(dn, ["inetOrgPerson"], {"uid": uid, "cn": uid, "sn": "One"}), writer.result
        assert reader.search(dn, "(objectClass=*)", BASE, attributes=["sn"]) and reader.entries[0].sn.value == "One"
        assert writer.modify(dn, {"sn": [(MODIFY_REPLACE, ["Two"])]}), writer.result
        assert reader.search(dn, "(objectClass=*)", BASE, attributes=["sn"]) and reader.entries[0].sn.value == "Two"
        assert reader.search(PEOPLE, f"(uid={uid})", attributes=["uid"]) and len(reader.entries) == 1
    for conn in conns:
        conn.unbind()
    # bootstrap ran once, in the server process, before the other process started
    text = srv.log.read_text()
    assert text.count("created cn=admin,") <= 1 and "ldap-1] created" not in text


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_wrong_passwords_through_both_processes_add_up_to_a_lock(make_server, backend):
    srv = make_server(backend, TWO + "[policy]\nlockout_failures = 3\nlockout_duration = \"10m\"\n")
    wait_ldap_children(srv)
    uid = unique("lk")
    dn = f"uid={uid},{PEOPLE}"
    srv.run("ldapadd", input=user_ldif(uid, password="Lock-Pass-01"), check=True)
    conns = on_each_process(srv, user=dn, password="Wrong-Pass-1")
    (pa, a), (pb, b) = conns.items()
    assert pa != pb
    assert not a.bind() and a.result["result"] == 49
    assert not b.bind() and b.result["result"] == 49
    # two failures (one per process): not locked yet, and the count is the database's
    state = srv.run("ldapsearch", "-LLL", "-b", dn, "-s", "base", "(objectClass=*)", "pwdFailureTime", "pwdAccountLockedTime")
    assert state.stdout.count("pwdFailureTime:") == 2 and "pwdAccountLockedTime" not in state.stdout
    assert not a.bind() and a.result["result"] == 49            # the third, on the first process: locked
    state = srv.run("ldapsearch", "-LLL", "-b", dn, "-s", "base", "(objectClass=*)", "pwdAccountLockedTime")
    assert "pwdAccountLockedTime:" in state.stdout
    # the right password is refused on the other process too
    b.password = "Lock-Pass-01"
    assert not b.bind() and b.result["result"] == 49
    a.password = "Lock-Pass-01"
    assert not a.bind() and a.result["result"] == 49
    for conn in (a, b):
        conn.unbind()


def test_ldaps_and_starttls_are_answered_by_both_processes(make_server):
    srv = make_server("sqlite", TWO)
    wait_ldap_children(srv)
    for kw in ({"ldaps": True}, {"starttls": True}):
        conns = on_each_process(srv, **kw)
        for conn in conns.values():
            assert conn.bind(), (kw, conn.result)
            assert conn.extend.standard.who_am_i() == f"dn:{ADMIN_DN}"
            conn.unbind()


def test_sigterm_stops_every_process_and_kill_9_takes_them_with_it(make_server):
    srv = make_server("sqlite", TWO)
    children = wait_ldap_children(srv)
    proc = srv.proc
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    wait_for("the LDAP process gone", lambda: not any(alive(p) for p in children), 20)
    text = srv.log.read_text()
    assert "Traceback" not in text, text[text.index("Traceback") - 2000:][:6000]
    assert "ended unexpectedly" not in text and "did not stop" not in text
    srv.proc = None
    # SIGTERM to the whole process group (a service manager): the same clean stop
    srv.start()
    children = wait_ldap_children(srv)
    for pid in (srv.proc.pid, *children):
        os.kill(pid, signal.SIGTERM)
    assert srv.proc.wait(timeout=60) in (0, -signal.SIGTERM)
    wait_for("the LDAP process gone", lambda: not any(alive(p) for p in children), 20)
    assert "ended unexpectedly" not in srv.log.read_text()
    srv.proc = None
    # kill -9 of the server: no orphan keeps answering on the port
    srv.start()
    children = wait_ldap_children(srv)
    srv.stop(signal.SIGKILL)
    wait_for("the LDAP process gone", lambda: not any(alive(p) for p in children), 10)


def test_a_killed_ldap_process_is_started_again_and_the_other_answers_meanwhile(make_server):
    srv = make_server("sqlite", TWO)
    (first,) = wait_ldap_children(srv)
    # the new process runs with the server's configuration, not the file as it is now
    srv.config_path.write_text("[ldap]\nlisten = not toml\n")
    os.kill(first, signal.SIGKILL)
    # (a connection the kernel gave the dying process in its last moment is reset: documented)
    wait_for("the end logged", lambda: "LDAP process 1 (pid %d) ended unexpectedly (signal 9)" % first
             in srv.log.read_text(), 10)
    for _ in range(5):                                   # the server's own process goes on answering
        assert srv.run("ldapwhoami").returncode == 0
    (second,) = wait_ldap_children(srv)
    assert second != first and alive(second)
    conns = on_each_process(srv)
    assert second in conns
    for conn in conns.values():
        assert conn.bind()
        conn.unbind()


def test_the_other_process_logs_into_the_server_log_with_its_tag(make_server):
    srv = make_server("sqlite", TWO + "[log]\naccess = true\n")
    (child,) = wait_ldap_children(srv)
    conns = on_each_process(srv)
    for pid, conn in conns.items():
        peer = f"peer=127.0.0.1:{conn.socket.getsockname()[1]} "
        assert conn.bind()
        conn.search(PEOPLE, "(uid=nobody-here)", attributes=["uid"])
        conn.unbind()

        def logged(peer: str = peer) -> list[str]:
            return [x for x in srv.log.read_text().splitlines() if peer in x and f'SEARCH dn="{PEOPLE}"' in x]
        (line,) = wait_for("the search's access line", logged, 10)
        # the other process's lines say which one it is (its conn= numbers are its own)
        assert (" ldap-1]" in line) == (pid == child), line


def test_writes_through_either_process_reach_microsoft_365(make_server, fake_tenant):
    from sync.test_worker import DOMAIN, PASSWORD, wait_active, wait_tenant  # type: ignore[import-not-found]

    srv = make_server("sqlite", TWO + office365_config(fake_tenant.info))
    wait_ldap_children(srv)
    wait_active(srv)
    conns = on_each_process(srv)
    for _ in range(3):                                    # the worker is caught up between rounds: each wakes it
        for conn in conns.values():
            assert conn.bind()
            uid = unique("w")
            attrs = {"uid": uid, "cn": uid, "sn": "Person", "givenName": uid, "mail": f"{uid}@{DOMAIN}",
                     "ldapsyncDirectory": "office365", "userPassword": PASSWORD}
            assert conn.add(f"uid={uid},{PEOPLE}", ["inetOrgPerson", "ldapsyncUser"], attrs), conn.result
            wait_tenant(fake_tenant, f"{uid}@{DOMAIN}", timeout=30)
            assert fake_tenant.admin.password_of(key=f"{uid}@{DOMAIN}") == PASSWORD
    for conn in conns.values():
        conn.unbind()


def test_metrics_add_up_both_processes(make_server):
    from conftest import free_port  # type: ignore[import-not-found]
    from ops.test_metrics_e2e import ops, scrape, value  # type: ignore[import-not-found]

    port = free_port()
    srv = make_server("sqlite", TWO + f'[metrics]\nlisten = "tcp:{port}:interface=127.0.0.1"\n')
    wait_ldap_children(srv)
    before = scrape(port)
    conns = on_each_process(srv)
    for conn in conns.values():
        for _ in range(3):
            assert conn.bind()
    # open connections: both processes' (livesum), then their binds, all on the server's page
    assert value(scrape(port), "ldapsync_ldap_connections") >= 2
    for conn in conns.values():
        conn.unbind()

    def counted() -> dict | None:
        now = scrape(port)
        return now if ops(now, "bind", "success") - ops(before, "bind", "success") >= 6 else None
    after = wait_for("the binds counted", counted, 10)
    assert ops(after, "bind", "success") - ops(before, "bind", "success") == 6


def test_a_user_bound_without_a_password_through_either_process_gets_the_activation_mail(make_server, fake_tenant,
                                                                                       smtp_sink):
    from helpers import wait_mail
    from sync.test_worker import DOMAIN  # type: ignore[import-not-found]

    srv = make_server("sqlite", TWO + office365_config(fake_tenant.info) + f'[mail]\nsmtp = "{smtp_sink.endpoint}"\n')
    wait_ldap_children(srv)
    conns = on_each_process(srv)
    for conn in conns.values():
        assert conn.bind()
        uid = unique("act")
        attrs = {"uid": uid, "cn": uid, "sn": "Person", "givenName": uid, "mail": f"{uid}@{DOMAIN}",
                 "ldapsyncAltMail": f"{uid}@home.example", "ldapsyncDirectory": "office365"}
        assert conn.add(f"uid={uid},{PEOPLE}", ["inetOrgPerson", "ldapsyncUser"], attrs), conn.result
        # the server's process mails at once; the other's link is mailed by the pages' poll (3 s)
        wait_mail(smtp_sink, f"{uid}@home.example", timeout=30)
        conn.unbind()


def test_one_process_is_one_process(make_server):
    srv = make_server("sqlite", "[ldap]\nprocesses = 1\n")
    assert srv.run("ldapwhoami").returncode == 0
    assert ldap_pids(srv) == [srv.proc.pid]
    assert "LDAP process" not in srv.log.read_text()
