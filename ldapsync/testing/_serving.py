"""How the fake tenant answers a request (``ServingMixin`` of ``FakeTenant``) and its twisted.web glue.

Owns: ``serve`` (admin API, outage, identity endpoints, Graph operations and ``$batch``, see the
layout in ``tenant.py``'s docstring), bearer-token checks, the admin API dispatch (``ADMIN_API``:
``POST /_fake/<method>`` calls ``FakeTenant.<method>``), the request record, and the twisted.web
site and resource that turn HTTP requests into ``Req`` and ``Resp`` back. Test double only.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from twisted.internet.defer import maybeDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from . import _graph, _identity
from ._http import GraphError, OAuthError, Req, Resp, parse_json_body, redact_json
from ._identity import TokenInfo

if TYPE_CHECKING:
    from .tenant import FakeTenant

log = Logger()

ADMIN_API = {
    "add_domain", "set_domain", "add_user", "add_users", "get_user", "all_users", "delete_user", "portal_edit",
    "password_of", "register_app", "set_permissions", "add_app_secret", "add_app_certificate",
    "approve_device_code", "deny_device_code", "app_token", "pending_device_codes", "expire_tokens",
    "revoke_refresh_tokens", "inject_fault", "clear_faults", "set_latency", "outage", "end_outage",
    "configure_throttling", "reset_throttling", "requests", "clear_requests", "expire_delta_tokens",
    "configure", "info",
}


class ServingMixin:
    """The request pipeline and the request record of ``FakeTenant``."""

    def requests(self, kind: str | None = "graph", method: str | None = None,
                 path: str | None = None, batch_items: bool = True) -> list[dict[str, Any]]:
        """Recorded requests (passwords redacted): kind "graph"/"identity"/None for all; ``path`` is
        a regex searched in the path; ``batch_items=False`` leaves out the items of $batch."""
        pattern = re.compile(path) if path else None
        return [copy.deepcopy(r) for r in self.records
                if (kind is None or r["kind"] == kind) and (method is None or r["method"] == method)
                and (pattern is None or pattern.search(r["path"]))
                and (batch_items or r["batch"] is None)]

    def clear_requests(self) -> None:
        self.records.clear()

    def _record(self, kind: str, req: Req, resp: Resp) -> None:
        if kind == "identity":
            body: Any = _identity.recorded_form(req) if req.body else None
        else:
            try:
                body = redact_json(json.loads(req.body)) if req.body else None
            except ValueError:
                body = "<not JSON>"
        self.records.append({
            "seq": len(self.records) + 1, "time": self.wall_time(), "kind": kind, "method": req.method,
            "path": req.path, "query": dict(req.query), "body": body,
            "status": 0 if resp.drop else resp.status, "client_id": req.client_id,
            "batch": req.in_batch, "request_id": req.request_id,
        })

    # --- serving -------------------------------------------------------------------------------

    def serve(self, req: Req) -> Resp:
        """Answer one HTTP request (the twisted.web resource calls this)."""
        if req.path.startswith("/_fake/"):
            return self._admin(req)
        identity = _identity.IDENTITY_PATH.match(req.path)
        kind = "identity" if identity or req.path == "/devicelogin" else "graph"
        if self._in_outage():
            resp = (Resp(0, drop=True) if self._outage_mode != "503" else
                    self._fault_response(kind, req, 503, 5, None, None))
        elif identity:
            resp = self._identity_operation(req, identity["tenant"], identity["rest"])
        elif req.path == "/devicelogin":
            resp = _identity.device_login_page(self, req)
        elif req.path.startswith("/v1.0/"):
            if req.path == "/v1.0/$batch" and req.method == "POST":
                resp = self._batch(req)
            else:
                resp = self._graph_operation(req)
        else:
            resp = GraphError(400, "BadRequest", "Invalid version.").response(req)
        self._stamp(req, resp)
        self._record(kind, req, resp)
        return resp

    def _stamp(self, req: Req, resp: Resp) -> None:
        resp.headers.setdefault("request-id", req.request_id)
        resp.headers.setdefault("client-request-id", req.client_request_id)
        resp.headers.setdefault("x-ms-ags-diagnostic", json.dumps(
            {"ServerInfo": {"DataCenter": "Fake", "Slice": "E", "Ring": "0", "ScaleUnit": "000",
                            "RoleInstance": "FAKE01"}}))

    def _identity_operation(self, req: Req, tenant_segment: str, rest: str) -> Resp:
        req.client_id = _identity.form_of(req).get("client_id") if req.method == "POST" else None
        fault = self._take_fault("identity", req)
        if fault and not fault.after:
            return Resp(0, drop=True) if fault.drop else self._fault_response(
                "identity", req, fault.status, fault.retry_after, fault.code, fault.message)
        try:
            resp = _identity.handle_identity(self, req, tenant_segment, rest)
        except OAuthError as exc:
            resp = exc.response(req)
        if fault:
            return Resp(0, drop=True) if fault.drop else self._fault_response(
                "identity", req, fault.status, fault.retry_after, fault.code, fault.message)
        return resp

    def authenticate(self, req: Req) -> TokenInfo:
        headers = {"WWW-Authenticate": f'Bearer realm="", authorization_uri="{self.authority}'
                                       f'/oauth2/authorize", client_id="{_identity.GRAPH_APP_ID}"'}
        scheme, _, value = (req.header("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise GraphError(401, "InvalidAuthenticationToken", "Access token is empty.",
                             headers=headers)
        info = self.access_tokens.get(value.strip())
        if info is None:
            raise GraphError(401, "InvalidAuthenticationToken",
                             "Access token validation failure. Invalid audience.", headers=headers)
        req.client_id = info.client_id
        if info.expires_at <= self.wall_time():
            raise GraphError(401, "InvalidAuthenticationToken",
                             "Lifetime validation failed, the token is expired.", headers=headers)
        return info

    def _graph_operation(self, req: Req) -> Resp:
        rel = req.path[len("/v1.0"):]
        fault = self._take_fault("graph", req)
        if fault and not fault.after:
            if fault.drop and req.in_batch is None:
                return Resp(0, drop=True)
            resp = self._fault_response("graph", req, fault.status, fault.retry_after, fault.code,
                                        fault.message)
        else:
            try:
                token = self.authenticate(req)
                throttle_headers = self._throttle(token, req, rel)
                resp = _graph.handle_graph(self, req, rel, token)
                resp.headers.update(throttle_headers)
            except GraphError as exc:
                resp = exc.response(req)
            if fault:
                if fault.drop and req.in_batch is None:
                    return Resp(0, drop=True)
                resp = self._fault_response("graph", req, fault.status, fault.retry_after,
                                            fault.code, fault.message)
        if req.in_batch is not None:
            self._stamp(req, resp)
            self._record("graph", req, resp)
        return resp

    def _batch(self, req: Req) -> Resp:
        try:
            self.authenticate(req)
            return _graph.batch(self, req, self._graph_operation)
        except GraphError as exc:
            return exc.response(req)

    def _admin(self, req: Req) -> Resp:
        if not secrets.compare_digest((req.header("x-fake-admin-token") or "").encode(),
                                      self.admin_token.encode()):
            return Resp(403, {"error": "missing or wrong X-Fake-Admin-Token"})
        name = req.path[len("/_fake/"):]
        if name not in ADMIN_API:
            return Resp(404, {"error": f"no admin method {name!r}"})
        try:
            kwargs = parse_json_body(req) or {}
            result = getattr(self, name)(**kwargs)
        except (GraphError, KeyError, TypeError, ValueError) as exc:
            return Resp(400, {"error": f"{type(exc).__name__}: {exc}"})
        return Resp(200, {"result": result})


# --- twisted.web glue ------------------------------------------------------------------------------

class _QuietSite(Site):
    """No access log (request bodies carry passwords, URLs carry UPNs); tracks open channels."""

    def __init__(self, resource: Resource):
        super().__init__(resource)
        self.channels: set[Any] = set()

    def log(self, request: Any) -> None:
        pass

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channels = self.channels
        lost = channel.connectionLost

        def connection_lost(reason: Any) -> None:
            channels.discard(channel)
            lost(reason)
        channel.connectionLost = connection_lost
        channels.add(channel)
        return channel


class _TenantResource(Resource):
    isLeaf = True

    def __init__(self, tenant: FakeTenant):
        super().__init__()
        self.tenant = tenant

    def render(self, request: Any) -> Any:
        split = urlsplit(request.uri.decode("utf-8", "replace"))
        req = Req(
            method=request.method.decode(),
            path=unquote(split.path),
            query=dict(parse_qsl(split.query, keep_blank_values=True)),
            headers={k.decode().lower(): v[-1].decode("utf-8", "replace")
                     for k, v in request.requestHeaders.getAllRawHeaders()},
            body=request.content.read() if request.content else b"",
        )
        gone: list[bool] = []
        request.notifyFinish().addBoth(lambda _: gone.append(True))
        delay = 0.0 if req.path.startswith("/_fake/") else self.tenant.latency
        d = (deferLater(self.tenant.reactor, delay, self.tenant.serve, req) if delay > 0
             else maybeDeferred(self.tenant.serve, req))
        d.addCallback(self._write, request, gone)
        d.addErrback(self._crash, request, req, gone)
        return NOT_DONE_YET

    def _write(self, resp: Resp, request: Any, gone: list[bool]) -> None:
        if gone:
            return
        if resp.drop:
            request.channel.transport.abortConnection()
            return
        request.setResponseCode(resp.status)
        for name, value in resp.json_headers().items():
            request.setHeader(name, value)
        body = resp.encoded()
        if resp.status not in (204, 304):
            request.setHeader("Content-Length", str(len(body)))
        if body:
            request.write(body)
        request.finish()

    def _crash(self, failure: Any, request: Any, req: Req, gone: list[bool]) -> None:
        log.failure("fake tenant: unhandled error for {method} {path}", failure,
                    method=req.method, path=req.path)
        resp = GraphError(500, "generalException", "Internal error in the fake tenant.").response(req)
        self._write(resp, request, gone)
