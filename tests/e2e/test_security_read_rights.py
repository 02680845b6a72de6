"""Rights from groups, one password per entry, unique entryUUID, big ORs (issue 15: 4-7 and a Low).

On SQLite and PostgreSQL, through ldap3 / ldap-utils and the ``ldapsync`` CLI:

- admin rights come from ``cn=admins``'s ``member`` values, looked up per
  operation: a ``memberOf`` forged in a loaded file grants nothing (and load
  recomputes memberOf), and a member removed from the group loses its rights
  on connections already bound;
- an entry holds one userPassword: a second value (user or admin, modify or
  add) is constraintViolation, so an old password cannot stay valid;
- entryUUID is unique: ``ldif load`` refuses a duplicate naming the line, and
  the database refuses one whatever writes it;
- an OR of thousands of indexed terms answers with its entries (SQLite said
  "Expression tree is too large" and the client got 52).
"""

from __future__ import annotations

import secrets

import pytest
import sqlalchemy as sa
from helpers import ADMIN_DN, GROUPS, PEOPLE, parse_ldif_output, unique, user_ldif
from ldap3 import BASE, MODIFY_ADD, MODIFY_REPLACE, NONE, SIMPLE, Connection, Server

pytestmark = pytest.mark.e2e

ADMINS = f"cn=admins,{GROUPS}"
PW = "Right-Pass-7"


def connect(server, dn: str, password: str) -> Connection:
    c = Connection(Server("127.0.0.1", port=server.port, get_info=NONE), user=dn, password=password,
                   authentication=SIMPLE, auto_bind=False, raise_exceptions=False, receive_timeout=30)
    c.open()
    assert c.bind(), c.result
    return c


def add_user(server, uid: str, password: str | None = PW) -> str:
    server.run("ldapadd", input=user_ldif(uid, password=password), check=True)
    return f"uid={uid},{PEOPLE}"


def ensure_admins_group(server) -> None:
    p = server.run("ldapsearch", "-LLL", "-b", ADMINS, "-s", "base", "(objectClass=*)", "1.1")
    if p.returncode == 32:
        server.run("ldapadd", input=f"dn: {ADMINS}\nobjectClass: groupOfNames\ncn: admins\nmember: {ADMIN_DN}\n",
                   check=True)


def admins_member(server, op: str, dn: str) -> None:
    """``op`` ("add" or "delete") ``dn`` as a member of cn=admins."""
    server.run("ldapmodify", input=f"dn: {ADMINS}\nchangetype: modify\n{op}: member\nmember: {dn}\n", check=True)


def read(c: Connection, dn: str, *attrs: str) -> dict[str, list[str]]:
    assert c.search(dn, "(objectClass=*)", search_scope=BASE, attributes=list(attrs) or ["*", "+"]), c.result
    return {k: [str(x) for x in v] for k, v in c.entries[0].entry_attributes_as_dict.items() if v}


# -- 6. stale admin rights ----------------------------------------------------------------

def test_removed_admin_loses_rights_on_an_open_connection(server):
    ensure_admins_group(server)
    carol, bob = add_user(server, unique("carol")), add_user(server, unique("bob"))
    admins_member(server, "add", carol)
    c = connect(server, carol, PW)
    try:
        assert "pwdChangedTime" in read(c, bob, "pwdChangedTime")            # an admin reads the policy state
        assert c.modify(bob, {"description": [(MODIFY_REPLACE, ["set by carol"])]}), c.result
        admins_member(server, "delete", carol)
        # the same connection, bound while carol was an admin
        assert "pwdChangedTime" not in read(c, bob, "pwdChangedTime")
        assert not c.search(PEOPLE, f"(&(uid={bob[4:].split(',')[0]})(pwdChangedTime=*))", attributes=["1.1"]) \
            or c.entries == []
        assert not c.modify(bob, {"description": [(MODIFY_REPLACE, ["set again"])]})
        assert c.result["result"] == 50, c.result
        when = read(connect(server, ADMIN_DN, server.admin_password), bob, "pwdChangedTime")["pwdChangedTime"][0]
        assert not c.compare(bob, "pwdChangedTime", when)
        assert c.result["result"] == 50, c.result
        assert not c.compare(bob, "userPassword", PW)
        assert c.result["result"] == 50, c.result
    finally:
        c.unbind()


