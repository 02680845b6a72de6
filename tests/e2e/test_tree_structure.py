"""The tree as LDAP clients see it, when entries are stored together with their parent.

``ldapsync init`` stores the suffix and the OUs under it in one write, and ``ldif load``
stores a whole tree in a few: each new entry must still know its parent, or a one-level
search finds nothing, ``hasSubordinates`` says FALSE and a non-empty OU can be deleted
(its users left behind, unreachable).  Real server, real ldap-utils, both databases.
"""

from __future__ import annotations

import pytest
from helpers import ADMIN_DN, PEOPLE, SUFFIX, parse_ldif_output, user_ldif

pytestmark = pytest.mark.e2e

TOP = {f"ou={ou},{SUFFIX}" for ou in ("people", "groups", "tags", "directories")}


def _dns(srv, base: str, scope: str) -> set[str]:
    p = srv.run("ldapsearch", "-LLL", "-s", scope, "-b", base, "(objectClass=*)", "1.1")
    assert p.returncode == 0, p.stderr
    return {line[4:] for line in p.stdout.splitlines() if line.startswith("dn: ")}


def _check_tree(srv, users: set[str]) -> None:
    everything = _dns(srv, SUFFIX, "sub")
    one = _dns(srv, SUFFIX, "one")
    # every entry one RDN below the suffix, and nothing else
    assert one == {dn for dn in everything if dn.count(",") == SUFFIX.count(",") + 1}, one
    assert TOP <= one
    assert _dns(srv, PEOPLE, "one") == users
    p = srv.run("ldapsearch", "-LLL", "-s", "base", "-b", PEOPLE, "(objectClass=*)", "hasSubordinates")
    assert "hasSubordinates: TRUE" in p.stdout, p.stdout
    # a non-leaf is not deleted: its users would be left without a parent
    for dn in (PEOPLE, SUFFIX):
        p = srv.run("ldapdelete", dn)
        assert p.returncode == 66, (dn, p.returncode, p.stdout, p.stderr)      # notAllowedOnNonLeaf
    assert _dns(srv, PEOPLE, "one") == users


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_tree_init_bootstraps_is_linked(make_server, backend):
    srv = make_server(backend, start=False)
    assert srv.cli("init").returncode == 0
    srv.start()
    srv.run("ldapadd", input=user_ldif("tree1"), check=True)
    _check_tree(srv, {f"uid=tree1,{PEOPLE}"})
    assert ADMIN_DN in _dns(srv, SUFFIX, "one")        # stored in the same write as the suffix


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_whole_tree_loaded_in_one_go_is_linked(make_server, tmp_path, backend):
    """A dump loaded into an empty database (``init --empty``): parents and children arrive together."""
    src = make_server(backend, start=False)
    assert src.cli("init").returncode == 0
    users = "".join(user_ldif(f"tree{i}") for i in range(3))
    (tmp_path / "users.ldif").write_text(users)
    assert src.cli("ldif", "load", str(tmp_path / "users.ldif")).returncode == 0
    dump = src.cli("ldif", "dump")
    assert dump.returncode == 0, dump.stderr
    assert len(parse_ldif_output(dump.stdout.decode())) >= 3 + 5

    srv = make_server(backend, start=False)
    assert srv.cli("init", "--empty").returncode == 0
    (tmp_path / "dump.ldif").write_bytes(dump.stdout)
    p = srv.cli("ldif", "load", str(tmp_path / "dump.ldif"))
    assert p.returncode == 0, p.stderr
    srv.start()
    _check_tree(srv, {f"uid=tree{i},{PEOPLE}" for i in range(3)})
