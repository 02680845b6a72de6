# ruff: noqa: F811
"""The per-DN gate around password checks (ldapsync/directory/binds.py) through Directory.authenticate,
on real SQLite and PostgreSQL: racing wrong passwords are verified at most lockout_failures times.

What was verified is read from the directory's own log events ("wrong password for DN ...", one per
verification that failed), observed with a twisted.logger observer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest_twisted
from twisted.internet import defer
from twisted.logger import globalLogPublisher

from directory.test_policy import T0, add_user, attrs_of, d  # noqa: F401 - d is the fixture (parameters named d use it: F811 is off for this file)
from ldapsync.clock import FixedClock
from ldapsync.directory.facade import Directory


def _wrong_password_events() -> tuple[list[dict[str, Any]], Any]:
    seen: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if str(event.get("log_format", "")).startswith("wrong password for"):
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    return seen, observer


@pytest_twisted.ensureDeferred
async def test_racing_wrong_passwords_are_verified_at_most_lockout_failures_times(d: Directory) -> None:
    dn = await add_user(d, "rae", "Rae-Pass-01")
    seen, observer = _wrong_password_events()
    try:
        outs = await defer.gatherResults([defer.ensureDeferred(d.authenticate(dn, b"wrong-%d" % i)) for i in range(20)])
        right = await d.authenticate(dn, b"Rae-Pass-01")
    finally:
        globalLogPublisher.removeObserver(observer)
    assert len([e for e in seen if e["dn"] == dn]) == d.policy.lockout_failures == 3
    assert not any(o.password_ok for o in outs) and sum(o.locked for o in outs) >= 20 - 3
    assert right.locked and not right.password_ok
    assert len(attrs_of(d, dn)["pwdFailureTime"]) == 3


@pytest_twisted.ensureDeferred
async def test_more_failures_than_a_lowered_policy_allows_do_not_hang_binds(d: Directory) -> None:
    """Failures recorded under lockout_failures = 5, then the policy says 3 (no lock was set):
    the next wrong password is verified and locks, a right one still works before that."""
    dn = await add_user(d, "low", "Low-Pass-01")
    cfg5 = dataclasses.replace(d.config, policy=dataclasses.replace(d.policy, lockout_failures=5))
    d5 = Directory(cfg5, d.db)
    d5.clock = FixedClock(T0)
    try:
        for _ in range(4):
            await d5.authenticate(dn, b"wrong")
    finally:
        d5.stop()
    assert "pwdAccountLockedTime" not in attrs_of(d, dn) and len(attrs_of(d, dn)["pwdFailureTime"]) == 4
    out = await d.authenticate(dn, b"wrong")
    assert out.locked and not out.password_ok
