"""Tests for ldapsync.directory.passwords."""

from __future__ import annotations

import base64
import hashlib
import os
import string
import sys

import argon2
import pytest

from ldapsync.directory import passwords
from ldapsync.directory.passwords import (
    HashParams,
    PasswordHasher,
    check_complexity,
    generate_password,
)

# The module the product verifies {CRYPT} with (the standard library's crypt up to 3.12,
# legacycrypt from 3.13): the tests use the same one, so they run, and do not skip, on 3.13+.
crypt = passwords._crypt_module

PW = b"correct horse battery staple"
WRONG = b"correct horse battery stapler"

# cheap parameters so the suite stays fast; the defaults are tested once below
FAST = HashParams(time_cost=1, memory_cost_kib=1024, parallelism=1)


@pytest.fixture(scope="module")
def hasher() -> PasswordHasher:
    return PasswordHasher(FAST)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def salted(scheme: str, algo: str, pw: bytes, salt: bytes) -> str:
    return "{" + scheme + "}" + b64(hashlib.new(algo, pw + salt).digest() + salt)


def unsalted(scheme: str, algo: str, pw: bytes) -> str:
    return "{" + scheme + "}" + b64(hashlib.new(algo, pw).digest())


# --- argon2 -------------------------------------------------------------------


def test_default_params_are_owasp_minimum() -> None:
    p = HashParams()
    assert (p.scheme, p.time_cost, p.memory_cost_kib, p.parallelism) == ("argon2", 2, 19456, 1)


def test_round_trip_default_params() -> None:
    h = PasswordHasher()
    stored = h.hash(PW)
    assert stored.startswith("{ARGON2}$argon2id$v=19$m=19456,t=2,p=1$")
    assert h.verify(stored, PW)
    assert not h.verify(stored, WRONG)
    assert not h.needs_rehash(stored)
    assert h.is_hashed(stored)


def test_hash_format_is_openldap_argon2(hasher: PasswordHasher) -> None:
    stored = hasher.hash(PW)
    scheme, encoded = stored[:8], stored[8:]
    assert scheme == "{ARGON2}"
    parts = encoded.split("$")
    # ['', 'argon2id', 'v=19', 'm=1024,t=1,p=1', salt, hash]
    assert parts[:4] == ["", "argon2id", "v=19", "m=1024,t=1,p=1"]
    assert len(parts) == 6
    assert "=" not in parts[4] + parts[5]  # unpadded base64, as OpenLDAP writes it
    assert hasher.hash(PW) != stored  # random salt


def test_argon2_scheme_case_insensitive(hasher: PasswordHasher) -> None:
    stored = hasher.hash(PW)
    assert hasher.verify("{argon2}" + stored[8:], PW)
    assert hasher.verify("{Argon2}" + stored[8:], PW)


def test_argon2i_and_other_params_verify(hasher: PasswordHasher) -> None:
    other = argon2.PasswordHasher(time_cost=3, memory_cost=2048, parallelism=2, type=argon2.Type.I)
    stored = "{ARGON2}" + other.hash(PW)
    assert stored.startswith("{ARGON2}$argon2i$")
    assert hasher.verify(stored, PW)
    assert not hasher.verify(stored, WRONG)
    assert hasher.needs_rehash(stored)


def test_needs_rehash(hasher: PasswordHasher) -> None:
    stored = hasher.hash(PW)
    assert not hasher.needs_rehash(stored)
    stronger = PasswordHasher(HashParams(time_cost=2, memory_cost_kib=1024))
    assert stronger.needs_rehash(stored)
    assert hasher.needs_rehash(salted("SSHA", "sha1", PW, b"salt"))
    assert hasher.needs_rehash("plain")
    assert hasher.needs_rehash("{ARGON2}garbage")
    assert hasher.needs_rehash("")


def test_only_argon2_for_new_hashes() -> None:
    with pytest.raises(ValueError):
        PasswordHasher(HashParams(scheme="ssha"))
    PasswordHasher(HashParams(scheme="ARGON2", time_cost=1, memory_cost_kib=1024))


