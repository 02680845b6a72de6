"""GraphClient unit tests: StubTreq + task.Clock, no sockets, no real sleeps."""

from __future__ import annotations

from typing import Any

import pytest
from graph._graph_stub import GRAPH, Reply, Seen, drive, graph_error, make_client
from treq.testing import StubTreq
from twisted.internet import defer, task
from twisted.internet import error as ierror
from twisted.logger import formatEvent, globalLogPublisher

from ldapsync.graph.client import BatchItem, PacingPolicy, RetryPolicy, WritePacer
from ldapsync.graph.errors import (
    BadRequest,
    DeltaExpired,
    Forbidden,
    GraphError,
    NotFound,
    ObjectConflict,
    Transient,
    Unauthorized,
)


def ok(body: Any = None, status: int = 200, **headers: str) -> Reply:
    return Reply(status, body if body is not None else {}, dict(headers))


# --------------------------------------------------------------------------- basics

def test_get_sends_select_auth_and_parses_json() -> None:
    client, g, clock, _ = make_client(lambda s: ok({"id": "1", "displayName": "A"}))
    user = drive(clock, client.get_user("alice@contoso.com", ["id", "displayName"]))
    assert user == {"id": "1", "displayName": "A"}
    s = g.seen[0]
    assert s.method == "GET" and s.path == "/users/alice@contoso.com"
    assert s.query == {"$select": "id,displayName"}
    assert s.headers["authorization"] == "Bearer tok-1"
    assert s.headers["accept"] == "application/json"


def test_every_user_read_has_select() -> None:
    client, g, clock, _ = make_client(lambda s: ok({"value": [{"id": "d"}]}))
    drive(clock, client.get_user("x"))
    drive(clock, client.list_domains())

    async def users() -> list[Any]:
        return [u async for u in client.list_users(top=5)]
    drive(clock, users())
    drive(clock, client.delta().collect())
    assert all("$select" in s.query for s in g.seen), [s.query for s in g.seen]


def test_upn_with_hash_is_quoted_in_path() -> None:
    client, g, clock, _ = make_client(lambda s: ok({"id": "1"}))
    drive(clock, client.get_user("a#b@contoso.com"))
    assert g.seen[0].path == "/users/a%23b@contoso.com"


def test_patch_returns_none_on_204_and_sends_json() -> None:
    client, g, clock, _ = make_client(lambda s: Reply(204))
    assert drive(clock, client.update_user("id1", {"displayName": "B"})) is None
    s = g.seen[0]
    assert s.method == "PATCH" and s.body == {"displayName": "B"}
    assert s.headers["content-type"] == "application/json"


# --------------------------------------------------------------------------- retries

def test_retry_503_with_full_jitter_backoff() -> None:
    replies = [graph_error(503, "ServiceUnavailable")] * 3 + [ok({"id": "1"})]
    client, g, clock, _ = make_client(lambda s: replies[len(g.seen) - 1],
                                      retry=RetryPolicy(base_delay=1.0, max_delay=60), rand=1.0)
    assert drive(clock, client.get("/users/1", {"$select": "id"})) == {"id": "1"}
    assert [s.at for s in g.seen] == [0, 1, 3, 7]          # 1, 2, 4 (random()=1 → the cap of each step)


def test_backoff_is_jittered_and_capped() -> None:
    replies = [graph_error(500, "x")] * 5 + [ok()]
    client, g, clock, _ = make_client(lambda s: replies[len(g.seen) - 1],
                                      retry=RetryPolicy(base_delay=1.0, max_delay=3.0), rand=0.5)
    drive(clock, client.get("/x"))
    gaps = [b.at - a.at for a, b in zip(g.seen, g.seen[1:])]
    assert gaps == [0.5, 1.0, 1.5, 1.5, 1.5]


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_retryable_statuses(status: int) -> None:
    replies = [graph_error(status, "X"), ok({"ok": True})]
    client, g, clock, _ = make_client(lambda s: replies[len(g.seen) - 1])
    assert drive(clock, client.get("/x")) == {"ok": True}
    assert len(g.seen) == 2


