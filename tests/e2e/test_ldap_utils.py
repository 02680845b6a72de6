"""End-to-end with OpenLDAP's own clients (ldap-utils) against a listening server.

Runs once on SQLite and once on PostgreSQL (the ``server`` fixture), over
ldap://, ldaps:// and StartTLS.
"""

from __future__ import annotations

import base64

import pytest
from helpers import ADMIN_DN, GROUPS, PEOPLE, SUFFIX, parse_ldif_output, unique, user_ldif

pytestmark = pytest.mark.e2e


def search(server, base=SUFFIX, flt="(objectClass=*)", *attrs, scope="sub", bind=ADMIN_DN, password=None, url=None, extra=()):
    p = server.run("ldapsearch", "-LLL", "-b", base, "-s", scope, *extra, flt, *attrs, bind=bind, password=password, url=url)
    assert p.returncode == 0, p.stderr
    return parse_ldif_output(p.stdout)


def test_root_dse_anonymous(server):
    p = server.run("ldapsearch", "-LLL", "-b", "", "-s", "base", "(objectClass=*)", "+", bind=None)
    assert p.returncode == 0, p.stderr
    dse = parse_ldif_output(p.stdout)[""]
    assert dse["namingContexts"] == [SUFFIX]
    assert "3" in dse["supportedLDAPVersion"]
    assert "1.2.840.113556.1.4.319" in dse["supportedControl"]
    assert {"1.3.6.1.4.1.1466.20037", "1.3.6.1.4.1.4203.1.11.1", "1.3.6.1.4.1.4203.1.11.3"} <= set(dse["supportedExtension"])
    assert dse["vendorName"] == ["ldapsync"]


def test_subschema_anonymous(server):
    p = server.run("ldapsearch", "-LLL", "-b", "cn=Subschema", "-s", "base", "(objectClass=subschema)",
                   "attributeTypes", "objectClasses", "ldapSyntaxes", "matchingRules", bind=None)
    assert p.returncode == 0, p.stderr
    sub = parse_ldif_output(p.stdout)["cn=Subschema"]
    assert any("'ldapsyncUser'" in v and "AUXILIARY" in v for v in sub["objectClasses"])
    assert any("'inetOrgPerson'" in v for v in sub["objectClasses"])
    assert any("'ldapsyncDirectory'" in v for v in sub["attributeTypes"])
    assert sub["ldapSyntaxes"] and sub["matchingRules"]


def test_generated_admin_password_file_works_with_dash_y(server):
    """OpenLDAP's tools send a -y file's bytes verbatim (a trailing newline would be part of the
    password): the file the server generates holds the password alone."""
    pw_file = server.workdir / "admin-password"
    assert pw_file.read_text() == server.admin_password and not server.admin_password.endswith("\n")
    p = server.run("ldapwhoami", "-D", ADMIN_DN, "-y", str(pw_file), bind=None, check=True)
    assert p.stdout.strip() == f"dn:{ADMIN_DN}"


def test_anonymous_cannot_read_or_write(server):
    p = server.run("ldapsearch", "-LLL", "-b", SUFFIX, "(uid=*)", bind=None)
    assert p.returncode == 50, p.stdout + p.stderr
    uid = unique()
    p = server.run("ldapadd", bind=None, input=user_ldif(uid))
    assert p.returncode == 50, p.stdout + p.stderr
    assert "bind first" in p.stderr


def test_add_search_modify_delete(server):
    uid = unique()
    server.run("ldapadd", input=user_ldif(uid, password="Initial-Pass1"), check=True)
    got = search(server, PEOPLE, f"(uid={uid.upper()})", "*", "+")
    dn = f"uid={uid},{PEOPLE}"
    entry = got[dn]
    assert entry["mail"] == [f"{uid}@example.com"]
    assert "userPassword" not in entry            # never returned
    assert len(entry["entryUUID"]) == 1 and entry["structuralObjectClass"] == ["inetOrgPerson"]
    assert entry["creatorsName"] == [ADMIN_DN] and entry["hasSubordinates"] == ["FALSE"]
    assert entry["entryDN"] == [dn]

    mod = f"""dn: {dn}
changetype: modify
replace: sn
sn: Changed
-
add: description
description: first
description: second
-
delete: givenName
-
add: telephoneNumber
telephoneNumber: +1 555 0100
"""
    server.run("ldapmodify", input=mod, check=True)
    entry = search(server, dn, "(objectClass=*)", scope="base")[dn]
    assert entry["sn"] == ["Changed"] and sorted(entry["description"]) == ["first", "second"]
    assert "givenName" not in entry
    # substring and presence filters
    assert dn in search(server, PEOPLE, "(&(sn=chan*)(description=*sec*))", "1.1")
    assert dn in search(server, PEOPLE, "(telephoneNumber=+1 555 0100)", "1.1")
    assert dn not in search(server, PEOPLE, "(!(sn=changed))", "1.1")
    server.run("ldapdelete", dn, check=True)
    assert search(server, PEOPLE, f"(uid={uid})") == {}


