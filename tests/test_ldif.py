"""Tests for ldapsync.ldif (RFC 2849 content records)."""

from __future__ import annotations

import base64
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ldapsync.ldif import LDIFError, LDIFRecord, format_header, format_record, parse_ldif


def parse(text: bytes | str) -> list[LDIFRecord]:
    if isinstance(text, str):
        text = text.encode("utf-8")
    return list(parse_ldif(io.BytesIO(text)))


def roundtrip(dn: str, attrs: list[tuple[str, bytes | str]]) -> LDIFRecord:
    data = format_header() + format_record(dn, attrs)
    (rec,) = parse(data)
    return rec


def as_bytes(attrs: list[tuple[str, bytes | str]]) -> list[tuple[str, bytes]]:
    return [(n, v.encode("utf-8") if isinstance(v, str) else v) for n, v in attrs]


# --- basic parsing -------------------------------------------------------------


def test_simple_records() -> None:
    recs = parse(
        "version: 1\n"
        "\n"
        "dn: dc=example,dc=com\n"
        "objectClass: top\n"
        "objectClass: domain\n"
        "dc: example\n"
        "\n"
        "dn: uid=alice,ou=people,dc=example,dc=com\n"
        "uid: alice\n"
        "cn: Alice Example\n"
    )
    assert [r.dn for r in recs] == ["dc=example,dc=com", "uid=alice,ou=people,dc=example,dc=com"]
    assert recs[0].attrs == [("objectClass", b"top"), ("objectClass", b"domain"), ("dc", b"example")]
    assert recs[1].attrs == [("uid", b"alice"), ("cn", b"Alice Example")]
    assert [r.lineno for r in recs] == [3, 8]


def test_version_optional_and_directly_followed_by_dn() -> None:
    assert parse("dn: cn=a\ncn: a\n")[0].dn == "cn=a"
    assert parse("version: 1\ndn: cn=a\ncn: a\n")[0].dn == "cn=a"
    assert parse("version: 1\n") == []
    assert parse("") == []
    assert parse("\n\n# only a comment\n\n") == []


def test_many_blank_lines_and_no_trailing_newline() -> None:
    recs = parse("\n\n\ndn: cn=a\ncn: a\n\n\n\n\ndn: cn=b\ncn: b")
    assert [(r.dn, r.lineno) for r in recs] == [("cn=a", 4), ("cn=b", 10)]


def test_attribute_description_kept_as_written() -> None:
    (rec,) = parse("dn: cn=a\nCN: a\nuserCertificate;binary:: AAE=\n2.5.4.3: b\n")
    assert rec.attrs == [("CN", b"a"), ("userCertificate;binary", b"\x00\x01"), ("2.5.4.3", b"b")]


def test_value_fill_spaces() -> None:
    (rec,) = parse("dn:    cn=a\ncn:a\nsn:    b\ndescription:\ndescription2::   AAE=\n")
    assert rec.dn == "cn=a"
    assert rec.attrs == [("cn", b"a"), ("sn", b"b"), ("description", b""), ("description2", b"\x00\x01")]


def test_crlf_file() -> None:
    data = (
        b"version: 1\r\n\r\n"
        b"# comment\r\n"
        b"dn: cn=a,dc=example,dc=com\r\n"
        b"cn: a\r\n"
        b"description: folded\r\n"
        b"  value\r\n"
        b"\r\n"
        b"dn: cn=b,dc=example,dc=com\r\n"
        b"cn: b\r\n"
    )
    recs = parse(data)
    assert [r.dn for r in recs] == ["cn=a,dc=example,dc=com", "cn=b,dc=example,dc=com"]
    assert recs[0].attrs == [("cn", b"a"), ("description", b"folded value")]
    assert recs[1].attrs == [("cn", b"b")]
    assert recs[1].lineno == 9


def test_folding() -> None:
    (rec,) = parse("dn: cn=a,\n dc=example,\n  dc=com\ndescription: one\n two\n three\ncn: a\n")
    assert rec.dn == "cn=a,dc=example, dc=com"
    assert rec.attrs == [("description", b"onetwothree"), ("cn", b"a")]


def test_folded_base64() -> None:
    value = bytes(range(256))
    enc = base64.b64encode(value).decode()
    folded = "\n ".join(enc[i : i + 40] for i in range(0, len(enc), 40))
    (rec,) = parse(f"dn: cn=a\njpegPhoto:: {folded}\n")
    assert rec.attrs == [("jpegPhoto", value)]


def test_comments() -> None:
    recs = parse(
        "# leading comment\n"
        "# folded comment that\n"
        " continues here: dn: not a record\n"
        "version: 1\n"
        "\n"
        "# comment before a record\n"
        "dn: cn=a\n"
        "# comment inside a record\n"
        "cn: a\n"
        "#another\n"
        " cn: folded into the comment\n"
        "sn: b\n"
    )
    assert len(recs) == 1
    assert recs[0].attrs == [("cn", b"a"), ("sn", b"b")]
    assert recs[0].lineno == 7


