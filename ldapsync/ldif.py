"""LDIF (RFC 2849) content records: a streaming parser and a formatter.

This module owns the text format used by ``ldapsync ldif load`` / ``ldif dump``
(the slapadd/slapcat equivalents).  It knows nothing about schema, DNs beyond
their text, or the store: :func:`parse_ldif` turns a byte stream into
:class:`LDIFRecord` values one at a time (memory does not grow with the file),
and :func:`format_record` turns one entry back into LDIF bytes that
:func:`parse_ldif` reads back unchanged.

Only content records are accepted.  Change records (``changetype:``) belong to
``ldapmodify`` against a running server, and are refused with a message saying
so.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urlsplit
from urllib.request import url2pathname

__all__ = ["LDIFError", "LDIFRecord", "format_header", "format_record", "parse_ldif"]

_FOLD_WIDTH = 76

# AttributeDescription: (descr / numericoid) *(";" option)   (RFC 4512 §2.5)
_ATTR_DESC_RE = re.compile(rb"(?:[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)*)(?:;[A-Za-z0-9-]+)*\Z")


@dataclass(frozen=True)
class LDIFRecord:
    """One content record: its DN, its attribute values in file order, and the line of its ``dn:``."""

    dn: str
    attrs: list[tuple[str, bytes]]
    lineno: int


class LDIFError(Exception):
    """Malformed LDIF; the message starts with ``line N:``."""

    def __init__(self, lineno: int, message: str) -> None:
        super().__init__(f"line {lineno}: {message}")
        self.lineno = lineno
        self.reason = message


# --- parsing -------------------------------------------------------------------


def _logical_lines(stream: BinaryIO) -> Iterator[tuple[int, bytes | None]]:
    """Unfolded, comment-free lines as ``(first physical line number, text)``.

    A blank line (the record separator) comes out as ``(lineno, None)``.
    """
    parts: list[bytes] = []  # the logical line being unfolded
    start = 0  # its first physical line
    in_comment = False  # the logical line being continued is a comment
    prev_blank = True  # nothing to continue (start of file, or after a blank line)
    lineno = 0
    for raw in stream:
        lineno += 1
        if raw.endswith(b"\n"):
            raw = raw[:-1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 BOM
            raw = raw[3:]
        if raw[:1] == b" ":
            if prev_blank:
                if raw.strip(b" ") == b"":
                    continue  # a whitespace-only line where a record would start: ignore
                raise LDIFError(lineno, "continuation line (starting with a space) with nothing to continue")
            if not in_comment:
                parts.append(raw[1:])
            continue
        # A new logical line begins: emit the one we were building.
        if parts:
            yield start, b"".join(parts)
            parts = []
        in_comment = False
        if not raw:
            prev_blank = True
            yield lineno, None
            continue
        prev_blank = False
        if raw[:1] == b"#":
            in_comment = True
            continue
        start = lineno
        parts.append(raw)
    if parts:
        yield start, b"".join(parts)


def _split_line(lineno: int, line: bytes) -> tuple[bytes, bytes]:
    """``b"cn: x"`` → ``(b"cn", b": x")`` — the name and everything from its colon on."""
    colon = line.find(b":")
    if colon <= 0:
        if colon == 0:
            raise LDIFError(lineno, "missing attribute name before ':'")
        raise LDIFError(lineno, "expected 'attribute: value' (no ':' found)")
    return line[:colon], line[colon:]


def _value(lineno: int, name: str, spec: bytes) -> bytes:
    """Decode the value part (starting at the colon) of an attrval-spec."""
    if spec.startswith(b"::"):
        text = spec[2:].strip(b" ")
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise LDIFError(lineno, f"invalid base64 value for {name!r}") from None
    if spec.startswith(b":<"):
        return _read_url(lineno, name, spec[2:].strip(b" "))
    return spec[1:].lstrip(b" ")


def _read_url(lineno: int, name: str, url_bytes: bytes) -> bytes:
    try:
        url = url_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise LDIFError(lineno, f"URL for {name!r} is not valid UTF-8") from None
    parts = urlsplit(url)
    if parts.scheme.lower() != "file":
        raise LDIFError(lineno, f"unsupported URL for {name!r}: only file:// URLs are allowed")
    if parts.netloc not in ("", "localhost"):
        raise LDIFError(lineno, f"unsupported URL for {name!r}: file URL must name a local file")
    path = url2pathname(parts.path)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise LDIFError(lineno, f"cannot read {path!r} for {name!r}: {e.strerror or e}") from None


def _decode_dn(lineno: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise LDIFError(lineno, "dn is not valid UTF-8") from None


_CHANGE_RECORD_MESSAGE = (
    "change records ({what}) are not accepted by load; "
    "load takes content records only (apply changes with ldapmodify against the running server)"
)


def parse_ldif(stream: BinaryIO) -> Iterator[LDIFRecord]:
    """Yield the content records of an LDIF byte stream, one at a time.

    Accepts an optional ``version: 1`` line, comments (also folded ones), folded
    lines, ``::`` base64 values (also for ``dn``), ``:<`` file URLs, LF or CRLF
    line ends and any number of blank lines between records.  Raises
    :class:`LDIFError` (with the line number) at the first problem; records
    before it have already been yielded.
    """
    dn: str | None = None
    dn_line = 0
    attrs: list[tuple[str, bytes]] = []
    first = True  # no logical line seen yet (version: may appear here only)
    for lineno, line in _logical_lines(stream):
        if line is None:
            if dn is not None:
                if not attrs:
                    raise LDIFError(dn_line, "entry has no attributes")
                yield LDIFRecord(dn, attrs, dn_line)
                dn, attrs = None, []
            continue
        name_b, spec = _split_line(lineno, line)
        name_l = name_b.lower()
        if dn is None:
            if first and name_l == b"version":
                first = False
                version = _value(lineno, "version", spec).strip()
                if version != b"1":
                    raise LDIFError(lineno, f"unsupported LDIF version {version.decode('ascii', 'replace')!r} (only 1)")
                continue
            first = False
            if name_l != b"dn":
                raise LDIFError(lineno, f"expected 'dn:' to start a record, found {name_b.decode('ascii', 'replace')!r}")
            dn = _decode_dn(lineno, _value(lineno, "dn", spec))
            dn_line = lineno
            continue
        if name_l in (b"changetype", b"control"):
            what = name_b.decode("ascii", "replace") + ":"
            raise LDIFError(lineno, _CHANGE_RECORD_MESSAGE.format(what=what))
        if name_l == b"dn":
            raise LDIFError(lineno, "second 'dn:' in one record (records must be separated by a blank line)")
        if not _ATTR_DESC_RE.match(name_b):
            raise LDIFError(lineno, f"invalid attribute description {name_b.decode('utf-8', 'replace')!r}")
        name = name_b.decode("ascii")
        attrs.append((name, _value(lineno, name, spec)))
    if dn is not None:
        if not attrs:
            raise LDIFError(dn_line, "entry has no attributes")
        yield LDIFRecord(dn, attrs, dn_line)


# --- formatting --------------------------------------------------------------------

# SAFE-INIT-CHAR excludes NUL, LF, CR, SPACE, ':' and '<'; SAFE-CHAR excludes NUL, LF, CR; both ASCII only.
_UNSAFE_RE = re.compile(rb"[\x00\n\r\x80-\xff]|\A[ :<]| \Z")


def _is_safe(value: bytes) -> bool:
    return _UNSAFE_RE.search(value) is None


def _fold(line: bytes, out: list[bytes]) -> None:
    if len(line) <= _FOLD_WIDTH:
        out.append(line + b"\n")
        return
    out.append(line[:_FOLD_WIDTH] + b"\n")
    step = _FOLD_WIDTH - 1
    for i in range(_FOLD_WIDTH, len(line), step):
        out.append(b" " + line[i : i + step] + b"\n")


def _attr_line(name: bytes, value: bytes, out: list[bytes]) -> None:
    if not value:
        _fold(name + b":", out)
    elif _is_safe(value):
        _fold(name + b": " + value, out)
    else:
        _fold(name + b":: " + base64.b64encode(value), out)


def format_record(dn: str, attrs: Iterable[tuple[str, bytes | str]]) -> bytes:
    """One content record followed by a blank line.

    Values that are not an RFC 2849 SAFE-STRING (non-ASCII, NUL/CR/LF, a leading
    space, ':' or '<', a trailing space) are written base64 (``::``), the dn
    likewise; lines are folded at 76 characters.  ``str`` values are UTF-8.
    """
    out: list[bytes] = []
    _attr_line(b"dn", dn.encode("utf-8"), out)
    for name, value in attrs:
        name_b = name.encode("ascii", "replace") if isinstance(name, str) else bytes(name)
        if not _ATTR_DESC_RE.match(name_b):
            raise ValueError(f"invalid attribute description {name!r}")
        if isinstance(value, str):
            value = value.encode("utf-8")
        _attr_line(name_b, bytes(value), out)
    out.append(b"\n")
    return b"".join(out)


def format_header() -> bytes:
    """The ``version: 1`` line and the blank line after it."""
    return b"version: 1\n\n"
