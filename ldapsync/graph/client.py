"""The Microsoft Graph client: treq over one persistent connection pool.

Owns every HTTP exchange with Graph: URLs and ``$select``, JSON in/out,
retries, token refresh on 401, paging, delta, ``$batch``, client-side pacing
and mapping failures to :mod:`ldapsync.graph.errors`.  It knows no database and
no LDAP; callers (the sync worker, importer, reconciler, CLI) get dicts and
typed exceptions.  Raw treq/Twisted exceptions never leave this module.

One request::

    pacer.acquire(writes)          token bucket: 95% of 3,000 writes / 150 s / app (configurable),
       │                           × share (1/n with n nodes of one deployment: sync/worker.py),
       │                           × the rate Graph really gives, learned from 429s and
       │                           x-ms-throttle-limit-percentage (graph/pacing.py);
       │                           paused for everyone after a 429's Retry-After
    token_provider.get_token()     (MSAL in a thread; memoised)
       │
    treq ──▶ Graph                 timeout on the whole exchange (headers + body)
       │
       ├─ 2xx                      → parsed JSON (or None for 204)
       ├─ 401 (first time)         → get_token(force_refresh=True), send again
       ├─ 429/500/502/503/504,     → wait Retry-After (or backoff with full jitter, capped),
       │  connection error/timeout    send again, up to RetryPolicy.max_attempts
       ├─ 404 on an object created → wait (replication lag), send again a few times
       │  moments ago
       └─ anything else            → GraphError subclass with Graph's code, message, request-id

Logging (twisted.logger): method, path (no query), status, request-id, attempt.
Never the Authorization header, request or response bodies, or tokens.
"""

from __future__ import annotations

import inspect
import json
import random as _random
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlencode, urlsplit

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from ldapsync import metrics
from ldapsync.graph.errors import (
    RETRYABLE_STATUSES,
    AuthError,
    GraphError,
    NotFound,
    Transient,
    error_from_response,
    redact,
)
from ldapsync.graph.errors import parse_retry_after as _parse_retry_after  # the name tests use
from ldapsync.graph.pacing import PacingPolicy, WritePacer

__all__ = [
    "DEFAULT_USER_SELECT",
    "DOMAIN_SELECT",
    "BatchItem",
    "BatchResult",
    "DeltaQuery",
    "GraphClient",
    "GraphResponse",
    "PacingPolicy",
    "RetryPolicy",
    "WritePacer",
    "make_agent",
]

log = Logger()
_warn = log.warn  # twisted.logger's name (not stdlib logging's .warning)

MAX_BATCH = 20
WRITE_METHODS = frozenset({"POST", "PATCH", "PUT", "DELETE"})

#: Properties read for a user unless the caller asks for others (several are $select-only).
DEFAULT_USER_SELECT: tuple[str, ...] = (
    "id", "userPrincipalName", "displayName", "givenName", "surname", "mail", "mailNickname",
    "accountEnabled", "otherMails", "proxyAddresses", "usageLocation", "userType",
    "passwordPolicies", "onPremisesImmutableId", "lastPasswordChangeDateTime", "createdDateTime",
)
DOMAIN_SELECT: tuple[str, ...] = (
    "id", "isVerified", "isDefault", "isInitial", "authenticationType", "passwordValidityPeriodInDays",
)


# --------------------------------------------------------------------------- policies

@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try before a request's failure is reported."""

    max_attempts: int = 6             # sends per request (first one included)
    base_delay: float = 1.0           # backoff: uniform(0, min(max_delay, base * 2**(n-1)))
    max_delay: float = 60.0
    max_retry_after: float = 600.0    # a longer Retry-After is not waited out here: Transient(retry_after=…)
    not_found_retries: int = 5        # 404 right after a create (replication lag)
    not_found_delay: float = 1.0
    recent_create_window: float = 120.0


# --------------------------------------------------------------------------- values