# --- known-answer vectors -------------------------------------------------------


@pytest.mark.parametrize(
    "scheme,algo",
    [("SSHA", "sha1"), ("SSHA256", "sha256"), ("SSHA384", "sha384"), ("SSHA512", "sha512"), ("SMD5", "md5")],
)
def test_salted_digests(hasher: PasswordHasher, scheme: str, algo: str) -> None:
    for salt in (b"\x01", b"abcd", os.urandom(8), os.urandom(16)):
        stored = salted(scheme, algo, PW, salt)
        assert hasher.verify(stored, PW)
        assert hasher.verify("{" + scheme.lower() + "}" + stored.split("}", 1)[1], PW)
        assert not hasher.verify(stored, WRONG)
        assert hasher.is_hashed(stored)
        assert hasher.needs_rehash(stored)


@pytest.mark.parametrize(
    "scheme,algo",
    [("SHA", "sha1"), ("SHA256", "sha256"), ("SHA384", "sha384"), ("SHA512", "sha512"), ("MD5", "md5")],
)
def test_unsalted_digests(hasher: PasswordHasher, scheme: str, algo: str) -> None:
    stored = unsalted(scheme, algo, PW)
    assert hasher.verify(stored, PW)
    assert hasher.verify("{" + scheme.lower() + "}" + stored.split("}", 1)[1], PW)
    assert not hasher.verify(stored, WRONG)
    assert hasher.is_hashed(stored)


def test_fixed_vectors(hasher: PasswordHasher) -> None:
    # Computed independently: slappasswd -h {SHA} -s secret ; {MD5} likewise.
    assert hasher.verify("{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=", b"secret")
    assert hasher.verify("{MD5}Xr4ilOzQ4PCOq3aQ0qbuaQ==", b"secret")
    assert not hasher.verify("{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=", b"Secret")


def test_salted_digest_needs_salt(hasher: PasswordHasher) -> None:
    # an unsalted SHA-1 digest labelled {SSHA} is not accepted (OpenLDAP agrees)
    assert not hasher.verify("{SSHA}" + b64(hashlib.sha1(PW).digest()), PW)
    # a salted digest labelled unsalted is not accepted either
    assert not hasher.verify("{SHA}" + b64(hashlib.sha1(PW + b"x").digest() + b"x"), PW)


# --- {CRYPT} --------------------------------------------------------------------

def test_crypt_backend_is_loaded() -> None:
    """A missing backend would turn every {CRYPT} login into a failure: fail loudly instead."""
    assert crypt is not None, "neither crypt nor legacycrypt importable (legacycrypt is a dependency on 3.13+)"
    if sys.version_info >= (3, 13):
        assert crypt.__name__ == "legacycrypt"


# Known answers made by another implementation (openssl passwd -6/-5/-1 -salt saltsalt hunter2).
OPENSSL_CRYPT = [
    "$6$saltsalt$8iYtNHxjWRl.NF6oNZ5tF.iKFlQREaXBLlSmZKP6dy9l5z3vsooWNW0/GZ6Nej73/TFug6pIPSqbJoCT6dfnj.",
    "$5$saltsalt$OIdfjX.u4Y3SJ4I2bX8w5BMf1VAUhHABNUirScDzZi3",
    "$1$saltsalt$ZliGyAN3DciDHEkDboonh/",
]


@pytest.mark.parametrize("encoded", OPENSSL_CRYPT, ids=["sha512", "sha256", "md5"])
def test_crypt_known_answers(hasher: PasswordHasher, encoded: str) -> None:
    assert hasher.verify("{CRYPT}" + encoded, b"hunter2")
    assert not hasher.verify("{CRYPT}" + encoded, b"hunter3")


