"""``ldapsync init`` / ``ldif load`` / ``ldif dump`` against real databases, also while the server runs."""

from __future__ import annotations

import pytest
from helpers import PEOPLE, SUFFIX, parse_ldif_output, unique, user_ldif

pytestmark = pytest.mark.e2e


def _users(n: int, prefix: str) -> str:
    return "".join(user_ldif(f"{prefix}{i:04d}", password="{SSHA}c2FsdGVkc2FsdGVkc2FsdGVkc2FsdA==") for i in range(n))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_init_load_dump_roundtrip(make_server, tmp_path, backend):
    srv = make_server(backend, start=False)
    p = srv.cli("init")
    assert p.returncode == 0, p.stderr
    assert b"created dc=example,dc=com" in p.stdout
    assert srv.cli("init").returncode == 0          # idempotent
    group = f"""dn: cn=team,ou=groups,{SUFFIX}
objectClass: groupOfNames
cn: team
member: uid=ld0001,{PEOPLE}
member: uid=ld0002,{PEOPLE}

"""
    (tmp_path / "in.ldif").write_text(_users(50, "ld") + group)
    p = srv.cli("ldif", "load", str(tmp_path / "in.ldif"))
    assert p.returncode == 0, p.stderr
    assert b"loaded 51 entries" in p.stdout
    # an existing entry stops the load, unless --skip-existing
    p = srv.cli("ldif", "load", str(tmp_path / "in.ldif"))
    assert p.returncode != 0 and b"already exists" in p.stderr
    p = srv.cli("ldif", "load", "--skip-existing", str(tmp_path / "in.ldif"))
    assert p.returncode == 0 and b"skipped 51" in p.stdout, p.stdout

    dump1 = srv.cli("ldif", "dump")
    assert dump1.returncode == 0, dump1.stderr
    parsed = parse_ldif_output(dump1.stdout.decode())
    assert parsed[f"uid=ld0001,{PEOPLE}"]["memberOf"] == [f"cn=team,ou=groups,{SUFFIX}"]
    assert len(parsed) == 51 + 6

    # The dump loads back into an empty database (`init --empty`: tables, no entries) unchanged.
    srv2 = make_server(backend, start=False)
    assert srv2.cli("init", "--empty").returncode == 0
    (tmp_path / "dump.ldif").write_bytes(dump1.stdout)
    p = srv2.cli("ldif", "load", str(tmp_path / "dump.ldif"))
    assert p.returncode == 0, p.stderr
    dump2 = srv2.cli("ldif", "dump")
    assert dump2.stdout == dump1.stdout

    # The server starts on the loaded database and serves it.
    srv2.start()
    p = srv2.run("ldapsearch", "-LLL", "-b", PEOPLE, "(uid=ld0042)", "mail")
    assert p.returncode == 0 and "ld0042@example.com" in p.stdout


def test_load_while_server_runs(make_server, tmp_path):
    srv = make_server("sqlite")
    uid = unique()
    (tmp_path / "one.ldif").write_text(user_ldif(uid))
    p = srv.cli("ldif", "load", str(tmp_path / "one.ldif"))
    assert p.returncode == 0, p.stderr
    p = srv.run("ldapsearch", "-LLL", "-b", PEOPLE, f"(uid={uid})", "1.1")
    assert f"uid={uid},{PEOPLE}" in p.stdout


def test_load_rejects_bad_entries_with_line_numbers(make_server, tmp_path):
    srv = make_server("sqlite", start=False)
    assert srv.cli("init").returncode == 0
    (tmp_path / "bad.ldif").write_text(user_ldif("okuser") + f"dn: uid=bad,{PEOPLE}\nobjectClass: inetOrgPerson\nuid: bad\n\n")
    p = srv.cli("ldif", "load", str(tmp_path / "bad.ldif"))
    assert p.returncode != 0
    assert b"requires attribute" in p.stderr or b"sn" in p.stderr, p.stderr
    (tmp_path / "orphan.ldif").write_text(user_ldif("orphan", parent=f"ou=missing,{SUFFIX}"))
    p = srv.cli("ldif", "load", str(tmp_path / "orphan.ldif"))
    assert p.returncode != 0 and b"line 1" in p.stderr and b"parent" in p.stderr


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_users_loaded_after_their_groups_get_member_of(make_server, tmp_path, backend):
    """A group that already lists entries not loaded yet (slapadd order does not matter): when the
    users arrive, in one batch, each gets memberOf of every group that lists it."""
    srv = make_server(backend, start=False)
    assert srv.cli("init").returncode == 0
    groups = "".join(f"""dn: cn={name},ou=groups,{SUFFIX}
objectClass: groupOfNames
cn: {name}
member: uid=gl0001,{PEOPLE}
member: uid=gl0003,{PEOPLE}

""" for name in ("alpha", "beta")) + f"""dn: cn=gamma,ou=groups,{SUFFIX}
objectClass: groupOfUniqueNames
cn: gamma
uniqueMember: uid=gl0002,{PEOPLE}

"""
    (tmp_path / "groups.ldif").write_text(groups)
    p = srv.cli("ldif", "load", str(tmp_path / "groups.ldif"))
    assert p.returncode == 0, p.stderr
    (tmp_path / "users.ldif").write_text(_users(4, "gl"))
    p = srv.cli("ldif", "load", str(tmp_path / "users.ldif"))
    assert p.returncode == 0, p.stderr
    parsed = parse_ldif_output(srv.cli("ldif", "dump").stdout.decode())
    member_of = {dn.split(",")[0]: sorted(attrs.get("memberOf", [])) for dn, attrs in parsed.items() if dn.startswith("uid=gl")}
    assert member_of == {
        "uid=gl0001": [f"cn=alpha,ou=groups,{SUFFIX}", f"cn=beta,ou=groups,{SUFFIX}"],
        "uid=gl0002": [f"cn=gamma,ou=groups,{SUFFIX}"],
        "uid=gl0003": [f"cn=alpha,ou=groups,{SUFFIX}", f"cn=beta,ou=groups,{SUFFIX}"],
        "uid=gl0000": [],
    }
