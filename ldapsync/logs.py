"""The server's log: ``[log] level``, ``format`` (text or JSON lines) and where it goes.

Owns the one log observer of a server process.  twistd asks its application for an
``ILogObserver`` before it starts logging; the wiring (``ldapsync/tap.py``) sets the one built
here, so every line — ours, Twisted's, the Microsoft 365 worker's re-emitted ones — goes through
the level filter and the chosen format, into ``[log] file`` when set, else where twistd would
write (``--logfile``; stdout with ``-n``; ``twistd.log`` otherwise).

JSON: one object per line with ``time`` (ISO 8601, UTC), ``level``, ``system`` (the logger's
namespace), ``message`` (the formatted text) and the event's own fields (``log_*`` keys and
values that cannot be shown as JSON are left out or shown as text).  Secrets never reach a log
line in the first place (callers log no password, token or secret), so nothing is filtered here.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    textFileLogObserver,
)
from twisted.python import logfile
from twisted.python.failure import Failure
from zope.interface import implementer

from ldapsync.config import LOG_LEVELS

LEVELS = {name: LogLevel.levelWithName(name) for name in LOG_LEVELS}   # [log] level → Twisted's level


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def json_line(event: dict[str, Any]) -> str:
    """One event as one line of JSON (no newline)."""
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time") or 0, timezone.utc).isoformat(timespec="milliseconds"),
        "level": getattr(level, "name", "info"),
        "system": event.get("log_system") if event.get("log_system") not in (None, "-") else event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        record["failure"] = failure.getTraceback()
    for key, value in event.items():
        if key.startswith("log_") or key in record or key in ("format", "message", "isError", "system", "time", "printed"):
            continue
        record[key] = _jsonable(value)
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


@implementer(ILogObserver)
class JSONLinesObserver:
    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: dict[str, Any]) -> None:
        self.out.write(json_line(event) + "\n")
        self.out.flush()


def output(log_file: str, twistd_logfile: str | None, nodaemon: bool) -> IO[str]:
    """Where lines go: ``[log] file``, else twistd's ``--logfile``, else stdout with -n, else twistd.log."""
    target = log_file or twistd_logfile or ""
    if target == "-" or (not target and nodaemon):
        return sys.stdout
    return logfile.LogFile.fromFullPath(target or "twistd.log")  # type: ignore[return-value]


ACCESS = "ldapsync.access"   # the access log's namespace (``[log] access``): written at info whatever the level


def make_observer(level: str, fmt: str, out: IO[str]) -> ILogObserver:
    """The filtered observer for a server process (the access log passes at info even when
    ``level`` is higher: asking for it is asking to see it)."""
    base = JSONLinesObserver(out) if fmt == "json" else textFileLogObserver(out)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
    predicate.setLogLevelForNamespace(ACCESS, LogLevel.debug if level == "debug" else LogLevel.info)
    return FilteringLogObserver(base, [predicate])
