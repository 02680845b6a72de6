"""WritePacer against a Graph that gives less than ``write_budget``: task.Clock, no sockets.

``Budget`` answers as the fake tenant's throttling does (ldapsync/testing/_faults.py: a sliding
window of ``writes`` per ``window`` s per app, ``Retry-After`` until the oldest write leaves it,
``x-ms-throttle-limit-percentage`` once the window is over 80% used); ``run`` drives writers the
way the sync worker does (16 slots, each: acquire, send, observe, on a 429 wait its
Retry-After and send again).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import pytest
from twisted.internet import defer, task

from ldapsync.graph.client import PacingPolicy, WritePacer

CONFIGURED = 19.0           # the default policy: 95% of 3,000 writes per 150 s


@dataclass
class Budget:
    clock: task.Clock
    writes: int | None          # None: Graph does not throttle
    window: float = 10.0
    sent: deque[float] = field(default_factory=deque)

    def answer(self) -> tuple[int, dict[str, str]]:
        now = self.clock.seconds()
        if self.writes is None:
            return 204, {}
        while self.sent and self.sent[0] <= now - self.window:
            self.sent.popleft()
        if len(self.sent) >= self.writes:
            wait = max(1, math.ceil(self.sent[0] + self.window - now))
            return 429, {"retry-after": str(wait), "x-ms-throttle-information": "WriteLimitExceeded"}
        self.sent.append(now)
        used = len(self.sent) / self.writes
        return 204, ({"x-ms-throttle-limit-percentage": f"{min(used, 1.8):.1f}"} if used > 0.8 else {})


@dataclass
class Run:
    attempts: int = 0
    throttled: int = 0
    accepted: list[float] = field(default_factory=list)
    rates: list[tuple[float, float]] = field(default_factory=list)   # (time, pacer.rate) each second

    def accepted_rate(self, start: float, end: float) -> float:
        return sum(1 for t in self.accepted if start <= t < end) / (end - start)

    def rate_between(self, start: float, end: float) -> list[float]:
        return [r for t, r in self.rates if start <= t < end]


def run(clock: task.Clock, pacers: list[WritePacer], budget: Budget, seconds: float,
        result: Run | None = None, slots: int = 16, latency: float = 0.02) -> Run:
    """Every pacer's node writes a backlog through ``slots`` concurrent requests for ``seconds``."""
    result = result or Run()
    end = clock.seconds() + seconds

    async def writer(pacer: WritePacer) -> None:
        while clock.seconds() < end:
            await pacer.acquire(1)
            await task.deferLater(clock, latency)
            status, headers = budget.answer()
            result.attempts += 1
            await task.deferLater(clock, latency)
            pacer.observe(status, headers, 1)
            if status == 429:
                result.throttled += 1
                await task.deferLater(clock, float(headers["retry-after"]))
            else:
                result.accepted.append(clock.seconds())

    ds = [defer.ensureDeferred(writer(p)) for p in pacers for _ in range(slots)]
    next_sample = clock.seconds()
    while clock.seconds() < end + 30 and not all(d.called for d in ds):
        if clock.seconds() >= next_sample and clock.seconds() < end:
            result.rates.append((clock.seconds(), sum(p.rate for p in pacers)))
            next_sample += 1.0
        clock.advance(0.01)
    for d in ds:
        if not d.called:
            d.cancel()
    return result


def test_settles_below_the_budget_graph_really_gives() -> None:
    """Graph gives 40 writes per 10 s (4/s) against the configured 19/s: once the pacer has
    learned it, few attempts are answered 429 and the rate sits just below 4/s, not above."""
    clock = task.Clock()
    pacer = WritePacer(clock, PacingPolicy())
    r = run(clock, [pacer], Budget(clock, writes=40, window=10.0), 300.0)
    assert r.throttled < 0.05 * r.attempts, (r.throttled, r.attempts)
    steady = r.rate_between(60, 300)
    assert max(steady) <= 4.0 * 1.1                           # it never goes back to 19/s
    assert 0.8 * 4.0 <= sum(steady) / len(steady) <= 4.0      # just below what Graph gives
    assert r.accepted_rate(60, 300) >= 0.9 * 4.0              # and Graph's budget is used


def test_two_nodes_each_learn_their_part() -> None:
    """Two nodes of one deployment (share 1/2 each) against the same smaller budget: together
    they settle below it and use it, with few 429s, each learning on its own."""
    clock = task.Clock()
    pacers = [WritePacer(clock, PacingPolicy()) for _ in range(2)]
    for p in pacers:
        p.set_share(0.5)
    r = run(clock, pacers, Budget(clock, writes=40, window=10.0), 400.0)
    assert r.throttled < 0.05 * r.attempts, (r.throttled, r.attempts)
    steady = r.rate_between(100, 400)
    assert 0.8 * 4.0 <= sum(steady) / len(steady) <= 4.0
    assert r.accepted_rate(100, 400) >= 0.85 * 4.0
    assert all(p.rate < 4.0 for p in pacers)