def test_scopes(server):
    ou = unique("ou")
    server.run("ldapadd", input=f"dn: ou={ou},{PEOPLE}\nobjectClass: organizationalUnit\nou: {ou}\n\n"
               + user_ldif("a" + ou, parent=f"ou={ou},{PEOPLE}") + user_ldif("b" + ou, parent=f"ou={ou},{PEOPLE}"), check=True)
    base = f"ou={ou},{PEOPLE}"
    assert set(search(server, base, scope="base")) == {base}
    assert set(search(server, base, scope="one")) == {f"uid=a{ou},{base}", f"uid=b{ou},{base}"}
    assert set(search(server, base, scope="sub")) == {base, f"uid=a{ou},{base}", f"uid=b{ou},{base}"}
    assert set(search(server, base, scope="children")) == {f"uid=a{ou},{base}", f"uid=b{ou},{base}"}
    # non-leaf delete refused
    p = server.run("ldapdelete", base)
    assert p.returncode == 66, p.stderr
    server.run("ldapdelete", "-r", base, check=True)
    p = server.run("ldapsearch", "-LLL", "-b", base, "(objectClass=*)")
    assert p.returncode == 32
    # the message names the DN too: look at the matchedDN field ldapsearch prints on its own line
    assert f"Matched DN: {PEOPLE}" in p.stdout + p.stderr, p.stdout + p.stderr


def test_attribute_selection_and_types_only(server):
    uid = unique()
    server.run("ldapadd", input=user_ldif(uid), check=True)
    dn = f"uid={uid},{PEOPLE}"
    e = search(server, dn, "(objectClass=*)", "cn", "mail", scope="base")[dn]
    assert set(e) == {"cn", "mail"}
    e = search(server, dn, "(objectClass=*)", "1.1", scope="base")[dn]
    assert e == {}
    e = search(server, dn, "(objectClass=*)", "+", scope="base")[dn]
    assert "entryUUID" in e and "cn" not in e
    e = search(server, dn, "(objectClass=*)", "*", scope="base")[dn]
    assert "cn" in e and "entryUUID" not in e
    p = server.run("ldapsearch", "-LLL", "-A", "-b", dn, "-s", "base", "(objectClass=*)", "cn")
    assert p.returncode == 0 and "cn:" in p.stdout and "Test" not in p.stdout


def test_user_password_not_returned_when_requested_by_name(server):
    """userPassword is never returned, also when a client names it (admin or the user itself;
    ldap-utils and ldap3), and -A does not reveal that the entry has one either."""
    from ldap3 import BASE, SIMPLE, Connection
    from ldap3 import Server as Ldap3Server

    uid = unique()
    dn = f"uid={uid},{PEOPLE}"
    server.run("ldapadd", input=user_ldif(uid, password="ByName-Pass1"), check=True)
    for who, pw in ((ADMIN_DN, None), (dn, "ByName-Pass1")):
        for attrs in (("userPassword",), ("userpassword", "cn"), ("*", "userPassword"), ("userPassword;binary",)):
            e = search(server, dn, "(objectClass=*)", *attrs, scope="base", bind=who, password=pw)[dn]
            assert not {a.split(";")[0].lower() for a in e} & {"userpassword"}, (who, attrs, sorted(e))
        p = server.run("ldapsearch", "-LLL", "-A", "-b", dn, "-s", "base", "(objectClass=*)", "userPassword",
                       bind=who, password=pw)
        assert p.returncode == 0 and "userPassword" not in p.stdout, p.stdout
        conn = Connection(Ldap3Server("127.0.0.1", port=server.port), user=who,
                          password=pw if pw is not None else server.admin_password, authentication=SIMPLE,
                          raise_exceptions=True, return_empty_attributes=False)
        conn.bind()
        try:
            conn.search(dn, "(objectClass=*)", BASE, attributes=["userPassword", "cn"])
            assert len(conn.response) == 1
            got = {k.lower() for k in conn.response[0]["raw_attributes"]}
            assert "cn" in got and "userpassword" not in got, (who, got)
        finally:
            conn.unbind()


