"""A scripted in-process Graph for unit tests: twisted.web resource behind treq's StubTreq,
driven by a ``task.Clock`` (no sockets, no real sleeps)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from treq.testing import StubTreq
from twisted.internet import defer, task
from twisted.web.resource import Resource

from ldapsync.graph.client import GraphClient, PacingPolicy, RetryPolicy

GRAPH = "https://graph.test/v1.0"


@dataclass
class Seen:
    at: float
    method: str
    path: str                 # without /v1.0
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


@dataclass
class Reply:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


def graph_error(status: int, code: str, message: str = "boom", details: list[str] | None = None,
                headers: dict[str, str] | None = None) -> Reply:
    err: dict[str, Any] = {"code": code, "message": message,
                           "innerError": {"request-id": f"req-{code}", "date": "2024-01-01T00:00:00"}}
    if details:
        err["details"] = [{"code": d, "target": "userPrincipalName"} for d in details]
    return Reply(status, {"error": err}, headers or {})


class ScriptedGraph(Resource):
    isLeaf = True

    def __init__(self, clock: task.Clock, handler: Callable[[Seen], Reply]) -> None:
        super().__init__()
        self.clock = clock
        self.handler = handler
        self.seen: list[Seen] = []

    def render(self, request: Any) -> bytes:
        url = urlsplit(request.uri.decode())
        path = url.path
        path = path.removeprefix("/v1.0")
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        headers = {k.decode().lower(): v[-1].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        raw = request.content.read()
        body = json.loads(raw) if raw else None
        seen = Seen(self.clock.seconds(), request.method.decode(), path, query, headers, body)
        self.seen.append(seen)
        reply = self.handler(seen)
        request.setResponseCode(reply.status)
        for k, v in reply.headers.items():
            request.setHeader(k, v)
        request.setHeader("request-id", f"rid-{len(self.seen)}")
        if reply.body is None:
            return b""
        request.setHeader("Content-Type", "application/json")
        return json.dumps(reply.body).encode()


class FakeTokens:
    def __init__(self) -> None:
        self.n = 1
        self.forced = 0

    async def get_token(self, force_refresh: bool = False, *, rejected_token: str | None = None) -> str:
        if force_refresh:
            self.forced += 1
            self.n += 1
        return f"tok-{self.n}"


def make_client(handler: Callable[[Seen], Reply], *, clock: task.Clock | None = None,
                retry: RetryPolicy | None = None, pacing: PacingPolicy | None = None,
                http: Any = None, tokens: Any = None, rand: float = 1.0,
                timeout: float = 30.0) -> tuple[GraphClient, ScriptedGraph, task.Clock, Any]:
    clock = clock or task.Clock()
    res = ScriptedGraph(clock, handler)
    tokens = tokens or FakeTokens()
    client = GraphClient(tokens, GRAPH, reactor=clock, http=http or StubTreq(res), retry=retry or RetryPolicy(),
                         pacing=pacing or PacingPolicy(enabled=False), random=lambda: rand, timeout=timeout)
    return client, res, clock, tokens


def drive(clock: task.Clock, coro: Any, limit: float = 100000.0) -> Any:
    """Run ``coro`` to completion, jumping the clock to each next timer; return or raise its result."""
    d = defer.ensureDeferred(coro)
    while not d.called:
        calls = [c for c in clock.getDelayedCalls() if c.active()]
        if not calls:
            raise AssertionError("coroutine is stuck with no timer pending")
        nxt = min(c.getTime() for c in calls)
        if nxt > limit:
            raise AssertionError(f"still running at t={nxt}")
        clock.advance(max(0.0, nxt - clock.seconds()))
    out: list[Any] = []
    d.addBoth(out.append)
    result = out[0]
    from twisted.python.failure import Failure
    if isinstance(result, Failure):
        result.raiseException()
    return result
