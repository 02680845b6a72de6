"""What ldapsync leaves on disk and in its queue, checked through real processes (issue 15, 9-10, low).

- the database directory (0700), database, -wal and -shm (0600) after a real server started under
  umask 022, and a world-readable database tightened at the next start with a warning;
- ``ldif dump -o`` files 0600, and a dump file of another user refused;
- a CA bundle planted under the old predictable /tmp name is not what MSAL trusts;
- ``[directory] durability`` as a real connection reports it (SQLite PRAGMA, PostgreSQL SHOW);
- ``ldapsync init`` prints the PostgreSQL URL without its password;
- a queued password copied to another user's outbox row is not delivered as that user's password,
  while a row queued by an earlier version (no associated data) still is.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_cert, office365_config  # type: ignore[import-not-found]
from helpers import PEOPLE, add_user, parse_ldif_output, unique, user_ldif, wait_for

pytestmark = pytest.mark.e2e
DOMAIN = "contoso.com"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def sqlite_server(make_server, **kw):  # type: ignore[no-untyped-def]
    """A private SQLite server whose database lives in ``var/`` (created by the server)."""
    srv = make_server("sqlite", start=False, **kw)
    srv.db_url = f"sqlite:///{srv.workdir / 'var' / 'ldapsync.db'}"
    return srv


def test_database_files_and_their_directory_are_private(make_server):
    srv = sqlite_server(make_server)
    with umask(0o022):
        srv.start()
    uid = unique()
    srv.run("ldapadd", input=user_ldif(uid, password="Some-Pass-1"), check=True)
    var = srv.workdir / "var"
    db = var / "ldapsync.db"
    assert mode(var) == 0o700
    for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        assert p.exists(), p
        assert mode(p) == 0o600, f"{p.name} is {mode(p):04o}"
    assert mode(srv.workdir / "admin-password") == 0o600

    # A database someone made world-readable is set back at the next start, with a warning.
    srv.stop()
    os.chmod(db, 0o644)
    with umask(0o022):
        srv.start()
    assert mode(db) == 0o600
    assert wait_for("the warning", lambda: "set to 0600" in srv.log.read_text())
    assert f"{db} was readable by other users (mode 0644)" in srv.log.read_text()


def test_dump_files_are_private_and_never_another_users(make_server, tmp_path):
    srv = make_server("sqlite")
    srv.run("ldapadd", input=user_ldif(unique(), password="Some-Pass-1"), check=True)
    out = tmp_path / "dump.ldif"
    with umask(0o022):
        p = srv.cli("ldif", "dump", "-o", str(out))
    assert p.returncode == 0, p.stderr
    assert mode(out) == 0o600 and b"userPassword" in out.read_bytes()

    # an existing file of ours is tightened before the hashes go in
    out.write_text("old\n")
    os.chmod(out, 0o644)
    assert srv.cli("ldif", "dump", "-o", str(out)).returncode == 0
    assert mode(out) == 0o600 and b"old" not in out.read_bytes()

    # one planted by another user (it would read every hash) is refused, and not written to
    planted = tmp_path / "planted.ldif"
    planted.write_text("")
    os.chmod(planted, 0o666)
    os.chown(planted, 65534, 65534)          # nobody (the tests run as root)
    p = srv.cli("ldif", "dump", "-o", str(planted))
    assert p.returncode != 0 and b"belongs to another user" in p.stderr, p.stderr
    assert planted.read_bytes() == b""


def test_durability_is_what_a_real_connection_reports(make_server, tmp_path):
    import sqlalchemy as sa

    from conftest import create_pg_database, drop_pg_database  # type: ignore[import-not-found]
    from ldapsync.store.database import Database

    def sqlite_sync(db: Database) -> int:
        db.start()
        try:
            return db.run_sync("pragma", lambda txn: txn.rows("PRAGMA synchronous")[0][0], write=False)
        finally:
            db.stop()

    url = f"sqlite:///{tmp_path / 'd.db'}"
    assert sqlite_sync(Database(url)) == 2                       # FULL: the default
    assert sqlite_sync(Database(url, durability="normal")) == 1  # NORMAL: opt-in

    pg_url, name = create_pg_database()
    try:
        for durability, want in (("full", "on"), ("normal", "off")):
            db = Database(pg_url, durability=durability)
            db.start()
            try:
                got = db.run_sync("show", lambda txn: txn.rows("SHOW synchronous_commit")[0][0])
            finally:
                db.stop()
            assert got == want, durability
        # another session of the same database keeps the server's setting
        eng = sa.create_engine(pg_url)
        with eng.connect() as c:
            assert c.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"
        eng.dispose()
    finally:
        drop_pg_database(name)

    # the server takes the key; a wrong value stops it with a message naming the key
    srv = make_server("sqlite", start=False)
    srv.config_path.write_text(srv.config_path.read_text().replace("[directory]\n", '[directory]\ndurability = "fast"\n', 1))
    p = srv.cli("init")
    assert p.returncode == 2 and b"[directory] durability" in p.stderr


def test_init_and_server_log_do_not_show_the_database_password(make_server):
    srv = make_server("postgresql", start=False)
    password = srv.db_url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    assert password
    p = srv.cli("init")
    assert p.returncode == 0, p.stderr
    out = p.stdout.decode() + p.stderr.decode()
    assert "database: " in out and ":***@" in out
    assert f":{password}@" not in out
    srv.start()
    srv.stop()
    assert f":{password}@" not in srv.log.read_text()


def test_a_ca_bundle_planted_in_tmp_is_not_trusted(make_server, fake_tenant, tmp_path):
    """The old code reused /tmp/ldapsync-ca-<sha256 of certifi + ca_bundle>.pem if it existed;
    a planted one holding only another CA must not be what MSAL trusts."""
    from ldapsync.graph.tls import public_pem

    ca_pem = Path(fake_tenant.info["ca_file"]).read_bytes()
    digest = hashlib.sha256(public_pem() + b"\n" + ca_pem).hexdigest()[:16]
    name = f"ldapsync-ca-{digest}.pem"
    planted = Path(tempfile.gettempdir()) / name
    other_ca, _, _ = make_cert(tmp_path / "attacker")
    planted.write_bytes(other_ca.read_bytes())
    try:
        from sync.test_worker import wait_active  # type: ignore[import-not-found]

        srv = make_server("sqlite", office365_config(fake_tenant.info))
        wait_active(srv)                      # MSAL signed in over TLS with the configured CA
        assert planted.read_bytes() == other_ca.read_bytes()
    finally:
        planted.unlink(missing_ok=True)
    assert not list(Path(tempfile.gettempdir()).glob("ldapsync-ca-*.pem.*.tmp"))


def test_a_queued_password_moved_to_another_users_row_is_not_delivered(make_server, fake_tenant):
    from sync.test_worker import wait_active  # type: ignore[import-not-found]

    from ldapsync.secretbox import SecretBox

    srv = make_server("sqlite", office365_config(fake_tenant.info))
    wait_active(srv)
    fake_tenant.admin.outage(mode="503")          # until end_outage: the rows stay queued
    try:
        ann, bob, cid = unique("ann"), unique("bob"), unique("cid")
        pw = {ann: "Ann-Pass-1234", bob: "Bob-Pass-1234", cid: "Cid-Pass-1234"}
        for uid in (ann, bob, cid):
            add_user(srv, uid, bound=True, password=pw[uid])       # mail: uid@contoso.com (DOMAIN)

        def uuid_of(uid: str) -> str:
            p = srv.run("ldapsearch", "-LLL", "-b", f"uid={uid},{PEOPLE}", "-s", "base", "(objectClass=*)", "entryUUID")
            return parse_ldif_output(p.stdout)[f"uid={uid},{PEOPLE}"]["entryUUID"][0]

        uuids = {uid: uuid_of(uid) for uid in (ann, bob, cid)}
        srv.stop()
    finally:
        fake_tenant.admin.end_outage()

    # Someone with write access to the database copies ann's queued password into bob's row, and
    # cid's row holds a password queued by an earlier version (sealed without associated data).
    assert mode(srv.workdir / "var" / "secret.key") == 0o600 and mode(srv.workdir / "var") == 0o700
    key = (srv.workdir / "var" / "secret.key").read_bytes()
    legacy = SecretBox(key).encrypt(pw[cid].encode()).hex()
    assert legacy[:2] == "01"
    db = sqlite3.connect(srv.db_url[len("sqlite:///"):])
    with db:
        (ann_secret,), = db.execute("SELECT secret FROM o365_outbox WHERE entry_uuid = ? AND secret IS NOT NULL",
                                    (uuids[ann],)).fetchall()
        db.execute("DELETE FROM o365_outbox WHERE entry_uuid = ?", (uuids[ann],))
        db.execute("UPDATE o365_outbox SET secret = ? WHERE entry_uuid = ? AND secret IS NOT NULL", (ann_secret, uuids[bob]))
        db.execute("UPDATE o365_outbox SET secret = ? WHERE entry_uuid = ? AND secret IS NOT NULL", (legacy, uuids[cid]))
        db.execute("UPDATE o365_outbox SET next_attempt_at = 0, attempts = 0")
    db.close()

    srv.start()
    cid_user = wait_for("cid delivered", lambda: fake_tenant.admin.get_user(key=f"{cid}@{DOMAIN}"), 60)
    assert fake_tenant.admin.password_of(key=f"{cid}@{DOMAIN}") == pw[cid] and cid_user["accountEnabled"]

    def bob_state() -> list[str] | None:
        p = srv.run("ldapsearch", "-LLL", "-b", f"uid={bob},{PEOPLE}", "-s", "base", "(objectClass=*)",
                    "o365SyncState", "o365LastError")
        e = parse_ldif_output(p.stdout)[f"uid={bob},{PEOPLE}"]
        return e.get("o365LastError") if e.get("o365SyncState") == ["error"] else None

    assert "cannot be decrypted" in wait_for("bob's row refused", bob_state, 60)[0]
    assert fake_tenant.admin.password_of(key=f"{bob}@{DOMAIN}") != pw[ann]
