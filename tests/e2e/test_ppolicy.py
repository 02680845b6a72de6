"""The password policy end to end: a real server (SQLite and PostgreSQL), real ldap-utils clients.

Time moves with ``Server.advance_clock`` (the server's policy clock, see ldapsync/clock.py), so
expiry and lock durations are tested without sleeping.  Every test makes its own users right
before it needs them, because a clock moved by one test stays moved for the next.
"""

from __future__ import annotations

import time

import pytest
from helpers import ADMIN_DN, PEOPLE, parse_ldif_output, unique, user_ldif

pytestmark = pytest.mark.e2e

DAY = 86400
SERVER_CONFIG = """
[policy]
history = 2
max_age = "30d"
expire_warning = "5d"
grace_logins = 1
lockout_failures = 3
lockout_duration = "10m"
failure_window = "10m"
"""


def new_user(server, password: str = "Initial-Pass1") -> str:
    uid = unique("pp")
    server.run("ldapadd", input=user_ldif(uid, password=password), check=True)
    return f"uid={uid},{PEOPLE}"


def whoami(server, dn: str, password: str, *extra: str):
    return server.run("ldapwhoami", *extra, bind=dn, password=password)


def pwd_attrs(server, dn: str, *, bind: str = ADMIN_DN, password: str | None = None) -> dict[str, list[str]]:
    p = server.run("ldapsearch", "-LLL", "-b", dn, "-s", "base", "(objectClass=*)", "+", bind=bind, password=password)
    assert p.returncode == 0, p.stderr
    got = parse_ldif_output(p.stdout).get(dn, {})
    return {k: v for k, v in got.items() if k.startswith("pwd")}


def test_weak_passwords_are_refused_with_the_rule(server):
    dn = new_user(server)
    p = server.run("ldappasswd", "-s", "Sh0rt!", dn)             # ldappasswd prints the result on stdout, exits 1
    assert p.returncode == 1 and "Constraint violation (19)" in p.stdout, p.stdout
    assert "Additional info: password must be at least 8 characters" in p.stdout
    p = server.run("ldapmodify", input=f"dn: {dn}\nchangetype: modify\nreplace: userPassword\nuserPassword: nocomplexity\n")
    assert p.returncode == 19, p.stderr
    assert "password must contain at least 3 of: lowercase, uppercase, digits, symbols" in p.stderr
    assert "nocomplexity" not in p.stderr
    uid = unique("pw")
    p = server.run("ldapadd", input=user_ldif(uid, password="weakweak"))
    assert p.returncode == 19 and "at least 3 of" in p.stderr
    # the user changing their own password is held to the same rules
    p = server.run("ldappasswd", "-a", "Initial-Pass1", "-s", "abcdefgh", bind=dn, password="Initial-Pass1")
    assert "Constraint violation (19)" in p.stdout and "at least 3 of" in p.stdout
    assert whoami(server, dn, "Initial-Pass1").returncode == 0


def test_history_refuses_recent_passwords(server):
    dn = new_user(server, "Hist-Pass-01")
    cur = "Hist-Pass-01"
    for nxt in ("Hist-Pass-02", "Hist-Pass-03"):
        p = server.run("ldappasswd", "-a", cur, "-s", nxt, bind=dn, password=cur)
        assert p.returncode == 0, p.stderr
        cur = nxt
    for old in ("Hist-Pass-01", "Hist-Pass-02", "Hist-Pass-03"):
        p = server.run("ldappasswd", "-a", cur, "-s", old, bind=dn, password=cur)
        assert "Constraint violation (19)" in p.stdout, (old, p.stdout)
        assert "password was used recently (last 2 passwords)" in p.stdout
    # ldapmodify delete-old/add-new is held to it too
    p = server.run("ldapmodify", bind=dn, password=cur, input=(
        f"dn: {dn}\nchangetype: modify\ndelete: userPassword\nuserPassword: {cur}\n-\n"
        f"add: userPassword\nuserPassword: Hist-Pass-02\n-\n"))
    assert p.returncode == 19 and "used recently" in p.stderr
    hist = pwd_attrs(server, dn)["pwdHistory"]
    assert len(hist) == 2 and all(v.split("#")[1] == "1.3.6.1.4.1.1466.115.121.1.40" for v in hist)


