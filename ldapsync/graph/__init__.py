"""Microsoft Graph: the treq client and the MSAL token provider.

Owns talking to Microsoft 365 (HTTP, tokens, clouds, encryption of stored
tokens).  Knows no database and no LDAP: ``graph/`` never imports ``store/``,
``ldap/`` or ``directory/``; the sync layer drives it.

    clouds.py   cloud name → authority + Graph URL + scope
    crypto.py   SecretBox (AES-GCM) and the [secrets] key file
    token.py    ApplicationTokenProvider / DelegatedTokenProvider (MSAL in a thread)
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