def test_429_retry_after_is_honoured_and_pauses_others() -> None:
    replies = {0: graph_error(429, "TooManyRequests", headers={"Retry-After": "7"})}
    client, g, clock, _ = make_client(lambda s: replies.get(len(g.seen) - 1, ok({"n": len(g.seen)})),
                                      rand=0.0)
    d1 = defer.ensureDeferred(client.get("/a"))
    assert len(g.seen) == 1
    clock.advance(1)
    d2 = defer.ensureDeferred(client.get("/b"))        # starts during the pause: must wait too
    assert len(g.seen) == 1
    clock.advance(5.9)
    assert len(g.seen) == 1
    clock.advance(0.2)
    assert d1.called and d2.called
    assert [s.at for s in g.seen] == [0, pytest.approx(7.1), pytest.approx(7.1)]
    assert client.stats["throttled"] == 1


def test_retry_after_http_date_is_understood() -> None:
    from ldapsync.graph.client import _parse_retry_after
    assert _parse_retry_after("12") == 12
    assert _parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0     # in the past
    assert _parse_retry_after("junk") is None


def test_too_long_retry_after_is_not_waited_out() -> None:
    client, g, clock, _ = make_client(
        lambda s: graph_error(429, "TooManyRequests", headers={"Retry-After": "3600"}),
        retry=RetryPolicy(max_retry_after=600))
    with pytest.raises(Transient) as ei:
        drive(clock, client.get("/x"))
    assert ei.value.retry_after == 3600 and ei.value.status == 429 and len(g.seen) == 1


def test_gives_up_after_max_attempts_with_graph_details() -> None:
    client, g, clock, _ = make_client(lambda s: graph_error(503, "ServiceUnavailable", "try later"),
                                      retry=RetryPolicy(max_attempts=4))
    with pytest.raises(Transient) as ei:
        drive(clock, client.get("/x"))
    e = ei.value
    assert (e.status, e.code, e.message, e.request_id) == (503, "ServiceUnavailable", "try later",
                                                           "req-ServiceUnavailable")
    assert len(g.seen) == 4


class FlakyHTTP:
    """Fails the first ``n`` requests with a connection error, then delegates to StubTreq."""

    def __init__(self, inner: StubTreq, n: int, exc: Exception | None = None, hang: bool = False) -> None:
        self.inner, self.n, self.exc, self.hang = inner, n, exc, hang
        self.calls = 0
        self.cancelled = 0

    def request(self, *a: Any, **kw: Any) -> defer.Deferred:
        self.calls += 1
        if self.calls <= self.n:
            if self.hang:
                def cancel(d: defer.Deferred) -> None:
                    self.cancelled += 1
                return defer.Deferred(cancel)
            return defer.fail(self.exc or ierror.ConnectionRefusedError("refused"))
        return self.inner.request(*a, **kw)


def test_connection_errors_are_retried() -> None:
    clock = task.Clock()
    from graph._graph_stub import ScriptedGraph
    res = ScriptedGraph(clock, lambda s: ok({"id": 1}))
    flaky = FlakyHTTP(StubTreq(res), 2)
    client, _, clock, _ = make_client(lambda s: ok(), clock=clock, http=flaky)
    assert drive(clock, client.get("/x")) == {"id": 1}
    assert flaky.calls == 3


def test_connection_errors_exhausted_become_transient() -> None:
    clock = task.Clock()
    from graph._graph_stub import ScriptedGraph
    flaky = FlakyHTTP(StubTreq(ScriptedGraph(clock, lambda s: ok())), 100)
    client, _, clock, _ = make_client(lambda s: ok(), clock=clock, http=flaky, retry=RetryPolicy(max_attempts=3))
    with pytest.raises(Transient) as ei:
        drive(clock, client.get("/x"))
    assert ei.value.code == "ConnectionError" and "refused" in ei.value.message
    assert flaky.calls == 3


