"""Delegated sign-in (``[office365] auth = "delegated"``): the device-code flow and its token cache.

Owns :class:`DelegatedTokenProvider`: an admin signs in once with the device-code flow
(:class:`DeviceFlow`); MSAL's ``SerializableTokenCache`` (refresh token) is kept sealed
(:class:`~ldapsync.secretbox.SecretBox`, bound to its purpose) in a
:class:`~ldapsync.graph.token_store.TokenCacheStore`; every later token comes from
``acquire_token_silent``.  The refresh token's expiry (90 days, sliding from the last time it was
redeemed) is tracked and persisted with the cache.  MSAL runs in a thread
(:mod:`ldapsync.graph.msal_thread`), and so do the store's methods.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ldapsync.clock import Clock, SystemClock
from ldapsync.graph.clouds import CloudEndpoints
from ldapsync.secretbox import DecryptionError, SecretBox
from ldapsync.graph.errors import AuthError
from ldapsync.graph.msal_thread import (
    _auth_error_from_exception,
    _auth_error_from_result,
    _ThreadedMSAL,
    make_requests_session,
)
from ldapsync.graph.token_store import TokenCacheStore

__all__ = ["REFRESH_TOKEN_LIFETIME", "DelegatedTokenProvider", "DeviceFlow"]

#: A delegated refresh token lives 90 days without use (sliding window).
REFRESH_TOKEN_LIFETIME = 90 * 86400.0
_CACHE_AAD = b"ldapsync/msal-token-cache/v1"


@dataclass(frozen=True)
class DeviceFlow:
    """A started device-code sign-in: print ``message``, then ``complete_device_flow``."""

    message: str
    user_code: str
    verification_uri: str
    expires_at: float
    raw: dict[str, Any] = field(repr=False, compare=False)


class DelegatedTokenProvider(_ThreadedMSAL):
    """Tokens of a signed-in admin (``auth = "delegated"``), refreshed silently."""

    def __init__(
        self,
        client_id: str,
        endpoints: CloudEndpoints,
        store: TokenCacheStore,
        box: SecretBox,
        *,
        ca_bundle: str | None = None,
        reactor: Any = None,
        threadpool: Any = None,
        timeout: float = 30.0,
        refresh_token_lifetime: float = REFRESH_TOKEN_LIFETIME,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(reactor=reactor, threadpool=threadpool)
        import msal  # type: ignore[import-untyped]

        self.client_id = client_id
        self.endpoints = endpoints
        self._store = store
        self._box = box
        self._ca_bundle = ca_bundle or None
        self._timeout = timeout
        self._rt_lifetime = refresh_token_lifetime
        # The policy clock (ldapsync/clock.py) dates the redemptions the 90-day expiry counts
        # from; without one, the real time (no test offset).
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._cache = msal.SerializableTokenCache()
        self._app: Any = None
        self._loaded_blob: bytes | None = None
        self._refreshed_at: float | None = None
        self._home_account_id: str | None = None
        self._lock = threading.RLock()
        self.username: str | None = None

    # -- persisted state

    @property
    def refresh_token_expires_at(self) -> datetime | None:
        """When the refresh token dies if unused: last redemption + 90 days (``None``: never signed in)."""
        if self._refreshed_at is None:
            return None
        return datetime.fromtimestamp(self._refreshed_at + self._rt_lifetime, tz=UTC)

    credential_expires_at = refresh_token_expires_at

    def _load_blocking(self) -> None:
        blob = self._store.load()
        if blob is None or blob == self._loaded_blob:
            return
        try:
            state = json.loads(self._box.decrypt(blob, aad=_CACHE_AAD).decode("utf-8"))
        except (DecryptionError, ValueError) as e:
            raise AuthError("token_cache_unreadable",
                            f"the stored sign-in cannot be read ({e}); sign in again",
                            needs_reauthorization=True) from None
        self._cache.deserialize(state.get("msal_cache") or "{}")
        self._refreshed_at = state.get("refreshed_at")
        self._home_account_id = state.get("home_account_id")
        self.username = state.get("username")
        self._loaded_blob = blob
        self.forget_token()

    def _save_blocking(self, force: bool = False) -> None:
        if not (force or self._cache.has_state_changed):
            return
        state = {
            "v": 1,
            "msal_cache": self._cache.serialize(),
            "refreshed_at": self._refreshed_at,
            "home_account_id": self._home_account_id,
            "username": self.username,
        }
        blob = self._box.encrypt(json.dumps(state).encode("utf-8"), aad=_CACHE_AAD)
        self._store.save(blob)
        self._loaded_blob = blob
        self._cache.has_state_changed = False

    def _load_locked(self) -> None:
        with self._lock:
            self._load_blocking()

    async def load(self) -> None:
        """Read the persisted sign-in (so ``refresh_token_expires_at`` is known at start-up)."""
        await self._in_thread(self._load_locked)

    # -- MSAL

    def _get_app(self) -> Any:
        if self._app is None:
            import msal  # type: ignore[import-untyped]

            kw: dict[str, Any] = {"authority": self.endpoints.authority, "token_cache": self._cache,
                                  "timeout": self._timeout}
            session = make_requests_session(self._ca_bundle)
            if session is not None:
                kw["http_client"] = session
            if not self.endpoints.is_microsoft_authority:
                kw["instance_discovery"] = False
            self._app = msal.PublicClientApplication(self.client_id, **kw)
        return self._app

    def reset(self) -> None:
        self._app = None
        self.forget_token()

    def _record_success(self, result: dict[str, Any], *, from_idp: bool) -> None:
        if from_idp:
            self._refreshed_at = self._clock.now()
        claims = result.get("id_token_claims") or {}
        if claims.get("preferred_username"):
            self.username = str(claims["preferred_username"])
        self._save_blocking(force=from_idp)

    def _initiate_blocking(self) -> dict[str, Any]:
        try:
            flow = self._get_app().initiate_device_flow(scopes=self.endpoints.scopes)
        except Exception as e:  # noqa: BLE001 - MSAL/requests raise many types; all become AuthError
            raise _auth_error_from_exception(e) from None
        if "user_code" not in flow:
            raise _auth_error_from_result(flow, delegated=False)
        return dict(flow)

    def _complete_blocking(self, flow: dict[str, Any]) -> dict[str, Any]:
        try:
            result = self._get_app().acquire_token_by_device_flow(flow)
        except Exception as e:  # noqa: BLE001 - MSAL/requests raise many types; all become AuthError
            raise _auth_error_from_exception(e) from None
        if not result or "access_token" not in result:
            raise _auth_error_from_result(result, delegated=False)
        with self._lock:
            return self._after_device_flow(result)

    def _after_device_flow(self, result: dict[str, Any]) -> dict[str, Any]:
        app = self._get_app()
        accounts = app.get_accounts()
        claims = result.get("id_token_claims") or {}
        chosen = None
        for a in accounts:
            if claims.get("oid") and a.get("local_account_id") == claims.get("oid"):
                chosen = a
        if chosen is None and accounts:
            chosen = accounts[0]
        self._home_account_id = chosen.get("home_account_id") if chosen else None
        if chosen and chosen.get("username"):
            self.username = chosen["username"]
        self._record_success(result, from_idp=True)
        return dict(result)

    def _silent_blocking(self, force: bool) -> dict[str, Any]:
        with self._lock:
            return self._silent_locked(force)

    def _silent_locked(self, force: bool) -> dict[str, Any]:
        self._load_blocking()
        try:
            app = self._get_app()
            accounts = app.get_accounts()
            account = next((a for a in accounts if a.get("home_account_id") == self._home_account_id), None)
            if account is None and accounts:
                account = accounts[0]
            if account is None:
                raise _auth_error_from_result(None, delegated=True)
            result = app.acquire_token_silent_with_error(
                self.endpoints.scopes, account=account, force_refresh=force)
        except AuthError:
            raise
        except Exception as e:  # noqa: BLE001 - MSAL/requests raise many types; all become AuthError
            raise _auth_error_from_exception(e) from None
        if not result or "access_token" not in result:
            err = _auth_error_from_result(result, delegated=True)
            if result is None:
                err = AuthError("no_refresh_token",
                                "the stored sign-in has no usable refresh token; run `ldapsync o365 authorize`",
                                needs_reauthorization=True)
            raise err
        from_idp = result.get("token_source") != "cache"
        self._record_success(result, from_idp=from_idp)
        return dict(result)

    # -- public

    async def initiate_device_flow(self) -> DeviceFlow:
        """Start a device-code sign-in; show ``flow.message`` to the admin."""
        flow = await self._in_thread(self._initiate_blocking)
        return DeviceFlow(
            message=str(flow.get("message") or ""),
            user_code=str(flow["user_code"]),
            verification_uri=str(flow.get("verification_uri") or flow.get("verification_url") or ""),
            expires_at=float(flow.get("expires_at") or 0),
            raw=flow,
        )

    async def complete_device_flow(self, flow: DeviceFlow) -> str:
        """Wait until the admin signed in (or the code expired); persist the cache; return the username."""
        result = await self._in_thread(self._complete_blocking, flow.raw)
        self._remember(result)
        return self.username or ""

    async def authorize(self, show: Callable[[str], object]) -> str:
        """The whole ``ldapsync o365 authorize``: start, ``show(message)``, wait, persist."""
        flow = await self.initiate_device_flow()
        show(flow.message)
        return await self.complete_device_flow(flow)

    async def get_token(self, force_refresh: bool = False, *, rejected_token: str | None = None) -> str:
        if force_refresh and rejected_token is not None and self._token not in (None, rejected_token) \
                and self._memo_valid():
            return self._token  # type: ignore[return-value]
        if not force_refresh and self._memo_valid():
            return self._token  # type: ignore[return-value]
        if force_refresh:
            self.forget_token()

        async def acquire() -> str:
            result = await self._in_thread(self._silent_blocking, force_refresh)
            return self._remember(result)

        return await self._flight.run(acquire)

