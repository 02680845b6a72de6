"""Small helpers shared by tests (import as ``helpers``; tests/ is on pythonpath)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

SUFFIX = "dc=example,dc=com"
ADMIN_DN = f"cn=admin,{SUFFIX}"
PEOPLE = f"ou=people,{SUFFIX}"
GROUPS = f"ou=groups,{SUFFIX}"


def unique(prefix: str = "u") -> str:
    return f"{prefix}{secrets.token_hex(4)}"


def user_ldif(uid: str, *, password: str | None = None, extra: str = "", parent: str = PEOPLE, domain: str = "example.com") -> str:
    text = f"""dn: uid={uid},{parent}
objectClass: inetOrgPerson
objectClass: ldapsyncUser
uid: {uid}
cn: {uid.capitalize()} Test
sn: Test
givenName: {uid.capitalize()}
mail: {uid}@{domain}
"""
    if password:
        text += f"userPassword: {password}\n"
    return text + extra + "\n"


def parse_ldif_output(text: str) -> dict[str, dict[str, list[str]]]:
    """ldapsearch -LLL output → {dn: {attr: [values]}} (handles folding and base64)."""
    import base64

    out: dict[str, dict[str, list[str]]] = {}
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith(" ") and lines:
            lines[-1] += line[1:]
        else:
            lines.append(line)
    cur: dict[str, list[str]] | None = None
    for line in lines:
        if not line.strip():
            cur = None
            continue
        if line.startswith("#"):
            continue
        name, sep, value = line.partition(":")
        if value.startswith(":"):
            value = base64.b64decode(value[1:].strip()).decode("utf-8", "replace")
        else:
            value = value.strip()
        if name == "dn":
            cur = out.setdefault(value, {})
        elif cur is not None:
            cur.setdefault(name, []).append(value)
    return out


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 15.0, interval: float = 0.1) -> Any:
    """Poll ``fn`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")