def test_size_limit(server):
    p = server.run("ldapsearch", "-LLL", "-z", "2", "-b", SUFFIX, "(objectClass=*)", "1.1")
    assert p.returncode == 4, p.stdout + p.stderr
    assert p.stdout.count("dn:") == 2


def test_paged_results(server):
    ou = unique("ou")
    base = f"ou={ou},{PEOPLE}"
    server.run("ldapadd", input=f"dn: {base}\nobjectClass: organizationalUnit\nou: {ou}\n\n"
               + "".join(user_ldif(f"p{i:02d}{ou}", parent=base) for i in range(25)), check=True)
    # critical control ('!'): a server that cannot page must refuse, not answer in one go;
    # -LL keeps the "# pagedresults" comment ldapsearch prints for every page it received
    p = server.run("ldapsearch", "-LL", "-E", "!pr=7/noprompt", "-b", base, "(uid=*)", "uid")
    assert p.returncode == 0, p.stderr
    dns = [l for l in p.stdout.splitlines() if l.startswith("dn:")]
    assert len(dns) == 25 and len(set(dns)) == 25
    pages = [l for l in p.stdout.splitlines() if l.startswith("# pagedresults:")]
    assert len(pages) == 4, p.stdout            # 7 + 7 + 7 + 4
    server.run("ldapdelete", "-r", base, check=True)


def test_modrdn_and_refint_memberof(server):
    a, b = unique("a"), unique("b")
    grp = unique("g")
    gdn = f"cn={grp},{GROUPS}"
    server.run("ldapadd", input=user_ldif(a) + user_ldif(b) + f"""dn: {gdn}
objectClass: groupOfNames
cn: {grp}
member: uid={a},{PEOPLE}
member: UID={b.upper()}, ou=People,dc=example,dc=com
""", check=True)
    ua = search(server, f"uid={a},{PEOPLE}", "(objectClass=*)", "memberOf", scope="base")
    assert ua[f"uid={a},{PEOPLE}"]["memberOf"] == [gdn]
    # member matching uses DN matching
    assert gdn in search(server, GROUPS, f"(member=uid={b},ou=people,dc=example,dc=com)", "1.1")
    # rename b: group member follows
    server.run("ldapmodrdn", "-r", f"uid={b},{PEOPLE}", f"uid={b}x", check=True)
    g = search(server, gdn, "(objectClass=*)", "member", scope="base")[gdn]
    assert f"uid={b}x,{PEOPLE}" in g["member"]
    assert not any(m.lower().startswith(f"uid={b},") for m in g["member"])
    ub = search(server, f"uid={b}x,{PEOPLE}", "(objectClass=*)", "memberOf", "uid", scope="base")[f"uid={b}x,{PEOPLE}"]
    assert ub["memberOf"] == [gdn] and ub["uid"] == [f"{b}x"]
    # delete a: group member removed
    server.run("ldapdelete", f"uid={a},{PEOPLE}", check=True)
    g = search(server, gdn, "(objectClass=*)", "member", scope="base")[gdn]
    assert g["member"] == [f"uid={b}x,{PEOPLE}"]
    # remove b from the group: memberOf goes
    server.run("ldapmodify", input=f"dn: {gdn}\nchangetype: modify\nadd: member\nmember: {ADMIN_DN}\n-\ndelete: member\nmember: uid={b}x,{PEOPLE}\n", check=True)
    ub = search(server, f"uid={b}x,{PEOPLE}", "(objectClass=*)", "memberOf", scope="base")[f"uid={b}x,{PEOPLE}"]
    assert "memberOf" not in ub
    # rename the group: memberOf of members follows
    server.run("ldapmodify", input=f"dn: {gdn}\nchangetype: modify\nadd: member\nmember: uid={b}x,{PEOPLE}\n", check=True)
    server.run("ldapmodrdn", "-r", gdn, f"cn={grp}2", check=True)
    ub = search(server, f"uid={b}x,{PEOPLE}", "(objectClass=*)", "memberOf", scope="base")[f"uid={b}x,{PEOPLE}"]
    assert ub["memberOf"] == [f"cn={grp}2,{GROUPS}"]


