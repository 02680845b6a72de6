"""``[metrics] listen`` on a really listening server: /metrics, /healthz and /readyz over HTTP.

The counters move with real LDAP traffic (ldap-utils and a raw socket), the Microsoft 365 worker
process's Graph requests add up on the server's page, the bound users are counted by sync state,
/readyz says 503 once the database is gone, and nothing listens when ``listen`` is empty.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Any

import pytest
from conftest import drop_pg_database, free_port, office365_config  # type: ignore[import-not-found]
from helpers import ADMIN_DN, SUFFIX, add_user, unique, wait_for, wait_mail
from prometheus_client.parser import text_string_to_metric_families
from sync.test_worker import DOMAIN, PASSWORD, wait_active, wait_tenant  # type: ignore[import-not-found]

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics_config(port: int) -> str:
    return f'[metrics]\nlisten = "tcp:{port}:interface=127.0.0.1"\n'


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(port: int) -> Samples:
    status, text = get(port, "/metrics")
    assert status == 200, text
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def ops(samples: Samples, operation: str, result: str) -> float:
    return value(samples, "ldapsync_ldap_operations_total", operation=operation, result=result)


def test_ldap_traffic_moves_the_counters_and_health_pages_answer(make_server: Any) -> None:
    port = free_port()
    srv = make_server("sqlite", metrics_config(port))
    before = scrape(port)
    # a wrong password, a search, an add: each counted under its operation and result code
    p = srv.run("ldapwhoami", bind=ADMIN_DN, password="not-the-password")
    assert p.returncode != 0
    srv.run("ldapsearch", "-LLL", "-b", SUFFIX, "-s", "base", "(objectClass=*)", check=True)
    add_user(srv, unique())
    after = scrape(port)
    assert ops(after, "bind", "invalidCredentials") == ops(before, "bind", "invalidCredentials") + 1
    assert ops(after, "search", "success") >= ops(before, "search", "success") + 1
    assert ops(after, "add", "success") >= ops(before, "add", "success") + 1
    assert ops(after, "bind", "success") >= ops(before, "bind", "success") + 2
    assert value(after, "ldapsync_ldap_operation_seconds_count", operation="bind") >= 3
    assert value(after, "ldapsync_database_up") == 1
    assert ("ldapsync_o365_queue_depth", ()) in after
    # an open connection is counted while it is open
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10):
        wait_for("the open connection counted", lambda: value(scrape(port), "ldapsync_ldap_connections") >= 1)
    wait_for("the closed connection uncounted", lambda: value(scrape(port), "ldapsync_ldap_connections") == 0)
    assert get(port, "/healthz") == (200, "ok\n")
    status, body = get(port, "/readyz")
    assert status == 200, body
    assert json.loads(body) == {"ready": True, "database": "ok", "connector": "off"}
    # the files the processes count in are private and next to the database
    d = srv.workdir / "metrics"
    assert d.is_dir() and oct(d.stat().st_mode & 0o777) == "0o700"


def test_graph_requests_of_the_worker_process_and_synced_users_are_counted(make_server: Any, fake_tenant: Any) -> None:
    port = free_port()
    srv = make_server("sqlite", office365_config(fake_tenant.info) + metrics_config(port))
    wait_active(srv)
    uid = unique()
    add_user(srv, uid, bound=True, password=PASSWORD)
    wait_tenant(fake_tenant, f"{uid}@{DOMAIN}", timeout=30)

    def counted() -> Samples | None:
        s = scrape(port)
        return s if value(s, "ldapsync_o365_users", state="synced") >= 1 else None

    # the users count is cached for ~10 s: a generous bound
    s = wait_for("the synced user counted", counted, 60, interval=0.5)
    graph = {k: v for k, v in s.items() if k[0] == "ldapsync_graph_requests_total"}
    created = [v for (_, labels), v in graph.items() if dict(labels).get("method") == "POST"
               and dict(labels).get("status", "").startswith("2")]
    assert created and sum(created) >= 1, graph
    status, body = get(port, "/readyz")
    assert status == 200, body
    assert json.loads(body)["connector"] == "active"


def test_readyz_says_503_when_the_database_is_gone(make_server: Any) -> None:
    port = free_port()
    srv = make_server("postgresql", metrics_config(port))
    status, body = get(port, "/readyz")
    assert status == 200, body
    drop_pg_database(srv.db_url.rsplit("/", 1)[1])

    def not_ready() -> tuple[int, str] | None:
        got = get(port, "/readyz")
        return got if got[0] == 503 else None

    status, body = wait_for("/readyz 503", not_ready, 60, interval=0.5)
    doc = json.loads(body)
    assert doc["ready"] is False and doc["database"] not in ("", "ok")
    assert value(scrape(port), "ldapsync_database_up") == 0
    assert get(port, "/healthz")[0] == 200      # the process itself still answers
    assert (srv.workdir / "var" / "metrics").is_dir()   # PostgreSQL: under the node's working directory


def test_metrics_are_off_when_listen_is_empty(make_server: Any) -> None:
    srv = make_server("sqlite", '[metrics]\nlisten = ""\n')
    assert srv.run("ldapwhoami").returncode == 0
    assert not (srv.workdir / "metrics").exists()


def test_mails_sent_by_the_server_are_counted(make_server: Any, smtp_sink: Any) -> None:
    port = free_port()
    srv = make_server("sqlite", f'[mail]\nsmtp = "{smtp_sink.endpoint}"\n' + metrics_config(port))
    uid = unique("mail")
    dn = add_user(srv, uid)
    assert srv.cli("user", "invite", dn).returncode == 0
    wait_mail(smtp_sink, f"{uid}@contoso.com")
    wait_for("the mail counted", lambda: value(scrape(port), "ldapsync_mail_sent_total", result="sent") >= 1, 30)