def test_admin_by_member_keeps_rights(server):
    """The other side: a member of cn=admins (by member) may modify others."""
    ensure_admins_group(server)
    dave, erin = add_user(server, unique("dave")), add_user(server, unique("erin"))
    admins_member(server, "add", dave)
    c = connect(server, dave, PW)
    try:
        assert c.modify(erin, {"description": [(MODIFY_REPLACE, ["by dave"])]}), c.result
    finally:
        c.unbind()


# -- 5. forged memberOf ---------------------------------------------------------------------

def test_forged_member_of_in_a_loaded_file_grants_nothing(server, tmp_path):
    ensure_admins_group(server)
    victim = add_user(server, unique("vic"))
    uid = unique("mal")
    (tmp_path / "forged.ldif").write_text(user_ldif(uid, password=PW, extra=f"memberOf: {ADMINS}\n"))
    p = server.cli("ldif", "load", str(tmp_path / "forged.ldif"))
    assert p.returncode == 0, p.stderr
    mallory = f"uid={uid},{PEOPLE}"
    admin = connect(server, ADMIN_DN, server.admin_password)
    assert "memberOf" not in read(admin, mallory, "memberOf")        # recomputed: cn=admins does not list it
    c = connect(server, mallory, PW)
    try:
        assert not c.modify(victim, {"description": [(MODIFY_REPLACE, ["pwned"])]})
        assert c.result["result"] == 50, c.result
        assert "pwdChangedTime" not in read(c, victim, "pwdChangedTime")
    finally:
        c.unbind()
    assert read(admin, victim, "description") == {}


def test_loaded_member_of_follows_the_groups_members(server, tmp_path):
    """A group in the file gives its members memberOf; a memberOf naming a group that does not list
    the entry is dropped."""
    tag = unique("lg")
    group = f"cn={tag},{GROUPS}"
    ldif = (user_ldif(f"{tag}a", extra=f"memberOf: {ADMINS}\n") + user_ldif(f"{tag}b")
            + f"dn: {group}\nobjectClass: groupOfNames\ncn: {tag}\nmember: uid={tag}a,{PEOPLE}\n\n")
    (tmp_path / "g.ldif").write_text(ldif)
    p = server.cli("ldif", "load", str(tmp_path / "g.ldif"))
    assert p.returncode == 0, p.stderr
    parsed = parse_ldif_output(server.run("ldapsearch", "-LLL", "-b", PEOPLE, f"(uid={tag}*)", "memberOf").stdout)
    assert parsed[f"uid={tag}a,{PEOPLE}"].get("memberOf") == [group]
    assert parsed[f"uid={tag}b,{PEOPLE}"].get("memberOf") is None


# -- 7. one password per entry ----------------------------------------------------------------

def test_a_user_cannot_add_a_second_password(server):
    dn = add_user(server, unique("two"))
    c = connect(server, dn, PW)
    try:
        assert not c.modify(dn, {"userPassword": [(MODIFY_ADD, ["Second-Pass-8"])]})
        assert c.result["result"] == 19, c.result
        assert "one" in c.result["message"] and "replace" in c.result["message"], c.result
    finally:
        c.unbind()
    # the old password still binds, the added one does not
    assert server.run("ldapwhoami", bind=dn, password=PW).returncode == 0
    assert server.run("ldapwhoami", bind=dn, password="Second-Pass-8").returncode == 49


def test_changing_a_password_by_delete_and_add_in_one_modify_works(server):
    dn = add_user(server, unique("chg"))
    p = server.run("ldapmodify", bind=dn, password=PW,
                   input=f"dn: {dn}\nchangetype: modify\ndelete: userPassword\nuserPassword: {PW}\n-\n"
                         f"add: userPassword\nuserPassword: Changed-Pass-8\n-\n")
    assert p.returncode == 0, p.stderr
    assert server.run("ldapwhoami", bind=dn, password="Changed-Pass-8").returncode == 0
    assert server.run("ldapwhoami", bind=dn, password=PW).returncode == 49


@pytest.mark.parametrize("how", ["admin-add", "admin-replace-two", "ldapadd-two"])
def test_nobody_stores_two_passwords(server, how):
    uid = unique("adm")
    dn = f"uid={uid},{PEOPLE}"
    if how == "ldapadd-two":
        p = server.run("ldapadd", input=user_ldif(uid, extra=f"userPassword: {PW}\nuserPassword: Other-Pass-8\n"))
    else:
        add_user(server, uid)
        op = "add" if how == "admin-add" else "replace"
        extra = "" if how == "admin-add" else f"userPassword: {PW}\n"
        p = server.run("ldapmodify", input=f"dn: {dn}\nchangetype: modify\n{op}: userPassword\n{extra}"
                                            f"userPassword: Other-Pass-8\n-\n")
    assert p.returncode == 19, (p.stdout, p.stderr)
    assert "one" in p.stderr, p.stderr
    assert server.run("ldapwhoami", bind=dn, password="Other-Pass-8").returncode == 49


