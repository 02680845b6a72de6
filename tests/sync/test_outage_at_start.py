"""The queue after a sign-in (token) outage at the server's start, end to end.

A server that starts while Microsoft 365's sign-in service is down finds the connector in
``error``.  Once the outage ends, queued changes must flow again soon: the worker looks at the
connector again, backing off, rather than waiting for the connector's periodic check (every 5
minutes), which left the queue stalled for minutes after a short outage at a restart.
"""

from __future__ import annotations

import time

import pytest
from conftest import office365_config  # type: ignore[import-not-found]
import helpers
from helpers import PEOPLE, SUFFIX, parse_ldif_output, unique

pytestmark = pytest.mark.e2e
CONNECTOR = f"cn=office365,ou=directories,{SUFFIX}"


def _connector_state(srv) -> str:
    p = srv.run("ldapsearch", "-LLL", "-b", CONNECTOR, "-s", "base", "(objectClass=*)", "o365ConnectorState")
    return next((line.split(": ", 1)[1] for line in p.stdout.splitlines() if line.startswith("o365ConnectorState:")), "")


def test_the_queue_flows_soon_after_a_sign_in_outage_at_start(make_server, fake_tenant):
    admin = fake_tenant.admin
    admin.inject_fault(status=503, count=None, target="identity", retry_after=1)    # sign-in down, Graph up
    try:
        srv = make_server("sqlite", office365_config(fake_tenant.info))
        helpers.wait_for("the connector's first check failed", lambda: _connector_state(srv) == "error", 60, 0.3)
        uid = unique("oa")
        ldif = (f"dn: uid={uid},{PEOPLE}\nobjectClass: inetOrgPerson\nobjectClass: ldapsyncUser\nuid: {uid}\n"
                f"cn: {uid} Test\nsn: Test\ngivenName: {uid}\nmail: {uid}@contoso.com\n"
                "userPassword: Corr3ct-Horse-Battery!\nldapsyncDirectory: office365\n")
        p = srv.run("ldapadd", input=ldif)
        assert p.returncode == 0, p.stderr
        # The outage outlasts the first look again (the worker re-checks at once when the
        # connector's entry and its memory disagree): 20 s in all, then it ends.
        time.sleep(20.0)
    finally:
        admin.clear_faults()

    def synced() -> bool:
        p = srv.run("ldapsearch", "-LLL", "-b", f"uid={uid},{PEOPLE}", "-s", "base", "(objectClass=*)", "o365SyncState")
        e = next(iter(parse_ldif_output(p.stdout).values()), {})
        return e.get("o365SyncState") == ["synced"]
    # The connector's own periodic check comes 300 s after the start: a generous two minutes
    # is far from it, and far above the worker's looks again (10 s, then 20 s, 40 s... at most 2 minutes apart).
    helpers.wait_for("the user delivered after the outage", synced, 120, 0.5)
    assert _connector_state(srv) == "active"
    assert len([u for u in admin.all_users() if u["userPrincipalName"] == f"{uid}@contoso.com"]) == 1
