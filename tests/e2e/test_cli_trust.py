"""A CLI you can trust (issue 18): it never creates an empty database by accident, says in one line
what went wrong (no traceback, exit 2, nothing created), refuses contradictory selections, and the
Microsoft 365 user commands (``o365 users``, ``bind``, ``unbind``, ``status``) against a real server
and the fake tenant."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import BIN, office365_config  # type: ignore[import-not-found]
from helpers import PEOPLE, SUFFIX, unique, user_ldif, wait_for

pytestmark = pytest.mark.e2e
DOMAIN = "contoso.com"          # the fake tenant's verified domain


def ldapsync(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The CLI as a cron job runs it: no --config, from ``cwd``, no $LDAPSYNC_CONFIG."""
    base = {k: v for k, v in os.environ.items() if k != "LDAPSYNC_CONFIG"}
    return subprocess.run([str(BIN / "ldapsync"), *args], capture_output=True, cwd=cwd, timeout=120,
                          env={**base, **(env or {})})


def one_line_error(p: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, nothing on stdout, one line on stderr naming every needle, no traceback."""
    err = p.stderr.decode()
    assert p.returncode == 2, (p.returncode, p.stdout, err)
    assert "Traceback" not in err, err
    assert err.startswith("ldapsync") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, (n, err)
    assert p.stdout == b"", p.stdout
    return err


# -- nothing is created by accident -----------------------------------------------------------

@pytest.mark.parametrize("command", [("ldif", "dump"), ("ldif", "dump", "-o", "backup.ldif"), ("user", "invitations"),
                                     ("user", "unlock", f"uid=x,{PEOPLE}"), ("o365", "users")])
def test_a_command_run_from_the_wrong_directory_refuses_and_creates_nothing(tmp_path, command):
    p = ldapsync(*command, cwd=tmp_path)
    one_line_error(p, "<embedded defaults>", str(tmp_path / "var" / "ldapsync.db"), "ldapsync init")
    assert sorted(os.listdir(tmp_path)) == []          # no var/, no var/ldapsync.db, no backup.ldif


def test_relative_paths_in_a_config_file_are_the_config_files_own(tmp_path):
    """A cron job or a service runs the CLI from anywhere: the file names a config gives
    (database, secret key, admin password) are found next to the config, not in the working
    directory, by init, by later commands and by the server alike."""
    etc, cron, other = tmp_path / "etc", tmp_path / "cron", tmp_path / "other"
    for d in (etc, cron, other):
        d.mkdir()
    (etc / "ldapsync.toml").write_text(
        '[directory]\ndatabase = "sqlite:///data/ldapsync.db"\n'
        '[admin]\npassword_file = "data/admin-password"\n'
        '[secrets]\nkey_file = "data/secret.key"\n'
        '[selfservice]\nlisten = ""\n')
    config = str(etc / "ldapsync.toml")
    p = ldapsync("--config", config, "init", cwd=cron)
    assert p.returncode == 0, p.stderr
    assert {f.name for f in (etc / "data").iterdir()} >= {"ldapsync.db", "admin-password"}
    p = ldapsync("--config", config, "ldif", "dump", cwd=other)
    assert p.returncode == 0 and b"dumped 6 entries" in p.stderr, p.stderr
    assert os.listdir(cron) == [] and os.listdir(other) == []


def test_only_init_creates_the_sqlite_database(make_server, tmp_path):
    srv = make_server("sqlite", start=False)
    db = Path(srv.db_url.removeprefix("sqlite:///"))
    p = srv.cli("ldif", "load", "-")
    one_line_error(p, str(srv.config_path), str(db), "ldapsync init")
    assert not db.exists()
    assert srv.cli("init").returncode == 0
    assert db.exists()
    p = srv.cli("ldif", "dump")
    assert p.returncode == 0 and b"dumped 6 entries" in p.stderr, p.stderr


def test_a_postgresql_database_without_the_schema_is_refused_with_its_password_hidden(make_server):
    srv = make_server("postgresql", start=False)
    password = srv.db_url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    p = srv.cli("ldif", "dump")
    err = one_line_error(p, "holds no ldapsync tables", ":***@", str(srv.config_path), "ldapsync init")
    assert f":{password}@" not in err
    eng = sa.create_engine(srv.db_url)
    try:
        assert sa.inspect(eng).get_table_names() == []          # nothing was created
    finally:
        eng.dispose()
    assert srv.cli("init").returncode == 0
    assert srv.cli("ldif", "dump").returncode == 0


# -- files: one line, exit 2 ------------------------------------------------------------------

def test_missing_or_unusable_files_are_one_line_not_a_traceback(make_server, tmp_path):
    srv = make_server("sqlite", start=False)
    assert srv.cli("init").returncode == 0
    one_line_error(srv.cli("ldif", "load", str(tmp_path / "missing.ldif")), "missing.ldif: No such file or directory")
    one_line_error(srv.cli("ldif", "load", str(tmp_path)), f"{tmp_path}: Is a directory")
    one_line_error(srv.cli("ldif", "dump", "-o", str(tmp_path / "no" / "dir" / "x.ldif")), "No such file or directory")
    assert not (tmp_path / "no").exists()
    one_line_error(srv.cli("ldif", "dump", "-o", str(tmp_path)), "Is a directory")
    # a config file that cannot be read (a directory: root reads any file whatever its mode)
    p = ldapsync("--config", str(tmp_path), "ldif", "dump", cwd=tmp_path)
    one_line_error(p, f"config file {tmp_path}", "Is a directory")
    p = ldapsync("--config", str(tmp_path / "nope.toml"), "init", cwd=tmp_path)
    one_line_error(p, "nope.toml")
    assert not (tmp_path / "var").exists()


def test_import_selections_that_contradict_each_other_are_refused(tmp_path):
    for args in (["--all", "--user", "a@contoso.com"], ["--all", "--filter", "x"], ["--user", "a@contoso.com", "--filter", "x"]):
        p = ldapsync("o365", "import", *args, cwd=tmp_path)
        assert p.returncode == 2 and b"not allowed with argument" in p.stderr, (args, p.stderr)
        assert b"Traceback" not in p.stderr
    assert os.listdir(tmp_path) == []


# -- o365 users / bind / unbind / status against the fake tenant --------------------------------

def _state(srv, dn: str) -> str:
    p = srv.cli("o365", "users", "--json")
    import json

    for line in p.stdout.decode().splitlines():
        row = json.loads(line)
        if row["dn"] == dn:
            return row["state"] or ""
    return ""


def test_o365_bind_users_unbind_and_status(make_server, fake_tenant):
    srv = make_server("sqlite", office365_config(fake_tenant.info))
    wait_for("connector active", lambda: b"state: active" in srv.cli("o365", "status").stdout, 60, 0.5)
    ok, other, broken = unique("cb"), unique("cb"), unique("cb")
    for uid, domain in ((ok, DOMAIN), (other, "example.com"), (broken, DOMAIN)):
        srv.run("ldapadd", input=user_ldif(uid, password="Corr3ct-Horse-Battery!", domain=domain), check=True)
    ok_dn, other_dn, broken_dn = (f"uid={u},{PEOPLE}" for u in (ok, other, broken))
    missing_dn = f"uid={unique('nobody')},{PEOPLE}"

    p = srv.cli("o365", "bind", ok_dn, other_dn, missing_dn)
    assert p.returncode == 1, p.stdout + p.stderr
    out, err = p.stdout.decode(), p.stderr.decode()
    assert f"{ok_dn}: bound" in out
    assert re.search(rf"^{re.escape(other_dn)}: .*example\.com.*\(constraintViolation\)$", err, re.M), err
    assert re.search(rf"^{re.escape(missing_dn)}: .*\(noSuchObject\)$", err, re.M), err
    assert "Traceback" not in err
    wait_for("the bound user synced", lambda: _state(srv, ok_dn) == "synced", 60, 0.5)
    assert fake_tenant.admin.get_user(key=f"{ok}@{DOMAIN}") is not None
    assert srv.cli("o365", "bind", ok_dn).stdout.decode().strip() == f"{ok_dn}: already bound"

    # a user in error: its create refused by Graph (a permanent 403)
    fake_tenant.admin.inject_fault(status=403, count=1, method="POST", path=r"/users$")
    assert srv.cli("o365", "bind", broken_dn).returncode == 0
    wait_for("the user in error", lambda: _state(srv, broken_dn) == "error", 60, 0.5)
    p = srv.cli("o365", "users", "--state", "error")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith(broken_dn) and f"{broken}@{DOMAIN}" in lines[0] and " error " in lines[0], lines
    listing = srv.cli("o365", "users").stdout.decode().splitlines()
    assert [line.split()[0] for line in listing] == sorted([ok_dn, broken_dn], key=str.lower)
    assert len({line.rindex(DOMAIN) + len(DOMAIN) for line in listing}) == 1      # aligned columns
    assert srv.cli("o365", "users", "--state", "held").stdout.decode().strip() == "no bound users in state held"

    p = srv.cli("o365", "status")
    out = p.stdout.decode()
    assert "bound users: 2 (1 synced, 0 pending, 1 in error, 0 disabled)" in out, out
    assert "users with a change held by the mass-disable guard: 0" in out, out
    assert "o365 users --state error" in out
    expiry = [line for line in out.splitlines() if line.startswith("credential expires")]
    assert expiry and re.fullmatch(r"credential expires: \d{4}-\d\d-\d\d \d\d:\d\d UTC", expiry[0]), out
    assert re.search(r"^last success: \d{4}-\d\d-\d\d \d\d:\d\d UTC$", out, re.M), out

    p = srv.cli("o365", "unbind", ok_dn, other_dn)
    assert p.returncode == 1
    assert f"{ok_dn}: unbound" in p.stdout.decode()
    assert p.stderr.decode().startswith(f"{other_dn}: not bound")
    wait_for("disabled in Microsoft 365", lambda: fake_tenant.admin.get_user(key=f"{ok}@{DOMAIN}")["accountEnabled"] is False, 60, 0.5)
    assert [line.split()[0] for line in srv.cli("o365", "users").stdout.decode().splitlines()] == [broken_dn]


def test_o365_users_held_by_the_mass_disable_guard(make_server, fake_tenant):
    """One write unbinding more users than disable_threshold is held: `o365 users --state held`
    lists them and `o365 status` counts them, until `o365 release`."""
    srv = make_server("sqlite", office365_config(fake_tenant.info, disable_threshold=1))
    wait_for("connector active", lambda: b"state: active" in srv.cli("o365", "status").stdout, 60, 0.5)
    uids = [unique("hd") for _ in range(2)]
    dns = [f"uid={u},{PEOPLE}" for u in uids]
    for uid in uids:
        srv.run("ldapadd", input=user_ldif(uid, password="Corr3ct-Horse-Battery!", domain=DOMAIN), check=True)
    tag = f"cn=Provisioning - Office 365,ou=tags,{SUFFIX}"
    members = "".join(f"member: {dn}\n" for dn in dns)
    srv.run("ldapmodify", input=f"dn: {tag}\nchangetype: modify\nadd: member\n{members}", check=True)
    for dn in dns:
        wait_for("synced", lambda dn=dn: _state(srv, dn) == "synced", 60, 0.5)
    srv.run("ldapmodify", input=f"dn: {tag}\nchangetype: modify\ndelete: member\n{members}", check=True)
    wait_for("held", lambda: len(srv.cli("o365", "users", "--state", "held").stdout.splitlines()) == 2, 30, 0.5)
    lines = srv.cli("o365", "users", "--state", "held").stdout.decode().splitlines()
    assert [line.split()[0] for line in lines] == sorted(dns, key=str.lower)
    assert all("held (unbound)" in line for line in lines), lines
    out = srv.cli("o365", "status").stdout.decode()
    assert "users with a change held by the mass-disable guard: 2" in out, out
    assert "2 held (`ldapsync o365 release`)" in out, out
    assert srv.cli("o365", "release").returncode == 0
    assert srv.cli("o365", "users", "--state", "held").stdout.decode().strip() == "no bound users in state held"


def test_reconcile_and_import_refuse_while_the_connector_is_not_active(make_server, fake_tenant):
    """A tenant in an outage: the commands print the connector's state and refuse in one line."""
    fake_tenant.admin.outage(seconds=None, mode="503")
    try:
        srv = make_server("sqlite", office365_config(fake_tenant.info), start=False)
        assert srv.cli("init").returncode == 0
        for args, consequence in ((("o365", "reconcile"), "nothing was compared"),
                                  (("o365", "import", "--all"), "nothing was imported")):
            p = srv.cli(*args)
            out, err = p.stdout.decode(), p.stderr.decode()
            assert p.returncode == 2, out + err
            assert "state: error" in out and "Traceback" not in err
            assert f"the connector is not active; {consequence}" in err
    finally:
        fake_tenant.admin.end_outage()
