"""``mail`` is unique, case-insensitively, among ldapsyncUser entries — end to end.

A real server (SQLite and PostgreSQL), ldap-utils and ldap3 clients: an add, a modify (replace or
add a value, add the ldapsyncUser class) and a modify DN that would give a second ldapsyncUser
entry an address in use are refused with constraintViolation, naming the attribute and, for an
admin, the entry that holds it; ``ldif load`` likewise.  Entries outside ldapsyncUser may share an
address.  Duplicates already in a database (written before this rule) do not stop the server nor
unrelated changes.  Two clients adding the same address at once on PostgreSQL: exactly one wins.
"""

from __future__ import annotations

import json
import threading

import pytest
from helpers import ADMIN_DN, PEOPLE, SUFFIX, unique
from ldap3 import MODIFY_REPLACE, SIMPLE, Connection, Server

pytestmark = pytest.mark.e2e

CONSTRAINT_VIOLATION = 19


def person(uid: str, mail: str, *, unique_class: bool = True) -> str:
    return (f"dn: uid={uid},{PEOPLE}\nobjectClass: inetOrgPerson\n"
            + ("objectClass: ldapsyncUser\n" if unique_class else "")
            + f"uid: {uid}\ncn: {uid}\nsn: Test\nmail: {mail}\n\n")


def refused(p, value: str, holder: str | None) -> None:
    out = p.stdout + p.stderr
    assert p.returncode == CONSTRAINT_VIOLATION, out
    assert "Constraint violation" in out and "mail:" in out and "already in use" in out and value in out, out
    if holder is not None:
        assert holder in out, out


def test_add_modify_and_rename_cannot_duplicate_a_mail(server):
    a, b = unique("ma"), unique("mb")
    mail_a = f"{a}@contoso.com"
    dn_a, dn_b = f"uid={a},{PEOPLE}", f"uid={b},{PEOPLE}"
    server.run("ldapadd", input=person(a, mail_a), check=True)
    # add: the same address in another case
    refused(server.run("ldapadd", input=person(b, mail_a.upper())), mail_a.upper(), dn_a)
    server.run("ldapadd", input=person(b, f"{b}@contoso.com"), check=True)
    # modify: replace, and add a second value (spaces and case do not make it another address)
    refused(server.run("ldapmodify", input=f"dn: {dn_b}\nchangetype: modify\nreplace: mail\nmail: {mail_a.title()}\n"),
            mail_a.title(), dn_a)
    refused(server.run("ldapmodify", input=f"dn: {dn_b}\nchangetype: modify\nadd: mail\nmail:  {mail_a.upper()} \n"),
            mail_a.upper(), dn_a)
    # modify DN: a new RDN that adds the address
    refused(server.run("ldapmodrdn", dn_b, f"mail={mail_a.upper()}"), mail_a.upper(), dn_a)
    # nothing was written by the refused operations
    got = server.run("ldapsearch", "-LLL", "-b", dn_b, "-s", "base", "mail", check=True).stdout
    assert f"mail: {b}@contoso.com" in got and a not in got
    # the holder itself may rewrite its address in another case, and then give it up to b
    server.run("ldapmodify", input=f"dn: {dn_a}\nchangetype: modify\nreplace: mail\nmail: {mail_a.upper()}\n", check=True)
    server.run("ldapmodify", input=f"dn: {dn_a}\nchangetype: modify\nreplace: mail\nmail: {a}-new@contoso.com\n", check=True)
    server.run("ldapmodify", input=f"dn: {dn_b}\nchangetype: modify\nreplace: mail\nmail: {mail_a}\n", check=True)


def test_only_ldapsync_users_share_one_address_space(server):
    a, c = unique("ma"), unique("mc")
    mail = f"{a}@contoso.com"
    server.run("ldapadd", input=person(a, mail), check=True)
    # an entry that is not an ldapsyncUser may hold the address (e.g. a shared mailbox contact)
    server.run("ldapadd", input=person(c, mail.upper(), unique_class=False), check=True)
    # ... but it cannot become an ldapsyncUser with it
    p = server.run("ldapmodify", input=f"dn: uid={c},{PEOPLE}\nchangetype: modify\nadd: objectClass\nobjectClass: ldapsyncUser\n")
    refused(p, mail.upper(), f"uid={a},{PEOPLE}")