def test_lockout_then_unlock_by_time_and_by_admin(server):
    dn = new_user(server, "Lock-Pass-01")
    for _ in range(3):
        assert whoami(server, dn, "Wrong-Pass-1").returncode == 49
    p = whoami(server, dn, "Lock-Pass-01", "-e", "ppolicy")
    assert p.returncode == 49 and "Invalid credentials" in p.stderr
    assert "Account locked" in p.stderr, p.stderr                 # only because the client asked (-e ppolicy)
    assert "locked" not in whoami(server, dn, "Lock-Pass-01").stderr.lower()
    state = pwd_attrs(server, dn)
    assert len(state["pwdFailureTime"]) == 3 and len(state["pwdAccountLockedTime"]) == 1
    server.advance_clock(601)                                     # lockout_duration = 10m
    assert whoami(server, dn, "Lock-Pass-01").returncode == 0
    state = pwd_attrs(server, dn)
    assert "pwdFailureTime" not in state and "pwdAccountLockedTime" not in state

    for _ in range(3):
        whoami(server, dn, "Wrong-Pass-1")
    assert whoami(server, dn, "Lock-Pass-01").returncode == 49
    # the user cannot unlock themselves (they cannot even bind); an admin deletes the lock
    p = server.run("ldapmodify", input=f"dn: {dn}\nchangetype: modify\ndelete: pwdAccountLockedTime\n")
    assert p.returncode == 0, p.stderr
    assert whoami(server, dn, "Lock-Pass-01").returncode == 0
    # an admin can also lock by hand (for lockout_duration), with the current time
    offset = float(server.clock_file.read_text()) if server.clock_file.exists() else 0.0
    locked_at = time.strftime("%Y%m%d%H%M%SZ", time.gmtime(time.time() + offset - 5))   # the server's "now"
    p = server.run("ldapmodify", input=f"dn: {dn}\nchangetype: modify\nadd: pwdAccountLockedTime\npwdAccountLockedTime: {locked_at}\n")
    assert p.returncode == 0, p.stderr
    assert whoami(server, dn, "Lock-Pass-01").returncode == 49


def test_failures_outside_the_window_do_not_lock(server):
    dn = new_user(server, "Window-Pass1")
    for _ in range(2):
        whoami(server, dn, "Wrong-Pass-1")
    server.advance_clock(601)                                     # failure_window = 10m
    whoami(server, dn, "Wrong-Pass-1")
    assert whoami(server, dn, "Window-Pass1").returncode == 0
    assert "pwdFailureTime" not in pwd_attrs(server, dn)        # a success forgets failures


def test_expiry_warning_grace_login_then_expired(server):
    dn = new_user(server, "Expire-Pass1")
    p = whoami(server, dn, "Expire-Pass1", "-e", "ppolicy")
    assert p.returncode == 0 and "expires" not in p.stderr, p.stderr
    server.advance_clock(26 * DAY)                                # 4 days left, inside expire_warning = 5d
    p = whoami(server, dn, "Expire-Pass1", "-e", "ppolicy")
    assert p.returncode == 0 and f"dn:{dn}" in p.stdout, p.stderr
    assert "Password expires in " in p.stderr, p.stderr
    secs = int(p.stderr.split("Password expires in ")[1].split()[0])
    assert 4 * DAY - 120 <= secs <= 4 * DAY
    server.advance_clock(4 * DAY + 60)                            # past max_age: one grace login
    p = whoami(server, dn, "Expire-Pass1", "-e", "ppolicy")
    assert p.returncode == 0 and "Password expired, 0 grace logins remain" in p.stderr, p.stderr
    p = whoami(server, dn, "Expire-Pass1", "-e", "ppolicy")
    assert p.returncode == 49 and "Password expired" in p.stderr, p.stderr
    assert whoami(server, dn, "Expire-Pass1").returncode == 49
    assert len(pwd_attrs(server, dn)["pwdGraceUseTime"]) == 1
    # an admin sets a new password: the clock starts again, grace uses are forgotten
    assert server.run("ldappasswd", "-s", "Renewed-Pass1", dn).returncode == 0
    assert whoami(server, dn, "Renewed-Pass1").returncode == 0
    assert "pwdGraceUseTime" not in pwd_attrs(server, dn)


def test_admin_is_exempt_from_lockout_and_expiry(server):
    for _ in range(6):
        assert whoami(server, ADMIN_DN, "Wrong-Pass-1").returncode == 49
    server.advance_clock(120 * DAY)
    p = whoami(server, ADMIN_DN, server.admin_password, "-e", "ppolicy")
    assert p.returncode == 0 and "expire" not in p.stderr.lower(), p.stderr
    assert "pwdFailureTime" not in pwd_attrs(server, ADMIN_DN)