def test_dn_base64_and_utf8() -> None:
    dn = "cn=Jürgen Müller,ou=people,dc=example,dc=com"
    enc = base64.b64encode(dn.encode()).decode()
    (rec,) = parse(f"dn:: {enc}\ncn:: {base64.b64encode('Jürgen Müller'.encode()).decode()}\n")
    assert rec.dn == dn
    assert rec.attrs == [("cn", "Jürgen Müller".encode())]
    # raw UTF-8 in a dn: line is not RFC 2849 but is common; accept it
    (rec,) = parse(f"dn: {dn}\ncn: x\n")
    assert rec.dn == dn


def test_url_value(tmp_path: Path) -> None:
    photo = tmp_path / "photo with space.jpg"
    photo.write_bytes(b"\xff\xd8\xff\xe0binary")
    url = photo.as_uri()
    (rec,) = parse(f"dn: cn=a\ncn: a\njpegPhoto:< {url}\n")
    assert rec.attrs == [("cn", b"a"), ("jpegPhoto", b"\xff\xd8\xff\xe0binary")]


def test_parse_is_lazy() -> None:
    """Records come out before the rest of the stream is read (and before a later error)."""
    gen = parse_ldif(io.BytesIO(b"dn: cn=a\ncn: a\n\ndn: cn=b\nbroken line\n"))
    first = next(gen)
    assert first.dn == "cn=a"
    with pytest.raises(LDIFError):
        next(gen)


# --- errors ----------------------------------------------------------------------------


def error_of(text: str | bytes) -> LDIFError:
    with pytest.raises(LDIFError) as info:
        parse(text)
    return info.value


def test_changetype_rejected() -> None:
    err = error_of("version: 1\n\ndn: cn=a,dc=example,dc=com\nchangetype: modify\nreplace: cn\ncn: b\n-\n")
    msg = str(err)
    assert msg.startswith("line 4: ")
    assert "change records" in msg and "ldapmodify" in msg
    assert err.lineno == 4


def test_changetype_add_rejected_too() -> None:
    assert "ldapmodify" in str(error_of("dn: cn=a\nchangetype: add\ncn: a\n"))
    assert "ldapmodify" in str(error_of("dn: cn=a\ncontrol: 1.2.3 true\nchangetype: delete\n"))


@pytest.mark.parametrize(
    "text,line,fragment",
    [
        ("dn: cn=a\ncn: a\nno colon here\n", 3, "no ':'"),
        ("cn: a\n", 1, "expected 'dn:'"),
        ("version: 1\n\ncn: a\ndn: cn=a\n", 3, "expected 'dn:'"),
        ("version: 2\n\ndn: cn=a\ncn: a\n", 1, "version"),
        ("dn: cn=a\ncn: a\n\ndn: cn=b\n\n", 4, "no attributes"),
        ("dn: cn=a\n", 1, "no attributes"),
        ("dn: cn=a\ncn: a\ndn: cn=b\n", 3, "second 'dn:'"),
        ("dn: cn=a\ncn: a\n\n continued\n", 4, "continuation"),
        (" dn: cn=a\ncn: a\n", 1, "continuation"),
        ("dn: cn=a\ncn: a\n\n\ndn: cn=b\njpegPhoto:: !!notbase64\n", 6, "base64"),
        ("dn:: !!!\ncn: a\n", 1, "base64"),
        ("dn: cn=a\n: novalue\n", 2, "attribute name"),
        ("dn: cn=a\nbad_attr: x\n", 2, "invalid attribute description"),
        ("dn: cn=a\njpegPhoto:< http://example.com/x.jpg\n", 2, "file://"),
        ("dn: cn=a\njpegPhoto:< file:///nonexistent/ldapsync-test/x.jpg\n", 2, "cannot read"),
        (b"dn:: /w==\ncn: a\n", 1, "UTF-8"),
        (b"dn: cn=\xff\ncn: a\n", 1, "UTF-8"),
    ],
)
def test_errors_have_line_numbers(text: str, line: int, fragment: str) -> None:
    err = error_of(text)
    assert str(err).startswith(f"line {line}: "), str(err)
    assert err.lineno == line
    assert fragment in str(err)


def test_error_line_of_folded_line_is_its_first_line() -> None:
    err = error_of("dn: cn=a\ncn: a\ndescription: x\n y\nbad\n value\n")
    assert str(err).startswith("line 5: ")


def test_error_line_counts_crlf_and_comments() -> None:
    err = error_of(b"# c\r\n#c2\r\n folded\r\ndn: cn=a\r\ncn: a\r\nchangetype: add\r\n")
    assert str(err).startswith("line 6: ")


# --- formatting -----------------------------------------------------------------------


def test_format_header() -> None:
    assert format_header() == b"version: 1\n\n"


def test_format_plain() -> None:
    out = format_record("cn=a,dc=example,dc=com", [("objectClass", "top"), ("cn", b"a")])
    assert out == b"dn: cn=a,dc=example,dc=com\nobjectClass: top\ncn: a\n\n"