def test_ldif_load_is_refused_naming_the_entry(server):
    a, b = unique("ma"), unique("mb")
    mail = f"{a}@contoso.com"
    server.run("ldapadd", input=person(a, mail), check=True)
    p = server.cli("ldif", "load", "-", input=person(b, mail.swapcase()).encode())
    out = (p.stdout + p.stderr).decode()
    assert p.returncode != 0, out
    assert "already in use" in out and f"uid={a},{PEOPLE}" in out, out
    assert server.run("ldapsearch", "-LLL", "-b", f"uid={b},{PEOPLE}", "-s", "base", "dn").returncode == 32
    # two new entries of one file sharing an address: refused too
    c, d = unique("mc"), unique("md")
    p = server.cli("ldif", "load", "-", input=(person(c, f"{c}@contoso.com") + person(d, f"{c.upper()}@contoso.com")).encode())
    assert p.returncode != 0 and "already in use" in (p.stdout + p.stderr).decode()


def test_concurrent_writes_of_one_address_exactly_one_wins(make_cluster):
    """Two nodes on one PostgreSQL database (each with its pool of writer threads): many clients of
    both nodes give the same new address, at the same moment, to different entries — one adds a
    new entry, the others replace the mail of existing ones (which, unlike adds under one parent,
    lock no common row) — several rounds; each round exactly one write succeeds."""
    nodes = make_cluster(2)
    srv = nodes[0]
    rounds, clients = 6, 8
    for r in range(rounds):
        mail = f"{unique('race')}@contoso.com"
        uids = [f"race{r}x{i}{unique('')}" for i in range(clients)]
        srv.run("ldapadd", input="".join(person(u, f"{u}@contoso.com") for u in uids[1:]), check=True)
        conns = [Connection(Server("127.0.0.1", port=nodes[i % 2].port), ADMIN_DN, srv.admin_password,
                            authentication=SIMPLE, auto_bind=True, raise_exceptions=False) for i in range(clients)]
        results: list[int] = [-1] * clients
        start = threading.Barrier(clients)

        def go(i: int) -> None:
            value = mail if i % 2 else mail.upper()
            start.wait(timeout=30)
            if i == 0:
                conns[i].add(f"uid={uids[i]},{PEOPLE}", ["inetOrgPerson", "ldapsyncUser"],
                             {"uid": uids[i], "cn": uids[i], "sn": "Race", "mail": value})
            else:
                conns[i].modify(f"uid={uids[i]},{PEOPLE}", {"mail": [(MODIFY_REPLACE, [value])]})
            results[i] = conns[i].result["result"]

        threads = [threading.Thread(target=go, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        for c in conns:
            c.unbind()
        assert sorted(results) == [0] + [CONSTRAINT_VIOLATION] * (clients - 1), (r, results)
        got = srv.run("ldapsearch", "-LLL", "-b", PEOPLE, f"(mail={mail})", "dn", check=True).stdout
        assert got.count("dn: ") == 1, got


def test_duplicates_already_stored_do_not_stop_the_server(make_server):
    """A database written before the rule may hold duplicates: the server starts, unrelated changes
    to those entries go through, a new address for one of them is accepted, and the README's
    search finds them."""
    import sqlite3

    srv = make_server("sqlite")
    a, b = unique("da"), unique("db")
    srv.run("ldapadd", input=person(a, f"{a}@contoso.com") + person(b, f"{b}@contoso.com"), check=True)
    srv.stop()
    # what an older version let through: b holds a's address (entry and its index row)
    path = srv.db_url.removeprefix("sqlite:///")
    con = sqlite3.connect(path)
    (eid, attrs), = con.execute("SELECT id, attrs FROM entries WHERE dn_norm = ?", (f"uid={b},{PEOPLE}",))
    attrs = json.loads(attrs)
    attrs["mail"] = [f"{a.upper()}@contoso.com"]
    con.execute("UPDATE entries SET attrs = ? WHERE id = ?", (json.dumps(attrs), eid))
    con.execute("UPDATE entry_index SET value = ? WHERE entry_id = ? AND attr = 'mail'", (f"{a}@contoso.com", eid))
    con.commit()
    con.close()
    srv.start()
    dn_a, dn_b = f"uid={a},{PEOPLE}", f"uid={b},{PEOPLE}"
    srv.run("ldapmodify", input=f"dn: {dn_b}\nchangetype: modify\nreplace: sn\nsn: Still\n", check=True)
    srv.run("ldapmodify", input=f"dn: {dn_a}\nchangetype: modify\nreplace: sn\nsn: Still\n", check=True)
    # the README's way to find them: every ldapsyncUser's mail, lower-cased, repeated ones
    out = srv.run("ldapsearch", "-LLL", "-o", "ldif-wrap=no", "-b", SUFFIX, "(objectClass=ldapsyncUser)", "mail",
                  check=True).stdout
    mails = [line.split(":", 1)[1].strip().lower() for line in out.splitlines() if line.startswith("mail:")]
    assert mails.count(f"{a}@contoso.com") == 2
    srv.run("ldapmodify", input=f"dn: {dn_b}\nchangetype: modify\nreplace: mail\nmail: {b}@contoso.com\n", check=True)
