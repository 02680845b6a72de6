"""``[ldap] processes > 1``: a COMMIT in any LDAP process wakes the one Microsoft 365 worker.

The other LDAP processes tell the server "w" (a line on their stdout) only after the server told
them "h" (the worker is caught up); a COMMIT made before the "h" reached them is told when it does
(``ldapsync/ldap_processes.py: _Wake``).  Here: that state machine, then the whole chain against a
stand-in worker child on real pipes (the one ``test_worker_process.py`` uses), with the LDAP
process's side in this process.
"""

from __future__ import annotations


import pytest_twisted
from sync.test_worker_process import CHILD, stand_in_service  # type: ignore[import-not-found]

from ldapsync.ldap_processes import _Wake


def test_a_child_says_w_once_per_h_and_never_loses_a_commit():
    said: list[int] = []
    w = _Wake(lambda: said.append(1))
    w()                                  # a COMMIT before any "h": the worker's own claim may see it...
    assert said == []
    w.on_hungry()                        # ...or not: the "h" that follows is answered at once
    assert said == [1]
    w.on_hungry()                        # caught up again, no COMMIT since: wait for the next one
    assert said == [1]
    w()
    assert said == [1, 1]
    w()                                  # the worker was just woken: no more until the next "h"
    w()
    assert said == [1, 1]
    w.on_hungry()                        # those two came after the wake: told at the "h"
    assert said == [1, 1, 1]


@pytest_twisted.ensureDeferred
async def test_commits_in_another_ldap_process_wake_the_caught_up_worker(tmp_path):
    from twisted.internet import reactor, task
    from twisted.logger import globalLogPublisher


    script = tmp_path / "child.py"
    script.write_text(CHILD)
    seen: list[str] = []

    def observer(event):
        if event.get("log_namespace") == "test.child":
            seen.append(event["log_child_text"])
    globalLogPublisher.addObserver(observer)

    svc = stand_in_service(tmp_path, script)
    # the other LDAP process, its pipe to the server in between: "w" → the server's wake
    other = _Wake(svc.wake)
    svc.on_hungry.append(other.on_hungry)
    try:
        svc._spawn()

        async def until(what, cond, timeout=10.0):
            for _ in range(int(timeout / 0.02)):
                if cond():
                    return
                await task.deferLater(reactor, 0.02, lambda: None)
            raise AssertionError(what)

        await until("the start-up wake", lambda: "wakes 1" in seen)
        await until("the worker caught up", lambda: svc.hungry)
        assert other.hungry                                   # the "h" reached the other process
        other()                                               # its COMMIT: wakes the worker
        await until("the wake from the other process", lambda: "wakes 2" in seen)
        other()                                               # a COMMIT while the worker works...
        await until("...is not lost: a wake at once when it is caught up", lambda: "wakes 3" in seen)
        await until("caught up again", lambda: svc.hungry)
        await task.deferLater(reactor, 0.5, lambda: None)
        assert [t for t in seen if t.startswith("wakes")] == ["wakes 1", "wakes 2", "wakes 3"]   # none unasked
        await svc.stopService()
    finally:
        globalLogPublisher.removeObserver(observer)
        if svc.pid is not None:
            svc.proto.transport.signalProcess("KILL")