def test_timeouts_cancel_and_retry() -> None:
    clock = task.Clock()
    from graph._graph_stub import ScriptedGraph
    res = ScriptedGraph(clock, lambda s: ok({"late": False}))
    flaky = FlakyHTTP(StubTreq(res), 1, hang=True)
    client, _, clock, _ = make_client(lambda s: ok(), clock=clock, http=flaky, timeout=10)
    assert drive(clock, client.get("/x")) == {"late": False}
    assert flaky.cancelled == 1
    assert res.seen[0].at == pytest.approx(11.0)            # 10 s timeout + 1 s backoff


# --------------------------------------------------------------------------- 401

def test_401_refreshes_token_once_and_retries() -> None:
    def h(s: Seen) -> Reply:
        if s.headers["authorization"] == "Bearer tok-1":
            return graph_error(401, "InvalidAuthenticationToken", "Access token has expired")
        return ok({"id": "1"})
    client, g, clock, tokens = make_client(h)
    assert drive(clock, client.get("/me")) == {"id": "1"}
    assert tokens.forced == 1
    assert [s.headers["authorization"] for s in g.seen] == ["Bearer tok-1", "Bearer tok-2"]


def test_401_twice_is_unauthorized() -> None:
    client, g, clock, tokens = make_client(lambda s: graph_error(401, "InvalidAuthenticationToken"))
    with pytest.raises(Unauthorized):
        drive(clock, client.get("/x"))
    assert tokens.forced == 1 and len(g.seen) == 2


def test_transient_auth_error_is_retried() -> None:
    from ldapsync.graph.errors import AuthError

    class Tokens:
        calls = 0

        async def get_token(self, force_refresh: bool = False) -> str:
            Tokens.calls += 1
            if Tokens.calls == 1:
                raise AuthError("connection_error", "idp down", transient=True)
            return "t"
    client, _g, clock, _ = make_client(lambda s: ok({"a": 1}), tokens=Tokens())
    assert drive(clock, client.get("/x")) == {"a": 1}


# --------------------------------------------------------------------------- error mapping

@pytest.mark.parametrize("reply,exc", [
    (graph_error(400, "Request_BadRequest", "Another object with the same value for property "
                 "userPrincipalName already exists.", details=["ObjectConflict"]), ObjectConflict),
    (graph_error(404, "Request_ResourceNotFound"), NotFound),
    (graph_error(403, "Authorization_RequestDenied"), Forbidden),
    (graph_error(400, "Request_BadRequest", "The specified password does not comply"), BadRequest),
    (graph_error(410, "syncStateNotFound"), DeltaExpired),
    (graph_error(400, "Request_BadRequest", details=["syncStateNotFound"]), DeltaExpired),
    (Reply(418, None), BadRequest),
    (Reply(501, None), GraphError),
])
def test_error_mapping(reply: Reply, exc: type) -> None:
    client, g, clock, _ = make_client(lambda s: reply)
    with pytest.raises(exc) as ei:
        drive(clock, client.post("/users", {"passwordProfile": {"password": "S3cret!pw"}}))
    assert type(ei.value) is exc
    assert ei.value.status == reply.status
    assert "S3cret" not in str(ei.value) and "tok-" not in str(ei.value)
    assert len(g.seen) == 1


def test_error_messages_are_redacted() -> None:
    from ldapsync.graph.errors import GraphError as GE
    from ldapsync.graph.errors import redact
    e = GE("x", 'bad Bearer eyJabc.def.ghi and "password": "hunter2"')
    assert "eyJ" not in str(e) and "hunter2" not in str(e)
    assert redact("client_secret=abc&x=1") == "client_secret=<redacted>&x=1"


def test_404_right_after_create_is_retried() -> None:
    state = {"gets": 0}

    def h(s: Seen) -> Reply:
        if s.method == "POST":
            return ok({"id": "new-id", "userPrincipalName": "n@contoso.com"}, 201)
        state["gets"] += 1
        if state["gets"] <= 2:
            return graph_error(404, "Request_ResourceNotFound")
        return ok({"id": "new-id"})
    client, _g, clock, _ = make_client(h)
    user = drive(clock, client.create_user({"userPrincipalName": "n@contoso.com"}))
    assert user["id"] == "new-id"
    assert drive(clock, client.get_user("new-id")) == {"id": "new-id"}
    assert state["gets"] == 3
    # by UPN too, and PATCH
    state["gets"] = 0
    assert drive(clock, client.get_user("N@contoso.com")) == {"id": "new-id"}


