"""The Microsoft Graph client: treq over one persistent connection pool.

Owns :class:`GraphClient`, what callers use for every HTTP exchange with Graph, and its typed
user/domain/organization/application helpers.  It knows no database and no LDAP; callers (the
sync worker, importer, reconciler, CLI) get dicts and typed exceptions.  Raw treq/Twisted
exceptions never leave the client.  The rest lives by responsibility (and is re-exported here):

    exchange.py   one request: URLs, JSON, retries, 401 refresh, 404 after create, pacing,
                  errors (GraphTransport, RetryPolicy, GraphResponse, make_agent)
    paging.py     @odata.nextLink paging and delta rounds (DeltaQuery)
    batch.py      $batch (BatchItem, BatchResult)
    pacing.py     the write pacer (PacingPolicy, WritePacer)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any
from urllib.parse import quote

from ldapsync.graph.batch import (
    MAX_BATCH,  # noqa: F401 - names of the single module this was, still importable from here
    BatchItem,
    BatchRequests,
    BatchResult,
)
from ldapsync.graph.errors import NotFound
from ldapsync.graph.exchange import (
    DEFAULT_USER_SELECT,
    DOMAIN_SELECT,
    MAX_CONNECTIONS,  # noqa: F401
    WRITE_METHODS,  # noqa: F401
    GraphResponse,
    RetryPolicy,
    _parse_retry_after,  # noqa: F401
    _select,
    make_agent,
)
from ldapsync.graph.pacing import PacingPolicy, WritePacer
from ldapsync.graph.paging import DeltaQuery, PagedRequests

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

class GraphClient(BatchRequests, PagedRequests):
    """Async Microsoft Graph client (``async def`` methods; run under Twisted's reactor).

    ``http`` (a treq ``HTTPClient``-like object, e.g. ``treq.testing.StubTreq``)
    replaces the real pool for tests; ``reactor`` may be a ``task.Clock`` then.
    """

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

