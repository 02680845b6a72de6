"""The fake tenant's Microsoft Graph v1.0 handlers: routing, domains, organization, $batch.

Owns: the routing of ``/v1.0/...`` paths to handlers, the domain, organization and application
handlers, and ``$batch``. The user resource (properties, validation, single-user handlers) is
``_graph_users.py``; listing, ``$filter``, paging and delta are ``_graph_queries.py``.
Authentication, faults, throttling and recording happen around these handlers in ``_serving.py``.
Test double only.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import parse_qsl, unquote, urlsplit

from ._graph_queries import count_users, list_users, users_delta
from ._graph_users import (P_APPS, P_DOMAINS, P_ORG, create_user, delete_user, get_user, me, not_found,
                           patch_user, require, user_action)
from ._http import GraphError, Req, Resp, parse_json_body
from ._identity import TokenInfo

if TYPE_CHECKING:
    from .tenant import FakeTenant

BATCH_LIMIT = 20


# --- routing -----------------------------------------------------------------------------------

_USER_KEY = re.compile(r"^/users/(?P<key>[^/]+)$")
_USER_ACTION = re.compile(r"^/users/(?P<key>[^/]+)/(?P<action>[A-Za-z.]+)$")
_APP_BY_APPID = re.compile(r"^/applications\(appId='(?P<app>[^']+)'\)$")
_DOMAIN = re.compile(r"^/domains/(?P<name>[^/]+)$")


def handle_graph(t: FakeTenant, req: Req, rel: str, token: TokenInfo) -> Resp:
    """Dispatch one Graph operation. ``rel`` is the path after ``/v1.0``."""
    m = req.method
    routes: list[tuple[str, re.Pattern[str] | str, Callable[..., Resp]]] = [
        ("GET", "/users", list_users), ("POST", "/users", create_user),
        ("GET", "/users/delta", users_delta), ("GET", "/users/$count", count_users),
        ("GET", "/domains", list_domains), ("GET", "/organization", organization),
        ("GET", "/me", me),
        ("GET", _DOMAIN, get_domain), ("GET", _APP_BY_APPID, get_application),
        ("POST", _USER_ACTION, user_action),
        ("GET", _USER_KEY, get_user), ("PATCH", _USER_KEY, patch_user),
        ("DELETE", _USER_KEY, delete_user),
    ]
    path_matched = False
    for method, pattern, handler in routes:
        match: dict[str, str] | None
        if isinstance(pattern, str):
            match = {} if rel == pattern else None
        else:
            found = pattern.match(rel)
            match = {k: unquote(v) for k, v in found.groupdict().items()} if found else None
        if match is None:
            continue
        path_matched = True
        if method == m:
            return handler(t, req, token, **match)
    if path_matched:
        raise GraphError(405, "Request_BadRequest",
                         f"The request method '{m}' is not allowed on this resource.")
    segment = rel.strip("/").split("/")[0] or rel
    raise GraphError(400, "BadRequest", f"Resource not found for the segment '{segment}'.")


# --- directory ---------------------------------------------------------------------------------

def list_domains(t: FakeTenant, req: Req, token: TokenInfo) -> Resp:
    require(token, P_DOMAINS)
    return Resp(200, {"@odata.context": f"{t.graph_url}/$metadata#domains",
                      "value": [dict(d) for d in t.domains.values()]})


def get_domain(t: FakeTenant, req: Req, token: TokenInfo, name: str) -> Resp:
    require(token, P_DOMAINS)
    domain = t.domains.get(name.lower())
    if domain is None:
        raise not_found(name)
    return Resp(200, {"@odata.context": f"{t.graph_url}/$metadata#domains/$entity", **domain})


def organization(t: FakeTenant, req: Req, token: TokenInfo) -> Resp:
    require(token, P_ORG)
    return Resp(200, {"@odata.context": f"{t.graph_url}/$metadata#organization",
                      "value": [t.organization()]})


def get_application(t: FakeTenant, req: Req, token: TokenInfo, app: str) -> Resp:
    require(token, P_APPS)
    registration = t.apps.get(app)
    if registration is None:
        raise not_found(app)
    return Resp(200, {"@odata.context": f"{t.graph_url}/$metadata#applications/$entity",
                      **t.application_resource(registration)})


# --- $batch ------------------------------------------------------------------------------------

def batch(t: FakeTenant, req: Req, run_item: Callable[[Req], Resp]) -> Resp:
    """JSON batching: each item is dispatched through ``run_item`` (auth, faults, throttling...)."""
    body = parse_json_body(req)
    items = body.get("requests") if isinstance(body, dict) else None
    if not isinstance(items, list) or not items:
        raise GraphError(400, "BadRequest", "Invalid batch payload format.")
    if len(items) > BATCH_LIMIT:
        raise GraphError(400, "BadRequest",
                         f"Number of batch request steps exceeds the maximum of {BATCH_LIMIT}.")
    raw_ids = [str(item.get("id")) if isinstance(item, dict) else None for item in items]
    if None in raw_ids or any(isinstance(item, dict) and "id" not in item for item in items):
        raise GraphError(400, "BadRequest", "Batch request step is missing the required 'id'.")
    ids = [str(i) for i in raw_ids]
    if len(set(ids)) != len(ids):
        raise GraphError(400, "BadRequest", "Batch request contains duplicate Ids.")
    for item in items:
        url = str(item.get("url", ""))
        if not url or urlsplit(url).scheme or not isinstance(item.get("method"), str):
            raise GraphError(400, "BadRequest", "Invalid request: each batch step needs a method and a "
                             "relative url.")
    statuses: dict[str, int] = {}
    responses = []
    for item, item_id in zip(items, ids, strict=True):
        headers = {str(k).lower(): str(v) for k, v in (item.get("headers") or {}).items()}
        item_req = Req(method=item["method"].upper(), path="", headers=headers, in_batch=req.request_id)
        depends = item.get("dependsOn") or []
        if any(statuses.get(str(d), 424) >= 400 for d in depends):
            resp = Resp(424, GraphError(424, "BadRequest", "Failed dependency").response(item_req).body)
        elif "body" in item and item["body"] is not None and "content-type" not in headers:
            resp = GraphError(400, "BadRequest", "Content-Type header must be specified for a request "
                              "with a body.").response(item_req)
        else:
            url = "/" + item["url"].lstrip("/")
            if url.startswith("/v1.0/"):
                url = url[5:]
            split = urlsplit(url)
            item_req.path = "/v1.0" + unquote(split.path)
            item_req.query = dict(parse_qsl(split.query, keep_blank_values=True))
            item_req.headers.setdefault("authorization", req.header("authorization") or "")
            item_req.body = (b"" if item.get("body") is None else
                             json.dumps(item["body"]).encode())
            resp = run_item(item_req)
        statuses[item_id] = resp.status
        entry: dict[str, Any] = {"id": item_id, "status": resp.status,
                                 "headers": {k: v for k, v in resp.json_headers().items()}}
        if resp.body is not None:
            entry["body"] = resp.body
        responses.append(entry)
    return Resp(200, {"responses": responses})
