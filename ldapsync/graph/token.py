"""Access tokens for Microsoft Graph, from MSAL, run in a thread.

Owns the two sign-in modes of ``[office365] auth`` and nothing else (no HTTP
to Graph, no database):

- ``application``: :class:`ApplicationTokenProvider`, client credentials with a
  client secret or a certificate (PEM holding key + certificate, or PFX with a
  password file).  MSAL's in-memory cache plus a small memo keep the token
  until shortly before it expires; ``force_refresh`` (after a 401) drops both.
- ``delegated``: :class:`DelegatedTokenProvider`, an admin signs in once with
  the device-code flow; MSAL's ``SerializableTokenCache`` (refresh token) is
  persisted encrypted (:class:`~ldapsync.graph.crypto.SecretBox`) through a
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
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ldapsync.graph.clouds import CloudEndpoints, endpoints_from_config
from ldapsync.graph.crypto import DecryptionError, SecretBox
from ldapsync.graph.errors import AuthError, redact

if TYPE_CHECKING:
    import requests

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
T = TypeVar("T")

#: A delegated refresh token lives 90 days without use (sliding window).
REFRESH_TOKEN_LIFETIME = 90 * 86400.0
#: Renew an access token this long before it expires (MSAL serves a cached one while > 5 min remain).
EARLY_RENEWAL = 300.0
_CACHE_AAD = b"ldapsync/msal-token-cache/v1"

_REAUTH_ERRORS = frozenset({"invalid_grant", "interaction_required", "consent_required",
                            "login_required", "no_account", "expired_token", "access_denied"})
_TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error", "connection_error",
                               "timeout"})


# --------------------------------------------------------------------------- protocols

@runtime_checkable
class TokenProvider(Protocol):
    """What :class:`~ldapsync.graph.client.GraphClient` needs."""

    async def get_token(self, force_refresh: bool = False, *, rejected_token: str | None = None) -> str:
        """A bearer token for Graph; ``force_refresh`` after a 401 (``rejected_token`` = the one refused)."""
        ...


@runtime_checkable
class TokenCacheStore(Protocol):
    """Where the delegated mode's encrypted MSAL cache lives (the database, later).

    Both methods are called from a worker thread, never on the reactor thread,
    and may block.  The blob is opaque ciphertext.
    """

    def load(self) -> bytes | None: ...

    def save(self, blob: bytes) -> None: ...


class FileTokenCacheStore:
    """A :class:`TokenCacheStore` in one file (mode 0600, replaced atomically)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def save(self, blob: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".tokcache-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise


class MemoryTokenCacheStore:
    """A :class:`TokenCacheStore` in memory (tests, dry runs)."""

    def __init__(self, blob: bytes | None = None) -> None:
        self.blob = blob
        self.saves = 0

    def load(self) -> bytes | None:
        return self.blob

    def save(self, blob: bytes) -> None:
        self.blob = blob
        self.saves += 1


# --------------------------------------------------------------------------- credentials

@dataclass(frozen=True)
class ClientCredential:
    """An app credential in the shape MSAL's ``client_credential`` takes.

    ``kind`` is ``"secret"`` or ``"certificate"``; ``expires_at`` is the
    certificate's notAfter (unknown for a secret: Graph or config has it).
    """

    kind: str
    value: str | dict[str, str] = field(repr=False)
    thumbprint: str = ""
    expires_at: datetime | None = None

    def __repr__(self) -> str:
        return f"ClientCredential(kind={self.kind!r}, thumbprint={self.thumbprint!r}, expires_at={self.expires_at!r})"


def _read_text_strip_newline(path: str) -> str:
    text = Path(path).read_text(encoding="utf-8")
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith("\n"):
        return text[:-1]
    return text


def load_client_credential(
    *,
    client_secret_file: str = "",
    certificate_file: str = "",
    certificate_thumbprint: str = "",
    certificate_password_file: str = "",
) -> ClientCredential:
    """Read the app credential named by config (blocking file I/O; call at start-up).

    - ``client_secret_file``: the secret, one trailing newline ignored.
    - ``certificate_file`` ending ``.pfx``/``.p12``: PKCS#12 (password from
      ``certificate_password_file``); otherwise PEM holding the private key and
      the certificate (or only the key, with ``certificate_thumbprint``).
      The SHA-1 thumbprint shown in the Entra portal is computed from the
      certificate when not given.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    if client_secret_file and certificate_file:
        raise ValueError("[office365]: give client_secret_file or certificate_file, not both")
    if client_secret_file:
        try:
            secret = _read_text_strip_newline(client_secret_file)
        except OSError as e:
            raise ValueError(f"[office365] client_secret_file: cannot read {client_secret_file}: {e.strerror}") from None
        if not secret:
            raise ValueError(f"[office365] client_secret_file: {client_secret_file} is empty")
        return ClientCredential("secret", secret)
    if not certificate_file:
        raise ValueError("[office365]: application mode needs client_secret_file or certificate_file")

    password: bytes | None = None
    if certificate_password_file:
        try:
            password = _read_text_strip_newline(certificate_password_file).encode("utf-8")
        except OSError as e:
            raise ValueError(
                f"[office365] certificate_password_file: cannot read {certificate_password_file}: {e.strerror}"
            ) from None
    try:
        data = Path(certificate_file).read_bytes()
    except OSError as e:
        raise ValueError(f"[office365] certificate_file: cannot read {certificate_file}: {e.strerror}") from None

    cert = None
    try:
        if certificate_file.lower().endswith((".pfx", ".p12")):
            key, cert, _extra = pkcs12.load_key_and_certificates(data, password)
            if key is None:
                raise ValueError("the PKCS#12 file holds no private key")
        else:
            key = serialization.load_pem_private_key(data, password)
            certs = x509.load_pem_x509_certificates(data) if b"-----BEGIN CERTIFICATE" in data else []
            pub = key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            for c in certs:
                if c.public_key().public_bytes(
                        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == pub:
                    cert = c
                    break
            if certs and cert is None:
                raise ValueError("no certificate in the file matches its private key")
    except (ValueError, TypeError) as e:
        raise ValueError(f"[office365] certificate_file {certificate_file}: {e}") from None

    thumbprint = certificate_thumbprint.replace(":", "").strip()
    if not thumbprint:
        if cert is None:
            raise ValueError(
                f"[office365] certificate_file {certificate_file} holds no certificate; "
                "add it to the file or set certificate_thumbprint")
        thumbprint = cert.fingerprint(hashes.SHA1()).hex()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")
    expires = cert.not_valid_after_utc if cert is not None else None
    return ClientCredential(
        "certificate", {"private_key": key_pem, "thumbprint": thumbprint.upper()},
        thumbprint=thumbprint.upper(), expires_at=expires)


def credential_from_config(cfg: Office365Config) -> ClientCredential:
    return load_client_credential(
        client_secret_file=cfg.client_secret_file,
        certificate_file=cfg.certificate_file,
        certificate_thumbprint=cfg.certificate_thumbprint,
        certificate_password_file=cfg.certificate_password_file,
    )


def make_requests_session(ca_bundle: str | None) -> requests.Session | None:
    """A session trusting the public roots plus ``ca_bundle``, immune to REQUESTS_CA_BUNDLE (psf/requests#3829)."""
    if not ca_bundle:
        return None
    import requests

    from ldapsync.graph.tls import mount_trust

    s = requests.Session()
    s.trust_env = False
    mount_trust(s, ca_bundle)       # in memory: no CA file another user could plant
    return s


# --------------------------------------------------------------------------- helpers

class _SingleFlight:
    """Concurrent callers share one in-flight acquisition."""

    def __init__(self) -> None:
        self._waiters: list[Deferred[Any]] | None = None

    async def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        if self._waiters is not None:
            d: Deferred[T] = Deferred()
            self._waiters.append(d)
            return await d
        self._waiters = []
        try:
            result = await fn()
        except BaseException as e:
            waiters, self._waiters = self._waiters, None
            for w in waiters:
                w.errback(Failure(e))
            raise
        waiters, self._waiters = self._waiters, None
        for w in waiters:
            w.callback(result)
        return result


def _auth_error_from_result(result: dict[str, Any] | None, *, delegated: bool) -> AuthError:
    if not result:
        return AuthError("no_account", "no signed-in account in the token cache; run `ldapsync o365 authorize`",
                         needs_reauthorization=delegated)
    code = str(result.get("error") or "unknown_error")
    desc = str(result.get("error_description") or "")
    # AADSTS descriptions carry a trace/correlation id and timestamp on extra lines; keep line one.
    first = desc.strip().splitlines()[0] if desc.strip() else ""
    return AuthError(
        code, first, str(result.get("correlation_id") or ""),
        needs_reauthorization=delegated and code in _REAUTH_ERRORS,
        transient=code in _TRANSIENT_ERRORS,
    )


def _auth_error_from_exception(e: BaseException) -> AuthError:
    import requests

    if isinstance(e, AuthError):
        return e
    text = redact(str(e).splitlines()[0] if str(e) else type(e).__name__)
    if isinstance(e, requests.exceptions.SSLError):
        return AuthError("tls_error", f"TLS failure talking to the identity provider: {text}", transient=True)
    if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return AuthError("connection_error", f"identity provider unreachable: {text}", transient=True)
    if isinstance(e, requests.exceptions.RequestException):
        return AuthError("http_error", text, transient=True)
    transient = any(f"HTTP Error: {c}" in str(e) for c in ("429", "500", "502", "503", "504"))
    return AuthError(type(e).__name__, text, transient=transient)


class _ThreadedMSAL:
    """Shared plumbing: thread pool, clock, memoised token, single flight."""

    def __init__(self, *, reactor: Any = None, threadpool: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as _r
            reactor = _r
        self._reactor = reactor
        self._threadpool = threadpool
        self._token: str | None = None
        self._token_expires = 0.0
        self._flight = _SingleFlight()

    def _in_thread(self, fn: Callable[..., T], *a: Any, **kw: Any) -> Deferred[T]:
        if self._threadpool is not None:
            return threads.deferToThreadPool(self._reactor, self._threadpool, fn, *a, **kw)
        return threads.deferToThread(fn, *a, **kw)

    def _now(self) -> float:
        return float(self._reactor.seconds())

    def _memo_valid(self) -> bool:
        return self._token is not None and self._now() < self._token_expires - EARLY_RENEWAL

    def _remember(self, result: dict[str, Any]) -> str:
        token = str(result["access_token"])
        self._token = token
        self._token_expires = self._now() + float(result.get("expires_in") or 0)
        return token

    def forget_token(self) -> None:
        self._token = None
        self._token_expires = 0.0


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


# --------------------------------------------------------------------------- delegated

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
        wall_clock: Callable[[], float] = time.time,
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
        self._wall = wall_clock
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
            self._refreshed_at = self._wall()
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


# --------------------------------------------------------------------------- wiring

def token_provider_from_config(
    cfg: Office365Config,
    *,
    store: TokenCacheStore | None = None,
    box: SecretBox | None = None,
    reactor: Any = None,
    threadpool: Any = None,
) -> ApplicationTokenProvider | DelegatedTokenProvider:
    """Build the provider ``[office365] auth`` asks for (reads credential files: call at start-up)."""
    endpoints = endpoints_from_config(cfg)
    if cfg.auth == "delegated":
        if store is None or box is None:
            raise ValueError("delegated mode needs a TokenCacheStore and a SecretBox")
        return DelegatedTokenProvider(cfg.client_id, endpoints, store, box, ca_bundle=cfg.ca_bundle or None,
                                      reactor=reactor, threadpool=threadpool)
    return ApplicationTokenProvider(cfg.client_id, endpoints, credential_from_config(cfg),
                                    ca_bundle=cfg.ca_bundle or None, reactor=reactor, threadpool=threadpool)
