"""A node frozen after it claimed new users, before it sent their creates (two nodes, PostgreSQL).

The node (A) claims a batch of new bound users and asks Graph whether their sign-in names exist;
it is frozen (SIGSTOP) while those look-ups are on their way.  Meanwhile the users are deleted
through the other node (B), which presumes A dead after ``node_timeout``, takes the rows over and
finds nothing to do: the users were deleted before any account was made.  Then A resumes and its
look-ups come back ("no such account").  It used to go on and create the accounts — enabled, with
the password the directory had, for users the directory no longer has, linked to nothing and
known to no record, so no reconciler ever blocked them.  A create is now sent only after a
transaction that finds the claim still the node's own (``sync/graph_mapping.py: ClaimLost``).
"""

from __future__ import annotations

import signal
import time

import pytest
from helpers import PEOPLE, unique
from sync.test_multinode import (  # type: ignore[import-not-found]
    DOMAIN, add_ldif, cluster_config, leases_of, queued, wait_active, wait_for)

pytestmark = pytest.mark.e2e


def test_a_node_frozen_before_its_creates_makes_no_account_for_users_deleted_meanwhile(make_cluster, fake_tenant):
    a, b = make_cluster(2, cluster_config(fake_tenant, outbox_lease="600s", reconcile_interval="2s"), start=False)
    a.start()
    wait_active(a)
    prefix = unique("fz")
    uids = [f"{prefix}x{i:02d}" for i in range(8)]
    upns = {f"{u}@{DOMAIN}".lower() for u in uids}

    fake_tenant.admin.set_latency(seconds=3.0)
    assert a.run("ldapmodify", input="".join(add_ldif(u) for u in uids)).returncode == 0
    wait_for("node A working on every user", lambda: len(leases_of(a, a.db_url)) == len(uids), 30, 0.05)
    time.sleep(1.0)                                # its look-ups are at the tenant, which answers after 3 s
    a.signal_all(signal.SIGSTOP)                   # before any answer: no create sent yet
    try:
        fake_tenant.admin.set_latency(seconds=0)   # (the look-ups in flight still take their 3 s)
        b.start()
        wait_active(b)
        text = "".join(f"dn: uid={u},{PEOPLE}\nchangetype: delete\n\n" for u in uids)
        p = b.run("ldapmodify", input=text)
        assert p.returncode == 0, p.stderr
        # B presumes A dead (node_timeout), takes the rows over: deleted before provisioned
        wait_for("B dealt with the users", lambda: queued(b.db_url) == 0, 120, 0.2)
    finally:
        a.signal_all(signal.SIGCONT)
    wait_for("A gave the users up", lambda: "is no longer its own" in a.log.read_text(errors="replace"), 60, 0.2)
    time.sleep(6.0)                                # A's other deliveries end; two reconcile passes
    made = [u for u in fake_tenant.admin.all_users() if str(u.get("userPrincipalName", "")).lower() in upns]
    enabled = [u["userPrincipalName"] for u in made if u.get("accountEnabled")]
    assert not enabled, f"accounts made for users deleted from the directory, enabled: {enabled}"
    assert not made, f"accounts made for users deleted from the directory: {[u['userPrincipalName'] for u in made]}"
    posts = [r for r in fake_tenant.admin.requests(method="POST") if r["path"].rstrip("/").endswith("/users")
             and str((r.get("body") or {}).get("userPrincipalName", "")).lower() in upns]
    assert not posts, f"{len(posts)} creates sent for users the directory had deleted"
    for srv in (a, b):
        text = srv.log.read_text(errors="replace")
        assert "Traceback" not in text, text[text.index("Traceback") - 2000:][:6000]
