"""``cn=Monitor`` (issue 18) through a really listening server and ldap-utils.

Shaped on slapd's back-monitor (``database monitor``): the admin sees the version,
the start time, the connections (current, total), the operations by type with
counts that move with traffic and the connector's summary, as operational
attributes (``'*' '+'``, as slapd); the root DSE lists ``monitorContext`` for admins.
An ordinary user and an anonymous client (even with ``allow_anonymous_read``)
get noSuchObject for every DN under ``cn=Monitor`` and nothing of it anywhere else.
"""

from __future__ import annotations

import re

import pytest
from helpers import ADMIN_DN, GROUPS, PEOPLE, add_user, parse_ldif_output, unique

import ldapsync

pytestmark = pytest.mark.e2e

MONITOR = "cn=Monitor"
OPERATIONS = ("Bind", "Unbind", "Search", "Compare", "Modify", "Modrdn", "Add", "Delete", "Abandon", "Extended")
PW = "Monitor-Secret-7"


def monitor(srv, *args: str, base: str = MONITOR, scope: str = "sub", bind: str | None = ADMIN_DN,
            password: str | None = None) -> dict[str, dict[str, list[str]]]:
    p = srv.run("ldapsearch", "-LLL", "-o", "ldif-wrap=no", "-b", base, "-s", scope, *(args or ("*", "+")),
                bind=bind, password=password)
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    return parse_ldif_output(p.stdout)


def counter(tree: dict[str, dict[str, list[str]]], dn: str, attr: str = "monitorCounter") -> int:
    return int(tree[dn][attr][0])


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_admin_reads_the_monitor_and_its_counts_move_with_traffic(make_server, backend: str) -> None:
    srv = make_server(backend)
    tree = monitor(srv)
    assert tree[MONITOR]["objectClass"] == ["monitorServer"]
    assert tree[MONITOR]["monitoredInfo"] == [f"ldapsync {ldapsync.__version__}"]
    assert tree[MONITOR]["hasSubordinates"] == ["TRUE"]
    assert re.fullmatch(r"\d{14}Z", tree[f"cn=Start,cn=Time,{MONITOR}"]["monitorTimestamp"][0])
    assert tree[f"cn=Start,cn=Time,{MONITOR}"]["monitorTimestamp"][0] <= tree[f"cn=Current,cn=Time,{MONITOR}"]["monitorTimestamp"][0]
    assert int(tree[f"cn=Uptime,cn=Time,{MONITOR}"]["monitoredInfo"][0]) >= 0
    current = counter(tree, f"cn=Current,cn=Connections,{MONITOR}")
    total = counter(tree, f"cn=Total,cn=Connections,{MONITOR}")
    assert current >= 1 and total >= current          # at least this search's own connection
    for op in OPERATIONS:
        assert tree[f"cn={op},cn=Operations,{MONITOR}"]["objectClass"] == ["monitorOperation"]
    search = f"cn=Search,cn=Operations,{MONITOR}"
    before = counter(tree, search, "monitorOpCompleted")
    # The search being answered has started, not completed (as in slapd).
    assert counter(tree, search, "monitorOpInitiated") >= before + 1
    # The connector's summary (no [office365] here: off, nothing queued, nobody in error).
    connector = f"cn=Connector,{MONITOR}"
    assert tree[connector]["monitoredInfo"] == ["off"]
    assert counter(tree, f"cn=Queue,{connector}") == 0
    assert counter(tree, f"cn=Error,cn=Users,{connector}") == 0

    for _ in range(3):
        srv.run("ldapsearch", "-b", PEOPLE, "-s", "base", "1.1", check=True)
    after = monitor(srv)
    assert counter(after, search, "monitorOpCompleted") >= before + 3
    assert counter(after, f"cn=Bind,cn=Operations,{MONITOR}", "monitorOpCompleted") >= 4
    assert counter(after, f"cn=Unbind,cn=Operations,{MONITOR}", "monitorOpCompleted") >= 4
    assert counter(after, f"cn=Total,cn=Connections,{MONITOR}") >= total + 4
    assert counter(after, f"cn=Operations,{MONITOR}", "monitorOpCompleted") >= counter(after, search, "monitorOpCompleted")