def test_ldif_load_refuses_two_passwords(server, tmp_path):
    uid = unique("ld2")
    (tmp_path / "two.ldif").write_text("version: 1\n\n" + user_ldif(uid, extra=f"userPassword: {PW}\nuserPassword: B-Pass-88\n"))
    p = server.cli("ldif", "load", str(tmp_path / "two.ldif"))
    assert p.returncode != 0
    assert b"line 3" in p.stderr and b"userPassword" in p.stderr, p.stderr


# -- 4. entryUUID is unique ------------------------------------------------------------------

def _uuid_of(server, dn: str) -> str:
    return read(connect(server, ADMIN_DN, server.admin_password), dn, "entryUUID")["entryUUID"][0]


def test_ldif_load_refuses_a_duplicate_entry_uuid(server, tmp_path):
    bob = add_user(server, unique("bob"))
    theirs = _uuid_of(server, bob)
    twin = unique("twin")
    (tmp_path / "dup.ldif").write_text("version: 1\n\n" + user_ldif(twin, password=PW, extra=f"entryUUID: {theirs.upper()}\n"))
    p = server.cli("ldif", "load", str(tmp_path / "dup.ldif"))
    assert p.returncode != 0
    assert b"line 3" in p.stderr and b"entryUUID" in p.stderr and bob.encode() in p.stderr, p.stderr
    assert server.run("ldapsearch", "-LLL", "-b", PEOPLE, f"(uid={twin})", "1.1").stdout == ""
    # two new entries sharing one entryUUID in one file: the second is named
    a, b = unique("pa"), unique("pb")
    shared = "0a1b2c3d-0000-4000-8000-" + secrets.token_hex(6)
    (tmp_path / "pair.ldif").write_text(user_ldif(a, extra=f"entryUUID: {shared}\n") + user_ldif(b, extra=f"entryUUID: {shared}\n"))
    p = server.cli("ldif", "load", str(tmp_path / "pair.ldif"))
    assert p.returncode != 0 and b"line 11" in p.stderr and f"uid={a},{PEOPLE}".encode() in p.stderr, p.stderr


def test_the_database_refuses_a_duplicate_entry_uuid(server):
    """The constraint holds whatever writes the rows (a second node, a script, a future code path)."""
    bob, other = add_user(server, unique("bob")), add_user(server, unique("oth"))
    theirs = _uuid_of(server, bob)
    engine = sa.create_engine(server.db_url)
    try:
        with engine.connect() as conn:
            other_id = conn.execute(sa.text("SELECT entry_id FROM entry_index WHERE attr = 'entryuuid' AND value = :v"),
                                    {"v": _uuid_of(server, other)}).scalar_one()
            with pytest.raises(sa.exc.IntegrityError):
                conn.execute(sa.text("UPDATE entry_index SET value = :v WHERE entry_id = :i AND attr = 'entryuuid'"),
                             {"v": theirs, "i": other_id})
            conn.rollback()
    finally:
        engine.dispose()


# -- Low: an OR of thousands of indexed terms -------------------------------------------------

@pytest.mark.parametrize("terms", [1000, 5000])
def test_a_big_or_of_indexed_terms_answers(server, terms):
    tag = unique("or")
    server.run("ldapadd", input="".join(user_ldif(f"{tag}{i}") for i in range(3)), check=True)
    mixed = [f"(uid={tag}x{i})" if i % 3 else f"(mail={tag}y{i}@example.com)" for i in range(terms - 3)]
    flt = "(|" + "".join(mixed) + f"(uid={tag}0)(mail={tag}1@example.com)(cn={tag.capitalize()}2 Test))"
    c = connect(server, ADMIN_DN, server.admin_password)
    try:
        assert c.search(PEOPLE, flt, attributes=["uid"]), c.result
        assert sorted(str(e.uid) for e in c.entries) == [f"{tag}0", f"{tag}1", f"{tag}2"]
        # prefix terms cannot be grouped: many of them still answer (the scope is scanned)
        flt = "(|" + "".join(f"(uid={tag}z{i}*)" for i in range(terms - 1)) + f"(uid={tag}1*))"
        assert c.search(PEOPLE, flt, attributes=["uid"]), c.result
        assert [str(e.uid) for e in c.entries] == [f"{tag}1"]
    finally:
        c.unbind()
