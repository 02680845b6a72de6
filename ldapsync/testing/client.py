"""Drive a fake tenant that runs in another process (test double only).

Owns: ``FakeTenantProcess`` (start ``python -m ldapsync.testing.tenant`` on a free port and read
where it listens) and ``AdminClient`` (blocking calls to its ``/_fake/<method>`` admin API, with the
same names and keyword arguments as the ``FakeTenant`` methods). For tests whose system under test
(the LDAP server) runs in a separate process, or tests that must not run a reactor themselves.

    with FakeTenantProcess(tmp_path / "tenant") as fake:
        fake.admin.inject_fault(status=503, count=2)
        fake.admin.password_of(key="AdeleV@contoso.com")
        fake.admin.seed_users({"upn": "user{i:06d}@contoso.com", "mail": "user{i:06d}@contoso.com"}, 100000)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .tls import requests_session


class AdminError(RuntimeError):
    pass


class AdminClient:
    """``client.<method>(**kwargs)`` → ``FakeTenant.<method>(**kwargs)`` over HTTPS."""

    def __init__(self, base_url: str, ca_file: str | Path, admin_token: str, timeout: float = 10):
        self._url = base_url.rstrip("/") + "/_fake/"
        self._session = requests_session(ca_file)
        self._session.headers["X-Fake-Admin-Token"] = admin_token
        self._timeout = timeout

    def call(self, _name: str, /, **kwargs: Any) -> Any:
        resp = self._session.post(self._url + _name, json=kwargs, timeout=self._timeout)
        body = resp.json()
        if resp.status_code != 200:
            raise AdminError(body.get("error", resp.text))
        return body["result"]

    def seed_users(self, template: dict[str, Any], count: int, *, start: int = 1, chunk: int = 5000) -> int:
        """``count`` users from ``template`` (see ``FakeTenant.add_users``), ``chunk`` per request so
        each call stays well inside the timeout; 100,000 users take a few seconds. Returns the count."""
        added = 0
        for first in range(start, start + count, chunk):
            n = min(chunk, start + count - first)
            added += self.call("add_users", template=template, count=n, start=first)["added"]
        return added

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda **kwargs: self.call(name, **kwargs)

    def close(self) -> None:
        self._session.close()


class FakeTenantProcess:
    """The demo tenant in a subprocess; ``info`` has authority, graph_url, ca_file, client_id…"""

    def __init__(self, state_dir: str | Path, port: int = 0, extra_args: list[str] | None = None):
        self.state_dir = Path(state_dir)
        self.port = port
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[str] | None = None
        self.info: dict[str, Any] = {}
        self.admin: AdminClient

    def start(self, timeout: float = 20) -> FakeTenantProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ldapsync.testing.tenant", "--json", "--port", str(self.port),
             "--state-dir", str(self.state_dir), *self.extra_args],
            stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = self.proc.stdout.readline()
        if not line or time.monotonic() > deadline:
            self.stop()
            raise RuntimeError("the fake tenant process did not start")
        self.info = json.loads(line)
        self.info["client_secret"] = Path(self.info["client_secret_file"]).read_text().strip()
        token = Path(self.info["admin_token_file"]).read_text().strip()
        self.admin = AdminClient(self.info["base_url"], self.info["ca_file"], token)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        if getattr(self, "admin", None) is not None:
            self.admin.close()

    def __enter__(self) -> FakeTenantProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
