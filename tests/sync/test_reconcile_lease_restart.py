"""A node killed in the middle of a reconcile pass reconciles again as soon as it is back.

Before, the lease of the killed pass kept every pass out for its full two minutes (the randomized
convergence test, PostgreSQL, seed 38: "another node holds the reconcile lease; skipped" for two
minutes after a kill -9), so portal edits made meanwhile were put back late.  The restarted worker
now frees the lease its node held.  The lease row is written as the killed pass left it (real
server, real database; a kill -9 at the exact moment of a pass cannot be timed).
"""

from __future__ import annotations

import socket
import time

import pytest
import sqlalchemy as sa
from conftest import office365_config  # type: ignore[import-not-found]
from helpers import wait_for
from sync.test_worker import wait_active  # type: ignore[import-not-found]

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_restarted_node_frees_the_reconcile_lease_it_died_with(make_server, fake_tenant, backend):
    srv = make_server(backend, office365_config(fake_tenant.info, reconcile_interval="1s"))
    wait_active(srv)
    wait_for("a reconcile pass", lambda: "reconcile: pass ended" in srv.log.read_text(), 30)
    srv.stop()
    node = f"{socket.gethostname()}/tcp:{srv.port}:interface=127.0.0.1"[:64]
    engine = sa.create_engine(srv.db_url)
    with engine.begin() as c:
        cur = c.execute(sa.text("UPDATE meta SET value = :v WHERE key = 'o365.reconciler_lease'"),
                        {"v": f"0123456789abcdef {node}@{time.time() + 600}"})
        assert cur.rowcount == 1
    engine.dispose()
    logged = len(srv.log.read_text())
    srv.start()

    def passes() -> bool:
        return "reconcile: pass started on this node" in srv.log.read_text()[logged:]
    wait_for("a reconcile pass after the restart", passes, 20)
    assert "the reconcile lease this node held before a restart released" in srv.log.read_text()[logged:]
