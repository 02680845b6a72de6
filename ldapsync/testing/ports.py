"""TCP ports on 127.0.0.1 for servers started as child processes: a free one, and waiting until one listens.

The one copy the tests (``tests/conftest.py``: ``free_port``, ``wait_port``) and the demo
(``ldapsync/demo.py``) share; each turns :class:`NotListening` into its own error.  Blocking
(``time.sleep``): for test code and plain CLI processes, never for a reactor thread.
"""

from __future__ import annotations

import socket
import subprocess
import time
from typing import Any


class NotListening(Exception):
    """Nothing listened in time: ``returncode`` is the process's exit status when it ended first,
    else None (the time ran out)."""

    def __init__(self, port: int, returncode: int | None, timeout: float) -> None:
        self.port = port
        self.returncode = returncode
        self.timeout = timeout
        super().__init__(f"the process exited with status {returncode}" if returncode is not None
                         else f"port {port} not listening after {timeout}s")


def free_port(preferred: int = 0) -> int:
    """``preferred`` when it is free on 127.0.0.1, else any free port (OSError when none is)."""
    if preferred:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", preferred))
                return int(s.getsockname()[1])
            except OSError:
                pass
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[Any] | None = None, timeout: float = 30.0,
              interval: float = 0.1) -> None:
    """Return once something accepts connections on 127.0.0.1:``port``; raise :class:`NotListening`
    when ``proc`` exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise NotListening(port, proc.returncode, timeout)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=max(interval * 5, 0.5)):
                return
        except OSError:
            time.sleep(interval)
    raise NotListening(port, None, timeout)
