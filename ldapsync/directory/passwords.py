"""Password hashing, verification, generation and the complexity rule.

This module owns everything the directory does with a ``userPassword`` value:

* :class:`PasswordHasher` makes new hashes (argon2id only, in OpenLDAP's
  ``{ARGON2}`` format, so a dump loads into slapd with the argon2 module) and
  verifies every scheme an imported directory is likely to hold: ``{ARGON2}``,
  the salted and unsalted SHA family, ``{MD5}``/``{SMD5}``, ``{CRYPT}``, and
  cleartext values left behind by an old import.
* :func:`generate_password` makes random passwords that always pass
  :func:`check_complexity`, which mirrors Microsoft 365's default cloud rule
  (8–256 characters, three of four character classes, ASCII only).

Everything here is blocking and CPU-bound (argon2 is deliberately slow):
callers on the reactor thread must run it in a thread pool.  Nothing here logs,
and no exception or message ever contains a password or a hash.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import string
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

__all__ = [
    "HashParams",
    "PasswordHasher",
    "SUPPORTED_SCHEMES",
    "check_complexity",
    "generate_password",
]

# --- {CRYPT} backend ---------------------------------------------------------


def _load_crypt() -> ModuleType | None:
    """The stdlib ``crypt`` module (≤ 3.12), else ``legacycrypt`` (3.13+), else None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt as _crypt  # noqa: PLC0415  (deprecated, removed in 3.13)
        return _crypt
    except ImportError:
        pass
    try:
        import legacycrypt  # type: ignore[import-not-found]  # noqa: PLC0415

        return legacycrypt  # type: ignore[no-any-return]
    except ImportError:
        return None


_crypt_module: ModuleType | None = _load_crypt()


# --- salted/unsalted digest schemes -------------------------------------------

# scheme (upper case) -> (digest constructor, salted?)
_DIGEST_SCHEMES: dict[str, tuple[Callable[[], "hashlib._Hash"], bool]] = {
    "SHA": (hashlib.sha1, False),
    "SSHA": (hashlib.sha1, True),
    "SHA256": (hashlib.sha256, False),
    "SSHA256": (hashlib.sha256, True),
    "SHA384": (hashlib.sha384, False),
    "SSHA384": (hashlib.sha384, True),
    "SHA512": (hashlib.sha512, False),
    "SSHA512": (hashlib.sha512, True),
    "MD5": (hashlib.md5, False),
    "SMD5": (hashlib.md5, True),
}

#: Every scheme :meth:`PasswordHasher.verify` understands (upper case, no braces).
SUPPORTED_SCHEMES: frozenset[str] = frozenset({"ARGON2", "CRYPT", *_DIGEST_SCHEMES})

_SCHEME_RE = re.compile(r"\{([A-Za-z0-9._-]+)\}")


def _split_scheme(stored: str) -> tuple[str | None, str]:
    """``"{SSHA}abc"`` → ``("SSHA", "abc")``; a value without ``{...}`` → ``(None, value)``."""
    m = _SCHEME_RE.match(stored)
    if m is None:
        return None, stored
    return m.group(1).upper(), stored[m.end():]


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text.strip().encode("ascii"), validate=True)


@dataclass(frozen=True)
class HashParams:
    """How new hashes are made.  Defaults are OWASP's minimum for argon2id."""

    scheme: str = "argon2"  # only argon2 for new hashes
    time_cost: int = 2
    memory_cost_kib: int = 19456
    parallelism: int = 1


class PasswordHasher:
    """Hash new passwords with argon2id; verify any supported stored scheme."""

    def __init__(self, params: HashParams = HashParams()) -> None:
        if params.scheme.lower() != "argon2":
            raise ValueError(f"unsupported hash scheme for new passwords: {params.scheme!r} (only 'argon2')")
        self.params = params
        self._argon2 = argon2.PasswordHasher(
            time_cost=params.time_cost,
            memory_cost=params.memory_cost_kib,
            parallelism=params.parallelism,
            type=argon2.Type.ID,
        )

    # -- new hashes --------------------------------------------------------

    def hash(self, plaintext: bytes) -> str:
        """``{ARGON2}$argon2id$v=19$m=…,t=…,p=…$salt$hash`` (OpenLDAP's argon2 module format)."""
        return "{ARGON2}" + self._argon2.hash(plaintext)

    # -- verification ------------------------------------------------------

    def verify(self, stored: str, plaintext: bytes) -> bool:
        """True if ``plaintext`` matches ``stored``.  Never raises.

        Unknown schemes, malformed values, an empty stored value and an empty
        password all give False (an empty password is an unauthenticated bind
        in LDAP, never a credential).
        """
        try:
            if isinstance(stored, bytes):
                stored = stored.decode("utf-8")
            if not isinstance(stored, str) or not isinstance(plaintext, (bytes, bytearray)):
                return False
            if not stored or not plaintext:
                return False
            plaintext = bytes(plaintext)
            scheme, rest = _split_scheme(stored)
            if scheme is None:
                # Cleartext left by an old import.
                return hmac.compare_digest(stored.encode("utf-8"), plaintext)
            if scheme == "ARGON2":
                return self._verify_argon2(rest, plaintext)
            if scheme == "CRYPT":
                return _verify_crypt(rest, plaintext)
            if scheme in _DIGEST_SCHEMES:
                return _verify_digest(scheme, rest, plaintext)
            return False
        except Exception:  # noqa: BLE001 — garbage in, False out; never leak details
            return False

    def _verify_argon2(self, encoded: str, plaintext: bytes) -> bool:
        # argon2-cffi picks the variant (argon2id / argon2i / argon2d) from the
        # encoded string, so hashes made with other parameters verify too.
        if not encoded.startswith("$argon2"):
            return False
        try:
            return self._argon2.verify(encoded, plaintext)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    # -- classification ----------------------------------------------------

    def is_fast(self, stored: str) -> bool:
        """True when verifying against ``stored`` is one digest or a comparison (the SHA and MD5
        families, cleartext): microseconds, cheaper than handing it to a thread.  ``{ARGON2}``
        and ``{CRYPT}`` (whose cost the hash sets) are not; nor is anything unreadable."""
        if not isinstance(stored, str):
            return False
        if not stored.startswith("{"):
            return True
        scheme, _ = _split_scheme(stored)
        return scheme in _DIGEST_SCHEMES

    def is_hashed(self, value: str) -> bool:
        """True if ``value`` starts with a ``{SCHEME}`` this module knows."""
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                return False
        if not isinstance(value, str):
            return False
        scheme, _ = _split_scheme(value)
        return scheme in SUPPORTED_SCHEMES

    def needs_rehash(self, stored: str) -> bool:
        """True unless ``stored`` is argon2id made with the current parameters."""
        try:
            if isinstance(stored, bytes):
                stored = stored.decode("utf-8")
            scheme, rest = _split_scheme(stored)
            if scheme != "ARGON2" or not rest.startswith("$argon2id$"):
                return True
            return bool(self._argon2.check_needs_rehash(rest))
        except Exception:  # noqa: BLE001
            return True


