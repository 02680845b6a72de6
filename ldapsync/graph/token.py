"""Access tokens for Microsoft Graph, from MSAL, run in a thread.

Owns the two sign-in modes of ``[office365] auth`` and nothing else (no HTTP
to Graph, no database):

- ``application``: :class:`ApplicationTokenProvider`, client credentials with a
  client secret or a certificate (PEM holding key + certificate, or PFX with a
  password file).  MSAL's in-memory cache plus a small memo keep the token
  until shortly before it expires; ``force_refresh`` (after a 401) drops both.
- ``delegated``: :class:`DelegatedTokenProvider`, an admin signs in once with
  the device-code flow; MSAL's ``SerializableTokenCache`` (refresh token) is
  persisted encrypted (:class:`~ldapsync.secretbox.SecretBox`) through a
  :class:`TokenCacheStore`; every later token comes from
  ``acquire_token_silent``.  The refresh token's expiry (90 days, sliding from
  the last time it was redeemed) is tracked and persisted with the cache.

MSAL is blocking (``requests``), including its constructor (OIDC discovery),
so every MSAL call runs in a thread pool; ``TokenCacheStore`` methods are
called from that thread too.  When ``ca_bundle`` is set MSAL gets a
``requests.Session`` trusting the public roots plus ``ca_bundle`` (an in-memory
SSL context, ``graph/tls.py``) and ``trust_env=False`` so that
``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` cannot override it.  Failures become
:class:`~ldapsync.graph.errors.AuthError` carrying MSAL's error and
error_description, never the secret or a token.

This module holds the application provider and :func:`token_provider_from_config`, and
re-exports the rest, which lives by responsibility in:

    msal_thread.py   TokenProvider; MSAL in a thread, memoised token, single flight, AuthError mapping
    delegated.py     DelegatedTokenProvider and the device-code flow; the sealed cache's contents
    token_store.py   TokenCacheStore: where the sealed cache is kept (file, memory)
    credentials.py   ClientCredential: the client secret or certificate read from config
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from ldapsync.clock import Clock
from ldapsync.graph.clouds import CloudEndpoints, endpoints_from_config
from ldapsync.graph.credentials import ClientCredential, credential_from_config, load_client_credential
from ldapsync.secretbox import SecretBox
from ldapsync.graph.delegated import REFRESH_TOKEN_LIFETIME, DelegatedTokenProvider, DeviceFlow
from ldapsync.graph.msal_thread import (
    TokenProvider,
    _auth_error_from_exception,
    _auth_error_from_result,
    _ThreadedMSAL,
    make_requests_session,
)
from ldapsync.graph.token_store import FileTokenCacheStore, MemoryTokenCacheStore, TokenCacheStore

if TYPE_CHECKING:
    from ldapsync.config import Office365Config

__all__ = [
    "REFRESH_TOKEN_LIFETIME",
    "ApplicationTokenProvider",
    "ClientCredential",
    "DelegatedTokenProvider",
    "DeviceFlow",
    "FileTokenCacheStore",
    "MemoryTokenCacheStore",
    "TokenCacheStore",
    "TokenProvider",
    "load_client_credential",
    "make_requests_session",
    "token_provider_from_config",
]

log = Logger()


# --------------------------------------------------------------------------- application

class ApplicationTokenProvider(_ThreadedMSAL):
    """Client-credentials tokens (``auth = "application"``)."""

    def __init__(
        self,
        client_id: str,
        endpoints: CloudEndpoints,
        credential: ClientCredential,
        *,
        ca_bundle: str | None = None,
        reactor: Any = None,
        threadpool: Any = None,
        timeout: float = 30.0,
        app_factory: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__(reactor=reactor, threadpool=threadpool)
        self.client_id = client_id
        self.endpoints = endpoints
        self._credential = credential
        self._ca_bundle = ca_bundle or None
        self._timeout = timeout
        self._app_factory = app_factory
        self._app: Any = None

    @property
    def credential_expires_at(self) -> datetime | None:
        """The certificate's end date (``None`` for a client secret)."""
        return self._credential.expires_at

    def reset(self, credential: ClientCredential | None = None) -> None:
        """Drop the MSAL application (and its replay cache of errors), e.g. after the secret changed."""
        if credential is not None:
            self._credential = credential
        self._app = None
        self.forget_token()

    def _build_app(self) -> Any:
        import msal  # type: ignore[import-untyped]

        kw: dict[str, Any] = {
            "client_credential": self._credential.value,
            "authority": self.endpoints.authority,
            "timeout": self._timeout,
        }
        session = make_requests_session(self._ca_bundle)
        if session is not None:
            kw["http_client"] = session
        if not self.endpoints.is_microsoft_authority:
            kw["instance_discovery"] = False
        factory = self._app_factory or msal.ConfidentialClientApplication
        return factory(self.client_id, **kw)

    def _acquire_blocking(self, force: bool) -> dict[str, Any]:
        try:
            if self._app is None:
                self._app = self._build_app()
            app = self._app
            if force:
                app.remove_tokens_for_client()
            result = app.acquire_token_for_client(scopes=self.endpoints.scopes)
        except Exception as e:  # noqa: BLE001 - MSAL/requests raise many types; all become AuthError
            raise _auth_error_from_exception(e) from None
        if not result or "access_token" not in result:
            raise _auth_error_from_result(result, delegated=False)
        return dict(result)

    async def get_token(self, force_refresh: bool = False, *, rejected_token: str | None = None) -> str:
        if force_refresh and rejected_token is not None and self._token not in (None, rejected_token) \
                and self._memo_valid():
            return self._token  # type: ignore[return-value]  # someone already refreshed
        if not force_refresh and self._memo_valid():
            return self._token  # type: ignore[return-value]
        if force_refresh:
            self.forget_token()

        async def acquire() -> str:
            result = await self._in_thread(self._acquire_blocking, force_refresh)
            log.debug("Graph app token acquired (source {source}, expires in {expires_in}s)",
                      source=result.get("token_source", "?"), expires_in=result.get("expires_in"))
            return self._remember(result)

        return await self._flight.run(acquire)

    async def check(self) -> None:
        """Acquire a token now (``ldapsync o365 authorize`` in application mode)."""
        await self.get_token(force_refresh=True)

# --------------------------------------------------------------------------- wiring

def token_provider_from_config(
    cfg: Office365Config,
    *,
    store: TokenCacheStore | None = None,
    box: SecretBox | None = None,
    reactor: Any = None,
    threadpool: Any = None,
    clock: Clock | None = None,
) -> ApplicationTokenProvider | DelegatedTokenProvider:
    """Build the provider ``[office365] auth`` asks for (reads credential files: call at start-up).

    ``clock`` (the policy clock, ldapsync/clock.py) dates the delegated sign-in's refresh-token
    redemptions, from which its 90-day expiry is counted; the connector passes its own."""
    endpoints = endpoints_from_config(cfg)
    if cfg.auth == "delegated":
        if store is None or box is None:
            raise ValueError("delegated mode needs a TokenCacheStore and a SecretBox")
        return DelegatedTokenProvider(cfg.client_id, endpoints, store, box, ca_bundle=cfg.ca_bundle or None,
                                      reactor=reactor, threadpool=threadpool,
                                      clock=clock)
    return ApplicationTokenProvider(cfg.client_id, endpoints, credential_from_config(cfg),
                                    ca_bundle=cfg.ca_bundle or None, reactor=reactor, threadpool=threadpool)
