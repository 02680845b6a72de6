"""What the server's two kinds of child process share: their stdout/stderr read as lines by the
server, and in the child the log observer that writes them and the death that follows the server's.

A child (the Microsoft 365 worker, ``worker_process.py``; an extra LDAP process,
``ldap_processes.py``) writes its log events to stdout as JSON lines (namespace, level, time,
text) among short control lines of its own, and anything outside its log (an interpreter error
before logging began) to stderr.  :class:`LineChildProtocol` splits both streams into lines, hands
the control lines to :meth:`~LineChildProtocol.control`, re-emits the log events into the
server's log and reports the child's end to its owner.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import defer, protocol
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from ldapsync import metrics


def split_lines(buf: bytes) -> tuple[list[bytes], bytes]:
    """The complete lines in ``buf`` and what is left of an unfinished one."""
    *lines, rest = buf.split(b"\n")
    return lines, rest


def republish(line: bytes, system: str | None = None) -> bool:
    """Re-emit one of a child's log events (same namespace and level) into this process's log;
    ``system`` tags it (``log_system``).  False when the line is not one of ours."""
    try:
        ns, level, when, text = json.loads(line)
        lvl = LogLevel.levelWithName(level)
    except Exception:  # noqa: BLE001 - not one of ours: the caller shows it as it is
        return False
    event = {"log_namespace": ns, "log_level": lvl, "log_time": when,
             "log_format": "{log_child_text}", "log_child_text": text}
    if system is not None:
        event["log_system"] = f"{ns}#{lvl.name} {system}"
    globalLogPublisher(event)
    return True


class LineChildProtocol(protocol.ProcessProtocol):
    """A child's stdout/stderr as lines; subclasses say what a control line means and how a
    line outside the log is shown.  ``owner._ended(proto, exit_code, signal)`` is called at the end."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self._out = b""
        self._err = b""
        self.ended: defer.Deferred = defer.Deferred()
        self.child_pid: int | None = None

    def control(self, line: bytes) -> bool:
        """Handle ``line`` if it is one of the child's control lines (True), else False."""
        return False

    def system(self) -> str | None:
        """The ``log_system`` tag of the child's re-emitted events (None: none)."""
        return None

    def raw(self, line: bytes) -> None:
        """Show a line the child wrote outside its log."""
        raise NotImplementedError

    def _event(self, line: bytes) -> None:
        if not republish(line, self.system()):
            self.raw(line)

    def connectionMade(self) -> None:
        self.child_pid = getattr(self.transport, "pid", None)

    def outReceived(self, data: bytes) -> None:
        lines, self._out = split_lines(self._out + data)
        for line in lines:
            if line and not self.control(line):
                self._event(line)

    def errReceived(self, data: bytes) -> None:
        lines, self._err = split_lines(self._err + data)
        for line in lines:
            if line.strip():
                self.raw(line)

    def processEnded(self, reason: Any) -> None:
        if self._out.strip():
            self._event(self._out)
        if self._err.strip():
            self.raw(self._err)
        self._out = self._err = b""
        if self.child_pid is not None:
            metrics.process_exited(self.child_pid)     # its live gauges no longer count
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        self.ended.callback((code, sig))
        self.owner._ended(self, code, sig)


# -- in the child ---------------------------------------------------------------------------------

class JSONLines:
    """Log observer: one JSON line per event on fd 1 (read by the parent: ``child_processes.LineChildProtocol``)."""

    def __init__(self, fd: int = 1) -> None:
        self.out = os.fdopen(os.dup(fd), "w", encoding="utf-8", buffering=1)
        self.lock = threading.Lock()

    def __call__(self, event: dict[str, Any]) -> None:      # a Twisted log event: any values
        text = formatEvent(event)
        f = event.get("log_failure")
        if f is not None:
            text = f"{text}\n{f.getTraceback()}".rstrip()
        level = event.get("log_level", LogLevel.info)
        line = json.dumps([event.get("log_namespace", "-"), getattr(level, "name", "info"),
                           event.get("log_time"), text], ensure_ascii=False)
        self.write_line(line)

    def write_line(self, line: str) -> None:
        with self.lock:
            try:
                self.out.write(line + "\n")
            except (OSError, ValueError):
                pass                                  # the parent is gone; PDEATHSIG ends us


QUIT = b"q"            # server → child: stop gracefully


def read_commands(reactor: Any, on_quit: Callable[[], object], commands: Mapping[bytes, Callable[[], object]],
                  first: bytes = b"") -> None:
    """A child's thread blocked on stdin (``first``: what was read already): "q" stops through the
    reactor; each other command byte in ``commands`` calls its handler here, in this thread.  EOF
    without "q" means the server died without a word: so does the child."""
    quit_asked = False
    while True:
        if first:
            data, first = first, b""
        else:
            try:
                data = os.read(0, 4096)
            except OSError:
                data = b""
        if not data:
            if not quit_asked:
                os._exit(1)
            return
        if QUIT in data:
            quit_asked = True
            reactor.callFromThread(on_quit)
        for command, handler in commands.items():
            if command in data:
                handler()


def die_with_parent() -> None:
    """SIGKILL this process when the LDAP process dies, however it dies (Linux)."""
    parent = int(os.environ.get("LDAPSYNC_PARENT_PID") or 0)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)                 # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if parent and os.getppid() != parent:             # died before prctl took effect
        os._exit(1)