def _verify_digest(scheme: str, encoded: str, plaintext: bytes) -> bool:
    factory, salted = _DIGEST_SCHEMES[scheme]
    try:
        raw = _b64decode(encoded)
    except (binascii.Error, ValueError):
        return False
    size = factory().digest_size
    if salted:
        if len(raw) <= size:  # OpenLDAP also insists on at least one salt byte
            return False
        digest, salt = raw[:size], raw[size:]
    else:
        if len(raw) != size:
            return False
        digest, salt = raw, b""
    h = factory()
    h.update(plaintext)
    h.update(salt)
    return hmac.compare_digest(h.digest(), digest)


def _verify_crypt(encoded: str, plaintext: bytes) -> bool:
    if _crypt_module is None or len(encoded) < 2:
        return False
    try:
        word = plaintext.decode("utf-8")
    except UnicodeDecodeError:
        return False
    if "\x00" in word:
        return False
    try:
        result = _crypt_module.crypt(word, encoded)
    except (ValueError, OSError, TypeError):
        return False
    if not result or len(result) < 2:
        return False
    return hmac.compare_digest(result.encode("utf-8"), encoded.encode("utf-8"))


# --- generation and complexity --------------------------------------------------

_LOWER = "abcdefghijkmnopqrstuvwxyz"  # no l
_UPPER = "ABCDEFGHJKLMNPQRSTUVWXYZ"  # no I, O
_DIGITS = "23456789"  # no 0, 1
_SYMBOLS = "!#$%*+-=?@^_~"  # shell-, URL- and LDIF-friendly subset of Microsoft's allowed symbols
_ALPHABET = _LOWER + _UPPER + _DIGITS + _SYMBOLS

MIN_LENGTH = 8
MAX_LENGTH = 256


def generate_password(length: int = 16) -> str:
    """A random ASCII password with lowercase, uppercase, digit and symbol.

    Always passes :func:`check_complexity`; ambiguous characters (``l I O 0 1``)
    are left out so it can be read aloud or off a screen.
    """
    if not MIN_LENGTH <= length <= MAX_LENGTH:
        raise ValueError(f"password length must be between {MIN_LENGTH} and {MAX_LENGTH}")
    chars = [
        secrets.choice(_LOWER),
        secrets.choice(_UPPER),
        secrets.choice(_DIGITS),
        secrets.choice(_SYMBOLS),
    ]
    chars += [secrets.choice(_ALPHABET) for _ in range(length - len(chars))]
    secrets.SystemRandom().shuffle(chars)
    return "".join(chars)


def check_complexity(password: str, min_length: int = MIN_LENGTH) -> str | None:
    """None if ``password`` passes Microsoft 365's default cloud rule, else why not.

    The rule: ``min_length`` (default 8) to 256 characters, ASCII only, no
    control characters, and at least 3 of lowercase, uppercase, digits and
    symbols.  The message names the rule and never echoes the password.
    """
    if len(password) < min_length:
        return f"must be at least {min_length} characters"
    if len(password) > MAX_LENGTH:
        return f"must be at most {MAX_LENGTH} characters"
    if not password.isascii():
        return "must not contain non-ASCII characters"
    if any(c not in string.printable or c in "\t\n\r\x0b\x0c" for c in password):
        return "must not contain control characters"
    classes = (
        any(c in string.ascii_lowercase for c in password)
        + any(c in string.ascii_uppercase for c in password)
        + any(c in string.digits for c in password)
        + any(not c.isalnum() for c in password)
    )
    if classes < 3:
        return "must contain at least 3 of: lowercase, uppercase, digits, symbols"
    return None