@pytest.mark.parametrize("method", ["METHOD_SHA512", "METHOD_SHA256", "METHOD_MD5", "METHOD_CRYPT"])
def test_crypt(hasher: PasswordHasher, method: str) -> None:
    m = getattr(crypt, method)
    if m not in crypt.methods:
        pytest.skip(f"{method} not supported by libcrypt")
    pw = "s3cret-pw"
    stored = "{CRYPT}" + crypt.crypt(pw, crypt.mksalt(m))
    assert hasher.verify(stored, pw.encode())
    assert hasher.verify("{crypt}" + stored[7:], pw.encode())
    assert not hasher.verify(stored, b"s3cret-Pw")  # differs within DES's 8 characters
    assert hasher.is_hashed(stored)
    assert hasher.needs_rehash(stored)


def test_crypt_prefixes(hasher: PasswordHasher) -> None:
    six = "{CRYPT}" + crypt.crypt("hunter2", "$6$saltsalt$")
    one = "{CRYPT}" + crypt.crypt("hunter2", "$1$saltsalt$")
    assert six.startswith("{CRYPT}$6$") and one.startswith("{CRYPT}$1$")
    for stored in (six, one):
        assert hasher.verify(stored, b"hunter2")
        assert not hasher.verify(stored, b"hunter3")


