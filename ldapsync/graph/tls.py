"""Which CAs the connector trusts: the usual public ones plus ``[office365] ca_bundle``.

``ca_bundle`` *adds* a trusted CA (a TLS-inspecting proxy, a sovereign-cloud
gateway, the fake tenant): both MSAL (requests) and the Graph client (treq)
trust certifi's public roots and every certificate in that file.

Nothing is written to disk: requests (MSAL) gets an ``ssl.SSLContext`` built
in memory from those certificates (:func:`mount_trust`).  A combined file in
a shared directory (``/tmp/ldapsync-ca-<hash>.pem``, as before) had a
predictable name: another local user could plant it first and make MSAL trust
only their CA.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

_BEGIN = b"-----BEGIN CERTIFICATE-----"
_END = b"-----END CERTIFICATE-----"


def pem_blocks(pem: bytes) -> list[bytes]:
    return [_BEGIN + part.split(_END)[0] + _END + b"\n" for part in pem.split(_BEGIN)[1:] if _END in part]


def extra_pem(ca_bundle: str) -> bytes:
    data = Path(ca_bundle).read_bytes()
    if not pem_blocks(data):
        raise ValueError(f"ca_bundle {ca_bundle} holds no PEM certificate")
    return data


def public_pem() -> bytes:
    import certifi

    return Path(certifi.where()).read_bytes()


def trusted_blocks(ca_bundle: str) -> list[bytes]:
    """certifi's roots followed by the certificates of ``ca_bundle``."""
    return pem_blocks(public_pem()) + pem_blocks(extra_pem(ca_bundle))


def trust_context(ca_bundle: str) -> ssl.SSLContext:
    """A client context (hostname check, certificate required) trusting certifi's roots plus
    ``ca_bundle``, built in memory."""
    ctx = ssl.create_default_context(cadata=b"".join(trusted_blocks(ca_bundle)).decode("ascii"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    return ctx


def mount_trust(session: Any, ca_bundle: str) -> None:
    """Make the ``requests.Session`` verify https:// with :func:`trust_context` (no CA file read at
    connect time; set ``trust_env = False`` too, or REQUESTS_CA_BUNDLE wins: psf/requests#3829)."""
    from requests.adapters import HTTPAdapter

    ctx = trust_context(ca_bundle)

    class _TrustAdapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> Any:
            kwargs["ssl_context"] = ctx
            return super().init_poolmanager(*args, **kwargs)

        def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
            kwargs["ssl_context"] = ctx
            return super().proxy_manager_for(proxy, **kwargs)

        def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
            super().cert_verify(conn, url, verify, cert)
            if verify:            # the context holds the roots: no bundle file on top of them
                conn.ca_certs = None
                conn.ca_cert_dir = None

    session.verify = True
    session.mount("https://", _TrustAdapter())
