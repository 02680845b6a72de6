"""Client-side pacing of Graph directory writes: the configured budget and the budget Graph gives.

Owns :class:`PacingPolicy` (the knobs) and :class:`WritePacer` (the state): a token bucket in
GCRA form at ``target`` × ``write_budget`` (× this node's share of it), a pause for everyone
after a 429's ``Retry-After``, and a *learned factor* on the rate, adjusted AIMD-style from
what Graph answers.  :mod:`ldapsync.graph.client` asks it before every request
(``acquire``) and tells it every answer (``observe``); both names are re-exported there.

Why it learns.  ``write_budget`` says what Graph documents (3,000 writes per 150 s per app and
tenant), but the budget Graph really gives can be lower: another app writing in the tenant, the
tenant-wide limit, a budget smaller than documented.  A pacer that only waits each
``Retry-After`` and comes straight back at the configured rate spends a quarter to a half of its
attempts on 429s (issue 14: 50.6%; tests/perf ``--scenarios throttle``, 40 writes per 10 s
against the default budget: 24%, and 1% with this pacer).  So:

* **Multiplicative decrease on a 429.**  The first 429 of an episode estimates the rate Graph
  accepted: the writes accepted over the last ``climb_period`` (not before the last episode),
  from the start of the stretch that filled Graph's window until the ``Retry-After`` ends, which
  is when Graph takes writes again; or, if higher, the rate that was accepted through a whole climb period since the last
  episode.  The first time (a burst at the configured rate, then a long Retry-After) that is the
  budget itself; later, about the rate that was being accepted.  The rate becomes ``backoff``
  (0.9) × that, and never more than 0.9 × the current rate.  429s answered to requests sent
  before this one (until the pause ends) belong to the same episode and change nothing more;
  writes booked but not yet sent wait for the pause and are booked again at the new rate,
  instead of all going out at the old one.
* **Additive increase while Graph accepts.**  Each ``climb_period`` (10 s) in which writes are
  accepted with no throttling signal, the rate climbs by ``climb_step`` (1.5%) of the configured
  rate, back up to it: from a fifth of the budget to all of it in about nine minutes.  No
  snap-back: the old pacer's slowdown lasted 30 s and then returned to full speed.
* **The header.**  ``x-ms-throttle-limit-percentage`` above ``slowdown_threshold`` (Graph says
  the limit is exceeded: 1.1 and up, it is sent with one decimal) lowers the rate to
  ``slowdown_target / percentage`` of what it was when such headers began, without compounding
  on every response, and holds the climb while they last.  Graph sends 0.8–1.0 whenever a window
  is over 80% used, which is all the time at our own 95%: those values, like no header, let the
  rate climb, or a healthy Graph would never give back the configured budget after one episode.
* A 429 on a read (``ResourceUnitLimitExceeded``) pauses everyone but says nothing about the
  write budget: it does not lower the write rate.

Across nodes.  The nodes of one deployment share the app's budget through ``set_share(1/n)``
(sync/worker.py, from the heartbeats); the learned factor applies on top of the share, and each
node learns its own.  No shared state is needed for that to converge: Graph throttles per app, so
when the app is over its budget every node that writes gets 429s, and several AIMD senders
sharing one limit converge to equal shares of it (the TCP congestion-control result, Chiu and
Jain 1989).  Storing the factor in the database would make the nodes react together but adds a
write per heartbeat and a coupling for no better end state; the cost of learning per node is that
a node that starts (or restarts) begins at the configured rate and learns again with one episode
of a few 429s.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from twisted.internet import task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ldapsync.graph.errors import parse_retry_after

__all__ = ["PacingPolicy", "WritePacer"]

log = Logger()


@dataclass(frozen=True)
class PacingPolicy:
    """Client-side budget for directory writes (per app per tenant).

    Writes go out at ``target`` × the budget's rate (``writes_per_window / window``)
    once ``burst`` writes have gone at once.  Any span of *t* seconds then sees at
    most ``burst + rate·t`` writes from us, which stays within the budget for every
    span of at least ``burst / (budget rate − rate)`` seconds.  The default burst
    keeps that span at half of ``shortest_window``, so the pacing holds whether
    Graph counts over its documented 150 s or over a shorter sliding window (a
    scaled test tenant counts 300 writes per 15 s): a big burst (150 writes, i.e.
    7.5 s of budget) is harmless against a 150 s window but overruns a 15 s one
    and earns 429s, whose pauses cost more than the burst ever saved.

    The rest says how the rate follows what Graph answers (see the module's docstring).
    """

    enabled: bool = True
    writes_per_window: int = 3000
    window: float = 150.0
    target: float = 0.95              # steady rate: 95% of the budget (19 writes/s of Graph's 20)
    burst: int | None = None          # None: sized for shortest_window (8 writes for Graph's budget)
    shortest_window: float = 15.0
    # Graph sends x-ms-throttle-limit-percentage (with one decimal) whenever a window is
    # over 80% used, so at our own 95% it says 0.9 or 1.0: reacting to that would slow us
    # down for nothing.  Slow down only when it says the limit is exceeded (> 1.0: other
    # nodes or other apps' writes on top of ours).
    slowdown_threshold: float = 1.05
    slowdown_target: float = 0.9      # rate = (rate when the headers began) × target / percentage
    backoff: float = 0.9              # after a 429: this × the rate Graph was accepting
    climb_step: float = 0.015         # + this × the configured rate …
    climb_period: float = 10.0        # … per this many seconds of accepted writes, no throttling signal
    min_factor: float = 0.02          # never below 2% of the configured rate (0.38 writes/s)

    @property
    def budget_rate(self) -> float:
        return max(1e-6, self.writes_per_window / self.window)

    @property
    def rate(self) -> float:
        return max(1e-6, self.budget_rate * self.target)

    @property
    def bucket(self) -> int:
        """The burst in effect (``burst``, or the default derived from ``shortest_window``)."""
        if self.burst is not None:
            return max(1, self.burst)
        headroom = (self.budget_rate - self.rate) * self.shortest_window / 2
        return max(1, int(headroom + 0.5))


def _percentage(raw: str | None) -> float | None:
    if not raw:
        return None
    try:
        pct = float(raw)
    except ValueError:
        return None
    if pct > 5:                       # tolerate "85" meaning 85 %
        pct /= 100.0
    return pct


class WritePacer:
    """A token bucket (GCRA form) for writes, a shared pause after a 429, and a learned rate.

    ``reserve(n)`` books ``n`` writes and says how long to wait; bookings are
    FIFO, so concurrent callers are served in order without polling.  ``acquire``
    waits for the booking and books again if a 429 lowered the rate or paused
    everyone meanwhile.  ``observe`` takes every answer from Graph.
    """

    def __init__(self, reactor: IReactorTime, policy: PacingPolicy = PacingPolicy()) -> None:
        self._reactor = reactor       # scheduling time (ldapsync/clock.py): waits and the bucket's seconds
        self.policy = policy
        self._tat = 0.0               # when the bucket would be full again
        self._pause_until = 0.0
        self._share = 1.0
        self._factor = 1.0            # learned: the part of the configured rate Graph gives
        self._generation = 0          # bumped when a 429 cancels the bookings made so far
        self._accepted: deque[tuple[float, int]] = deque()   # (time, writes) accepted by Graph
        self._span_start = -math.inf  # accepted writes from here on estimate the accepted rate
        self._episode_until = -math.inf   # 429s before this belong to the episode already handled
        self._climb_from = 0.0        # the next climb is due climb_period after this
        self._proven = 0.0            # the highest factor Graph accepted a whole climb period since the last 429
        self._header_ref = 1.0        # the factor when over-the-limit headers began
        self._header_until = -math.inf
        self.stats: dict[str, int] = {"decreases": 0, "climbs": 0}

    def _now(self) -> float:
        """The reactor's time.  (Twisted's interfaces declare ``seconds`` without ``self``, which
        mypy, without the zope plugin, will not call through an instance.)"""
        return self._reactor.seconds()  # type: ignore[misc]

    @property
    def factor(self) -> float:
        """The learned part of the configured rate (1.0: Graph gives all of ``write_budget``)."""
        return self._factor

    @property
    def share(self) -> float:
        """This process's part of the budget (1/n with n nodes writing for the same app)."""
        return self._share

    def set_share(self, share: float) -> None:
        """Use ``share`` of the budget from now on: its rate and, through the same time tolerance,
        its burst; several nodes of one deployment together then stay within the app's budget.
        The learned factor applies on top of it."""
        self._share = min(1.0, max(0.01, share))

    @property
    def configured_rate(self) -> float:
        """Writes per second this node may send when Graph gives the whole configured budget."""
        return self.policy.rate * self._share

    @property
    def rate(self) -> float:
        """Current writes per second."""
        return self.configured_rate * self._factor

    @property
    def _tolerance(self) -> float:
        """How far ahead of now writes may be booked and still go at once (the burst)."""
        return self.policy.bucket / self.policy.rate

    def reserve(self, writes: int) -> float:
        now = self._now()
        wait = max(0.0, self._pause_until - now)
        if writes > 0 and self.policy.enabled:
            self._tat = max(self._tat, now) + writes / self.rate
            wait = max(wait, self._tat - self._tolerance - now)
        return wait

    def backlogged(self) -> bool:
        """Whether a write booked now would have to wait: the budget, not the work, sets the pace."""
        if not self.policy.enabled:
            return False
        return self._tat - self._tolerance > self._now()

    async def acquire(self, writes: int) -> None:
        while True:
            generation = self._generation
            delay = self.reserve(writes)
            if delay <= 0:
                return
            await task.deferLater(self._reactor, delay)
            if generation == self._generation and self._now() >= self._pause_until:
                return
            # a 429 came while this booking waited: its slot was given up; wait for the pause
            # and book again at the rate learned from it

    def pause(self, seconds: float) -> None:
        """Everyone waits ``seconds`` (Graph throttles per app, so all our requests would get 429)."""
        self._pause_until = max(self._pause_until, self._now() + seconds)

    # -- learning

    def observe(self, status: int, headers: Mapping[str, str], writes: int = 0) -> None:
        """One answer from Graph (headers with lower-case names) to a request carrying ``writes``
        writes (0 for a read, and for the outer answer of a ``$batch``: its items are observed
        one by one)."""
        now = self._now()
        if status == 429:
            retry_after = parse_retry_after(headers.get("retry-after"))
            if retry_after is not None and math.isfinite(retry_after):
                self.pause(retry_after)
            info = headers.get("x-ms-throttle-information", "")
            if writes > 0 or "write" in info.lower():
                self._decrease(now)
            return
        pct = _percentage(headers.get("x-ms-throttle-limit-percentage"))
        if pct is not None and pct >= self.policy.slowdown_threshold:
            self._over_limit(now, pct)
        if 200 <= status < 300 and writes > 0:
            self._accept(now, writes)

    def _accept(self, now: float, writes: int) -> None:
        self._accepted.append((now, writes))
        horizon = now - self.policy.climb_period
        while self._accepted and self._accepted[0][0] < horizon:
            self._accepted.popleft()
        if self._factor >= 1.0 or now < self._header_until or now < self._episode_until:
            return
        if now - self._climb_from >= self.policy.climb_period:
            self._proven = max(self._proven, self._factor)     # accepted through a whole period
            self._factor = min(1.0, self._factor + self.policy.climb_step)
            self._climb_from = now
            self.stats["climbs"] += 1

    def accepted_rate(self, until: float) -> float | None:
        """Writes per second Graph accepted from us over the last ``climb_period`` (not before the
        last 429 episode) up to ``until``: the writes accepted from one of them on, over the time
        from it to ``until``, for the one that gives the most (the start of the stretch that
        filled Graph's window: a lone write before an idle spell does not dilute a burst after
        it).  None if none was accepted."""
        start = max(self._span_start, self._now() - self.policy.climb_period)
        best: float | None = None
        writes = 0
        for t, n in reversed(self._accepted):
            if t < start:
                break
            writes += n
            rate = writes / max(until - t, 1e-3)
            best = rate if best is None else max(best, rate)
        return best

    def _decrease(self, now: float) -> None:
        if now < self._episode_until:
            return                    # sent before the episode's first 429 was answered
        end = max(self._pause_until, now)
        accepted = self.accepted_rate(end)
        was = self.rate
        basis = self._factor if accepted is None else max(accepted / self.configured_rate, self._proven)
        self._set_factor(self.policy.backoff * min(basis, self._factor))
        log.info("Graph throttled our writes: pacing at {rate:.2f} writes/s (was {was:.2f}; Graph accepted "
                 "{accepted} writes/s), climbing back by {step:.2f} writes/s every {period:g} s without throttling",
                 rate=self.rate, was=was, accepted="?" if accepted is None else f"{accepted:.2f}",
                 step=self.policy.climb_step * self.configured_rate, period=self.policy.climb_period)
        self._proven = 0.0
        self._span_start = end
        self._episode_until = end
        self._climb_from = end
        self._tat = end               # bookings made so far are void: acquire books them again
        self._generation += 1
        self.stats["decreases"] += 1

    def _over_limit(self, now: float, pct: float) -> None:
        if now >= self._header_until:
            self._header_ref = self._factor
        self._header_until = now + self.policy.climb_period
        self._climb_from = max(self._climb_from, now)
        target = self._header_ref * self.policy.slowdown_target / pct
        if target < self._factor:
            self._set_factor(target)

    def _set_factor(self, factor: float) -> None:
        self._factor = min(1.0, max(self.policy.min_factor, factor))
