"""One request to Microsoft Graph, with retries: treq over one persistent connection pool.

Owns the exchange itself: URLs and ``$select``, JSON in/out, retries, token refresh on 401,
the 404 retry right after a create, client-side pacing (:mod:`ldapsync.graph.pacing`) and
mapping failures to :mod:`ldapsync.graph.errors`, in :class:`GraphTransport`, which
:class:`~ldapsync.graph.client.GraphClient` builds on.  Raw treq/Twisted exceptions never
leave it.

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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlencode, urlsplit

from twisted.internet import defer, ssl, task
from twisted.logger import Logger
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.http_headers import Headers

from ldapsync import metrics
from ldapsync.graph.errors import (
    RETRYABLE_STATUSES,
    AuthError,
    GraphError,
    Transient,
    error_from_response,
    redact,
)
from ldapsync.graph.errors import parse_retry_after as _parse_retry_after
from ldapsync.graph.pacing import PacingPolicy, WritePacer
from ldapsync.graph.tls import trusted_blocks

__all__ = [
    "DEFAULT_USER_SELECT",
    "DOMAIN_SELECT",
    "MAX_CONNECTIONS",
    "WRITE_METHODS",
    "GraphResponse",
    "GraphTransport",
    "RetryPolicy",
    "make_agent",
]

log = Logger()
_warn = log.warn  # twisted.logger's name (not stdlib logging's .warning)

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
    pool = HTTPConnectionPool(reactor, persistent=True)

    class _QuietFactory(pool._factory):  # type: ignore[name-defined,misc]
        noisy = False                     # no "Starting/Stopping factory" line per connection

    pool._factory = _QuietFactory
    pool.maxPersistentPerHost = max_connections
    pool.cachedConnectionTimeout = 120
    pool.retryAutomatically = False        # we retry ourselves (and not blindly for POST)
    if ca_bundle:
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


class GraphTransport:
    """One Graph request with retries (:meth:`request`) and the verbs on it, with the state
    that needs (pool, token provider, pacer, retry policy, recently created objects, counters)."""

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
        maybe_applied = False       # an earlier send of this request may have reached Graph and been applied
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
                maybe_applied = True
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
                    maybe_applied = maybe_applied or status >= 500   # a 429 was not applied; a 5xx may have been
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
            err.repeated = maybe_applied
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
