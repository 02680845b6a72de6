"""Microsoft Graph: the treq client and the MSAL token provider.

Owns talking to Microsoft 365 (HTTP, tokens, clouds).  Stored tokens are sealed with
``ldapsync/secretbox.py``, which the queued passwords use too.  Knows no database and no LDAP: ``graph/`` never imports ``store/``,
``ldap/`` or ``directory/``; the sync layer drives it.

    clouds.py   cloud name → authority + Graph URL + scope
    token.py    ApplicationTokenProvider, token_provider_from_config (MSAL in a thread:
                msal_thread.py; delegated.py device-code sign-in; token_store.py,
                credentials.py)
    client.py   GraphClient (retry, Retry-After, 401 refresh, paging, delta, $batch, pacing)
    errors.py   GraphError and its subclasses
"""

from ldapsync.graph.errors import (  # noqa: F401
    AlreadyExists,
    AuthError,
    BadRequest,
    DeltaExpired,
    Forbidden,
    GraphError,
    NotFound,
    ObjectConflict,
    Transient,
    Unauthorized,
)