def test_404_for_an_old_object_is_not_retried() -> None:
    client, g, clock, _ = make_client(lambda s: graph_error(404, "Request_ResourceNotFound"))
    assert drive(clock, client.find_user_by_upn("nobody@contoso.com")) is None
    assert len(g.seen) == 1


def test_404_after_create_eventually_gives_up() -> None:
    def h(s: Seen) -> Reply:
        if s.method == "POST":
            return ok({"id": "x1"}, 201)
        return graph_error(404, "Request_ResourceNotFound")
    client, g, clock, _ = make_client(h, retry=RetryPolicy(not_found_retries=3))
    drive(clock, client.create_user({"userPrincipalName": "x@c.com"}))
    with pytest.raises(NotFound):
        drive(clock, client.update_user("x1", {"displayName": "X"}))
    assert len(g.seen) == 1 + 4


# --------------------------------------------------------------------------- paging and delta

def test_paged_follows_next_link() -> None:
    def h(s: Seen) -> Reply:
        page = int(s.query.get("page", "0"))
        body: dict[str, Any] = {"value": [{"id": f"{page}-{i}"} for i in range(3)]}
        if page < 2:
            body["@odata.nextLink"] = f"{GRAPH}/users?$select=id&$top=3&page={page + 1}"
        return ok(body)
    client, g, clock, _ = make_client(h)

    async def run() -> list[Any]:
        return [u["id"] async for u in client.list_users(["id"], top=3)]
    assert drive(clock, run()) == [f"{p}-{i}" for p in range(3) for i in range(3)]
    assert g.seen[0].query == {"$select": "id", "$top": "3"}
    assert len(g.seen) == 3


def test_next_link_to_another_host_is_refused() -> None:
    client, g, clock, _ = make_client(lambda s: ok({"value": [], "@odata.nextLink": "https://evil.test/steal"}))

    async def run() -> list[Any]:
        return [u async for u in client.paged("/users", {"$select": "id"})]
    with pytest.raises(GraphError, match="another host"):
        drive(clock, run())
    assert len(g.seen) == 1


def test_delta_yields_items_and_returns_delta_link() -> None:
    def h(s: Seen) -> Reply:
        if "$deltatoken" in s.query:
            return ok({"value": [{"id": "3", "@removed": {"reason": "deleted"}}],
                       "@odata.deltaLink": f"{GRAPH}/users/delta?$deltatoken=t2"})
        if "$skiptoken" in s.query:
            return ok({"value": [{"id": "2"}], "@odata.deltaLink": f"{GRAPH}/users/delta?$deltatoken=t1"})
        return ok({"value": [{"id": "1"}], "@odata.nextLink": f"{GRAPH}/users/delta?$skiptoken=s1"})
    client, g, clock, _ = make_client(h)
    q = client.delta(["id", "displayName"])
    assert [u["id"] for u in drive(clock, q.collect())] == ["1", "2"]
    assert q.delta_link == f"{GRAPH}/users/delta?$deltatoken=t1"
    assert g.seen[0].path == "/users/delta" and g.seen[0].query == {"$select": "id,displayName"}
    q2 = client.delta(delta_link=q.delta_link)
    assert drive(clock, q2.collect()) == [{"id": "3", "@removed": {"reason": "deleted"}}]
    assert q2.delta_link.endswith("t2")


def test_a_next_link_loop_is_detected() -> None:
    client, g, clock, _ = make_client(lambda s: ok({"value": [{"id": 1}], "@odata.nextLink": f"{GRAPH}/users?p=1"}))

    async def run() -> list[Any]:
        return [u async for u in client.paged("/users", {"$select": "id"})]
    with pytest.raises(GraphError, match="same nextLink"):
        drive(clock, run())
    assert len(g.seen) == 2
    with pytest.raises(GraphError, match="same nextLink"):
        drive(clock, client.delta(["id"]).collect())


