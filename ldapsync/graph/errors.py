"""The Graph layer's own errors, which drive the sync layer's retry policy.

Owns turning an HTTP status plus Graph's error body (``{"error": {"code",
"message", "innerError": {"request-id"}, "details": [...]}}``) into one of a
small set of exception types, branching on status and codes, never on message
text.  Messages never contain tokens, passwords or secrets: Graph does not echo
them, and :func:`redact` scrubs anything that looks like a bearer token or JWT
from every message we build, to be safe.

    GraphError                      base: code, message, request_id, status
    ├── Transient                   429 / 5xx / timeouts / connection errors: retry later
    ├── NotFound                    404 Request_ResourceNotFound
    ├── ObjectConflict (AlreadyExists)  400 with ObjectConflict detail, 409
    ├── BadRequest                  other 400s (bad property, password complexity, …)
    ├── Unauthorized                401 even after a fresh token
    ├── Forbidden                   403 Authorization_RequestDenied (missing permission/role)
    ├── DeltaExpired                410 / syncStateNotFound: start a full delta sync again
    └── AuthError                   token acquisition failed (MSAL error, never the secret)
"""

from __future__ import annotations

import email.utils
import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "RETRYABLE_STATUSES",
    "AlreadyExists",
    "AuthError",
    "BadRequest",
    "DeltaExpired",
    "Forbidden",
    "GraphError",
    "NotFound",
    "ObjectConflict",
    "Transient",
    "Unauthorized",
    "error_from_response",
    "parse_retry_after",
    "redact",
]

#: Statuses the client retries (with backoff, honouring Retry-After).
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})

_JWT = re.compile(r"eyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',]+")
_SECRETISH = re.compile(
    r"(?i)(\"?(?:password|client_secret|access_token|refresh_token|id_token|assertion)\"?\s*[:=]\s*\"?)"
    r"[^\s\"',&}]+"
)


def redact(text: str) -> str:
    """Remove anything that looks like a token, bearer credential or password value."""
    if not text:
        return text
    text = _JWT.sub("<redacted>", text)
    text = _BEARER.sub(r"\1<redacted>", text)
    return _SECRETISH.sub(r"\1<redacted>", text)


class GraphError(Exception):
    """A Graph request (or the token acquisition before it) failed.

    ``code`` is Graph's (or MSAL's) error code, ``message`` its human text,
    ``request_id`` Graph's request-id (or MSAL's correlation id), ``status``
    the HTTP status (0 when there was no HTTP response).  ``details`` holds the
    codes from ``error.details[*].code``; ``retry_after`` the server's
    Retry-After in seconds when it sent one.
    """

    def __init__(
        self,
        code: str = "",
        message: str = "",
        request_id: str = "",
        status: int = 0,
        *,
        details: Sequence[str] = (),
        retry_after: float | None = None,
    ) -> None:
        self.code = code or ""
        self.message = redact(message or "")
        self.request_id = request_id or ""
        self.status = status
        self.details = tuple(details)
        self.retry_after = retry_after
        # the answer to a resend of a request an earlier send of which may have been applied (its
        # reply was lost: a reset connection, a 5xx): a write refused now may be that write's echo
        self.repeated = False
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = []
        if self.status:
            parts.append(str(self.status))
        if self.code:
            parts.append(self.code)
        head = " ".join(parts)
        text = f"{head}: {self.message}" if head and self.message else (head or self.message)
        if self.request_id:
            text += f" (request-id {self.request_id})"
        return text

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, "
                f"request_id={self.request_id!r}, status={self.status!r})")


class Transient(GraphError):
    """Throttling, a server error, a timeout or a connection failure: retry later."""


class NotFound(GraphError):
    """The object does not exist (404)."""


class ObjectConflict(GraphError):
    """Another object already has this UPN / mail / proxy address."""


AlreadyExists = ObjectConflict


class BadRequest(GraphError):
    """Graph refused the request as invalid; retrying the same request will not help."""


class Unauthorized(GraphError):
    """401 even with a freshly acquired token."""


class Forbidden(GraphError):
    """403: the app lacks a permission or directory role."""


class DeltaExpired(GraphError):
    """The delta link is no longer valid (410 Gone / syncStateNotFound): resync from scratch."""


class AuthError(GraphError):
    """Acquiring a token failed.

    ``needs_reauthorization`` is set when only an admin can fix it by signing
    in again (delegated mode: ``invalid_grant``, no account in the cache,
    interaction required).  ``transient`` is set when the identity provider
    was unreachable or throttling/failing (retry later).
    """

    def __init__(
        self,
        code: str = "",
        message: str = "",
        request_id: str = "",
        status: int = 0,
        *,
        needs_reauthorization: bool = False,
        transient: bool = False,
        **kw: Any,
    ) -> None:
        self.needs_reauthorization = needs_reauthorization
        self.transient = transient
        super().__init__(code, message, request_id, status, **kw)


def parse_retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds from now (delta-seconds or HTTP-date), or ``None``."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _as_error_obj(body: Any) -> Mapping[str, Any]:
    if isinstance(body, (bytes, bytearray)):
        try:
            body = json.loads(body.decode("utf-8")) if body else {}
        except (ValueError, UnicodeDecodeError):
            body = {}
    if isinstance(body, Mapping):
        err = body.get("error")
        if isinstance(err, Mapping):
            return err
    return {}


def error_from_response(
    status: int,
    body: Any,
    headers: Mapping[str, str] | None = None,
    *,
    retry_after: float | None = None,
) -> GraphError:
    """Map a failed Graph response (status, body bytes or parsed JSON) to a typed error."""
    headers = {k.lower(): v for k, v in (headers or {}).items()}
    err = _as_error_obj(body)
    code = str(err.get("code") or "")
    message = str(err.get("message") or "")
    inner = err.get("innerError") or err.get("innererror") or {}
    request_id = ""
    if isinstance(inner, Mapping):
        request_id = str(inner.get("request-id") or inner.get("requestId") or "")
    request_id = request_id or headers.get("request-id", "") or headers.get("client-request-id", "")
    details = []
    for d in err.get("details") or ():
        if isinstance(d, Mapping) and d.get("code"):
            details.append(str(d["code"]))
    if not message and not code:
        message = f"HTTP {status}"
    kw: dict[str, Any] = {"details": details, "retry_after": retry_after}
    args = (code, message, request_id, status)
    codes = {code, *details}
    if "syncStateNotFound" in codes or "resyncRequired" in codes or status == 410:
        return DeltaExpired(*args, **kw)
    if status in RETRYABLE_STATUSES or (status >= 500 and status != 501) or status == 408:
        return Transient(*args, **kw)
    if "ObjectConflict" in codes or status == 409:
        return ObjectConflict(*args, **kw)
    if status == 404:
        return NotFound(*args, **kw)
    if status == 401:
        return Unauthorized(*args, **kw)
    if status == 403:
        return Forbidden(*args, **kw)
    if 400 <= status < 500:
        return BadRequest(*args, **kw)
    return GraphError(*args, **kw)
