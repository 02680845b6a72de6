"""What every LDAP connection and operation leaves behind, recorded from one place.

The protocol edge (``server.py``) tells a connection's :class:`Observer` when the connection
opens and closes, and when each operation is dispatched, answered (its result went out) and
finished (its handler ended, answered or not: abandoned, or the connection gone).  The observer
feeds the three records kept of them:

- cn=Monitor's counters (``directory/monitor.py``'s ``STATS``): always, process-local;
- the Prometheus metrics (``ldapsync/metrics.py``): while ``[metrics] listen`` is set;
- the access log (``[log] access``, like slapd's stats level): one line per answer and one per
  connection opened or closed; never a value, only the operation's DN.

While metrics and the access log are off an operation costs the counters and a check: its start
time is not even read.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from ldapsync import metrics
from ldapsync.directory.errors import ResultCode
from ldapsync.directory.monitor import STATS
from ldapsync.ldap import ber
from ldapsync.logs import ACCESS

access_log = Logger(namespace=ACCESS)   # [log] access: written at info whatever [log] level
_connection_ids = itertools.count(1)

#: Response tag → the operation's name in the metrics (upper-case in the access log).
OPERATION = {ber.BIND_RESPONSE: "bind", ber.SEARCH_DONE: "search", ber.MODIFY_RESPONSE: "modify",
             ber.ADD_RESPONSE: "add", ber.DEL_RESPONSE: "delete", ber.MODDN_RESPONSE: "modrdn",
             ber.COMPARE_RESPONSE: "compare", ber.EXTENDED_RESPONSE: "extended"}


@dataclass(slots=True)
class Operation:
    """One operation in progress on a connection (every request that gets a response)."""

    msgid: int
    req: Any                  # the decoded request
    tag: int                  # its response's tag
    abandoned: bool = False
    started: float = 0.0      # dispatch time (time.monotonic); 0 while neither metrics nor the access log is on


class Observer:
    """One connection's recorder: the only place the edge reports to monitor, metrics and access log."""

    def __init__(self, access: bool, peer: Callable[[], str]) -> None:
        self.access = access
        self.peer = peer                          # the client's host:port, asked only for a log line
        self.id = next(_connection_ids)           # "conn=N" in the access log

    def opened(self) -> None:
        metrics.ldap_connection_opened()
        STATS.opened()
        if self.access:
            access_log.info("conn={conn} peer={peer} connection opened", conn=self.id, peer=self.peer())

    def closed(self) -> None:
        metrics.ldap_connection_closed()
        STATS.closed()
        if self.access:
            access_log.info("conn={conn} peer={peer} connection closed", conn=self.id, peer=self.peer())

    def dispatched(self, req: Any) -> float:
        """A request was read (any, unbind and abandon too): count it.  Returns its start time
        when anything will read it, else 0."""
        STATS.op_started(type(req).__name__)
        return time.monotonic() if self.access or metrics.enabled() else 0.0

    def answered(self, op: Operation, code: int) -> None:
        """``op``'s result went out (once per operation)."""
        if not (self.access or metrics.enabled()):
            return
        seconds = time.monotonic() - op.started if op.started else 0.0
        name = OPERATION[op.tag]
        metrics.ldap_operation(name, _code_name(code), seconds)
        if self.access:
            self._access_line(op, name.upper(), code, seconds)

    def finished(self, op: Operation) -> None:
        """``op``'s handler ended, answered or not."""
        STATS.op_done(type(op.req).__name__)

    def _access_line(self, op: Operation, name: str, code: int, seconds: float) -> None:
        req = op.req
        dn = str(req.base if isinstance(req, ber.SearchRequest) else getattr(req, "dn", ""))   # never a value
        extra = {"oid": req.name} if isinstance(req, ber.ExtendedRequest) else {}
        result = ResultCode(code).name if code in ResultCode._value2member_map_ else "unknown"
        access_log.info('conn={conn} msgid={msgid} peer={peer} {operation} dn="{dn}"{log_oid} result={result}({code}) '
                        "{duration_ms:.1f}ms", conn=self.id, msgid=op.msgid, peer=self.peer(), operation=name, dn=dn,
                        log_oid=f" oid={req.name}" if extra else "", result=result, code=int(code),
                        duration_ms=round(seconds * 1000, 3), **extra)


def _code_name(code: int) -> str:
    try:
        return ResultCode(code).name
    except ValueError:
        return str(int(code))