def test_delta_gone_raises_delta_expired() -> None:
    client, _g, clock, _ = make_client(lambda s: graph_error(410, "Gone"))
    with pytest.raises(DeltaExpired):
        drive(clock, client.delta(delta_link=f"{GRAPH}/users/delta?$deltatoken=old").collect())


# --------------------------------------------------------------------------- $batch

def batch_handler(item_reply: Any) -> Any:
    def h(s: Seen) -> Reply:
        assert s.path == "/$batch"
        return ok({"responses": [
            dict(id=r["id"], **item_reply(r, s)) for r in reversed(s.body["requests"])]})
    return h


def test_batch_chunks_by_20_and_keeps_order() -> None:
    client, g, clock, _ = make_client(batch_handler(
        lambda r, s: {"status": 200, "body": {"url": r["url"]}, "headers": {}}))
    items = [BatchItem("GET", f"/users/u{i}?$select=id") for i in range(45)]
    results = drive(clock, client.batch(items))
    assert [len(s.body["requests"]) for s in g.seen] == [20, 20, 5]
    assert [r.body["url"] for r in results] == [f"/users/u{i}?$select=id" for i in range(45)]
    assert all(r.ok for r in results)


def test_batch_item_with_body_gets_content_type() -> None:
    client, g, clock, _ = make_client(batch_handler(lambda r, s: {"status": 204}))
    drive(clock, client.batch([BatchItem("PATCH", "/users/a", {"displayName": "A"}), BatchItem("GET", "users/b")]))
    reqs = g.seen[0].body["requests"]
    assert reqs[0]["headers"]["Content-Type"] == "application/json" and reqs[0]["body"] == {"displayName": "A"}
    assert reqs[1]["url"] == "/users/b" and "headers" not in reqs[1]


def test_batch_retries_only_throttled_items_after_longest_retry_after() -> None:
    def item(r: dict, s: Seen) -> dict:
        first = len(g.seen) == 1
        if first and r["id"] == "2":
            return {"status": 429, "headers": {"Retry-After": "5"}, "body": {"error": {"code": "TooManyRequests"}}}
        if first and r["id"] == "3":
            return {"status": 503, "headers": {"Retry-After": "2"}, "body": {"error": {"code": "x"}}}
        if r["id"] == "4":
            return {"status": 400, "body": {"error": {"code": "Request_BadRequest", "message": "bad"}}}
        return {"status": 204}
    client, g, clock, _ = make_client(batch_handler(item))
    items = [BatchItem("PATCH", f"/users/u{i}", {"displayName": str(i)}) for i in range(4)]
    results = drive(clock, client.batch(items))
    assert [[r["id"] for r in s.body["requests"]] for s in g.seen] == [["1", "2", "3", "4"], ["2", "3"]]
    assert g.seen[1].at == 5
    assert [r.status for r in results] == [204, 204, 204, 400]
    assert isinstance(results[3].error, BadRequest)
    with pytest.raises(BadRequest):
        results[3].raise_for_error()


def test_batch_item_retries_are_bounded() -> None:
    client, g, clock, _ = make_client(batch_handler(lambda r, s: {"status": 503, "body": {"error": {"code": "x"}}}),
                                      retry=RetryPolicy(max_attempts=3))
    results = drive(clock, client.batch([BatchItem("GET", "/users/a")]))
    assert len(g.seen) == 3 and results[0].status == 503 and isinstance(results[0].error, Transient)


def test_batch_rejects_duplicate_ids() -> None:
    client, _g, clock, _ = make_client(lambda s: ok())
    with pytest.raises(ValueError):
        drive(clock, client.batch([BatchItem("GET", "/a", id="x"), BatchItem("GET", "/b", id="x")]))


def test_batch_404_after_create_in_same_client_is_retried() -> None:
    def item(r: dict, s: Seen) -> dict:
        if r["method"] == "POST":
            return {"status": 201, "body": {"id": "nid", "userPrincipalName": "n@c.com"}}
        if len(g.seen) < 4:
            return {"status": 404, "body": {"error": {"code": "Request_ResourceNotFound"}}}
        return {"status": 204}
    client, g, clock, _ = make_client(batch_handler(item))
    drive(clock, client.batch([BatchItem("POST", "/users", {"userPrincipalName": "n@c.com"})]))
    res = drive(clock, client.batch([BatchItem("PATCH", "/users/nid", {"displayName": "N"})]))
    assert res[0].status == 204 and len(g.seen) == 4


