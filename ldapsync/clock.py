"""Wall-clock time for the rules that depend on it: password expiry and lockout, link expiry.

Everything that decides "has this expired?" asks a :class:`Clock` rather than
``time.time()``, so tests can move time forward.  Unit tests pass a
:class:`FixedClock`.  End-to-end tests drive a real server process: when the
environment variable ``LDAPSYNC_TEST_CLOCK_FILE`` names a file, :func:`system_clock`
adds the number of seconds written in it (e.g. ``86400`` = one day ahead) to
the real time.  The file is re-read when it changes, so a test can advance a
running server's clock; a missing or unreadable file means no offset.  It is
meant for tests and demonstrations only and is logged at start when set.
"""

from __future__ import annotations

import os
import time
from typing import Protocol

ENV_CLOCK_FILE = "LDAPSYNC_TEST_CLOCK_FILE"


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""
        ...


class SystemClock:
    """The real time, plus the test offset from ``$LDAPSYNC_TEST_CLOCK_FILE`` when set."""

    def __init__(self, offset_file: str | None = None) -> None:
        self.offset_file = offset_file
        self._mtime: int | None = None
        self._offset = 0.0

    def offset(self) -> float:
        if not self.offset_file:
            return 0.0
        try:
            st = os.stat(self.offset_file)
        except OSError:
            self._mtime, self._offset = None, 0.0
            return 0.0
        if st.st_mtime_ns != self._mtime:
            try:
                with open(self.offset_file, encoding="ascii") as f:
                    self._offset = float(f.read().strip() or 0)
            except (OSError, ValueError):
                self._offset = 0.0
            self._mtime = st.st_mtime_ns
        return self._offset

    def now(self) -> float:
        return time.time() + self.offset()


class FixedClock:
    """A clock that only moves when told to (unit tests)."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


_system: SystemClock | None = None


def system_clock() -> SystemClock:
    """The process-wide clock (one per process, so every rule agrees on the time)."""
    global _system
    if _system is None:
        _system = SystemClock(os.environ.get(ENV_CLOCK_FILE) or None)
    return _system
