"""Value syntaxes: is a value a valid DN, INTEGER, GeneralizedTime, UUID, ...; GeneralizedTime itself.

This module owns the check a value of an attribute must pass before it is
stored (:func:`validate_value`, an ``invalidAttributeSyntax`` refusal that
names the attribute, the value and the syntax), the per-syntax rule behind
it (:func:`_syntax_problem`, which DN parsing also uses for RDN values), and
RFC 4517 GeneralizedTime parsing and formatting, which matching and the
password policy use too.  The ``{len}`` bound of a SYNTAX is not enforced.
The functions are :class:`~ldapsync.directory.schema.Schema` methods; call
them as such.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from ldapsync.directory.dn import parse_dn
from ldapsync.directory.errors import LDAPError, ResultCode
from ldapsync.directory.schema_model import _DESCR_RE, _NUMERICOID_RE, SYNTAXES, AttributeType

if TYPE_CHECKING:
    from ldapsync.directory.schema import Schema

__all__ = ["parse_generalized_time", "format_generalized_time", "validate_value"]


# --------------------------------------------------------------------------
# Generalized time


_GT_RE = re.compile(
    r"^(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})?(\d{2})?([.,]\d+)?(Z|[+-]\d{2}(?:\d{2})?)$"
)


def parse_generalized_time(value: str) -> datetime:
    """Parse RFC 4517 GeneralizedTime into an aware UTC datetime; ValueError if invalid."""
    m = _GT_RE.match(value.strip())
    if not m:
        raise ValueError(f"not a GeneralizedTime: {value!r}")
    year, month, day, hour = (int(m.group(k)) for k in range(1, 5))
    minute = m.group(5)
    second = m.group(6)
    frac = m.group(7)
    if second is not None and minute is None:
        raise ValueError(f"not a GeneralizedTime: {value!r}")
    base = datetime(year, month, day, hour, int(minute or 0),
                    min(int(second or 0), 59), tzinfo=timezone.utc)
    if second is not None and int(second) == 60:  # leap second: clamp
        base = base.replace(second=59)
    if frac:
        f = float("0." + frac[1:])
        if second is not None:
            base += timedelta(seconds=f)
        elif minute is not None:
            base += timedelta(minutes=f)
        else:
            base += timedelta(hours=f)
    tz = m.group(8)
    if tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        hh = int(tz[1:3])
        mm = int(tz[3:5]) if len(tz) > 3 else 0
        if hh > 23 or mm > 59:
            raise ValueError(f"bad time zone offset in {value!r}")
        base -= sign * timedelta(hours=hh, minutes=mm)
    return base


def format_generalized_time(dt: datetime) -> str:
    """Canonical UTC GeneralizedTime: ``YYYYMMDDHHMMSSZ`` or with a trimmed fraction."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    dt = dt.astimezone(timezone.utc)
    text = dt.strftime("%Y%m%d%H%M%S")
    if dt.microsecond:
        text += "." + f"{dt.microsecond:06d}".rstrip("0")
    return text + "Z"


# --------------------------------------------------------------------------
# Syntax checks

_INTEGER_RE = re.compile(r"^(0|-?[1-9][0-9]*)$")
_PRINTABLE_RE = re.compile(r"^[A-Za-z0-9'()+,\-./:? =]+$")
_NUMERIC_RE = re.compile(r"^[0-9 ]+$")
_UUID_RE = re.compile(r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$")
_BITSTRING_RE = re.compile(r"^'[01]*'B$")


def validate_value(schema: Schema, attr: AttributeType, value: str) -> None:
    """Raise invalidAttributeSyntax if ``value`` does not fit ``attr``'s syntax.

    The ``{len}`` bound of a SYNTAX is only a suggestion (RFC 4512 4.1.2)
    and is not enforced.
    """
    syntax = attr.syntax
    problem = _syntax_problem(schema, syntax, value)
    if problem is not None:
        raise LDAPError(
            ResultCode.invalidAttributeSyntax,
            f"{attr.name}: value {_show(value)} {problem} "
            f"({SYNTAXES.get(syntax or '', syntax)} syntax)",
        )


def _syntax_problem(schema: Schema, syntax: str | None, value: str) -> str | None:
    if syntax is None:
        return None
    name = SYNTAXES.get(syntax)
    if name == "Distinguished Name":
        return _dn_problem(schema, value)
    if name == "Name And Optional UID":
        dn_part, sep, uid = value.rpartition("#")
        if sep and _BITSTRING_RE.match(uid):
            return _dn_problem(schema, dn_part)
        return _dn_problem(schema, value)
    if name == "INTEGER":
        return None if _INTEGER_RE.match(value) else "is not an integer"
    if name == "Boolean":
        return None if value in ("TRUE", "FALSE") else "is not TRUE or FALSE"
    if name == "Generalized Time":
        try:
            parse_generalized_time(value)
        except (ValueError, OverflowError):
            return "is not a GeneralizedTime such as 20240131235959Z"
        return None if value == value.strip() else "has surrounding spaces"
    if name == "IA5 String":
        return None if value.isascii() else "contains non-ASCII characters"
    if name == "Printable String":
        return None if _PRINTABLE_RE.match(value) else "contains characters not allowed in a PrintableString"
    if name == "Country String":
        return None if len(value) == 2 and _PRINTABLE_RE.match(value) else "is not a two-letter country code"
    if name == "Numeric String":
        return None if _NUMERIC_RE.match(value) else "is not made of digits and spaces"
    if name == "OID":
        v = value.strip()
        return None if (_NUMERICOID_RE.match(v) or _DESCR_RE.match(v)) else "is not an OID or a name"
    if name == "Directory String":
        return None if value.strip() else "is empty"
    if name == "UUID":
        return None if _UUID_RE.match(value) else "is not a UUID"
    if name == "Telephone Number":
        return None if value.strip() else "is empty"
    if name == "Bit String":
        return None if _BITSTRING_RE.match(value) else "is not a bit string such as '0101'B"
    return None


def _dn_problem(schema: Schema, value: str) -> str | None:
    try:
        parse_dn(value, schema)
    except LDAPError as e:
        return f"is not a valid DN ({e.message})"
    return None


def _show(value: str) -> str:
    return repr(value if len(value) <= 64 else value[:61] + "...")
