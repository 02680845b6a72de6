"""Graph's JSON ``$batch``: up to 20 requests in one, with item-by-item retries.

Owns :class:`BatchItem` / :class:`BatchResult` and :meth:`BatchRequests.batch`: chunks of
``MAX_BATCH``, ``dependsOn`` within a chunk, items answered 429/5xx (or 404 right after a create)
sent again in a new batch, each item's answer told to the pacer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from twisted.logger import Logger

from ldapsync.graph.errors import RETRYABLE_STATUSES, GraphError, error_from_response
from ldapsync.graph.errors import parse_retry_after as _parse_retry_after
from ldapsync.graph.exchange import WRITE_METHODS, GraphTransport

__all__ = ["MAX_BATCH", "BatchItem", "BatchRequests", "BatchResult"]

log = Logger()
_warn = log.warn  # twisted.logger's name (not stdlib logging's .warning)

MAX_BATCH = 20


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


def _is_users_collection(url: str) -> bool:
    return urlsplit(url).path.rstrip("/").lower() in ("/users", "users")


class BatchRequests(GraphTransport):
    """``$batch`` on top of :class:`~ldapsync.graph.exchange.GraphTransport`."""

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
