"""Prometheus metrics, liveness and readiness on ``[metrics] listen`` (off when unset).

Owns the metric definitions, the recording calls the rest of the code makes (no-ops while
metrics are off) and the three HTTP pages::

    GET /metrics   Prometheus text format: what every process of this server counted, added up,
                   plus the queue and the bound users read from the database at scrape time
    GET /healthz   200 "ok" while the process answers
    GET /readyz    200 when the database answers (503 when not), with the connector's state

Several processes count (the LDAP server and its Microsoft 365 worker process): each writes
prometheus_client's multiprocess files into one private directory (0700) that the server empties
at start and names in ``PROMETHEUS_MULTIPROC_DIR``, which its children inherit; ``/metrics``
adds them up (prometheus_client's ``MultiProcessCollector``).  Nothing here knows the database:
the wiring hands in an async ``probe`` that reads it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads
from twisted.web import resource, server

ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Probe:
    """What the database says at scrape time (filled by the wiring's probe)."""

    database_ok: bool = False
    database_error: str = ""
    connector_state: str = "off"                     # off, or o365ConnectorState
    queue_rows: dict[str, int] = field(default_factory=dict)
    oldest_change_age: float | None = None
    users_by_state: dict[str, int] = field(default_factory=dict)


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.operations = Counter("ldapsync_ldap_operations", "LDAP operations answered, by operation and result code",
                                  ["operation", "result"])
        self.seconds = Histogram("ldapsync_ldap_operation_seconds", "Time from request to answer of LDAP operations",
                                 ["operation"], buckets=LATENCY_BUCKETS)
        self.connections = Gauge("ldapsync_ldap_connections", "Open LDAP connections", multiprocess_mode="livesum")
        self.graph = Counter("ldapsync_graph_requests", "HTTP requests to Microsoft Graph, by method and status",
                             ["method", "status"])
        self.mail = Counter("ldapsync_mail_sent", "Mails handed to the SMTP server, by result", ["result"])


_m: _Metrics | None = None


def enable(directory: str | os.PathLike[str], *, fresh: bool) -> None:
    """Count into ``directory`` from now on (``fresh``: the server at start, which empties it;
    its child processes join with ``fresh=False``)."""
    global _m
    path = Path(directory)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    if fresh:
        for f in path.glob("*.db"):
            f.unlink()
    os.environ[ENV] = str(path)
    from prometheus_client import values

    values.ValueClass = values.get_value_class()   # multiprocess values, now that the directory is set
    _m = _Metrics()


def enable_from_environment() -> None:
    """In a child process: join the parent's metrics when it has them on."""
    if os.environ.get(ENV) and _m is None:
        enable(os.environ[ENV], fresh=False)


def enabled() -> bool:
    return _m is not None


def process_exited(pid: int) -> None:
    """A child process ended: its live gauges no longer count."""
    if _m is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, os.environ[ENV])


# -- recording (cheap no-ops while metrics are off) -------------------------------------------

def ldap_operation(operation: str, result: str, seconds: float) -> None:
    if _m is not None:
        _m.operations.labels(operation, result).inc()
        _m.seconds.labels(operation).observe(seconds)


def ldap_connection_opened() -> None:
    if _m is not None:
        _m.connections.inc()


def ldap_connection_closed() -> None:
    if _m is not None:
        _m.connections.dec()


def graph_request(method: str, status: int | str) -> None:
    if _m is not None:
        _m.graph.labels(method, str(status)).inc()


def mail_sent(result: str) -> None:
    if _m is not None:
        _m.mail.labels(result).inc()


# -- the pages ---------------------------------------------------------------------------------

def render_metrics(probe: Probe, now: float | None = None) -> bytes:
    """The Prometheus text page: every process's counters plus ``probe``'s figures."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess
    from prometheus_client.core import GaugeMetricFamily

    now = time.time() if now is None else now

    class DatabaseCollector:
        def collect(self) -> Any:
            up = GaugeMetricFamily("ldapsync_database_up", "1 when the database answered the scrape")
            up.add_metric([], 1.0 if probe.database_ok else 0.0)
            yield up
            if not probe.database_ok:
                return
            depth = GaugeMetricFamily("ldapsync_o365_queue_depth",
                                      "Queued Microsoft 365 changes waiting for delivery (ready or held)")
            depth.add_metric([], float(probe.queue_rows.get("ready", 0) + probe.queue_rows.get("held", 0)))
            yield depth
            rows = GaugeMetricFamily("ldapsync_o365_queue_rows", "Queued Microsoft 365 changes by state", labels=["state"])
            for state in ("ready", "held", "error"):
                rows.add_metric([state], float(probe.queue_rows.get(state, 0)))
            yield rows
            age = GaugeMetricFamily("ldapsync_o365_oldest_change_age_seconds",
                                    "Age of the oldest queued change not in error (0 when none)")
            age.add_metric([], max(0.0, now - probe.oldest_change_age) if probe.oldest_change_age is not None else 0.0)
            yield age
            users = GaugeMetricFamily("ldapsync_o365_users", "Users by o365SyncState", labels=["state"])
            for state in sorted({"pending", "synced", "error", "disabled", *probe.users_by_state}):
                users.add_metric([state], float(probe.users_by_state.get(state, 0)))
            yield users

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(DatabaseCollector())  # type: ignore[arg-type]
    return generate_latest(registry)


ProbeFn = Callable[[], Awaitable[Probe]]


class _Page(resource.Resource):
    isLeaf = True

    def __init__(self, probe: ProbeFn, kind: str) -> None:
        super().__init__()
        self.probe = probe
        self.kind = kind

    def render_GET(self, request: Any) -> Any:
        if self.kind == "healthz":
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"ok\n"
        d = defer.ensureDeferred(self.probe())
        if self.kind == "metrics":
            # Reads every process's files: on a pool thread, not the reactor's.
            d.addCallback(lambda probe: threads.deferToThread(render_metrics, probe))
            d.addCallback(self._metrics, request)
        else:
            d.addCallback(self._ready, request)
        d.addErrback(self._failed, request)
        return server.NOT_DONE_YET

    def _metrics(self, body: bytes, request: Any) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST

        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        request.write(body)
        request.finish()

    def _ready(self, probe: Probe, request: Any) -> None:
        request.setResponseCode(200 if probe.database_ok else 503)
        request.setHeader(b"content-type", b"application/json")
        request.write(json.dumps({"ready": probe.database_ok,
                                  "database": "ok" if probe.database_ok else probe.database_error or "unreachable",
                                  "connector": probe.connector_state}).encode() + b"\n")
        request.finish()

    def _failed(self, failure: Any, request: Any) -> None:
        request.setResponseCode(503)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.write(b"probe failed; see the server log\n")
        request.finish()


class _Root(resource.Resource):
    def __init__(self, probe: ProbeFn) -> None:
        super().__init__()
        for name in ("metrics", "healthz", "readyz"):
            self.putChild(name.encode(), _Page(probe, name))

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ldapsync: /metrics /healthz /readyz\n"


class _QuietSite(server.Site):
    def log(self, request: Any) -> None:   # scrapes every few seconds would flood the log
        pass


def site(probe: ProbeFn) -> server.Site:
    """The twisted.web site for ``[metrics] listen``."""
    return _QuietSite(_Root(probe))
