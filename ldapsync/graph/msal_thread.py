"""What both token providers share: MSAL in a thread, a memoised token, one flight at a time.

Owns :class:`TokenProvider` (what the Graph client needs), :class:`_ThreadedMSAL` (thread pool,
the reactor's time, the memoised token and its early renewal, single flight), the ``requests`` session MSAL
gets when ``ca_bundle`` is set, and turning MSAL's results and exceptions into
:class:`~ldapsync.graph.errors.AuthError` (MSAL's error and first description line, never the
secret or a token).  :mod:`ldapsync.graph.token` and :mod:`ldapsync.graph.delegated` build on it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from ldapsync.graph.errors import AuthError, redact

if TYPE_CHECKING:
    import requests

__all__ = ["EARLY_RENEWAL", "TokenProvider", "make_requests_session"]

T = TypeVar("T")

#: Renew an access token this long before it expires (MSAL serves a cached one while > 5 min remain).
EARLY_RENEWAL = 300.0

_REAUTH_ERRORS = frozenset({"invalid_grant", "interaction_required", "consent_required",
                            "login_required", "no_account", "expired_token", "access_denied"})
_TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error", "connection_error",
                               "timeout"})
#: AADSTS codes of an application credential only an admin can renew: the client secret expired.
_EXPIRED_CREDENTIAL_CODES = frozenset({7000222})


@runtime_checkable
class TokenProvider(Protocol):
    """What :class:`~ldapsync.graph.client.GraphClient` needs."""

    async def get_token(self, force_refresh: bool = False, *, rejected_token: str | None = None) -> str:
        """A bearer token for Graph; ``force_refresh`` after a 401 (``rejected_token`` = the one refused)."""
        ...

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
    codes = {c for c in result.get("error_codes") or () if isinstance(c, int)}
    return AuthError(
        code, first, str(result.get("correlation_id") or ""),
        needs_reauthorization=(delegated and code in _REAUTH_ERRORS) or bool(codes & _EXPIRED_CREDENTIAL_CODES),
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
    """Shared plumbing: thread pool, the reactor's time, memoised token, single flight."""

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