def test_scopes_filters_attributes_and_compare_as_slapd(make_server) -> None:
    srv = make_server()
    ops = monitor(srv, "1.1", base=f"cn=Operations,{MONITOR}", scope="one")
    assert sorted(ops) == sorted(f"cn={op},cn=Operations,{MONITOR}" for op in OPERATIONS)
    # As slapd: without '+' the figures (operational attributes) are not shown.
    plain = monitor(srv, "*", base=f"cn=Current,cn=Connections,{MONITOR}", scope="base")
    assert "monitorCounter" not in plain[f"cn=Current,cn=Connections,{MONITOR}"]
    counters = monitor(srv, "(objectClass=monitorCounterObject)", "monitorCounter")
    assert f"cn=Total,cn=Connections,{MONITOR}" in counters and MONITOR not in counters
    missing = srv.run("ldapsearch", "-b", f"cn=Nothing,cn=Connections,{MONITOR}", "-s", "base")
    assert missing.returncode == 32 and f"cn=Connections,{MONITOR}" in missing.stdout   # matched DN
    assert srv.run("ldapcompare", MONITOR, "cn:Monitor").returncode == 6                 # compareTrue
    assert srv.run("ldapcompare", f"cn=Time,{MONITOR}", "cn:Space").returncode == 5      # compareFalse


def test_root_dse_lists_monitor_context_for_admins_only(make_server) -> None:
    srv = make_server()
    dse = monitor(srv, "+", base="", scope="base")
    assert dse[""]["monitorContext"] == [MONITOR]
    uid = unique("mon")
    user = add_user(srv, uid, password=PW)
    assert "monitorContext" not in srv.run("ldapsearch", "-b", "", "-s", "base", "+", bind=user, password=PW).stdout
    assert "monitorContext" not in srv.run("ldapsearch", "-b", "", "-s", "base", "+", bind=None).stdout
    # A member of cn=admins (by the group's member values) is an admin: it sees the monitor.
    srv.run("ldapadd", input=f"dn: cn=admins,{GROUPS}\nobjectClass: groupOfNames\ncn: admins\nmember: {user}\n", check=True)
    assert "monitorContext: cn=Monitor" in srv.run("ldapsearch", "-b", "", "-s", "base", "+", bind=user, password=PW).stdout
    assert f"cn=Start,cn=Time,{MONITOR}" in monitor(srv, "1.1", bind=user, password=PW)


def test_users_and_anonymous_see_nothing_of_it(make_server) -> None:
    srv = make_server(extra_config="[ldap]\nallow_anonymous_read = true\n")
    user = add_user(srv, unique("mon"), password=PW)
    assert f"cn=Current,cn=Connections,{MONITOR}" in monitor(srv, "1.1")     # there for the admin
    for bind, password in ((user, PW), (None, None)):
        who = bind or "anonymous"
        for base in (MONITOR, f"cn=Current,cn=Connections,{MONITOR}"):
            for scope in ("base", "one", "sub"):
                p = srv.run("ldapsearch", "-LLL", "-b", base, "-s", scope, "*", "+", bind=bind, password=password)
                assert p.returncode == 32, (who, base, scope, p.returncode, p.stdout, p.stderr)   # noSuchObject
                assert "monitor" not in p.stdout.lower(), (who, p.stdout)
        p = srv.run("ldapcompare", MONITOR, "cn:Monitor", bind=bind, password=password)
        assert p.returncode == 32, (who, p.returncode, p.stdout, p.stderr)
        p = srv.run("ldapsearch", "-LLL", "-b", "", "-s", "sub", "(objectClass=*)", "*", "+", bind=bind, password=password)
        assert p.returncode == 0, (who, p.returncode, p.stdout, p.stderr)
        assert PEOPLE in p.stdout and "monitor" not in p.stdout.lower(), who     # the directory, not the monitor