def test_climbs_back_slowly_when_graph_stops_throttling() -> None:
    """Once the other app stops writing, the rate climbs back to the configured 19/s, by 1.5%
    of it per 10 s: slowly (the budget may be back only for a moment), but all the way."""
    clock = task.Clock()
    pacer = WritePacer(clock, PacingPolicy())
    budget = Budget(clock, writes=40, window=10.0)
    r = run(clock, [pacer], budget, 120.0)
    assert pacer.rate <= 4.0 * 1.1
    budget.writes = None                                     # Graph gives the whole budget again
    r = run(clock, [pacer], budget, 60.0, Run())
    assert pacer.rate < 0.5 * CONFIGURED                      # no snap back after 30 s
    assert r.throttled == 0
    r = run(clock, [pacer], budget, 900.0, r)
    assert pacer.rate == pytest.approx(CONFIGURED)
    assert r.accepted_rate(clock.seconds() - 60, clock.seconds() - 1) >= 0.95 * CONFIGURED


def test_a_healthy_graph_is_never_slowed() -> None:
    """At Graph's real budget (3,000 per 150 s) the pacer keeps its 19/s for 10 minutes with no
    429, although Graph says 0.9-1.0 in x-ms-throttle-limit-percentage all along; and a 429 on a
    read (the resource-unit limit, not the write budget) pauses but does not slow the writes."""
    clock = task.Clock()
    pacer = WritePacer(clock, PacingPolicy())
    budget = Budget(clock, writes=3000, window=150.0)
    headers_seen: list[str] = []
    answer = budget.answer

    def answer_and_note() -> tuple[int, dict[str, str]]:
        status, headers = answer()
        headers_seen.append(headers.get("x-ms-throttle-limit-percentage", ""))
        return status, headers
    budget.answer = answer_and_note                           # type: ignore[method-assign]
    r = run(clock, [pacer], budget, 300.0)
    assert {"0.9", "1.0"} & set(headers_seen)
    pacer.observe(429, {"retry-after": "2", "x-ms-throttle-information": "ResourceUnitLimitExceeded"}, 0)
    r = run(clock, [pacer], budget, 300.0, r)
    assert r.throttled == 0
    assert min(rate for _, rate in r.rates) == pytest.approx(CONFIGURED)
    assert r.accepted_rate(0, 600) >= 0.9 * 20.0


def test_the_throttle_header_lowers_the_rate_without_snapping_back() -> None:
    clock = task.Clock()
    pacer = WritePacer(clock, PacingPolicy())
    for pct in ("0.5", "0.9", "1.0"):                        # within the limit: nothing to learn
        pacer.observe(204, {"x-ms-throttle-limit-percentage": pct}, 1)
    assert pacer.rate == pytest.approx(CONFIGURED)
    pacer.observe(204, {"x-ms-throttle-limit-percentage": "1.5"}, 1)
    assert pacer.rate == pytest.approx(CONFIGURED * 0.9 / 1.5)
    for _ in range(20):                                       # every response says so: no compounding
        clock.advance(0.5)
        pacer.observe(204, {"x-ms-throttle-limit-percentage": "1.5"}, 1)
    assert pacer.rate == pytest.approx(CONFIGURED * 0.6)
    pacer.observe(204, {"x-ms-throttle-limit-percentage": "1.8"}, 1)    # worse: lower still
    assert pacer.rate == pytest.approx(CONFIGURED * 0.5)
    for _ in range(62):                                       # the headers stop: 31 s of accepted writes
        clock.advance(0.5)
        pacer.observe(204, {"x-ms-throttle-limit-percentage": "1.0"}, 1)
    assert CONFIGURED * 0.5 < pacer.rate < CONFIGURED * 0.6   # climbing, not back at full speed
    for _ in range(800):
        clock.advance(0.5)
        pacer.observe(204, {}, 1)
    assert pacer.rate == pytest.approx(CONFIGURED)


def test_writes_booked_before_a_429_wait_for_it() -> None:
    """Writes booked at the configured rate before the first 429 do not all go out at that rate
    when it comes: they wait out the Retry-After and are booked again at the learned rate."""
    clock = task.Clock()
    pacer = WritePacer(clock, PacingPolicy())
    sent: list[float] = []

    async def one() -> None:
        await pacer.acquire(1)
        sent.append(clock.seconds())
        pacer.observe(204, {}, 1)
    ds = [defer.ensureDeferred(one()) for _ in range(40)]
    for _ in range(100):                                      # 1 s at 19/s: 8 + 19 writes go out
        clock.advance(0.01)
    pacer.observe(429, {"retry-after": "5", "x-ms-throttle-information": "WriteLimitExceeded"}, 1)
    before = len(sent)
    for _ in range(499):
        clock.advance(0.01)
    assert len(sent) == before                                # nothing during the pause
    while not all(d.called for d in ds):
        clock.advance(0.01)
    after = [t for t in sent if t >= 5.0]
    assert (len(after) - 1) / (after[-1] - after[0]) < 0.9 * CONFIGURED
