"""Plain request/response values shared by the fake tenant's identity and Graph handlers.

Owns: ``Req``/``Resp`` (what a handler sees and returns, independent of twisted.web, so that
``$batch`` items go through the very same handlers), Graph's error body, OAuth error bodies, and
redaction of secrets in the request record. Test double only.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

JSON_TYPE = ("application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;"
             "charset=utf-8")
REDACTED = "***REDACTED***"
_SECRET_JSON_KEYS = {"password", "newpassword", "currentpassword"}
_SECRET_FORM_KEYS = {"client_secret", "client_assertion", "refresh_token", "device_code", "password",
                     "code", "assertion"}


@dataclass
class Req:
    method: str
    path: str                                   # decoded, no query string, e.g. "/v1.0/users"
    query: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)   # lower-case names
    body: bytes = b""
    in_batch: str | None = None                 # the outer $batch request-id, for items
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    client_id: str | None = None                # who the request authenticated as, once known

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)

    @property
    def client_request_id(self) -> str:
        return self.header("client-request-id") or self.request_id


@dataclass
class Resp:
    status: int
    body: Any = None                            # dict/list → JSON; bytes/str → as is; None → empty
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False                          # abort the connection instead of answering

    def encoded(self) -> bytes:
        if self.body is None:
            return b""
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode()
        return json.dumps(self.body).encode()

    def json_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.body is not None and not isinstance(self.body, (bytes, str)):
            headers.setdefault("Content-Type", JSON_TYPE)
        return headers


class GraphError(Exception):
    """Raised by Graph handlers; becomes Graph's error body."""

    def __init__(self, status: int, code: str, message: str,
                 details: list[dict[str, str]] | None = None, headers: dict[str, str] | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message
        self.details = details or []
        self.headers = headers or {}

    def response(self, req: Req) -> Resp:
        err: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "innerError": {
                "date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
                "request-id": req.request_id,
                "client-request-id": req.client_request_id,
            },
        }
        if self.details:
            err["details"] = self.details
        return Resp(self.status, {"error": err}, dict(self.headers))


class OAuthError(Exception):
    """Raised by identity handlers; becomes an AAD-style OAuth error body."""

    def __init__(self, status: int, error: str, aadsts: int, description: str,
                 headers: dict[str, str] | None = None):
        super().__init__(f"{error}: AADSTS{aadsts}")
        self.status, self.error, self.aadsts, self.description = status, error, aadsts, description
        self.headers = headers or {}

    def response(self, req: Req) -> Resp:
        return Resp(self.status, {
            "error": self.error,
            "error_description": f"AADSTS{self.aadsts}: {self.description} Trace ID: {req.request_id}"
                                 f" Correlation ID: {req.client_request_id} Timestamp: "
                                 + time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
            "error_codes": [self.aadsts],
            "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
            "trace_id": req.request_id,
            "correlation_id": req.client_request_id,
        }, dict(self.headers))


def redact_json(value: Any) -> Any:
    """A copy of ``value`` with every password-like key's value replaced."""
    if isinstance(value, dict):
        return {k: (REDACTED if isinstance(k, str) and k.lower() in _SECRET_JSON_KEYS and v is not None
                    else redact_json(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_json(v) for v in value]
    return value


def redact_form(form: dict[str, str]) -> dict[str, str]:
    return {k: (REDACTED if k in _SECRET_FORM_KEYS else v) for k, v in form.items()}


def parse_json_body(req: Req) -> Any:
    """The request's JSON body, or a 400 like Graph's when it is not JSON."""
    try:
        return json.loads(req.body or b"null")
    except ValueError:
        raise GraphError(400, "BadRequest", "Unable to read JSON request payload. Please ensure "
                         "Content-Type header is set and payload is of valid JSON format.") from None
