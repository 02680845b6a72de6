"""Who gets a password verified, and when: a lockout that holds under concurrency, fairness between addresses.

Owns the in-process bookkeeping around the password checks of binds
(:meth:`ldapsync.directory.facade.Directory.authenticate`); knows no SQL and
no BER (the directory hands it a callable that reads the entry).

- :class:`DNGate`, per entry: a password is verified only while the failures
  recorded in the database plus the verifications in progress in this process
  stay below ``[policy] lockout_failures``.  The read that decides runs under a
  per-entry lock, and a verification gives its slot back only after its failure
  is committed, so however many connections race (or pipeline), at most
  ``lockout_failures`` wrong passwords are verified before the lock is set, and
  none after (a locked entry is refused without looking at the password).  The
  count itself is kept in the database (``pwdFailureTime``, incremented under a
  row lock), so other processes and nodes see the lock as soon as it commits.
- :class:`AddressLimiter`, per client address: at most ``slots`` verifications
  at once (the others wait their turn, so one address cannot fill the hash
  thread pool ahead of everyone else), and after ``failures_per_minute`` wrong
  passwords within a minute its binds are refused with ``busy`` — without
  looking at the password — until the minute has passed.

::

    bind ─▶ AddressLimiter.refused? ──yes──▶ busy (51), nothing verified
              │ no
              ▼
            DNGate.enter(dn): [per-DN lock] read entry ─ locked? ──▶ invalidCredentials
              │ failures + in flight < lockout_failures, else wait for a slot
              ▼
            AddressLimiter.slot(address) ─▶ hash pool: verify
              │ wrong: record the failure (one write: row lock, count, lock at N)
              ▼
            DNGate.release(dn)
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from enum import Enum
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred, DeferredLock, DeferredSemaphore
from twisted.logger import Logger

from ldapsync.clock import Timer

log = Logger()

T = TypeVar("T")
WINDOW = 60.0             # seconds over which wrong passwords per address are counted
_PRUNE_AT = 10_000        # addresses remembered before expired ones are swept


class Admission(Enum):
    """What :meth:`DNGate.enter`'s ``decide`` says about one bind."""

    WAIT = "wait"         # no slot free: wait until a verification in progress ends, then decide again
    TAKE = "take"         # verify, holding a slot (the policy counts this verification)
    PASS = "pass"         # answer without a slot (refused, unknown entry, or exempt from lockout)


class _Slot:
    __slots__ = ("lock", "in_flight", "waiters", "users")

    def __init__(self) -> None:
        self.lock = DeferredLock()
        self.in_flight = 0
        self.waiters: list[Deferred[None]] = []
        self.users = 0


class DNGate(Generic[T]):
    """Per-entry admission of password verifications in this process (see the module docstring)."""

    def __init__(self) -> None:
        self._slots: dict[str, _Slot] = {}

    def in_flight(self, key: str) -> int:
        slot = self._slots.get(key)
        return slot.in_flight if slot is not None else 0

    async def enter(self, key: str, decide: Callable[[int], Awaitable[tuple[T, Admission]]]) -> tuple[T, bool]:
        """Call ``decide(in_flight)`` under ``key``'s lock until it does not say WAIT.

        Returns (what ``decide`` returned, whether a slot was taken); a taken slot
        must be given back with :meth:`release` once the outcome is recorded.
        """
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot()
        slot.users += 1
        took = False
        try:
            while True:
                async with slot.lock:
                    value, admission = await decide(slot.in_flight)
                    if admission is Admission.TAKE:
                        slot.in_flight += 1
                        took = True
                        return value, True
                    if admission is Admission.PASS:
                        return value, False
                    waiter: Deferred[None] = Deferred()
                    slot.waiters.append(waiter)
                await waiter
        finally:
            if not took:
                self._leave(key, slot)

    async def release(self, key: str) -> None:
        """Give back a slot taken by :meth:`enter` (after the failure, if any, is committed)."""
        slot = self._slots[key]
        async with slot.lock:
            slot.in_flight -= 1
            waiters, slot.waiters = slot.waiters, []
        for w in waiters:
            w.callback(None)
        self._leave(key, slot)

    def _leave(self, key: str, slot: _Slot) -> None:
        slot.users -= 1
        if slot.users == 0 and self._slots.get(key) is slot:
            del self._slots[key]


class AddressLimiter:
    """Per client address: verifications at once, and wrong passwords per minute (see the module docstring)."""

    def __init__(self, failures_per_minute: int, slots: int, monotonic: Timer = time.monotonic) -> None:
        self.failures_per_minute = failures_per_minute
        self.slots = max(slots, 1)
        self.monotonic = monotonic
        self._failures: dict[str, deque[float]] = {}
        self._sems: dict[str, tuple[DeferredSemaphore, list[int]]] = {}
        self._told: dict[str, float] = {}

    def refused_for(self, address: str | None) -> float:
        """Seconds until ``address`` may bind again (0: it may now)."""
        if address is None or not self.failures_per_minute:
            return 0.0
        q = self._failures.get(address)
        if q is None:
            return 0.0
        now = self.monotonic()
        while q and q[0] <= now - WINDOW:
            q.popleft()
        if not q:
            del self._failures[address]
            return 0.0
        if len(q) < self.failures_per_minute:
            return 0.0
        wait = q[-self.failures_per_minute] + WINDOW - now
        if self._told.get(address, 0.0) <= now - WINDOW:
            self._told[address] = now
            log.warn("{n} wrong passwords from {address} within a minute: its binds are refused (busy) for {s:.0f}s",
                     n=len(q), address=address, s=wait)
        return max(wait, 1.0)

    def note_failure(self, address: str | None) -> None:
        if address is None or not self.failures_per_minute:
            return
        now = self.monotonic()
        if len(self._failures) >= _PRUNE_AT:
            for a in [a for a, q in self._failures.items() if not q or q[-1] <= now - WINDOW]:
                del self._failures[a]
            for a in [a for a, t in self._told.items() if t <= now - WINDOW]:
                del self._told[a]
        q = self._failures.setdefault(address, deque())
        q.append(now)
        while len(q) > self.failures_per_minute:
            q.popleft()

    @asynccontextmanager
    async def slot(self, address: str | None) -> AsyncIterator[None]:
        """Hold one of the address's verification slots (FIFO among that address's binds)."""
        if address is None:
            yield
            return
        entry = self._sems.get(address)
        if entry is None:
            entry = self._sems[address] = (DeferredSemaphore(self.slots), [0])
        sem, users = entry
        users[0] += 1
        try:
            await sem.acquire()
            try:
                yield
            finally:
                sem.release()
        finally:
            users[0] -= 1
            if users[0] == 0 and self._sems.get(address) is entry:
                del self._sems[address]
