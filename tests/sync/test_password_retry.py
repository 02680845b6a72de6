"""A password PATCH whose reply is lost after Graph applied it (found by the randomized convergence
test, profile full, seed 44: a kill -9 between Graph's answer and the delivery's COMMIT).

Graph refuses to set the password an account already has ("The specified password does not comply
with password complexity requirements"), so the retry of such a PATCH used to end in
``o365SyncState: error`` and stop the user's queue: the user's later unbind was never delivered and
the account stayed enabled.  The fake tenant applies the PATCH, then answers 503 (its lost-reply
fault): the retry must find the password set and the user synced, and a later change must flow.

The same after a kill -9 between Graph's answer and the delivery's COMMIT: the note of the try,
committed before the PATCH went out, tells the restarted worker that the password went out before.
A 400 to a first send stays Graph's answer to that password (an error on the entry).
"""

from __future__ import annotations

import signal

import pytest
from conftest import office365_config  # type: ignore[import-not-found]
from helpers import PEOPLE, unique
from sync.test_worker import DOMAIN, PASSWORD, person, wait_active, wait_entry_state, wait_tenant  # type: ignore[import-not-found]

pytestmark = pytest.mark.e2e
NEW_PASSWORD = "Quiet-Meadow-73!x"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_password_set_whose_reply_was_lost_is_not_an_error(make_server, fake_tenant, backend):
    srv = make_server(backend, office365_config(fake_tenant.info))
    wait_active(srv)
    uid = unique("lost")
    upn = f"{uid}@{DOMAIN}"
    srv.run("ldapadd", input=person(uid, password=PASSWORD, bound=True), check=True)
    wait_tenant(fake_tenant, upn, lambda u: u["accountEnabled"] is True, timeout=30)
    wait_entry_state(srv, uid, "synced", timeout=30)
    # the next PATCH of this user is applied, then its reply is lost
    fake_tenant.admin.inject_fault(status=503, count=1, retry_after=1, after=True, method="PATCH", path=r"/users/")
    p = srv.run("ldappasswd", "-s", NEW_PASSWORD, f"uid={uid},{PEOPLE}")
    assert p.returncode == 0, p.stderr
    wait_tenant(fake_tenant, upn, lambda u: fake_tenant.admin.password_of(key=upn) == NEW_PASSWORD, timeout=30)
    # the retry meets Graph's "already this password" refusal: the user must end synced, not in error
    srv.run("ldapmodify", input=f"dn: uid={uid},{PEOPLE}\nchangetype: modify\nreplace: sn\nsn: Later\n", check=True)
    wait_tenant(fake_tenant, upn, lambda u: u.get("surname") == "Later", timeout=60)
    e = wait_entry_state(srv, uid, "synced", timeout=30)
    assert "o365LastError" not in e, e
    assert "the password was set by an earlier try whose reply was lost" in srv.log.read_text()
    assert fake_tenant.admin.password_of(key=upn) == NEW_PASSWORD


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_password_set_before_a_kill_9_is_not_an_error_after_the_restart(make_server, fake_tenant, backend):
    """The seed-44 case itself: Graph applied the password, the node was killed before it recorded
    the delivery; the restarted worker's try meets "already this password"."""
    srv = make_server(backend, office365_config(fake_tenant.info))
    wait_active(srv)
    uid = unique("kill")
    upn = f"{uid}@{DOMAIN}"
    srv.run("ldapadd", input=person(uid, password=PASSWORD, bound=True), check=True)
    wait_entry_state(srv, uid, "synced", timeout=30)
    # applied, then a 503 whose Retry-After keeps the client waiting: the node dies meanwhile
    fake_tenant.admin.inject_fault(status=503, count=1, retry_after=30, after=True, method="PATCH", path=r"/users/")
    p = srv.run("ldappasswd", "-s", NEW_PASSWORD, f"uid={uid},{PEOPLE}")
    assert p.returncode == 0, p.stderr
    wait_tenant(fake_tenant, upn, lambda u: fake_tenant.admin.password_of(key=upn) == NEW_PASSWORD, timeout=30)
    srv.signal_all(signal.SIGKILL)
    assert srv.proc is not None
    srv.proc.wait(30)
    srv.proc = None
    srv.start()
    e = wait_entry_state(srv, uid, "synced", timeout=60)
    assert "o365LastError" not in e, e
    assert "the password was set by an earlier try whose reply was lost" in srv.log.read_text()
    srv.run("ldapmodify", input=f"dn: uid={uid},{PEOPLE}\nchangetype: modify\nreplace: sn\nsn: After\n", check=True)
    wait_tenant(fake_tenant, upn, lambda u: u.get("surname") == "After", timeout=60)
    assert fake_tenant.admin.password_of(key=upn) == NEW_PASSWORD