# --------------------------------------------------------------------------- pacing

def test_pacer_keeps_any_window_within_budget() -> None:
    clock = task.Clock()
    policy = PacingPolicy(writes_per_window=30, window=10.0, target=2 / 3, burst=10)
    pacer = WritePacer(clock, policy)
    times: list[float] = []

    async def one() -> None:
        await pacer.acquire(1)
        times.append(clock.seconds())
    ds = [defer.ensureDeferred(one()) for _ in range(100)]
    while not all(d.called for d in ds):
        clock.advance(0.01)
    assert times[:10] == [0.0] * 10                    # the burst goes at once
    assert times == sorted(times)                      # FIFO
    for t in times:                                    # no 10 s window holds more than 30 writes
        assert sum(1 for u in times if t <= u < t + 10.0) <= 30
    assert times[-1] == pytest.approx((100 - 10) / 2.0, abs=0.02)   # then 2 writes/s


@pytest.mark.parametrize("budget,window", [(3000, 150.0), (300, 15.0)])
def test_default_pacing_fits_any_window_from_15_s(budget: int, window: float) -> None:
    """Graph's 3,000 writes / 150 s, and the same rate counted over 15 s (the scaled budget the
    benchmark gives the fake tenant): the default burst keeps every 15 s window within 300
    writes, with margin for jitter, while the steady rate stays at 95% of the budget."""
    clock = task.Clock()
    policy = PacingPolicy(writes_per_window=budget, window=window)
    assert policy.rate == pytest.approx(19.0) and policy.bucket == 8
    pacer = WritePacer(clock, policy)
    times = [pacer.reserve(1) for _ in range(1000)]          # a backlog: all booked at t = 0
    assert times == sorted(times) and times[:8] == [0.0] * 8
    for short in (15.0, 150.0):
        worst = max(sum(1 for u in times if t <= u < t + short) for t in times)
        assert worst <= 0.98 * short * 20
    assert (len(times) - 8) / times[-1] == pytest.approx(19.0, rel=0.01)


def test_two_pacers_at_half_share_together_fit_the_budget() -> None:
    """Two nodes of one deployment (one app, one budget) each pace to 1/2 of it: together their
    writes keep every 15 s and 150 s window within Graph's budget, at 95% of its rate."""
    clock = task.Clock()
    pacers = [WritePacer(clock, PacingPolicy()) for _ in range(2)]
    for p in pacers:
        p.set_share(0.5)
        assert p.share == 0.5 and p.rate == pytest.approx(9.5)
    times = sorted(t for p in pacers for t in [p.reserve(1) for _ in range(1500)])   # a shared backlog
    for short in (15.0, 150.0):
        worst = max(sum(1 for u in times if t <= u < t + short) for t in times)
        assert worst <= 0.98 * short * 20
    assert (len(times) - 8) / times[-1] == pytest.approx(19.0, rel=0.01)
    assert times[:8] == [0.0] * 8 and times[8] > 0          # the burst is split too (4 + 4)
    pacers[0].set_share(1.0)                                  # the other node is gone: full rate again
    assert pacers[0].rate == pytest.approx(19.0)
    pacers[0].set_share(0.0)
    assert pacers[0].share == 0.01                            # never stops altogether


def test_pacer_says_when_the_budget_sets_the_pace() -> None:
    """The worker gathers its completions only while writes queue for the budget."""
    clock = task.Clock()
    pacer = WritePacer(clock, PacingPolicy(writes_per_window=30, window=10.0, target=2 / 3, burst=3))   # 2/s
    assert not pacer.backlogged()
    assert [pacer.reserve(1) for _ in range(3)] == [0.0, 0.0, 0.0]     # the burst: nobody waits
    assert not pacer.backlogged()
    assert pacer.reserve(1) == pytest.approx(0.5)
    assert pacer.backlogged()                                          # the next one would wait
    clock.advance(0.5)
    assert not pacer.backlogged()
    off = WritePacer(clock, PacingPolicy(enabled=False))            # write_budget = 0
    for _ in range(100):
        off.reserve(1)
    assert not off.backlogged()


