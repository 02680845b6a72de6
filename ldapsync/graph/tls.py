"""Which CAs the connector trusts: the usual public ones plus ``[office365] ca_bundle``.

``ca_bundle`` *adds* a trusted CA (a TLS-inspecting proxy, a sovereign-cloud
gateway, the fake tenant): both MSAL (requests) and the Graph client (treq)
trust certifi's public roots and every certificate in that file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

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


def combined_bundle_file(ca_bundle: str) -> str:
    """A PEM file (cached by content) with certifi's roots plus ``ca_bundle``, for requests' ``verify=``."""
    data = public_pem() + b"\n" + extra_pem(ca_bundle)
    name = f"ldapsync-ca-{hashlib.sha256(data).hexdigest()[:16]}.pem"
    path = Path(tempfile.gettempdir()) / name
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return str(path)
