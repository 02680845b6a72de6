"""Signed cookies, CSRF tokens and attempt rate limits for the self-service pages.

No state is kept per session on the server: a session is a cookie holding the
user's DN, its expiry and a stamp, signed with a key derived from the ``[secrets]``
key (HMAC-SHA256), so every node of a multi-node deployment accepts it.  The
stamp is a MAC of what the session is bound to (the user's password hash and
sign-out generation, see web.py): when either changes, every cookie issued
before stops working, on every node.  CSRF is
the signed double-submit pattern: a random ``ls_csrf`` cookie and, in each
form, ``HMAC(key, "csrf:" + cookie)``; a cross-site page can read neither.

Rate limits count attempts in a sliding window per user and per client
address, in memory (per node: the lockout in the directory itself applies
across nodes).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections import deque
from dataclasses import dataclass


def derive_key(master: bytes, purpose: str) -> bytes:
    return hmac.new(master, b"ldapsync selfservice " + purpose.encode(), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Session:
    dn: str
    expires: float
    must_change: bool = False     # signed in with an expired password: only a change is allowed
    stamp: str = ""               # Signer.stamp of the user's state when the session began


class Signer:
    def __init__(self, master_key: bytes) -> None:
        self._session_key = derive_key(master_key, "session")
        self._csrf_key = derive_key(master_key, "csrf")
        self._stamp_key = derive_key(master_key, "session-stamp")

    # -- sessions ------------------------------------------------------------------
    def session_cookie(self, s: Session) -> str:
        body = _b64(json.dumps({"dn": s.dn, "exp": round(s.expires), "chg": s.must_change, "st": s.stamp},
                               separators=(",", ":")).encode())
        mac = _b64(hmac.new(self._session_key, body.encode(), hashlib.sha256).digest())
        return f"{body}.{mac}"

    def read_session(self, cookie: str | None, now: float) -> Session | None:
        if not cookie or len(cookie) > 4096 or "." not in cookie:
            return None
        body, _, mac = cookie.partition(".")
        want = _b64(hmac.new(self._session_key, body.encode(), hashlib.sha256).digest())
        if not hmac.compare_digest(want, mac):
            return None
        try:
            data = json.loads(_unb64(body))
            s = Session(str(data["dn"]), float(data["exp"]), bool(data.get("chg")), str(data.get("st") or ""))
        except (ValueError, KeyError, TypeError):
            return None
        return s if s.expires > now else None

    def stamp(self, dn: str, facts: list[str]) -> str:
        """A MAC of the facts a session is bound to (never the facts themselves: they include a hash)."""
        msg = "\0".join([dn.lower(), *facts]).encode("utf-8", "surrogateescape")
        return _b64(hmac.new(self._stamp_key, msg, hashlib.sha256).digest()[:18])

    def stamp_ok(self, s: Session, facts: list[str]) -> bool:
        return bool(s.stamp) and hmac.compare_digest(self.stamp(s.dn, facts), s.stamp)

    # -- CSRF ----------------------------------------------------------------------
    @staticmethod
    def new_csrf_cookie() -> str:
        return secrets.token_urlsafe(24)

    def csrf_field(self, cookie: str) -> str:
        return _b64(hmac.new(self._csrf_key, b"csrf:" + cookie.encode(), hashlib.sha256).digest())

    def csrf_ok(self, cookie: str | None, field: str | None) -> bool:
        if not cookie or not field or len(cookie) > 200 or len(field) > 200:
            return False
        return hmac.compare_digest(self.csrf_field(cookie), field)


class RateLimiter:
    """At most ``limit`` attempts per key in any ``window`` seconds."""

    def __init__(self, limit: int, window: float, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._hits: dict[str, deque[float]] = {}

    def retry_after(self, key: str, now: float) -> float:
        """0 when an attempt is allowed now (and counts it), else seconds to wait."""
        if self.limit <= 0:
            return 0.0
        q = self._hits.get(key)
        if q is None:
            if len(self._hits) >= self.max_keys:
                self._prune(now)
            q = self._hits[key] = deque()
        while q and q[0] <= now - self.window:
            q.popleft()
        if len(q) >= self.limit:
            return max(1.0, q[0] + self.window - now)
        q.append(now)
        return 0.0

    def _prune(self, now: float) -> None:
        for k in [k for k, q in self._hits.items() if not q or q[-1] <= now - self.window]:
            del self._hits[k]
        if len(self._hits) >= self.max_keys:          # still full: forget the oldest half
            for k in list(self._hits)[: self.max_keys // 2]:
                del self._hits[k]