def test_crypt_bcrypt_if_available(hasher: PasswordHasher) -> None:
    if crypt.METHOD_BLOWFISH not in crypt.methods:
        pytest.skip("no bcrypt in libcrypt")
    stored = "{CRYPT}" + crypt.crypt("hunter2", crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
    assert stored.startswith("{CRYPT}$2b$")
    assert hasher.verify(stored, b"hunter2")
    assert not hasher.verify(stored, b"hunter3")


def test_crypt_without_backend(hasher: PasswordHasher, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(passwords, "_crypt_module", None)
    assert not hasher.verify("{CRYPT}$1$saltsalt$q5GZM2VoGHzAxmGbZGF1j.", b"hunter2")


def test_crypt_garbage(hasher: PasswordHasher) -> None:
    for stored in ("{CRYPT}", "{CRYPT}x", "{CRYPT}*", "{CRYPT}!", "{CRYPT}$9$nope$", "{CRYPT}$6$"):
        assert not hasher.verify(stored, b"hunter2"), stored
    good = "{CRYPT}" + crypt.crypt("hunter2", "$6$saltsalt$")
    assert not hasher.verify(good, b"hunt\x00er2")
    assert not hasher.verify(good, b"\xff\xfe")


# --- cleartext, garbage, classification -------------------------------------------


def test_cleartext(hasher: PasswordHasher) -> None:
    assert hasher.verify("hunter2", b"hunter2")
    assert not hasher.verify("hunter2", b"hunter3")
    assert not hasher.verify("hunter2", b"hunter")
    assert hasher.verify("pässwörd", "pässwörd".encode())
    assert not hasher.is_hashed("hunter2")
    assert hasher.needs_rehash("hunter2")


def test_empty_never_matches(hasher: PasswordHasher) -> None:
    assert not hasher.verify("", b"")
    assert not hasher.verify("", b"x")
    assert not hasher.verify("{SHA}" + b64(hashlib.sha1(b"").digest()), b"")
    assert not hasher.verify(hasher.hash(b"x"), b"")


@pytest.mark.parametrize(
    "stored",
    [
        "{SSHA}",
        "{SSHA}not base64!!",
        "{SSHA}====",
        "{SHA}AAAA",
        "{SHA512}" + "A" * 10,
        "{ARGON2}",
        "{ARGON2}$argon2id$v=19$m=1024,t=1,p=1$bad",
        "{ARGON2}$argon2id$garbage$$$$",
        "{ARGON2}hunter2",
        "{PBKDF2}hunter2",
        "{UNKNOWN}hunter2",
        "{SASL}alice@EXAMPLE.COM",
        "{}hunter2",
        "{SSHA}\u00e9\u00e9",
    ],
)
def test_garbage_is_false(hasher: PasswordHasher, stored: str) -> None:
    assert hasher.verify(stored, b"hunter2") is False
    assert hasher.needs_rehash(stored) is True


def test_wrong_types_are_false(hasher: PasswordHasher) -> None:
    assert hasher.verify(None, b"x") is False  # type: ignore[arg-type]
    assert hasher.verify("x", None) is False  # type: ignore[arg-type]
    assert hasher.verify("x", "x") is False  # type: ignore[arg-type]
    assert hasher.verify(b"\xff", b"x") is False  # type: ignore[arg-type]


def test_stored_bytes_accepted(hasher: PasswordHasher) -> None:
    stored = salted("SSHA", "sha1", PW, b"salt")
    assert hasher.verify(stored.encode(), PW)  # type: ignore[arg-type]


def test_unknown_scheme_with_braces_is_not_cleartext(hasher: PasswordHasher) -> None:
    # "{FOO}bar" is an unknown scheme, not the cleartext password "{FOO}bar"
    assert not hasher.verify("{FOO}bar", b"{FOO}bar")
    assert not hasher.is_hashed("{FOO}bar")


def test_is_hashed(hasher: PasswordHasher) -> None:
    for scheme in ("ARGON2", "SSHA", "ssha256", "SSHA384", "SSHA512", "SHA", "sha256", "SHA512", "MD5", "SMD5", "crypt"):
        assert hasher.is_hashed("{" + scheme + "}x"), scheme
    assert not hasher.is_hashed("")
    assert not hasher.is_hashed("SSHA}x")
    assert not hasher.is_hashed(" {SSHA}x")


# --- generation and complexity ---------------------------------------------------


def test_generate_password_always_complex() -> None:
    seen = set()
    for _ in range(1000):
        pw = generate_password()
        assert len(pw) == 16
        assert pw.isascii()
        assert check_complexity(pw) is None, pw
        assert any(c in string.ascii_lowercase for c in pw)
        assert any(c in string.ascii_uppercase for c in pw)
        assert any(c in string.digits for c in pw)
        assert any(not c.isalnum() for c in pw)
        assert not set(pw) & set("lIO01 ")
        seen.add(pw)
    assert len(seen) == 1000


@pytest.mark.parametrize("length", [8, 9, 32, 256])
def test_generate_password_lengths(length: int) -> None:
    for _ in range(50):
        pw = generate_password(length)
        assert len(pw) == length
        assert check_complexity(pw) is None


@pytest.mark.parametrize("length", [0, 3, 7, 257])
def test_generate_password_bad_length(length: int) -> None:
    with pytest.raises(ValueError):
        generate_password(length)


@pytest.mark.parametrize(
    "pw",
    [
        "Abcdefg1",  # lower, upper, digit
        "abcdefg!1",  # lower, digit, symbol
        "ABCDEFG!1",  # upper, digit, symbol
        "Abcdefg!",  # lower, upper, symbol
        "Abc def 1",  # space counts as a symbol
        "Aa1!" * 64,  # 256 characters
    ],
)
def test_complexity_ok(pw: str) -> None:
    assert check_complexity(pw) is None


@pytest.mark.parametrize(
    "pw,message",
    [
        ("", "must be at least 8 characters"),
        ("Ab1!xyz", "must be at least 8 characters"),
        ("Aa1!" * 64 + "x", "must be at most 256 characters"),
        ("abcdefgh", "must contain at least 3 of: lowercase, uppercase, digits, symbols"),
        ("abcdefg1", "must contain at least 3 of: lowercase, uppercase, digits, symbols"),
        ("ABCDEFG!", "must contain at least 3 of: lowercase, uppercase, digits, symbols"),
        ("12345678", "must contain at least 3 of: lowercase, uppercase, digits, symbols"),
        ("Pässwörd1", "must not contain non-ASCII characters"),
        ("Password1\u2603", "must not contain non-ASCII characters"),
        ("Pass\tword1", "must not contain control characters"),
    ],
)
def test_complexity_failures(pw: str, message: str) -> None:
    assert check_complexity(pw) == message


def test_complexity_min_length_parameter() -> None:
    assert check_complexity("Abcdefg1", min_length=12) == "must be at least 12 characters"
    assert check_complexity("Abcdefgh1234", min_length=12) is None


def test_complexity_message_never_contains_password() -> None:
    for pw in ("Secretxy", "sécret1A", "short"):
        msg = check_complexity(pw)
        assert msg is not None and pw not in msg