def test_modrdn_new_superior_moves_subtree(server):
    ou1, ou2 = unique("ou"), unique("ou")
    server.run("ldapadd", input=f"dn: ou={ou1},{PEOPLE}\nobjectClass: organizationalUnit\nou: {ou1}\n\n"
               f"dn: ou={ou2},{PEOPLE}\nobjectClass: organizationalUnit\nou: {ou2}\n\n"
               + user_ldif("m" + ou1, parent=f"ou={ou1},{PEOPLE}"), check=True)
    server.run("ldapmodrdn", "-s", f"ou={ou2},{PEOPLE}", f"ou={ou1},{PEOPLE}", f"ou={ou1}", check=True)
    moved = f"uid=m{ou1},ou={ou1},ou={ou2},{PEOPLE}"
    got = search(server, f"ou={ou2},{PEOPLE}", "(uid=*)", "uid")
    assert moved in got
    assert set(search(server, f"ou={ou1},ou={ou2},{PEOPLE}", scope="one")) == {moved}
    # renaming onto an existing entry
    server.run("ldapadd", input=user_ldif("n" + ou1) + user_ldif("o" + ou1), check=True)
    p = server.run("ldapmodrdn", f"uid=n{ou1},{PEOPLE}", f"uid=o{ou1}")
    assert p.returncode == 68, p.stderr
    # moving below a parent that does not exist
    p = server.run("ldapmodrdn", "-s", f"ou=nowhere,{PEOPLE}", f"uid=n{ou1},{PEOPLE}", f"uid=n{ou1}")
    assert p.returncode == 32, p.stderr


def test_compare(server):
    uid = unique()
    server.run("ldapadd", input=user_ldif(uid, password="Compare-Pass1"), check=True)
    dn = f"uid={uid},{PEOPLE}"
    assert server.run("ldapcompare", dn, "sn:TEST").returncode == 6
    assert server.run("ldapcompare", dn, "sn:nope").returncode == 5
    assert server.run("ldapcompare", dn, "title:x").returncode == 16
    assert server.run("ldapcompare", f"uid=nobody,{PEOPLE}", "sn:x").returncode == 32


def test_bind_whoami_passwd(server):
    uid = unique()
    dn = f"uid={uid},{PEOPLE}"
    server.run("ldapadd", input=user_ldif(uid, password="First-Pass1"), check=True)
    p = server.run("ldapwhoami", bind=dn, password="First-Pass1")
    assert p.returncode == 0 and p.stdout.strip() == f"dn:{dn}"
    assert server.run("ldapwhoami", bind=dn, password="wrong").returncode == 49
    assert server.run("ldapwhoami", bind=f"uid=ghost,{PEOPLE}", password="x").returncode == 49
    assert server.run("ldapwhoami", bind=None).stdout.strip() == "anonymous"
    # the user changes its own password with the old one
    p = server.run("ldappasswd", "-a", "First-Pass1", "-s", "Second-Pass2", bind=dn, password="First-Pass1")
    assert p.returncode == 0, p.stderr
    assert server.run("ldapwhoami", bind=dn, password="Second-Pass2").returncode == 0
    assert server.run("ldapwhoami", bind=dn, password="First-Pass1").returncode == 49
    # wrong old password
    p = server.run("ldappasswd", "-a", "nope", "-s", "Third-Pass3", bind=dn, password="Second-Pass2")
    assert p.returncode != 0 and "Invalid credentials (49)" in p.stdout + p.stderr
    # the admin generates one
    p = server.run("ldappasswd", dn)
    assert p.returncode == 0, p.stderr
    generated = p.stdout.split("New password:")[1].strip()
    assert server.run("ldapwhoami", bind=dn, password=generated).returncode == 0
    # a user cannot change someone else's password or write other attributes
    other = unique()
    server.run("ldapadd", input=user_ldif(other, password="Other-Pass1"), check=True)
    p = server.run("ldappasswd", "-s", "Hijack-Pass1", f"uid={other},{PEOPLE}", bind=dn, password=generated)
    assert p.returncode != 0 and "Insufficient access (50)" in p.stdout + p.stderr
    p = server.run("ldapmodify", bind=dn, password=generated, input=f"dn: {dn}\nchangetype: modify\nreplace: sn\nsn: Me\n")
    assert p.returncode == 50
    # ... but may read the directory, without passwords
    got = search(server, PEOPLE, f"(uid={other})", "*", bind=dn, password=generated)
    assert "userPassword" not in got[f"uid={other},{PEOPLE}"]


def test_user_without_password_cannot_bind(server):
    uid = unique()
    server.run("ldapadd", input=user_ldif(uid), check=True)
    assert server.run("ldapwhoami", bind=f"uid={uid},{PEOPLE}", password="anything").returncode == 49


