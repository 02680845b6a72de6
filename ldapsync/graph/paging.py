"""Reading collections from Graph: ``@odata.nextLink`` paging and delta rounds.

Owns :meth:`PagedRequests.paged`, :meth:`PagedRequests.delta` and :class:`DeltaQuery` (a delta
round, which hands back the ``@odata.deltaLink`` for the next one), and the guard against a
server that sends the same link again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from ldapsync.graph.errors import GraphError
from ldapsync.graph.exchange import DEFAULT_USER_SELECT, GraphTransport, _select

__all__ = ["DeltaQuery", "PagedRequests"]


class PagedRequests(GraphTransport):
    """Paging and delta on top of :class:`~ldapsync.graph.exchange.GraphTransport`."""

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


def _check_progress(current: str, next_link: str) -> None:
    if next_link == current:
        raise GraphError("PagingLoop", "Graph returned the same nextLink again; stopping to avoid a loop")


class DeltaQuery:
    """Async iterator over a delta round; ``delta_link`` is set once it is exhausted."""

    def __init__(self, client: GraphTransport, start: str) -> None:
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
