"""Time, in the three kinds the code needs, each with one name used everywhere.

1. **The policy clock** -- :class:`Clock`, an object with ``.now()`` (seconds since the epoch),
   always named ``clock``.  Every rule that decides "has this expired?" asks it rather than
   ``time.time()``: password expiry and lockout, link expiry, the connector's credential expiry.
   Tests move it: unit tests pass a :class:`FixedClock`; end-to-end tests drive a real server
   process and, when the environment variable ``LDAPSYNC_TEST_CLOCK_FILE`` names a file,
   :func:`system_clock` adds the number of seconds written in it (e.g. ``86400`` = one day ahead)
   to the real time.  The file is re-read when it changes, so a test can advance a running
   server's clock; a missing or unreadable file means no offset.  It is meant for tests and
   demonstrations only and is logged at start when set.

2. **Mechanism time** -- a :data:`Timer`, a plain ``Callable[[], float]``, named for what it reads:

   * ``wall_time`` (default ``time.time``): instants stored in the database and compared by
     other processes, e.g. the outbox's ``next_attempt_at`` and leases.  The planner that stamps a row and
     the worker that later compares it must use the same base, so this is never the policy clock
     (a test offset would make rows wait, or come due, days early).
   * ``monotonic`` (default ``time.monotonic``): durations and rate-limit windows within one
     process (connection and bind limits, the database probe, progress reports).

3. **Scheduling** -- Twisted's :class:`~twisted.internet.interfaces.IReactorTime` (``callLater``,
   ``seconds()``), named ``reactor`` (or ``scheduler`` where a ``reactor`` parameter already makes
   connections); tests pass a ``twisted.internet.task.Clock``.  It waits and paces (Graph write
   pacing, mail retry backoff, the ``LoopingCall`` timers, whose attribute Twisted itself calls
   ``clock``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Protocol, TypeAlias

ENV_CLOCK_FILE = "LDAPSYNC_TEST_CLOCK_FILE"

Timer: TypeAlias = Callable[[], float]
"""Mechanism time: ``time.time`` (named ``wall_time``) or ``time.monotonic`` (named ``monotonic``)."""


class Clock(Protocol):
    """The policy clock (see the module docstring)."""

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