@dataclass(frozen=True)
class GraphResponse:
    status: int
    headers: Mapping[str, str]
    body: bytes = field(repr=False)

    @property
    def request_id(self) -> str:
        return self.headers.get("request-id", "") or self.headers.get("client-request-id", "")

    def json(self) -> Any:
        if not self.body:
            return None
        try:
            return json.loads(self.body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise GraphError("InvalidResponse", "Graph sent a response that is not JSON",
                             self.request_id, self.status) from None


@dataclass(frozen=True)
class BatchItem:
    """One request of a ``$batch``: ``url`` relative to the version root (``/users/…``)."""

    method: str
    url: str
    body: Any = None
    headers: Mapping[str, str] | None = None
    id: str | None = None
    depends_on: tuple[str, ...] = ()


@dataclass
class BatchResult:
    id: str
    status: int
    headers: dict[str, str]
    body: Any

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def error(self) -> GraphError | None:
        if self.ok:
            return None
        return error_from_response(self.status, self.body, self.headers,
                                   retry_after=_parse_retry_after(self.headers.get("retry-after")))

    def raise_for_error(self) -> Any:
        err = self.error
        if err is not None:
            raise err
        return self.body


class _TransportError(Exception):
    """No HTTP response: connection refused/reset, TLS failure, timeout."""


def _select(select: str | Iterable[str]) -> str:
    return select if isinstance(select, str) else ",".join(select)


def _describe_failure(e: BaseException) -> str:
    reasons = getattr(e, "reasons", None)     # ResponseNeverReceived / ResponseFailed / RequestTransmissionFailed
    if reasons:
        inner = reasons[0]
        inner_e = getattr(inner, "value", inner)
        return f"{type(e).__name__}: {_describe_failure(inner_e)}"
    text = str(e).strip()
    if type(e).__name__ == "Error" and "SSL" in type(e).__module__:
        return f"TLS failure: {text}"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# Kept-open HTTPS connections per host: at least the outbox worker's requests in flight (16) plus
# the reconciler's, or every request beyond it opens (and closes) a TLS connection of its own.
MAX_CONNECTIONS = 24


def make_agent(reactor: Any, *, ca_bundle: str | None = None, timeout: float = 30.0,
               max_connections: int = MAX_CONNECTIONS) -> tuple[Any, Any]:
    """An ``Agent`` on a persistent pool; ``ca_bundle`` adds trusted CAs to the public roots."""
    from twisted.internet import ssl
    from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)

    class _QuietFactory(pool._factory):  # type: ignore[name-defined,misc]
        noisy = False                     # no "Starting/Stopping factory" line per connection

    pool._factory = _QuietFactory
    pool.maxPersistentPerHost = max_connections
    pool.cachedConnectionTimeout = 120
    pool.retryAutomatically = False        # we retry ourselves (and not blindly for POST)
    if ca_bundle:
        from ldapsync.graph.tls import trusted_blocks

        certs = []
        for block in trusted_blocks(ca_bundle):
            try:
                certs.append(ssl.Certificate.loadPEM(block))
            except Exception:       # an odd root in certifi's bundle must not stop us
                continue
        root = ssl.trustRootFromCertificates(certs)
        policy = BrowserLikePolicyForHTTPS(trustRoot=root)
    else:
        policy = BrowserLikePolicyForHTTPS()
    agent = Agent(reactor, contextFactory=policy, pool=pool, connectTimeout=timeout)
    return agent, pool


# --------------------------------------------------------------------------- the client

