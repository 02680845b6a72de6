"""Encryption at rest for secrets ldapsync must keep: the MSAL token cache and
queued passwords.

Owns the key file (``[secrets] key_file``: 32 random bytes, mode 0600, created
on first use) and :class:`SecretBox`, AES-256-GCM from ``cryptography``.
Sealed format::

    version byte | 12-byte random nonce | ciphertext+16-byte tag

    b"\\x02": sealed with non-empty associated data; decrypts only with that same ``aad``
    b"\\x01": sealed with the ``aad`` the caller gave, possibly none (what every blob was
            before version 2; still read)

``aad`` (associated data) binds a blob to its purpose (e.g. ``b"token-cache"``
or a user id), so a blob copied to another row does not decrypt.  Queued
passwords are bound to their user's entryUUID (:meth:`SecretBox.seal_password`):
a password row's secret copied to another user's row cannot be delivered as that
user's password.  Rows queued by earlier versions carry version 1 blobs without
``aad``; :meth:`SecretBox.open_password` still opens those (so an upgrade loses no
queued password), and no version 1 password blob is written any more, so that
window closes as the old rows are delivered.  Nothing here logs or prints key
material or plaintext.
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
_VERSION = b"\x01"          # the caller's aad, possibly none
_BOUND = b"\x02"            # non-empty aad, required to decrypt
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
        return (_BOUND if aad else _VERSION) + nonce + self._aead.encrypt(nonce, bytes(plaintext), aad or None)

    def decrypt(self, blob: bytes, aad: bytes = b"", *, unbound_ok: bool = False) -> bytes:
        """Open ``blob``.  A version 2 blob needs the ``aad`` it was sealed with; with ``unbound_ok``
        a version 1 blob sealed without any is accepted too (rows written before version 2)."""
        version = blob[:1]
        if version not in (_VERSION, _BOUND):
            raise DecryptionError("unknown secret format (bad version prefix)")
        if version == _BOUND and not aad:
            raise DecryptionError("sealed secret is bound to associated data and none was given")
        if len(blob) < 1 + _NONCE + 16:
            raise DecryptionError("sealed secret is truncated")
        nonce, ct = blob[1:1 + _NONCE], blob[1 + _NONCE:]
        tries = [aad or None]
        if version == _VERSION and unbound_ok and aad:
            tries.append(None)
        for use in tries:
            try:
                return self._aead.decrypt(nonce, ct, use)
            except InvalidTag:
                continue
        raise DecryptionError(
            "sealed secret does not decrypt: tampered with, sealed for another user, or with another key"
        )

    def seal_password(self, password: bytes, entry_uuid: str) -> bytes:
        """A queued password, bound to its user (entryUUID)."""
        return self.encrypt(password, password_aad(entry_uuid))

    def open_password(self, blob: bytes, entry_uuid: str) -> bytes:
        """The queued password of the user ``entry_uuid``; also a version 1 row from before binding."""
        return self.decrypt(blob, password_aad(entry_uuid), unbound_ok=True)


def password_aad(entry_uuid: str) -> bytes:
    """The associated data of a queued password: its purpose and its user."""
    return b"o365-password:" + entry_uuid.encode("utf-8")


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
