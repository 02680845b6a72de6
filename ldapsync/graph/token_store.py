"""Where the delegated mode's encrypted MSAL token cache is kept.

Owns :class:`TokenCacheStore` (the interface :class:`~ldapsync.graph.delegated.DelegatedTokenProvider`
saves its sealed cache through) and two stores: one file (mode 0600, replaced atomically) and
memory.  The blob is opaque ciphertext (sealed by the provider); nothing here decrypts it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Protocol, runtime_checkable

__all__ = ["FileTokenCacheStore", "MemoryTokenCacheStore", "TokenCacheStore"]


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