@pytest.mark.parametrize(
    "value",
    [
        b" leading space",
        b"trailing space ",
        b":colon first",
        b"<angle first",
        b"nul\x00inside",
        b"cr\rinside",
        b"lf\ninside",
        "Jürgen".encode(),
        b"\xff\xfe",
    ],
)
def test_unsafe_values_base64(value: bytes) -> None:
    out = format_record("cn=a", [("description", value)])
    assert b"description:: " + base64.b64encode(value) + b"\n" in out
    assert roundtrip("cn=a", [("description", value)]).attrs == [("description", value)]


@pytest.mark.parametrize("value", [b"a:b", b"a<b", b"in side", b"#notacomment", b"-", b"x" * 10])
def test_safe_values_plain(value: bytes) -> None:
    out = format_record("cn=a", [("description", value)])
    assert b"description: " + value + b"\n" in out


def test_empty_value() -> None:
    out = format_record("cn=a", [("description", b"")])
    assert out == b"dn: cn=a\ndescription:\n\n"
    assert roundtrip("cn=a", [("description", b"")]).attrs == [("description", b"")]


def test_folding_at_76() -> None:
    value = ("0123456789" * 40).encode()
    out = format_record("cn=a", [("description", value)])
    lines = out.split(b"\n")
    assert all(len(line) <= 76 for line in lines)
    assert len(lines[1]) == 76
    assert all(line.startswith(b" ") for line in lines[2:-2])
    assert roundtrip("cn=a", [("description", value)]).attrs == [("description", value)]


def test_dn_base64_and_folding() -> None:
    dn = "cn=" + "Ünïcödé " * 20 + "x,ou=people,dc=example,dc=com"
    out = format_record(dn, [("cn", "x")])
    assert out.startswith(b"dn:: ")
    assert all(len(line) <= 76 for line in out.split(b"\n"))
    assert roundtrip(dn, [("cn", "x")]).dn == dn
    assert roundtrip(" leading", [("cn", "x")]).dn == " leading"


def test_format_rejects_bad_attribute_description() -> None:
    for bad in ("", "cn:", "c n", "cn\n", "jürgen"):
        with pytest.raises(ValueError):
            format_record("cn=a", [(bad, b"x")])


def test_round_trip_everything() -> None:
    attrs: list[tuple[str, bytes | str]] = [
        ("objectClass", "inetOrgPerson"),
        ("objectClass", "ldapsyncUser"),
        ("cn", "Zoë Ångström"),
        ("sn", "李"),
        ("userCertificate;binary", os.urandom(700)),
        ("jpegPhoto", bytes(range(256)) * 4),
        ("description", "x" * 1000),
        ("description", " spaced "),
        ("userPassword", "{ARGON2}$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA"),
        ("mail", "zoe@example.com"),
        ("postalAddress", "line1\nline2"),
        ("o", ""),
    ]
    dn = "uid=zoë,ou=people,dc=example,dc=com"
    rec = roundtrip(dn, attrs)
    assert rec.dn == dn
    assert rec.attrs == as_bytes(attrs)
    assert rec.lineno == 3


def test_round_trip_many_records_one_stream() -> None:
    entries = [(f"uid=u{i},ou=people,dc=example,dc=com", [("uid", f"u{i}"), ("x", os.urandom(i))]) for i in range(1, 50)]
    data = format_header() + b"".join(format_record(dn, a) for dn, a in entries)
    recs = parse(data)
    assert [(r.dn, r.attrs) for r in recs] == [(dn, as_bytes(a)) for dn, a in entries]


# --- scale --------------------------------------------------------------------------------


class _GeneratedStream(io.RawIOBase):
    """A readable binary stream that generates N records on the fly (never all in memory)."""

    def __init__(self, n: int) -> None:
        self._chunks = self._gen(n)
        self._buf = b""

    @staticmethod
    def _gen(n: int) -> Iterator[bytes]:
        yield format_header()
        for i in range(n):
            yield format_record(
                f"uid=user{i},ou=people,dc=example,dc=com",
                [
                    ("objectClass", b"top"),
                    ("objectClass", b"inetOrgPerson"),
                    ("uid", f"user{i}".encode()),
                    ("cn", f"User Number {i}".encode()),
                    ("sn", b"Number"),
                    ("mail", f"user{i}@example.com".encode()),
                    ("description", b"A fairly long description that will need folding " * 2),
                ],
            )

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        while not self._buf:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def test_100k_records_stream() -> None:
    stream = io.BufferedReader(_GeneratedStream(100_000))
    t0 = time.monotonic()
    count = 0
    last = None
    for rec in parse_ldif(stream):  # type: ignore[arg-type]
        count += 1
        last = rec
    elapsed = time.monotonic() - t0
    assert count == 100_000
    assert last is not None and last.dn == "uid=user99999,ou=people,dc=example,dc=com"
    assert len(last.attrs) == 7
    assert elapsed < 60  # generous; typically a couple of seconds