def test_policy_state_is_for_admins_only(server):
    dn = new_user(server, "State-Pass1")
    whoami(server, dn, "Wrong-Pass-1")
    assert server.run("ldappasswd", "-a", "State-Pass1", "-s", "State-Pass2", bind=dn, password="State-Pass1").returncode == 0
    whoami(server, dn, "Wrong-Pass-1")
    admin_view = pwd_attrs(server, dn)
    assert {"pwdChangedTime", "pwdHistory", "pwdFailureTime"} <= set(admin_view)
    # by name, too
    p = server.run("ldapsearch", "-LLL", "-b", dn, "-s", "base", "(objectClass=*)", "pwdChangedTime")
    assert "pwdChangedTime:" in p.stdout
    # the user sees none of it, cannot probe it with a filter or compare, and cannot write it
    assert pwd_attrs(server, dn, bind=dn, password="State-Pass2") == {}
    p = server.run("ldapsearch", "-LLL", "-b", dn, "-s", "base", "(pwdFailureTime=*)", "1.1", bind=dn, password="State-Pass2")
    assert p.returncode == 0 and dn not in p.stdout
    p = server.run("ldapcompare", dn, "pwdChangedTime:" + admin_view["pwdChangedTime"][0], bind=dn, password="State-Pass2")
    assert p.returncode == 50
    p = server.run("ldapmodify", bind=dn, password="State-Pass2",
                   input=f"dn: {dn}\nchangetype: modify\nreplace: pwdChangedTime\npwdChangedTime: 20990101000000Z\n")
    assert p.returncode == 19 and "no user modification" in p.stderr
    p = server.run("ldapmodify", bind=dn, password="State-Pass2",
                   input=f"dn: {dn}\nchangetype: modify\ndelete: pwdFailureTime\n")
    assert p.returncode == 50
    # an admin may clear failures, but not rewrite history
    whoami(server, dn, "Wrong-Pass-1")
    assert server.run("ldapmodify", input=f"dn: {dn}\nchangetype: modify\ndelete: pwdFailureTime\n").returncode == 0
    p = server.run("ldapmodify", input=f"dn: {dn}\nchangetype: modify\ndelete: pwdHistory\n")
    assert p.returncode == 19


def test_root_dse_lists_the_control(server):
    p = server.run("ldapsearch", "-LLL", "-b", "", "-s", "base", "(objectClass=*)", "supportedControl", bind=None)
    assert "1.3.6.1.4.1.42.2.27.8.5.1" in p.stdout


def test_lockout_until_admin_and_policy_off(make_server):
    srv = make_server("sqlite", '[policy]\nlockout_failures = 2\nlockout_duration = "0"\nmax_age = "0"\nhistory = 0\n')
    dn = new_user(srv, "Forever-Pass1")
    for _ in range(2):
        whoami(srv, dn, "Wrong-Pass-1")
    srv.advance_clock(400 * DAY)
    assert whoami(srv, dn, "Forever-Pass1").returncode == 49      # still locked; never expired
    assert srv.run("ldapmodify", input=f"dn: {dn}\nchangetype: modify\ndelete: pwdAccountLockedTime\n").returncode == 0
    assert whoami(srv, dn, "Forever-Pass1").returncode == 0
    # history = 0: the same password may be set again
    assert srv.run("ldappasswd", "-a", "Forever-Pass1", "-s", "Forever-Pass1", bind=dn, password="Forever-Pass1").returncode == 0


def test_cli_user_unlock(server):
    dn = new_user(server)
    for _ in range(3):
        assert whoami(server, dn, "Wrong-Pass-9").returncode == 49
    assert whoami(server, dn, "Initial-Pass1").returncode == 49          # locked
    p = server.cli("user", "unlock", dn)
    assert p.returncode == 0 and p.stdout.decode().strip() == f"{dn}: unlocked", p
    assert "pwdAccountLockedTime" not in pwd_attrs(server, dn) and "pwdFailureTime" not in pwd_attrs(server, dn)
    assert whoami(server, dn, "Initial-Pass1").returncode == 0
    assert whoami(server, dn, "Wrong-Pass-9").returncode == 49
    p = server.cli("user", "unlock", dn)
    assert p.stdout.decode().strip() == f"{dn}: 1 failed attempt(s) forgotten"
    assert server.cli("user", "unlock", dn).stdout.decode().strip() == f"{dn}: not locked"
    p = server.cli("user", "unlock", f"uid=nobody,{PEOPLE}")
    assert p.returncode == 1 and b"no entry" in p.stderr