class GraphClient:
    """Async Microsoft Graph client (``async def`` methods; run under Twisted's reactor).

    ``http`` (a treq ``HTTPClient``-like object, e.g. ``treq.testing.StubTreq``)
    replaces the real pool for tests; ``reactor`` may be a ``task.Clock`` then.
    """

    def __init__(
        self,
        token_provider: Any,
        graph_url: str,
        *,
        reactor: Any,
        ca_bundle: str | None = None,
        timeout: float = 30.0,
        http: Any = None,
        retry: RetryPolicy = RetryPolicy(),
        pacing: PacingPolicy = PacingPolicy(),
        pacer: WritePacer | None = None,
        random: Any = None,
        max_connections: int = MAX_CONNECTIONS,
        user_agent: str = "ldapsync",
    ) -> None:
        self._tokens = token_provider
        self.graph_url = graph_url.rstrip("/")
        parts = urlsplit(self.graph_url)
        self._origin = (parts.scheme, parts.netloc)
        self._base_path = parts.path
        self._reactor = reactor
        self._timeout = timeout
        self.retry = retry
        self.pacer = pacer or WritePacer(reactor, pacing)
        self._random = random or _random.random
        self._user_agent = user_agent
        self._pool = None
        if http is None:
            import treq.client

            agent, self._pool = make_agent(reactor, ca_bundle=ca_bundle, timeout=timeout,
                                           max_connections=max_connections)
            http = treq.client.HTTPClient(agent)
        self._http = http
        self._recent: dict[str, float] = {}      # lowercased id/UPN → created at
        try:
            self._rejected_kw = "rejected_token" in inspect.signature(token_provider.get_token).parameters
        except (TypeError, ValueError):
            self._rejected_kw = False
        #: counters for tests and the perf benchmark
        self.stats: dict[str, int] = {"requests": 0, "retries": 0, "throttled": 0, "token_refreshes": 0}

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.closeCachedConnections()

    # -- URLs

    def url(self, path: str, params: Mapping[str, Any] | None = None) -> str:
        """Absolute URL for ``path`` (relative to the version root) with encoded ``params``."""
        if path.startswith(("https://", "http://")):
            url = path
        else:
            url = self.graph_url + ("" if path.startswith("/") else "/") + path
        if params:
            q = {k: (_select(v) if k == "$select" and not isinstance(v, str) else v)
                 for k, v in params.items() if v is not None}
            url += ("&" if "?" in url else "?") + urlencode(q, quote_via=quote, safe="$,'()")
        return url

    def _check_origin(self, url: str) -> None:
        parts = urlsplit(url)
        if (parts.scheme, parts.netloc) != self._origin:
            # never send the bearer token to another host (a nextLink/deltaLink is opaque, but ours)
            raise GraphError("UnexpectedLink", f"refusing to follow a link to another host: {parts.netloc}")

    def _log_path(self, url: str) -> str:
        path = urlsplit(url).path
        if path.startswith(self._base_path):
            path = path[len(self._base_path):] or "/"
        return path

    # -- recent creates (404 replication lag)

    def _note_created(self, *keys: Any) -> None:
        now = self._reactor.seconds()
        for k in keys:
            if k:
                self._recent[str(k).lower()] = now
        if len(self._recent) > 10000:
            horizon = now - self.retry.recent_create_window
            self._recent = {k: t for k, t in self._recent.items() if t >= horizon}

    def _is_recent(self, url: str) -> bool:
        if not self._recent:
            return False
        segs = [unquote(s).lower() for s in urlsplit(url).path.split("/")]
        horizon = self._reactor.seconds() - self.retry.recent_create_window
        for i, s in enumerate(segs[:-1]):
            if s == "users":
                t = self._recent.get(segs[i + 1])
                if t is not None and t >= horizon:
                    return True
        return False

    # -- the exchange

    def _backoff(self, attempt: int, base: float | None = None) -> float:
        b = self.retry.base_delay if base is None else base
        return self._random() * min(self.retry.max_delay, b * (2 ** (attempt - 1)))

    def _not_found_backoff(self, n: int) -> float:
        """Equal jitter (half fixed, half random): replication lag needs a guaranteed minimum wait."""
        d = min(self.retry.max_delay, self.retry.not_found_delay * (2 ** (n - 1)))
        return d / 2 + self._random() * d / 2

    async def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            await task.deferLater(self._reactor, seconds)

    async def _token(self, force: bool = False, rejected: str | None = None) -> str:
        if force:
            self.stats["token_refreshes"] += 1
            if self._rejected_kw:
                return await self._tokens.get_token(force_refresh=True, rejected_token=rejected)
            return await self._tokens.get_token(force_refresh=True)
        return await self._tokens.get_token()

    async def _send_once(self, method: str, url: str, headers: dict[str, str], body: bytes | None) -> GraphResponse:
        import treq

        async def exchange() -> GraphResponse:
            hdrs = Headers({k.encode("latin-1"): [v.encode("latin-1")] for k, v in headers.items()})
            resp = await self._http.request(method, url, headers=hdrs, data=body, allow_redirects=False)
            content = await treq.content(resp)
            flat = {k.decode("latin-1").lower(): v[-1].decode("latin-1")
                    for k, v in resp.headers.getAllRawHeaders()}
            return GraphResponse(resp.code, flat, content)

        d = defer.ensureDeferred(exchange())
        d.addTimeout(self._timeout, self._reactor)
        try:
            resp = await d
        except defer.TimeoutError:
            metrics.graph_request(method, "error")
            raise _TransportError(f"no response within {self._timeout:g}s") from None
        except defer.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - connection refused/reset, DNS, TLS, malformed response
            metrics.graph_request(method, "error")
            raise _TransportError(redact(_describe_failure(e))) from None
        metrics.graph_request(method, resp.status)
        return resp

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        writes: int | None = None,
        retry_not_found: bool | None = None,
        expect_not_found: bool = False,
    ) -> GraphResponse:
        """Send one Graph request with retries; return the 2xx response or raise a GraphError.

        ``writes`` is how many directory writes the request costs (default: 1
        for POST/PATCH/PUT/DELETE); ``retry_not_found`` retries a 404 for a
        while (default: only when the URL names an object created moments ago);
        ``expect_not_found``: a 404 is an answer (an existence check), logged at debug, not warn.
        """
        method = method.upper()
        url = self.url(path, params)
        self._check_origin(url)
        if writes is None:
            writes = 1 if method in WRITE_METHODS else 0
        if retry_not_found is None:
            retry_not_found = self._is_recent(url)
        body = None
        base_headers = {"Accept": "application/json", "User-Agent": self._user_agent}
        if json_body is not None:
            body = json.dumps(json_body).encode("utf-8")
            base_headers["Content-Type"] = "application/json"
        if headers:
            base_headers.update(headers)
        log_path = self._log_path(url)
        batch_call = urlsplit(url).path.endswith("/$batch")

        attempt = 0
        refreshed = False
        not_found_tries = 0
        token: str | None = None
        while True:
            attempt += 1
            await self.pacer.acquire(writes)
            try:
                token = await self._token()
            except AuthError as e:
                if e.transient and attempt < self.retry.max_attempts:
                    delay = self._backoff(attempt)
                    _warn("Graph token acquisition failed ({code}); retrying in {delay:.1f}s",
                             code=e.code, delay=delay)
                    self.stats["retries"] += 1
                    await self._sleep(delay)
                    continue
                raise
            hdrs = dict(base_headers, Authorization=f"Bearer {token}")
            self.stats["requests"] += 1
            started = self._reactor.seconds()
            try:
                resp = await self._send_once(method, url, hdrs, body)
            except _TransportError as e:
                if attempt >= self.retry.max_attempts:
                    _warn("Graph {method} {path}: {error} (giving up after {attempt} attempts)",
                             method=method, path=log_path, error=str(e), attempt=attempt)
                    raise Transient("ConnectionError", str(e)) from None
                delay = self._backoff(attempt)
                _warn("Graph {method} {path}: {error}; retry {attempt} in {delay:.1f}s",
                         method=method, path=log_path, error=str(e), attempt=attempt, delay=delay)
                self.stats["retries"] += 1
                await self._sleep(delay)
                continue

            status = resp.status
            # a $batch's writes are observed item by item (_batch_chunk), not by its outer 200
            self.pacer.observe(status, resp.headers, 0 if batch_call and 200 <= status < 300 else writes)
            log.debug("Graph {method} {path} -> {status} request-id {request_id} ({elapsed:.3f}s, attempt {attempt})",
                      method=method, path=log_path, status=status, request_id=resp.request_id,
                      elapsed=self._reactor.seconds() - started, attempt=attempt)
            if 200 <= status < 300:
                return resp

            retry_after = _parse_retry_after(resp.headers.get("retry-after"))
            if status == 401 and not refreshed:
                refreshed = True
                log.info("Graph {method} {path} -> 401 request-id {request_id}; refreshing the token",
                         method=method, path=log_path, request_id=resp.request_id)
                await self._token(force=True, rejected=token)
                attempt -= 1        # a token refresh is not a retry of a failing server
                continue
            if status in RETRYABLE_STATUSES:
                if status == 429:
                    self.stats["throttled"] += 1
                if retry_after is not None and retry_after > self.retry.max_retry_after:
                    raise error_from_response(status, resp.body, resp.headers, retry_after=retry_after)
                if attempt < self.retry.max_attempts:
                    # (a 429's Retry-After already paused everyone: pacer.observe above)
                    delay = retry_after if retry_after is not None else self._backoff(attempt)
                    _warn("Graph {method} {path} -> {status} request-id {request_id}; "
                             "retry {attempt} in {delay:.1f}s",
                             method=method, path=log_path, status=status, request_id=resp.request_id,
                             attempt=attempt, delay=delay)
                    self.stats["retries"] += 1
                    await self._sleep(delay)
                    continue
            if status == 404 and retry_not_found and not_found_tries < self.retry.not_found_retries:
                not_found_tries += 1
                attempt -= 1
                delay = self._not_found_backoff(not_found_tries)
                log.info("Graph {method} {path} -> 404 right after create; retry in {delay:.1f}s",
                         method=method, path=log_path, delay=delay)
                await self._sleep(delay)
                continue
            err = error_from_response(status, resp.body, resp.headers, retry_after=retry_after)
            (log.debug if status == 404 and expect_not_found else _warn)(
                "Graph {method} {path} -> {status} {code} request-id {request_id}",
                     method=method, path=log_path, status=status, code=err.code, request_id=err.request_id)
            raise err

    # -- verbs

    async def get(self, path: str, params: Mapping[str, Any] | None = None, *,
                  headers: Mapping[str, str] | None = None, expect_not_found: bool = False) -> Any:
        return (await self.request("GET", path, params=params, headers=headers,
                                   expect_not_found=expect_not_found)).json()

    async def post(self, path: str, body: Any = None, *, params: Mapping[str, Any] | None = None,
                   headers: Mapping[str, str] | None = None) -> Any:
        return (await self.request("POST", path, params=params, json_body=body, headers=headers)).json()

    async def patch(self, path: str, body: Any, *, headers: Mapping[str, str] | None = None) -> Any:
        return (await self.request("PATCH", path, json_body=body, headers=headers)).json()

    async def delete(self, path: str, *, headers: Mapping[str, str] | None = None) -> None:
        await self.request("DELETE", path, headers=headers)

    async def paged(self, path: str, params: Mapping[str, Any] | None = None, *,
                    headers: Mapping[str, str] | None = None) -> AsyncIterator[Any]:
        """Every item of a collection, following ``@odata.nextLink`` to the end."""
        page = await self.get(path, params, headers=headers)
        current = self.url(path, params)
        while True:
            for item in (page or {}).get("value", ()):
                yield item
            next_link = (page or {}).get("@odata.nextLink")
            if not next_link:
                return
            _check_progress(current, next_link)
            current = next_link
            page = await self.get(next_link, headers=headers)

    def delta(self, select: str | Iterable[str] = DEFAULT_USER_SELECT, delta_link: str | None = None, *,
              path: str = "/users/delta", params: Mapping[str, Any] | None = None) -> DeltaQuery:
        """Changes since ``delta_link`` (everything when ``None``).

        ``async for item in q`` yields users (and ``{"id", "@removed"}``);
        afterwards ``q.delta_link`` holds the link for the next round.  A link
        Graph no longer knows raises :class:`~ldapsync.graph.errors.DeltaExpired`.
        """
        if delta_link:
            start = delta_link
        else:
            start = self.url(path, dict(params or {}, **{"$select": _select(select)}))
        return DeltaQuery(self, start)

    # -- $batch

    async def batch(self, items: Sequence[BatchItem]) -> list[BatchResult]:
        """Run ``items`` in ``$batch`` requests of ≤ 20; results in the same order.

        Items that come back 429/5xx are sent again (in a new batch, after the
        longest Retry-After among them) up to ``RetryPolicy.max_attempts``;
        the last result of each item is returned, successful or not.
        """
        ids: list[str] = []
        for i, item in enumerate(items):
            ids.append(item.id or str(i + 1))
        if len(set(ids)) != len(ids):
            raise ValueError("batch item ids must be unique")
        results: list[BatchResult | None] = [None] * len(items)
        for start in range(0, len(items), MAX_BATCH):
            await self._batch_chunk(items, ids, list(range(start, min(start + MAX_BATCH, len(items)))), results)
        return [r for r in results if r is not None]

    def _batch_request(self, item: BatchItem, item_id: str, present: set[str]) -> dict[str, Any]:
        url = item.url if item.url.startswith("/") else "/" + item.url
        req: dict[str, Any] = {"id": item_id, "method": item.method.upper(), "url": url}
        headers = dict(item.headers or {})
        if item.body is not None:
            req["body"] = item.body
            headers.setdefault("Content-Type", "application/json")
        if headers:
            req["headers"] = headers
        deps = [d for d in item.depends_on if d in present]
        if deps:
            req["dependsOn"] = deps
        return req

    async def _batch_chunk(self, items: Sequence[BatchItem], ids: list[str], todo: list[int],
                           results: list[BatchResult | None]) -> None:
        attempt = 0
        not_found_tries = 0
        while todo:
            attempt += 1
            present = {ids[i] for i in todo}
            payload = {"requests": [self._batch_request(items[i], ids[i], present) for i in todo]}
            writes = sum(1 for i in todo if items[i].method.upper() in WRITE_METHODS)
            resp = await self.request("POST", "/$batch", json_body=payload, writes=writes)
            data = resp.json() or {}
            by_id = {str(r.get("id")): r for r in data.get("responses", ()) if isinstance(r, dict)}
            again: list[int] = []
            waits: list[float] = []
            throttled = False
            only_not_found = True
            for i in todo:
                r = by_id.get(ids[i])
                if r is None:
                    res = BatchResult(ids[i], 500, {}, {"error": {
                        "code": "MissingBatchResponse", "message": "Graph returned no response for this item"}})
                else:
                    hdrs = {str(k).lower(): str(v) for k, v in (r.get("headers") or {}).items()}
                    res = BatchResult(ids[i], int(r.get("status") or 0), hdrs, r.get("body"))
                results[i] = res
                self.pacer.observe(res.status, res.headers, 1 if items[i].method.upper() in WRITE_METHODS else 0)
                if res.ok and items[i].method.upper() == "POST" and _is_users_collection(items[i].url) \
                        and isinstance(res.body, dict):
                    self._note_created(res.body.get("id"), res.body.get("userPrincipalName"))
                if res.status in RETRYABLE_STATUSES:
                    again.append(i)
                    only_not_found = False
                    if res.status == 429:
                        throttled = True
                        self.stats["throttled"] += 1
                    ra = _parse_retry_after(res.headers.get("retry-after"))
                    if ra is not None:
                        waits.append(ra)
                elif res.status == 404 and self._is_recent(self.url(items[i].url)):
                    again.append(i)
            if not again:
                return
            if only_not_found:
                if not_found_tries >= self.retry.not_found_retries:
                    return
                not_found_tries += 1
                attempt -= 1
                delay = self._not_found_backoff(not_found_tries)
            else:
                if attempt >= self.retry.max_attempts:
                    return
                longest = max(waits) if waits else None
                if longest is not None and longest > self.retry.max_retry_after:
                    return
                delay = longest if longest is not None else self._backoff(attempt)
                if throttled and longest is not None:
                    self.pacer.pause(longest)
            _warn("Graph $batch: {n} of {total} items to retry in {delay:.1f}s",
                     n=len(again), total=len(todo), delay=delay)
            self.stats["retries"] += 1
            await self._sleep(delay)
            todo = again

    # -- users and domains

    async def create_user(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /users``; returns the new user (trust its ``id``: reads may 404 for a few seconds)."""
        user = await self.post("/users", dict(body))
        self._note_created(user.get("id"), user.get("userPrincipalName") or body.get("userPrincipalName"))
        return user

    async def get_user(self, id_or_upn: str, select: str | Iterable[str] = DEFAULT_USER_SELECT, *,
                       expect_not_found: bool = False) -> dict[str, Any]:
        """``GET /users/{id}``; ``expect_not_found``: the caller handles NotFound (no warning logged)."""
        return await self.get(f"/users/{quote(id_or_upn, safe='@')}", {"$select": _select(select)},
                              expect_not_found=expect_not_found)

    async def find_user_by_upn(self, upn: str, select: str | Iterable[str] = DEFAULT_USER_SELECT
                               ) -> dict[str, Any] | None:
        """The user with this UPN, or ``None``."""
        try:
            return await self.get_user(upn, select, expect_not_found=True)
        except NotFound:
            return None

    async def list_users(self, select: str | Iterable[str] = DEFAULT_USER_SELECT, *, top: int | None = None,
                         filter: str | None = None) -> AsyncIterator[dict[str, Any]]:
        params: dict[str, Any] = {"$select": _select(select)}
        if top:
            params["$top"] = top
        if filter:
            params["$filter"] = filter
        async for u in self.paged("/users", params):
            yield u

    async def update_user(self, id_or_upn: str, patch: Mapping[str, Any]) -> None:
        """``PATCH /users/{id}`` (204); only the properties sent change."""
        await self.request("PATCH", f"/users/{quote(id_or_upn, safe='@')}", json_body=dict(patch))

    async def revoke_sessions(self, id_or_upn: str) -> None:
        await self.request("POST", f"/users/{quote(id_or_upn, safe='@')}/revokeSignInSessions")

    async def list_domains(self) -> list[dict[str, Any]]:
        return [d async for d in self.paged("/domains", {"$select": ",".join(DOMAIN_SELECT)})]

    async def get_organization(self, select: str | Iterable[str] = ("id", "displayName", "verifiedDomains")
                               ) -> dict[str, Any] | None:
        orgs = [o async for o in self.paged("/organization", {"$select": _select(select)})]
        return orgs[0] if orgs else None

    async def get_application(self, app_id: str, select: str | Iterable[str] = (
            "id", "appId", "displayName", "passwordCredentials", "keyCredentials")) -> dict[str, Any]:
        """The app registration by client id: its secrets' and certificates' ``endDateTime``
        (needs Application.Read.All)."""
        return await self.get(f"/applications(appId='{quote(app_id, safe='')}')", {"$select": _select(select)})


def _check_progress(current: str, next_link: str) -> None:
    if next_link == current:
        raise GraphError("PagingLoop", "Graph returned the same nextLink again; stopping to avoid a loop")


def _is_users_collection(url: str) -> bool:
    return urlsplit(url).path.rstrip("/").lower() in ("/users", "users")


class DeltaQuery:
    """Async iterator over a delta round; ``delta_link`` is set once it is exhausted."""

    def __init__(self, client: GraphClient, start: str) -> None:
        self._client = client
        self._start = start
        self.delta_link: str | None = None
        self.pages = 0

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._run()

    async def _run(self) -> AsyncIterator[dict[str, Any]]:
        url: str | None = self._start
        while url:
            page = await self._client.get(url) or {}
            self.pages += 1
            for item in page.get("value", ()):
                yield item
            next_link = page.get("@odata.nextLink")
            if next_link:
                _check_progress(url, next_link)
            else:
                self.delta_link = page.get("@odata.deltaLink")
            url = next_link

    async def collect(self) -> list[dict[str, Any]]:
        return [item async for item in self]