def test_pacer_reads_are_not_paced_but_respect_pause() -> None:
    clock = task.Clock()
    pacer = WritePacer(clock, PacingPolicy(writes_per_window=3, window=10, burst=1))
    for _ in range(50):
        assert pacer.reserve(0) == 0
    pacer.pause(4)
    assert pacer.reserve(0) == 4


# The throttle header and 429s lowering the rate (and its slow climb back): tests/graph/test_pacer.py.


def test_client_writes_are_paced_and_reads_not() -> None:
    clock = task.Clock()
    client, g, clock, _ = make_client(lambda s: Reply(204), clock=clock,
                                      pacing=PacingPolicy(writes_per_window=12, window=10, target=10 / 12, burst=2))
    ds = [defer.ensureDeferred(client.update_user(f"u{i}", {"displayName": "x"})) for i in range(6)]
    ds += [defer.ensureDeferred(client.get("/users/r", {"$select": "id"})) for _ in range(3)]
    while not all(d.called for d in ds):
        clock.advance(0.05)
    writes = [s.at for s in g.seen if s.method == "PATCH"]
    reads = [s.at for s in g.seen if s.method == "GET"]
    assert reads == [0, 0, 0]
    assert writes[:2] == [0, 0] and writes[-1] == pytest.approx(4.0, abs=0.06)   # 1 write/s after the burst


def test_client_slows_down_when_graph_reports_an_overrun() -> None:
    usage = ["1.0"]
    client, _g, clock, _ = make_client(
        lambda s: Reply(204, None, {"x-ms-throttle-limit-percentage": usage[0]}),
        pacing=PacingPolicy(writes_per_window=3000, window=150, target=0.9))
    drive(clock, client.update_user("a", {"displayName": "x"}))
    assert client.pacer.rate == pytest.approx(18.0)          # 100% used: our own pacing at work
    usage[0] = "1.2"
    drive(clock, client.update_user("a", {"displayName": "y"}))
    assert client.pacer.rate == pytest.approx(18.0 * 0.9 / 1.2)


# --------------------------------------------------------------------------- logging

def test_logs_have_no_tokens_or_passwords() -> None:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        replies = [graph_error(503, "x"), graph_error(401, "InvalidAuthenticationToken"),
                   graph_error(400, "Request_BadRequest", details=["ObjectConflict"])]
        client, g, clock, _ = make_client(lambda s: replies[min(len(g.seen), 3) - 1])
        with pytest.raises(ObjectConflict):
            drive(clock, client.create_user({"userPrincipalName": "a@c.com",
                                              "passwordProfile": {"password": "Sup3r$ecret"}}))
    finally:
        globalLogPublisher.removeObserver(events.append)
    text = "\n".join(formatEvent(e) + repr(e) for e in events if e.get("log_namespace", "").startswith("ldapsync"))
    assert "POST" in text and "/users" in text
    assert "tok-" not in text and "Sup3r$ecret" not in text and "Bearer" not in text


def test_an_expected_404_is_not_a_warning() -> None:
    """An existence check (find_user_by_upn) that finds nothing is an answer, logged at debug;
    an unexpected 404 (get_user) is still a warning."""
    from twisted.logger import LogLevel

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        client, _g, clock, _ = make_client(lambda s: graph_error(404, "Request_ResourceNotFound"))
        assert drive(clock, client.find_user_by_upn("nobody@contoso.com")) is None
        def warned() -> list[str]:
            return [formatEvent(e) for e in events if "-> 404" in formatEvent(e) and e["log_level"] >= LogLevel.warn]

        assert any("-> 404" in formatEvent(e) for e in events) and warned() == []
        with pytest.raises(NotFound):
            drive(clock, client.get_user("gone@contoso.com"))
        assert len(warned()) == 1, warned()
    finally:
        globalLogPublisher.removeObserver(events.append)
