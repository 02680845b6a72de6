"""Matching rules: the normalized forms equality, substring and ordering matching compare.

This module owns what makes two values "the same" under an attribute's
matching rules: :func:`normalize` (equality; the form index rows store and
equality filters look up), :func:`substr_normalize` (substring pieces) and
:func:`ordering_key` (``>=`` / ``<=``).  They run on the hot path of every
search filter and every index row written, and they are lenient: a value
that does not fit the syntax gets a best-effort form, never an error.  The
table of known rules is ``schema_model.MATCHING_RULES``.  The functions are
:class:`~ldapsync.directory.schema.Schema` methods; call them as such.
"""

from __future__ import annotations

import re
import unicodedata
from typing import TYPE_CHECKING, Any

from ldapsync.directory.dn import parse_dn
from ldapsync.directory.errors import LDAPError
from ldapsync.directory.schema_model import _S, AttributeType
from ldapsync.directory.schema_syntax import _BITSTRING_RE, format_generalized_time, parse_generalized_time

if TYPE_CHECKING:
    from ldapsync.directory.schema import Schema

__all__ = ["normalize", "substr_normalize", "ordering_key"]

_WS_RE = re.compile(r"\s+")


def _collapse(value: str) -> str:
    return _WS_RE.sub(" ", unicodedata.normalize("NFKC", value)).strip()


def _case_ignore(value: str) -> str:
    return _collapse(value).casefold()


def normalize(schema: Schema, attr: AttributeType, value: str) -> str:
    """Equality-normalized form of ``value`` (for indexes and equality matching).

    Lenient: a value that does not fit the syntax is returned in a
    best-effort form rather than raising (an assertion with such a value
    simply matches nothing).
    """
    return _normalize_rule(schema, attr.equality, value)


def _normalize_rule(schema: Schema, rule: str | None, value: str) -> str:
    if rule is None or rule in ("octetStringMatch", "bitStringMatch", "certificateExactMatch",
                                "octetStringOrderingMatch", "presentationAddressMatch",
                                "protocolInformationMatch"):
        return value
    if rule in ("caseIgnoreMatch", "caseIgnoreIA5Match", "caseIgnoreOrderingMatch",
                "caseIgnoreSubstringsMatch", "caseIgnoreIA5SubstringsMatch"):
        return _case_ignore(value)
    if rule == "caseIgnoreListMatch" or rule == "caseIgnoreListSubstringsMatch":
        return "$".join(_case_ignore(p) for p in value.split("$"))
    if rule in ("caseExactMatch", "caseExactIA5Match", "caseExactOrderingMatch",
                "caseExactSubstringsMatch", "caseExactIA5SubstringsMatch"):
        return _collapse(value)
    if rule == "distinguishedNameMatch":
        return _normalize_dn(schema, value)
    if rule == "uniqueMemberMatch":
        dn_part, sep, uid = value.rpartition("#")
        if sep and _BITSTRING_RE.match(uid):
            return _normalize_dn(schema, dn_part) + "#" + uid
        return _normalize_dn(schema, value)
    if rule in ("integerMatch", "integerOrderingMatch", "integerFirstComponentMatch"):
        v = value.strip()
        if rule == "integerFirstComponentMatch" and v.startswith("("):
            v = v[1:].strip().split()[0] if v[1:].strip() else v
        try:
            return str(int(v))
        except ValueError:
            return v
    if rule in ("generalizedTimeMatch", "generalizedTimeOrderingMatch"):
        try:
            return format_generalized_time(parse_generalized_time(value))
        except ValueError:
            return value.strip()
    if rule in ("numericStringMatch", "numericStringOrderingMatch", "numericStringSubstringsMatch"):
        return value.replace(" ", "")
    if rule in ("telephoneNumberMatch", "telephoneNumberSubstringsMatch"):
        return re.sub(r"[\s-]", "", value).casefold()
    if rule == "booleanMatch":
        return value.strip().upper()
    if rule in ("UUIDMatch", "UUIDOrderingMatch"):
        return value.strip().lower()
    if rule == "objectIdentifierMatch":
        return _normalize_oid(schema, value)
    if rule == "objectIdentifierFirstComponentMatch":
        v = value.strip()
        if v.startswith("("):
            rest = v[1:].split()
            v = rest[0] if rest else v
        return _normalize_oid(schema, v)
    return value


def _normalize_oid(schema: Schema, value: str) -> str:
    v = value.strip()
    oc = schema.object_class(v)
    if oc is not None:
        return oc.name.lower()
    at = schema.attribute(v)
    if at is not None:
        return at.name.lower()
    return v.lower()


def _normalize_dn(schema: Schema, value: str) -> str:
    try:
        return parse_dn(value, schema).norm
    except LDAPError:
        return value.strip().lower()


def substr_normalize(schema: Schema, attr: AttributeType, value: str) -> str:
    """Normalized form for substring assertions (initial/any/final pieces and values).

    Unlike :meth:`normalize`, leading/trailing spaces of a piece are kept
    collapsed but not stripped, so ``*a b*`` keeps its inner space.
    """
    rule = attr.substr or attr.equality
    if rule in ("caseIgnoreSubstringsMatch", "caseIgnoreIA5SubstringsMatch", "caseIgnoreMatch",
                "caseIgnoreIA5Match", "caseIgnoreListSubstringsMatch"):
        return _WS_RE.sub(" ", unicodedata.normalize("NFKC", value)).casefold()
    if rule in ("caseExactSubstringsMatch", "caseExactIA5SubstringsMatch", "caseExactMatch",
                "caseExactIA5Match"):
        return _WS_RE.sub(" ", unicodedata.normalize("NFKC", value))
    if rule in ("numericStringSubstringsMatch", "numericStringMatch"):
        return value.replace(" ", "")
    if rule in ("telephoneNumberSubstringsMatch", "telephoneNumberMatch"):
        return re.sub(r"[\s-]", "", value).casefold()
    return _normalize_rule(schema, rule, value)


def ordering_key(schema: Schema, attr: AttributeType, value: str) -> Any:
    """A comparable key for ``>=`` / ``<=``; ``None`` when the value is not of the syntax.

    int for INTEGER syntax, a fixed-width UTC string for GeneralizedTime,
    the equality-normalized string otherwise.
    """
    rule = attr.ordering or attr.equality
    if attr.syntax == _S + "27" or rule in ("integerMatch", "integerOrderingMatch"):
        try:
            return int(value.strip())
        except ValueError:
            return None
    if attr.syntax == _S + "24" or rule in ("generalizedTimeMatch", "generalizedTimeOrderingMatch"):
        try:
            return parse_generalized_time(value).strftime("%Y%m%d%H%M%S.%f")
        except ValueError:
            return None
    return _normalize_rule(schema, rule, value)
