"""Encryption at rest for secrets ldapsync must keep: the MSAL token cache and
queued passwords.

Owns the key file (``[secrets] key_file``: 32 random bytes, mode 0600, created
on first use) and :class:`SecretBox`, AES-256-GCM from ``cryptography``.
Sealed format::

    b"\\x01" (version) | 12-byte random nonce | ciphertext+16-byte tag

``aad`` (associated data) binds a blob to its purpose (e.g. ``b"token-cache"``
or a user id), so a blob copied to another row does not decrypt.  Nothing here
logs or prints key material or plaintext.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["KEY_SIZE", "DecryptionError", "SecretBox", "load_or_create_key"]

KEY_SIZE = 32
_VERSION = b"\x01"
_NONCE = 12


class DecryptionError(ValueError):
    """The blob is not ours, was tampered with, or was sealed with another key."""


class SecretBox:
    """AES-GCM sealing of byte strings with a version prefix."""

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_SIZE:
            raise ValueError(f"SecretBox needs a {KEY_SIZE}-byte key")
        self._aead = AESGCM(bytes(key))

    def __repr__(self) -> str:          # never show the key
        return "SecretBox(<key>)"

    def encrypt(self, plaintext: bytes, aad: bytes = b"") -> bytes:
        nonce = os.urandom(_NONCE)
        return _VERSION + nonce + self._aead.encrypt(nonce, bytes(plaintext), aad or None)

    def decrypt(self, blob: bytes, aad: bytes = b"") -> bytes:
        if not blob or blob[:1] != _VERSION:
            raise DecryptionError("unknown secret format (bad version prefix)")
        if len(blob) < 1 + _NONCE + 16:
            raise DecryptionError("sealed secret is truncated")
        nonce, ct = blob[1:1 + _NONCE], blob[1 + _NONCE:]
        try:
            return self._aead.decrypt(nonce, ct, aad or None)
        except InvalidTag:
            raise DecryptionError(
                "sealed secret does not decrypt: tampered with, or sealed with another key"
            ) from None


def _parse_key(data: bytes, path: Path) -> bytes:
    if len(data) == KEY_SIZE:
        return data
    # Admin-provided keys may be base64 text (e.g. `openssl rand -base64 32 > key`).
    try:
        decoded = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) == KEY_SIZE:
        return decoded
    raise ValueError(
        f"secret key file {path} must hold {KEY_SIZE} random bytes (or their base64); "
        f"it holds {len(data)} bytes"
    )


def load_or_create_key(path: str | os.PathLike[str]) -> bytes:
    """Read the key, or create it (32 random bytes, mode 0600, parent dir 0700).

    Creation is atomic and safe against a concurrent creator (server and CLI
    starting together): the key is written to a temporary file and linked into
    place only if no key exists yet; the loser reads the winner's key.
    """
    p = Path(path)
    try:
        return _parse_key(p.read_bytes(), p)
    except FileNotFoundError:
        pass
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".key-", dir=p.parent)   # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(KEY_SIZE))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        try:
            os.link(tmp, p)
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
    return _parse_key(p.read_bytes(), p)
