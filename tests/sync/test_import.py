"""`ldapsync o365 import`: end to end (marked e2e: the fake tenant process, a real server (twistd),
ldap-utils), and in process on real SQLite/PostgreSQL with a stub Graph client (not e2e).

The tenant is seeded with users covering each rule (alias present/absent, guest, unverified
domain, collisions on uid and on mail, odd characters, no usable username); the CLI lists,
dry-runs and imports them; the result is checked over LDAP.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from conftest import _make_server, drop_pg_database, office365_config  # type: ignore[import-not-found]
from helpers import PEOPLE, parse_ldif_output, user_ldif

from ldapsync.sync.importer import normalize_uid

CONNECTOR = f"cn=office365,ou=directories,{PEOPLE.split(',', 1)[1]}"


def test_normalize_uid() -> None:
    assert normalize_uid("AdeleV") == "adelev"
    assert normalize_uid("Zoë O'Brien+x") == "zoe.obrienx"
    assert normalize_uid("  a__b..c  ") == "a_b.c"
    assert normalize_uid("###") == ""
    assert normalize_uid(None) == ""


@pytest.fixture(scope="module")
def tenant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from ldapsync.testing.client import FakeTenantProcess

    proc = FakeTenantProcess(tmp_path_factory.mktemp("tenant"))
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def srv(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tls_files, tenant) -> Iterator[Any]:
    import time

    s, pg = _make_server(tmp_path_factory.mktemp(f"import-{request.param}"), request.param, tls_files,
                         office365_config(tenant.info))
    s.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            p = s.run("ldapsearch", "-LLL", "-b", CONNECTOR, "-s", "base", "(objectClass=*)", "o365ConnectorState")
            if "o365ConnectorState: active" in p.stdout:
                break
            time.sleep(0.2)
        yield s
    finally:
        s.stop()
        if pg:
            drop_pg_database(pg)


def seed(tenant, tag: str) -> dict[str, dict[str, Any]]:
    """Users for this backend's run (``tag`` keeps the two backends' users apart)."""
    a = tenant.admin
    users = {
        "alias": a.add_user(upn=f"Alias{tag}@contoso.com", display_name="Alias Person", mailNickname=f"Nick{tag}",
                            mail=f"Alias{tag}@contoso.com", givenName="Alias", surname="Person"),
        "noalias": a.add_user(upn=f"noalias{tag}@contoso.com", display_name="No Alias", mailNickname=None,
                              mail=f"Mail.Local{tag}@contoso.com"),
        "odd": a.add_user(upn=f"zoe{tag}@contoso.com", display_name="Zoë O'Brien", mailNickname=f"Zoë O'Brien+{tag}",
                          mail=f"zoe{tag}@contoso.com"),
        "guest": a.add_user(upn=f"g{tag}_fabrikam.com#EXT#@contoso.onmicrosoft.com", display_name="Guest",
                            userType="Guest", mail=f"g{tag}@fabrikam.com"),
        "unverified": a.add_user(upn=f"bob{tag}@fabrikam.com", display_name="Bob", mail=f"bob{tag}@fabrikam.com"),
        "uid_taken": a.add_user(upn=f"someone{tag}@contoso.com", display_name="Uid Taken", mailNickname=f"taken{tag}",
                                mail=f"someone{tag}@contoso.com"),
        "mail_taken": a.add_user(upn=f"mt{tag}@contoso.com", display_name="Mail Taken", mailNickname=f"mtx{tag}",
                                 mail=f"mt{tag}@contoso.com"),
        "no_uid": a.add_user(upn="+" * (2 if tag == "sq" else 3) + "@contoso.com", display_name="Nobody",
                             mailNickname="###"),
    }
    return users


def cli_json(srv, *args: str) -> tuple[int, dict[str, dict[str, Any]], dict[str, Any]]:
    p = srv.cli("o365", "import", "--json", *args)
    rows: dict[str, dict[str, Any]] = {}
    summary: dict[str, Any] = {}
    for line in p.stdout.decode().splitlines():
        obj = json.loads(line)
        if "summary" in obj:
            summary = obj["summary"]
        else:
            rows[obj["userPrincipalName"]] = obj
    assert summary, (p.stdout, p.stderr)
    return p.returncode, rows, summary


def people(srv) -> dict[str, dict[str, list[str]]]:
    p = srv.run("ldapsearch", "-LLL", "-b", PEOPLE, "-s", "one", "(objectClass=*)", "*", "+")
    assert p.returncode == 0, p.stderr
    return parse_ldif_output(p.stdout)


@pytest.mark.e2e
def test_import_end_to_end(srv, tenant) -> None:
    tag = srv.backend[:2]
    # directory entries the tenant's users collide with
    srv.run("ldapadd", input=user_ldif(f"taken{tag}"), check=True)
    srv.run("ldapadd", input=user_ldif(f"other{tag}").replace(f"other{tag}@example.com", f"mt{tag}@contoso.com"), check=True)
    u = seed(tenant, tag)
    upn = {k: v["userPrincipalName"] for k, v in u.items()}

    # --list --json: every user with its username and verdict; nothing written
    before = people(srv)
    rc, rows, summary = cli_json(srv, "--list")
    assert rc == 0
    assert rows[upn["alias"]]["status"] == "importable" and rows[upn["alias"]]["uid"] == f"nick{tag}"
    assert rows[upn["noalias"]]["uid"] == f"mail.local{tag}" and rows[upn["noalias"]]["status"] == "importable"
    assert rows[upn["odd"]]["uid"] == f"zoe.obrien{tag}"
    assert rows[upn["guest"]]["reason"] == "guest"
    assert rows[upn["unverified"]]["reason"] == "no mail or UPN on a verified domain"
    assert rows[upn["uid_taken"]]["reason"] == "already registered"
    assert f"uid=taken{tag},{PEOPLE}" in rows[upn["uid_taken"]]["detail"]
    assert rows[upn["mail_taken"]]["reason"] == "already registered"
    assert f"uid=other{tag},{PEOPLE}" in rows[upn["mail_taken"]]["detail"]
    assert rows[upn["no_uid"]]["reason"] == "no usable username", rows[upn["no_uid"]]
    # the human table too
    p = srv.cli("o365", "import", "--list")
    assert p.returncode == 0 and b"USERNAME" in p.stdout and f"nick{tag}".encode() in p.stdout

    # --dry-run writes nothing
    rc, rows, summary = cli_json(srv, "--all", "--dry-run")
    assert rc == 0 and summary["imported"] == 0 and summary["importable"] >= 3
    assert rows[upn["alias"]]["status"] == "would import"
    assert people(srv).keys() == before.keys()

    # --user: only that one; an unknown UPN is a failure (exit 1), the other is still imported
    rc, rows, summary = cli_json(srv, "--user", upn["alias"], "--user", f"ghost{tag}@contoso.com")
    assert rc == 1 and summary["imported"] == 1 and summary["failed"] == 1
    assert set(people(srv)) - set(before) == {f"uid=nick{tag},{PEOPLE}"}

    # --all: the rest
    rc, rows, summary = cli_json(srv, "--all")
    assert rc == 0, summary
    assert summary["failed"] == 0
    assert rows[upn["alias"]]["reason"] == "already imported"
    for k in ("noalias", "odd"):
        assert rows[upn[k]]["status"] == "imported"
    entries = people(srv)
    e = entries[f"uid=nick{tag},{PEOPLE}"]
    assert e["o365ObjectId"] == [u["alias"]["id"]]
    assert e["mail"] == [upn["alias"]] and e["cn"] == ["Alias Person"] and e["sn"] == ["Person"]
    assert e["givenName"] == ["Alias"] and e["displayName"] == ["Alias Person"]
    assert set(e["objectClass"]) >= {"inetOrgPerson", "ldapsyncUser"}
    assert "userPassword" not in e and "ldapsyncDirectory" not in e and "o365SyncState" not in e
    odd = entries[f"uid=zoe.obrien{tag},{PEOPLE}"]
    assert odd["sn"] == ["O'Brien"] and odd["o365ObjectId"] == [u["odd"]["id"]]
    noalias = entries[f"uid=mail.local{tag},{PEOPLE}"]
    assert noalias["mail"] == [f"Mail.Local{tag}@contoso.com"]
    for k in ("guest", "unverified", "uid_taken", "mail_taken", "no_uid"):
        assert not any(v.get("o365ObjectId") == [u[k]["id"]] for v in entries.values()), k
    # the colliding entries were left alone
    assert "o365ObjectId" not in entries[f"uid=taken{tag},{PEOPLE}"]
    # inactive: a bind fails with invalidCredentials
    p = srv.run("ldapwhoami", bind=f"uid=nick{tag},{PEOPLE}", password="anything-at-all")
    assert p.returncode == 49, (p.returncode, p.stderr)
    # not bound: nothing was created in Microsoft 365
    assert not tenant.admin.requests(kind="graph", method="POST", path="/users")

    # re-running imports nothing new
    rc, rows, summary = cli_json(srv, "--all")
    assert rc == 0 and summary["imported"] == 0 and summary["failed"] == 0
    assert people(srv).keys() == entries.keys()

    # --include-guests imports the guest
    rc, rows, summary = cli_json(srv, "--user", upn["guest"], "--include-guests")
    assert rc == 0, rows
    # the guest's mail is on an unverified domain, its UPN on the verified initial domain
    assert rows[upn["guest"]]["status"] == "imported"
    assert rows[upn["guest"]]["mail"] == upn["guest"]


@pytest.mark.e2e
def test_import_plain_output_and_summary(srv, tenant) -> None:
    p = srv.cli("o365", "import", "--all", "--dry-run")
    assert p.returncode == 0, p.stderr
    out = p.stdout.decode()
    assert "Microsoft 365 user(s):" in out and "failed: 0" in out


@pytest.mark.e2e
def test_import_needs_a_selection(srv) -> None:
    p = srv.cli("o365", "import")
    assert p.returncode == 2 and b"--all" in p.stderr


def test_progress_line_on_a_terminal_plain_lines_otherwise() -> None:
    import io

    from ldapsync.sync.importer import Plan, Reporter, Summary

    s = Summary(imported=3, seen=4, skipped={"guest": 1})
    p = Plan("id1", "a@contoso.com", "A", "a", "a@contoso.com", dn="uid=a,ou=people,dc=example,dc=com")
    out, err = io.StringIO(), io.StringIO()
    r = Reporter(out, err, json_lines=False, listing=False, tty=True)
    r.row(p, "imported")
    r.progress(s)
    r.progress(s, final=True)
    assert out.getvalue() == ""                       # imported users only counted on a terminal
    assert err.getvalue().startswith("\r") and "3 imported, 1 skipped, 0 failed" in err.getvalue()
    assert "users/s" in err.getvalue()
    out, err = io.StringIO(), io.StringIO()
    r = Reporter(out, err, json_lines=False, listing=False, tty=False)
    r.row(p, "imported")
    r.progress(s)
    r.summary(s, dry_run=False, listing=False)
    assert "imported: a@contoso.com" in out.getvalue() and "\r" not in err.getvalue()
    assert "3 imported; skipped: 1 guest; failed: 0" in out.getvalue()


@pytest.mark.e2e
def test_interrupted_import_repeated_gives_the_same_directory(make_server, fake_tenant) -> None:
    """kill -9 in the middle of an import, run it again: every user exactly once, nothing half-made."""
    import signal
    import subprocess
    import time

    srv = make_server("sqlite", office365_config(fake_tenant.info))
    wait = time.monotonic() + 30
    while "state: active" not in srv.cli("o365", "status").stdout.decode() and time.monotonic() < wait:
        time.sleep(0.2)
    # 1,000 users in one bulk call; batches of 100 leave ~0.3 s of import to kill in after the first
    n = 1000
    got_ids = fake_tenant.admin.add_users(template={
        "upn": "kill{i:04d}@contoso.com", "display_name": "Kill Test {i}", "mailNickname": "kill{i:04d}",
        "mail": "kill{i:04d}@contoso.com", "surname": "Test"}, count=n, start=0, return_ids=True)["ids"]
    seeded = {f"kill{i:04d}": oid for i, oid in enumerate(got_ids)}
    # The import pages with $top=999: the last user comes on a second page, which Graph answers
    # only after `latency` seconds.  So however loaded the machine, the kill lands before the end.
    fake_tenant.admin.set_latency(seconds=5.0)
    proc = subprocess.Popen([__import__("sys").executable, "-m", "ldapsync.cli", "--config", str(srv.config_path),
                             "o365", "import", "--filter", "startswith(userPrincipalName,'kill')"],
                            cwd=srv.workdir, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    # wait until some users are in, then kill -9 mid-run
    for _ in range(200):
        line = proc.stdout.readline()
        if b"kill0040" in line or not line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    fake_tenant.admin.set_latency(seconds=0)
    partial = {u for u in people(srv) if u.startswith("uid=kill")}
    assert 0 < len(partial) < n
    p = srv.cli("o365", "import", "--filter", "startswith(userPrincipalName,'kill')")
    assert p.returncode == 0, p.stderr
    got = {dn: e for dn, e in people(srv).items() if dn.startswith("uid=kill")}
    assert len(got) == n
    for uid, oid in seeded.items():
        e = got[f"uid={uid},{PEOPLE}"]
        assert e["o365ObjectId"] == [oid] and e["mail"] == [f"{uid}@contoso.com"] and e["sn"] == ["Test"]
        assert "userPassword" not in e and "ldapsyncDirectory" not in e
    # binding an imported user links it by its object id: no account is created
    posts = len(fake_tenant.admin.requests(kind="graph", method="POST", path=r"^/v1\.0/users$"))
    srv.run("ldapmodify", input=f"dn: uid=kill0007,{PEOPLE}\nchangetype: modify\nadd: ldapsyncDirectory\n"
                                 "ldapsyncDirectory: office365\n", check=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        e = people(srv)[f"uid=kill0007,{PEOPLE}"]
        if e.get("o365SyncState") == ["synced"]:
            break
        time.sleep(0.2)
    assert e.get("o365SyncState") == ["synced"] and e["o365ObjectId"] == [seeded["kill0007"]]
    assert len(fake_tenant.admin.requests(kind="graph", method="POST", path=r"^/v1\.0/users$")) == posts


# -- in process: batching, planned names, progress ------------------------------------------

class _ListClient:
    """Just enough of GraphClient for ``run_import``: ``list_users`` over a fixed list."""

    def __init__(self, users: list[dict[str, Any]]) -> None:
        self.users = users

    async def list_users(self, select: Any, *, top: int | None = None, filter: str | None = None):  # type: ignore[no-untyped-def]
        for u in self.users:
            yield u


@pytest.fixture(params=["sqlite", "postgresql"])
def directory(request: pytest.FixtureRequest, tmp_path) -> Iterator[Any]:
    from conftest import create_pg_database  # type: ignore[import-not-found]
    from helpers import SUFFIX

    from ldapsync.config import AdminConfig, Config, DirectoryConfig, PasswordsConfig
    from ldapsync.directory.facade import Directory
    from ldapsync.store.database import Database

    pg = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'i.db'}"
    else:
        url, pg = create_pg_database()
    cfg = Config(directory=DirectoryConfig(suffix=SUFFIX, database=url),
                 admin=AdminConfig(password_file=str(tmp_path / "pw")),
                 passwords=PasswordsConfig(hash_time_cost=1, hash_memory_kib=8192))
    d = Directory(cfg, Database(url))
    d.bootstrap_sync()
    d.db.start()
    yield d
    d.db.stop()
    if pg:
        drop_pg_database(pg)


def _tenant_user(n: int, **over: Any) -> dict[str, Any]:
    u = {"id": f"00000000-0000-0000-0000-{n:012d}", "userPrincipalName": f"u{n}@contoso.com",
         "displayName": f"User {n}", "givenName": "U", "surname": f"S{n}", "mail": f"u{n}@contoso.com",
         "mailNickname": f"u{n}", "userType": "Member"}
    u.update(over)
    return u


def _rows(out: str) -> dict[str, dict[str, Any]]:
    return {o["userPrincipalName"]: o for o in map(json.loads, out.splitlines()) if "summary" not in o}


def _imported(d) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """uid → o365ObjectId of every entry under ou=people that has one."""
    from ldapsync.store import entries as store

    got: dict[str, str] = {}
    after = ""
    for _ in range(100):
        rows = d.db.run_sync("dump", store.all_entries_txn, after, 1000, write=False)
        if not rows:
            break
        for e in rows:
            if e.attrs.get("o365ObjectId"):
                got[e.attrs["uid"][0]] = e.attrs["o365ObjectId"][0]
        after = rows[-1].path
    return got


@pytest_twisted.ensureDeferred
async def test_batched_import_checks_collisions_inside_a_batch(directory) -> None:
    """Users are written BATCH per transaction: two tenant users with the same uid or mail in one
    batch give one entry and one "already registered" naming it; dry-run says the same."""
    import io

    from ldapsync.sync.importer import Reporter, run_import

    users = [_tenant_user(1), _tenant_user(2, mailNickname="u1"), _tenant_user(3, mail="U1@contoso.com"),
             *(_tenant_user(n) for n in range(4, 12))]
    client = _ListClient(users)
    people = f"ou=people,{directory.suffix}"
    for dry_run in (True, False):
        out = io.StringIO()
        rep = Reporter(out, io.StringIO(), json_lines=True, listing=False)
        s = await run_import(directory, client, verified={"contoso.com"}, actor_dn=str(directory.admin_dn),
                             reporter=rep, dry_run=dry_run, batch=4)
        rows = _rows(out.getvalue())
        assert s.failed == 0 and s.skipped == {"already registered": 2} and s.seen == 11, s
        assert (s.importable, s.imported) == ((9, 0) if dry_run else (0, 9))
        assert rows["u2@contoso.com"]["reason"] == rows["u3@contoso.com"]["reason"] == "already registered"
        if not dry_run:
            assert f"uid=u1,{people} (same uid)" in rows["u2@contoso.com"]["detail"]
            assert f"uid=u1,{people} (same mail)" in rows["u3@contoso.com"]["detail"]
    got = _imported(directory)
    assert set(got) == {"u1", *(f"u{n}" for n in range(4, 12))} and got["u1"] == users[0]["id"]


@pytest_twisted.ensureDeferred
async def test_a_failing_user_rolls_back_its_batch_which_is_then_written_one_by_one(directory, monkeypatch) -> None:
    import io

    from ldapsync.directory.errors import LDAPError, ResultCode
    from ldapsync.sync import importer

    class FailingWrite(importer.Write):  # type: ignore[misc,name-defined]
        def create(self, dn, attrs, parent, **kw):  # type: ignore[no-untyped-def]
            if attrs["uid"] == ["u3"]:
                raise LDAPError(ResultCode.unwillingToPerform, "refused for the test")
            return super().create(dn, attrs, parent, **kw)

    monkeypatch.setattr(importer, "Write", FailingWrite)
    client = _ListClient([_tenant_user(n) for n in range(1, 8)])
    out = io.StringIO()
    rep = importer.Reporter(out, io.StringIO(), json_lines=True, listing=False)
    s = await importer.run_import(directory, client, verified={"contoso.com"}, actor_dn=str(directory.admin_dn),
                                  reporter=rep, batch=3)
    assert (s.imported, s.failed, s.seen) == (6, 1, 7), s
    rows = _rows(out.getvalue())
    assert rows["u3@contoso.com"]["status"] == "failed" and "refused for the test" in rows["u3@contoso.com"]["detail"]
    assert set(_imported(directory)) == {"u1", "u2", "u4", "u5", "u6", "u7"}
    # the run can simply be repeated: the rest is "already imported", the bad one fails again
    monkeypatch.setattr(importer, "Write", importer.Write.__mro__[1])
    out = io.StringIO()
    rep = importer.Reporter(out, io.StringIO(), json_lines=True, listing=False)
    s = await importer.run_import(directory, client, verified={"contoso.com"}, actor_dn=str(directory.admin_dn),
                                  reporter=rep, batch=3)
    assert (s.imported, s.failed, s.skipped) == (1, 0, {"already imported": 6}), s
    assert len(_imported(directory)) == 7


def test_planned_names_reject_a_repeat_and_remember_nothing_then() -> None:
    from ldapsync.sync.importer import PlannedNames

    p = PlannedNames(cache_kib=64)
    try:
        assert p.add("a", "a@x")
        assert not p.add("a", "b@x")          # same uid
        assert not p.add("c", "a@x")          # same mail
        assert p.add("c", "b@x")              # the rejected ones were not remembered
        for i in range(20000):                # beyond the cache: spills to its temporary file
            assert p.add(f"user{i}", f"user{i}@x")
        p.commit()
        assert not p.add("user19999", "new@x") and p.add("new", "new@x")
    finally:
        p.close()


def test_progress_is_shown_at_most_every_interval() -> None:
    import io

    from ldapsync.sync.importer import Reporter, Summary

    now = [100.0]
    err = io.StringIO()
    r = Reporter(io.StringIO(), err, json_lines=False, listing=False, tty=False, monotonic=lambda: now[0])
    s = Summary(seen=1)
    for _ in range(50):                        # one call per batch
        r.progress(s)
        now[0] += 0.1
    assert err.getvalue().count("\n") == 1     # 5 s of batches, PLAIN_INTERVAL 10 s: one line
    err = io.StringIO()
    r = Reporter(io.StringIO(), err, json_lines=False, listing=False, tty=True, monotonic=lambda: now[0])
    for _ in range(10):
        r.progress(s)
        now[0] += 0.1
    r.progress(s, final=True)
    assert err.getvalue().count("\r") == 5     # at 0, 0.3, 0.6, 0.9 s (TTY_INTERVAL 0.25 s), then the final one
    assert err.getvalue().endswith("\n")
