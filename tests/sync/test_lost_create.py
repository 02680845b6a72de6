"""A create whose reply was lost, and a node killed before the retry (found by the randomized
convergence test, PostgreSQL, seed 38).

Graph made the account (``POST /users`` applied), but the worker died before it heard so and
recorded the account's id.  Meanwhile the user's queue moved on; the restarted worker delivers the
coalesced rest.  It used to look the account up by the user's *current* UPN only:

- the user deleted (or unbound) since: "unbound before it was provisioned: nothing to do", and the
  account the lost create made stayed enabled, linked to nobody, for good;
- the user's mail (its UPN) changed since: no account under the new UPN, so a second one was made;
- its password changed since: the retry took the account to hold the queued password already and
  never sent it.

The fake tenant applies the create, then answers 503 with a long Retry-After (its lost-reply
fault); the worker process is killed while it waits.  Real server, both databases.
"""

from __future__ import annotations

import os
import signal

import pytest
from conftest import office365_config  # type: ignore[import-not-found]
from helpers import PEOPLE, unique, wait_for
from sync.test_worker import DOMAIN, PASSWORD, person, wait_active, wait_entry_state, wait_tenant  # type: ignore[import-not-found]

pytestmark = pytest.mark.e2e
NEW_PASSWORD = "Quiet-Meadow-73!x"


def _create_lost_then_worker_killed(srv, fake_tenant, uid: str, then: str) -> str:
    """Add a bound user whose create is applied but unanswered, run ``then`` (LDIF changes) while
    the worker waits to retry, kill the worker process; the server starts a new one."""
    upn = f"{uid}@{DOMAIN}"
    fake_tenant.admin.inject_fault(status=503, count=1, retry_after=60, after=True, method="POST", path=r"/users$")
    srv.run("ldapadd", input=person(uid, password=PASSWORD, bound=True), check=True)
    wait_tenant(fake_tenant, upn, timeout=30)                    # Graph made it; the reply is lost
    if then:
        p = srv.run("ldapmodify", input=then)
        assert p.returncode == 0, p.stderr
    workers = [pid for pid in srv.pids() if pid != srv.proc.pid]
    assert workers, "no worker process"
    for pid in workers:                 # the node stays up: only its worker dies
        os.kill(pid, signal.SIGKILL)
    return upn


def _accounts_of(fake_tenant, uid: str) -> list[dict]:
    return [u for u in fake_tenant.admin.all_users() if u.get("mailNickname") == uid
            or str(u.get("userPrincipalName", "")).lower().startswith(uid)]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_deleted_users_account_made_by_a_lost_create_is_blocked(make_server, fake_tenant, backend):
    srv = make_server(backend, office365_config(fake_tenant.info, reconcile_interval="2s"))
    wait_active(srv)
    uid = unique("lostdel")
    upn = _create_lost_then_worker_killed(srv, fake_tenant, uid, f"dn: uid={uid},{PEOPLE}\nchangetype: delete\n")
    wait_tenant(fake_tenant, upn, lambda u: u["accountEnabled"] is False, timeout=30)
    assert len(_accounts_of(fake_tenant, uid)) == 1
    # the account is known now: re-enabled in the portal, it is blocked again (the deleted user's record)
    fake_tenant.admin.portal_edit(key=upn, accountEnabled=True)
    wait_tenant(fake_tenant, upn, lambda u: u["accountEnabled"] is False, timeout=30)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_an_account_made_by_a_lost_create_follows_the_users_new_mail_and_password(make_server, fake_tenant, backend):
    srv = make_server(backend, office365_config(fake_tenant.info))
    wait_active(srv)
    uid = unique("lostmail")
    new_upn = f"{uid}.moved@{DOMAIN}"
    upn = _create_lost_then_worker_killed(
        srv, fake_tenant, uid,
        f"dn: uid={uid},{PEOPLE}\nchangetype: modify\nreplace: mail\nmail: {new_upn}\n-\n"
        f"replace: userPassword\nuserPassword: {NEW_PASSWORD}\n")
    e = wait_entry_state(srv, uid, "synced", timeout=60)
    assert "o365LastError" not in e, e
    moved = wait_tenant(fake_tenant, new_upn, timeout=30)
    accounts = _accounts_of(fake_tenant, uid)
    assert [a["id"] for a in accounts] == [moved["id"]], f"expected one account, found {accounts}"
    assert e["o365ObjectId"] == [moved["id"]]
    assert fake_tenant.admin.get_user(key=upn) is None
    assert fake_tenant.admin.password_of(key=new_upn) == NEW_PASSWORD
    assert moved["accountEnabled"] is True


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_lost_create_retried_with_the_same_password_is_not_an_error(make_server, fake_tenant, backend):
    """Nothing changed meanwhile: the retry links the account and takes Graph's refusal of the
    password it already has as set (the create noted it)."""
    srv = make_server(backend, office365_config(fake_tenant.info))
    wait_active(srv)
    uid = unique("lostsame")
    upn = _create_lost_then_worker_killed(srv, fake_tenant, uid, "")
    e = wait_entry_state(srv, uid, "synced", timeout=60)
    assert "o365LastError" not in e and "o365PasswordPending" not in e, e
    assert len(_accounts_of(fake_tenant, uid)) == 1
    assert fake_tenant.admin.password_of(key=upn) == PASSWORD
    wait_for("log line", lambda: "linked to the account our lost create made" in srv.log.read_text(), 10)
