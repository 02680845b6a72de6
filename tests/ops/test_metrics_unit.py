"""ldapsync.metrics without a server: several processes' counts add up; the page parses.

Each case runs in a fresh interpreter, because enabling metrics sets process-wide state
(prometheus_client's value class and PROMETHEUS_MULTIPROC_DIR), as it does in the server.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families


def _py(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_counts_of_two_processes_add_up_and_database_figures_appear(tmp_path: Path) -> None:
    d = tmp_path / "metrics"
    _py(f"""
        from ldapsync import metrics
        metrics.enable({str(d)!r}, fresh=True)
        for _ in range(3):
            metrics.ldap_operation("search", "success", 0.002)
        metrics.ldap_operation("bind", "invalidCredentials", 0.05)
        metrics.ldap_connection_opened()
    """)
    out = _py(f"""
        import os, sys
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = {str(d)!r}
        from ldapsync import metrics
        metrics.enable_from_environment()
        metrics.ldap_operation("search", "success", 0.004)
        metrics.graph_request("PATCH", 429)
        metrics.mail_sent("sent")
        probe = metrics.Probe(database_ok=True, connector_state="active", queue_rows={{"ready": 4, "held": 1, "error": 2}},
                              oldest_change_age=1000.0, users_by_state={{"synced": 7, "error": 2}})
        sys.stdout.write(metrics.render_metrics(probe, now=1030.0).decode())
    """)
    s = _samples(out)
    assert s[("ldapsync_ldap_operations_total", (("operation", "search"), ("result", "success")))] == 4
    assert s[("ldapsync_ldap_operations_total", (("operation", "bind"), ("result", "invalidCredentials")))] == 1
    assert s[("ldapsync_ldap_operation_seconds_count", (("operation", "search"),))] == 4
    assert s[("ldapsync_graph_requests_total", (("method", "PATCH"), ("status", "429")))] == 1
    assert s[("ldapsync_mail_sent_total", (("result", "sent"),))] == 1
    assert s[("ldapsync_o365_queue_depth", ())] == 5
    assert s[("ldapsync_o365_queue_rows", (("state", "error"),))] == 2
    assert s[("ldapsync_o365_oldest_change_age_seconds", ())] == 30
    assert s[("ldapsync_o365_users", (("state", "synced"),))] == 7
    assert s[("ldapsync_o365_users", (("state", "pending"),))] == 0
    assert s[("ldapsync_database_up", ())] == 1


def test_a_fresh_start_forgets_the_last_run(tmp_path: Path) -> None:
    d = tmp_path / "metrics"
    code = f"""
        import sys
        from ldapsync import metrics
        metrics.enable({str(d)!r}, fresh=True)
        metrics.ldap_operation("add", "success", 0.01)
        sys.stdout.write(metrics.render_metrics(metrics.Probe()).decode())
    """
    _py(code)
    s = _samples(_py(code))
    assert s[("ldapsync_ldap_operations_total", (("operation", "add"), ("result", "success")))] == 1
    assert s[("ldapsync_database_up", ())] == 0
    assert ("ldapsync_o365_queue_depth", ()) not in s
    assert oct(d.stat().st_mode & 0o777) == "0o700"


def test_off_records_nothing_and_needs_no_directory(tmp_path: Path) -> None:
    out = _py("""
        import os
        from ldapsync import metrics
        metrics.ldap_operation("search", "success", 0.001)
        metrics.graph_request("GET", 200)
        print(metrics.enabled(), os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    """)
    assert out.strip() == "False None"
