"""The app credential of ``[office365] auth = "application"``: a client secret or a certificate.

Owns reading it from the files config names (:func:`load_client_credential`, blocking: call at
start-up) into :class:`ClientCredential`, the shape MSAL's ``client_credential`` takes.  The
secret and the private key never appear in a repr, log line or error message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

if TYPE_CHECKING:
    from ldapsync.config import Office365Config

__all__ = ["ClientCredential", "credential_from_config", "load_client_credential"]


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
