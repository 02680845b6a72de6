"""A user unbound and deleted while its create is still on its way to Graph (the randomized
convergence test, PostgreSQL, seeds 85 and 87).

The unbind found no account to record yet and the delete found the user neither bound nor
blocked, so neither noted it; the create's completion then recorded the account as one ldapsync
created (``bound``), and the blocking delivered next left it so.  The deleted user's account was
blocked, but an edit in the portal that enabled it again was never put back: the reconciler only
blocks accounts whose record says ``deleted``.  Now the delivery of a deleted user's row records
the account as deleted, and the reconcilers treat a record whose entry is gone as deleted.

The fake tenant answers slowly, so the create is in flight while the LDAP writes run.  Real
server, both databases.
"""

from __future__ import annotations

import pytest
from conftest import office365_config  # type: ignore[import-not-found]
from helpers import PEOPLE, unique
from sync.test_worker import DOMAIN, PASSWORD, person, wait_active, wait_entry_state, wait_tenant  # type: ignore[import-not-found]

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_user_deleted_while_its_create_is_in_flight_stays_blocked(make_server, fake_tenant, backend):
    fake = fake_tenant
    srv = make_server(backend, office365_config(fake.info, reconcile_interval="2s"))
    wait_active(srv)
    warm = unique("warm")                                    # the worker process delivers by now
    srv.run("ldapadd", input=person(warm, password=PASSWORD, bound=True), check=True)
    wait_entry_state(srv, warm, "synced", timeout=30)
    uid = unique("gone")
    upn = f"{uid}@{DOMAIN}"
    fake.admin.set_latency(seconds=3.0)
    srv.run("ldapadd", input=person(uid, password=PASSWORD, bound=True), check=True)
    p = srv.run("ldapmodify", input=f"dn: uid={uid},{PEOPLE}\nchangetype: modify\ndelete: ldapsyncDirectory\n")
    assert p.returncode == 0, p.stderr
    p = srv.run("ldapdelete", f"uid={uid},{PEOPLE}")
    assert p.returncode == 0, p.stderr
    assert fake.admin.get_user(key=upn) is None, "the create was delivered before the LDAP writes: no race"
    wait_tenant(fake, upn, timeout=30)                       # the create lands
    fake.admin.set_latency(seconds=0)
    wait_tenant(fake, upn, lambda u: u["accountEnabled"] is False, timeout=30)   # then the block
    fake.admin.portal_edit(key=upn, accountEnabled=True)
    wait_tenant(fake, upn, lambda u: u["accountEnabled"] is False, timeout=30)   # put back by the reconciler