def test_prehashed_passwords_from_openldap(server):
    import hashlib
    import os

    salt = os.urandom(8)
    ssha = "{SSHA}" + base64.b64encode(hashlib.sha1(b"Legacy-Pass1" + salt).digest() + salt).decode()
    uid = unique()
    server.run("ldapadd", input=user_ldif(uid, password=ssha), check=True)
    assert server.run("ldapwhoami", bind=f"uid={uid},{PEOPLE}", password="Legacy-Pass1").returncode == 0


@pytest.mark.parametrize("mode", ["ldaps", "starttls"])
def test_tls(server, mode):
    if mode == "ldaps":
        p = server.run("ldapwhoami", url=server.ldaps_url)
    else:
        p = server.run("ldapwhoami", "-ZZ")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"dn:{ADMIN_DN}"
    if mode == "starttls":
        got = search(server, PEOPLE, "(objectClass=organizationalUnit)", "ou", scope="base", extra=("-ZZ",))
        assert PEOPLE in got


def test_unknown_critical_control(server):
    p = server.run("ldapsearch", "-LLL", "-e", "!1.2.3.4.5", "-b", SUFFIX, "-s", "base", "(objectClass=*)")
    assert p.returncode == 12, p.stdout + p.stderr
    p = server.run("ldapsearch", "-LLL", "-e", "1.2.3.4.5", "-b", SUFFIX, "-s", "base", "(objectClass=*)", "1.1")
    assert p.returncode == 0
    p = server.run("ldapsearch", "-LLL", "-M", "-b", SUFFIX, "-s", "base", "(objectClass=*)", "1.1")
    assert p.returncode == 0


def test_increment(server):
    uid = unique()
    dn = f"uid={uid},{PEOPLE}"
    server.run("ldapadd", input=f"""dn: {dn}
objectClass: inetOrgPerson
objectClass: posixAccount
uid: {uid}
cn: {uid}
sn: x
uidNumber: 1000
gidNumber: 100
homeDirectory: /home/{uid}
""", check=True)
    server.run("ldapmodify", input=f"dn: {dn}\nchangetype: modify\nincrement: uidNumber\nuidNumber: 5\n", check=True)
    assert search(server, dn, "(uidNumber>=1005)", "uidNumber", scope="base")[dn]["uidNumber"] == ["1005"]
    assert search(server, PEOPLE, "(&(uidNumber<=1005)(uidNumber>=1005))", "1.1") == {dn: {}}


def test_admins_group_members_are_admins(server):
    uid = unique("adm")
    dn = f"uid={uid},{PEOPLE}"
    server.run("ldapadd", input=user_ldif(uid, password="Admin-Group-1"), check=True)
    victim = unique()
    server.run("ldapadd", input=user_ldif(victim), check=True)
    mod = f"dn: uid={victim},{PEOPLE}\nchangetype: modify\nreplace: sn\nsn: ByDelegate\n"
    assert server.run("ldapmodify", bind=dn, password="Admin-Group-1", input=mod).returncode == 50
    p = server.run("ldapsearch", "-LLL", "-b", GROUPS, "(cn=admins)", "1.1")
    if f"cn=admins,{GROUPS}" in p.stdout:
        server.run("ldapmodify", input=f"dn: cn=admins,{GROUPS}\nchangetype: modify\nadd: member\nmember: {dn}\n", check=True)
    else:
        server.run("ldapadd", input=f"dn: cn=admins,{GROUPS}\nobjectClass: groupOfNames\ncn: admins\nmember: {dn}\n", check=True)
    assert server.run("ldapmodify", bind=dn, password="Admin-Group-1", input=mod).returncode == 0
    server.run("ldapmodify", input=f"dn: cn=admins,{GROUPS}\nchangetype: modify\ndelete: member\nmember: {dn}\n-\nadd: member\nmember: {ADMIN_DN}\n", check=True)
    assert server.run("ldapmodify", bind=dn, password="Admin-Group-1", input=mod).returncode == 50


def test_idle_timeout_closes_idle_connections(make_server):
    import socket
    import time

    srv = make_server("sqlite", "[ldap]\nidle_timeout = \"1s\"\n")
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    time.sleep(2.5)
    data = s.recv(4096)          # Notice of Disconnection, then EOF
    assert b"1.3.6.1.4.1.1466.20036" in data
    s.close()
    assert srv.run("ldapwhoami").returncode == 0
