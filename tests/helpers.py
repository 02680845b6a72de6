"""Small helpers shared by tests (import as ``helpers``; tests/ is on pythonpath)."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from http.cookiejar import CookieJar
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


LINK_RE = re.compile(r"(http://127\.0\.0\.1:\d+/(?:activate|reset)\?token=[A-Za-z0-9_\-]+)")


# -- self-service: mails, links and a cookie-keeping HTTP client ---------------------------------
def mails_to(sink: Any, address: str) -> list[Any]:
    return [m for m in sink.messages() if address in m.rcpt_to]


def wait_mail(sink: Any, address: str, count: int = 1, timeout: float = 30) -> Any:
    wait_for(f"{count} mail(s) to {address}", lambda: len(mails_to(sink, address)) >= count, timeout)
    return mails_to(sink, address)[count - 1]


def link_in(msg: Any) -> str:
    m = LINK_RE.search(msg.body())
    assert m, msg.body()
    return m.group(1)


def whoami(srv: Any, dn: str, password: str) -> Any:
    return srv.run("ldapwhoami", bind=dn, password=password)


def ssha(password: str) -> str:
    """An OpenLDAP-style salted SHA-1 hash of ``password`` (what an export from slapd holds)."""
    salt = secrets.token_bytes(8)
    return "{SSHA}" + base64.b64encode(hashlib.sha1(password.encode() + salt).digest() + salt).decode()


def add_user(srv: Any, uid: str, *, alt: str | None = None, bound: bool = False, password: str | None = None) -> str:
    dn = f"uid={uid},{PEOPLE}"
    ldif = (f"dn: {dn}\nobjectClass: inetOrgPerson\nobjectClass: ldapsyncUser\nuid: {uid}\ncn: {uid.title()} Person\n"
            f"sn: Person\ngivenName: {uid.title()}\nmail: {uid}@contoso.com\n")
    if alt:
        ldif += f"ldapsyncAltMail: {alt}\n"
    if bound:
        ldif += "ldapsyncDirectory: office365\n"
    if password:
        ldif += f"userPassword: {password}\n"
    srv.run("ldapadd", input=ldif, check=True)
    return dn


class Client:
    """A cookie-keeping HTTP client for what a browser would never send (forged forms)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect())

    def request(self, path: str, data: dict[str, str] | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        req = urllib.request.Request(self.base + path, data=body, headers=headers or {})
        try:
            with self.opener.open(req, timeout=20) as r:
                return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode()

    def csrf(self, path: str) -> str:
        _, _, page = self.request(path)
        m = re.search(r'name="csrf" value="([^"]+)"', page)
        assert m, page
        return m.group(1)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")
