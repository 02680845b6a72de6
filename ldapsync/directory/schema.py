"""The LDAP schema: attribute types, object classes, syntaxes and matching.

This module owns reading OpenLDAP-format ``.schema`` files (the ones in the
project's ``schema/`` folder), resolving inheritance (an attribute type's
effective matching rules and syntax, an object class's effective MUST/MAY),
and the rules built on that: value normalization for equality/substring/
ordering matching and indexing, value syntax checks, entry checks against the
object classes, and the values of the ``cn=Subschema`` entry.

It knows nothing about storage, the protocol or access control, and it never
does I/O after :meth:`Schema.load`.  Refusals are :class:`LDAPError` with the
result code a standard server gives; a broken schema *file* is a
:class:`SchemaError` at load time (a start-up problem, not a client's).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from ldapsync.directory.errors import LDAPError, ResultCode

__all__ = [
    "AttributeType",
    "ObjectClass",
    "Schema",
    "SchemaError",
    "SYNTAXES",
    "MATCHING_RULES",
    "DN_SYNTAX",
    "NAME_AND_OPTIONAL_UID_SYNTAX",
    "DEFAULT_SCHEMA_FILES",
    "parse_generalized_time",
    "format_generalized_time",
]

DN_SYNTAX = "1.3.6.1.4.1.1466.115.121.1.12"
NAME_AND_OPTIONAL_UID_SYNTAX = "1.3.6.1.4.1.1466.115.121.1.34"
_S = "1.3.6.1.4.1.1466.115.121.1."

#: Syntaxes the server knows: OID -> description (RFC 4517, RFC 4530, RFC 2307, X.509).
SYNTAXES: dict[str, str] = {
    _S + "3": "Attribute Type Description",
    _S + "4": "Audio",
    _S + "5": "Binary",
    _S + "6": "Bit String",
    _S + "7": "Boolean",
    _S + "8": "Certificate",
    _S + "9": "Certificate List",
    _S + "10": "Certificate Pair",
    _S + "11": "Country String",
    _S + "12": "Distinguished Name",
    _S + "13": "Data Quality",
    _S + "14": "Delivery Method",
    _S + "15": "Directory String",
    _S + "16": "DIT Content Rule Description",
    _S + "17": "DIT Structure Rule Description",
    _S + "19": "DSA Quality",
    _S + "21": "Enhanced Guide",
    _S + "22": "Facsimile Telephone Number",
    _S + "23": "Fax",
    _S + "24": "Generalized Time",
    _S + "25": "Guide",
    _S + "26": "IA5 String",
    _S + "27": "INTEGER",
    _S + "28": "JPEG",
    _S + "30": "Matching Rule Description",
    _S + "31": "Matching Rule Use Description",
    _S + "34": "Name And Optional UID",
    _S + "35": "Name Form Description",
    _S + "36": "Numeric String",
    _S + "37": "Object Class Description",
    _S + "38": "OID",
    _S + "39": "Other Mailbox",
    _S + "40": "Octet String",
    _S + "41": "Postal Address",
    _S + "42": "Protocol Information",
    _S + "43": "Presentation Address",
    _S + "44": "Printable String",
    _S + "45": "SubtreeSpecification",
    _S + "49": "Supported Algorithm",
    _S + "50": "Telephone Number",
    _S + "51": "Teletex Terminal Identifier",
    _S + "52": "Telex Number",
    _S + "53": "UTC Time",
    _S + "54": "LDAP Syntax Description",
    _S + "58": "Substring Assertion",
    "1.3.6.1.1.15.1": "X.509 Certificate Exact Assertion",
    "1.3.6.1.1.16.1": "UUID",
    "1.3.6.1.1.1.0.0": "RFC2307 NIS Netgroup Triple",
    "1.3.6.1.1.1.0.1": "RFC2307 Boot Parameter",
}

#: Matching rules the server knows: name -> (OID, syntax OID).
MATCHING_RULES: dict[str, tuple[str, str]] = {
    "objectIdentifierMatch": ("2.5.13.0", _S + "38"),
    "distinguishedNameMatch": ("2.5.13.1", _S + "12"),
    "caseIgnoreMatch": ("2.5.13.2", _S + "15"),
    "caseIgnoreOrderingMatch": ("2.5.13.3", _S + "15"),
    "caseIgnoreSubstringsMatch": ("2.5.13.4", _S + "58"),
    "caseExactMatch": ("2.5.13.5", _S + "15"),
    "caseExactOrderingMatch": ("2.5.13.6", _S + "15"),
    "caseExactSubstringsMatch": ("2.5.13.7", _S + "58"),
    "numericStringMatch": ("2.5.13.8", _S + "36"),
    "numericStringOrderingMatch": ("2.5.13.9", _S + "36"),
    "numericStringSubstringsMatch": ("2.5.13.10", _S + "58"),
    "caseIgnoreListMatch": ("2.5.13.11", _S + "41"),
    "caseIgnoreListSubstringsMatch": ("2.5.13.12", _S + "58"),
    "booleanMatch": ("2.5.13.13", _S + "7"),
    "integerMatch": ("2.5.13.14", _S + "27"),
    "integerOrderingMatch": ("2.5.13.15", _S + "27"),
    "bitStringMatch": ("2.5.13.16", _S + "6"),
    "octetStringMatch": ("2.5.13.17", _S + "40"),
    "octetStringOrderingMatch": ("2.5.13.18", _S + "40"),
    "telephoneNumberMatch": ("2.5.13.20", _S + "50"),
    "telephoneNumberSubstringsMatch": ("2.5.13.21", _S + "58"),
    "presentationAddressMatch": ("2.5.13.22", _S + "43"),
    "uniqueMemberMatch": ("2.5.13.23", _S + "34"),
    "protocolInformationMatch": ("2.5.13.24", _S + "42"),
    "generalizedTimeMatch": ("2.5.13.27", _S + "24"),
    "generalizedTimeOrderingMatch": ("2.5.13.28", _S + "24"),
    "integerFirstComponentMatch": ("2.5.13.29", _S + "27"),
    "objectIdentifierFirstComponentMatch": ("2.5.13.30", _S + "38"),
    "certificateExactMatch": ("2.5.13.34", "1.3.6.1.1.15.1"),
    "caseExactIA5Match": ("1.3.6.1.4.1.1466.109.114.1", _S + "26"),
    "caseIgnoreIA5Match": ("1.3.6.1.4.1.1466.109.114.2", _S + "26"),
    "caseIgnoreIA5SubstringsMatch": ("1.3.6.1.4.1.1466.109.114.3", _S + "58"),
    "caseExactIA5SubstringsMatch": ("1.3.6.1.4.1.4203.1.2.1", _S + "58"),
    "UUIDMatch": ("1.3.6.1.1.16.2", "1.3.6.1.1.16.1"),
    "UUIDOrderingMatch": ("1.3.6.1.1.16.3", "1.3.6.1.1.16.1"),
}
_RULE_BY_KEY: dict[str, str] = {}
for _name, (_oid, _syn) in MATCHING_RULES.items():
    _RULE_BY_KEY[_name.lower()] = _name
    _RULE_BY_KEY[_oid] = _name

#: The files :meth:`Schema.load_default` reads, in order.
DEFAULT_SCHEMA_FILES: tuple[str, ...] = (
    "system.schema",
    "core.schema",
    "cosine.schema",
    "inetorgperson.schema",
    "nis.schema",
    "ldapsync.schema",
    "monitor.schema",
)

USAGES = ("userApplications", "directoryOperation", "distributedOperation", "dSAOperation")
KINDS = ("STRUCTURAL", "AUXILIARY", "ABSTRACT")


class SchemaError(ValueError):
    """A schema file is malformed or refers to something undefined."""


# --------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class AttributeType:
    """An attribute type with its *effective* matching rules and syntax."""

    oid: str
    names: tuple[str, ...]
    sup: str | None
    equality: str | None
    ordering: str | None
    substr: str | None
    syntax: str | None
    single_value: bool
    no_user_modification: bool
    collective: bool
    usage: str
    definition: str
    description: str = ""
    obsolete: bool = False
    syntax_len: int | None = None

    @property
    def name(self) -> str:
        """The canonical spelling (first NAME), or the OID when unnamed."""
        return self.names[0] if self.names else self.oid

    @property
    def operational(self) -> bool:
        return self.usage != "userApplications"

    @property
    def is_dn(self) -> bool:
        return self.syntax in (DN_SYNTAX, NAME_AND_OPTIONAL_UID_SYNTAX)


@dataclass(frozen=True)
class ObjectClass:
    """An object class with its *effective* MUST/MAY (superclasses included)."""

    oid: str
    names: tuple[str, ...]
    sups: tuple[str, ...]
    kind: str
    must: frozenset[str]
    may: frozenset[str]
    definition: str
    description: str = ""
    obsolete: bool = False
    #: canonical names of this class and all its superclasses
    ancestry: frozenset[str] = field(default=frozenset())

    @property
    def name(self) -> str:
        return self.names[0] if self.names else self.oid


# --------------------------------------------------------------------------
# Parsing RFC 4512 descriptions in OpenLDAP files

_TOKEN_RE = re.compile(r"\s*(\(|\)|\$|'(?:[^'\\]|\\.)*'|[^\s()$']+)")


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if not m:
            raise SchemaError(f"cannot parse near {text[pos:pos + 40]!r}")
        tokens.append(m.group(1))
        pos = m.end()
    return tokens


def _unquote(tok: str) -> str:
    if len(tok) >= 2 and tok[0] == "'" and tok[-1] == "'":
        return tok[1:-1].replace("\\27", "'").replace("\\5c", "\\").replace("\\5C", "\\")
    return tok


@dataclass
class _RawDef:
    kind: str  # "at" | "oc"
    oid: str
    fields: dict[str, Any]
    source: str


def _parse_description(text: str, kind: str, source: str) -> _RawDef:
    toks = _tokenize(text)
    if len(toks) < 3 or toks[0] != "(" or toks[-1] != ")":
        raise SchemaError(f"{source}: definition must be enclosed in parentheses")
    toks = toks[1:-1]
    oid = toks[0]
    fields: dict[str, Any] = {}
    i = 1

    def take_list() -> list[str]:
        nonlocal i
        if toks[i] == "(":
            out: list[str] = []
            i += 1
            while i < len(toks) and toks[i] != ")":
                if toks[i] != "$":
                    out.append(_unquote(toks[i]))
                i += 1
            if i >= len(toks):
                raise SchemaError(f"{source}: unterminated list in {oid}")
            i += 1
            return out
        val = _unquote(toks[i])
        i += 1
        return [val]

    while i < len(toks):
        kw = toks[i].upper()
        i += 1
        if kw in ("NAME", "SUP", "MUST", "MAY"):
            fields[kw] = take_list()
        elif kw in ("DESC", "EQUALITY", "ORDERING", "SUBSTR", "SYNTAX", "USAGE"):
            if i >= len(toks):
                raise SchemaError(f"{source}: {kw} without a value in {oid}")
            fields[kw] = _unquote(toks[i])
            i += 1
        elif kw in ("SINGLE-VALUE", "COLLECTIVE", "NO-USER-MODIFICATION", "OBSOLETE",
                    "STRUCTURAL", "AUXILIARY", "ABSTRACT"):
            fields[kw] = True
        elif kw.startswith("X-"):
            fields.setdefault("X", []).append((toks[i - 1], take_list()))
        else:
            raise SchemaError(f"{source}: unknown keyword {toks[i - 1]!r} in {oid}")
    return _RawDef(kind, oid, fields, source)


def _read_statements(text: str, source: str) -> Iterable[tuple[str, str, str]]:
    """Yield (keyword, rest, location) per statement; continuation lines start with whitespace."""
    current: list[str] = []
    start = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                yield _split_statement(current, f"{source}:{start}")
                current = []
            continue
        if line[0] in " \t":
            if not current:
                raise SchemaError(f"{source}:{lineno}: continuation line without a statement")
            current.append(line.strip())
        else:
            if current:
                yield _split_statement(current, f"{source}:{start}")
            current = [line.strip()]
            start = lineno
    if current:
        yield _split_statement(current, f"{source}:{start}")


def _split_statement(lines: list[str], loc: str) -> tuple[str, str, str]:
    joined = " ".join(lines)
    m = re.match(r"^([^\s(]+)\s*(.*)$", joined)
    if not m:
        raise SchemaError(f"{loc}: cannot parse statement")
    return m.group(1).lower(), m.group(2).strip(), loc


_NUMERICOID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
_DESCR_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-]*$")


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
# Value helpers

_WS_RE = re.compile(r"\s+")
_INTEGER_RE = re.compile(r"^(0|-?[1-9][0-9]*)$")
_PRINTABLE_RE = re.compile(r"^[A-Za-z0-9'()+,\-./:? =]+$")
_NUMERIC_RE = re.compile(r"^[0-9 ]+$")
_UUID_RE = re.compile(r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$")
_BITSTRING_RE = re.compile(r"^'[01]*'B$")


def _collapse(value: str) -> str:
    return _WS_RE.sub(" ", unicodedata.normalize("NFKC", value)).strip()


def _case_ignore(value: str) -> str:
    return _collapse(value).casefold()


# --------------------------------------------------------------------------
# The schema


class Schema:
    """A loaded, resolved schema.  Immutable after construction; safe to share."""

    _default: "Schema | None" = None

    def __init__(self, attribute_types: Sequence[AttributeType], object_classes: Sequence[ObjectClass]) -> None:
        self.attribute_types: tuple[AttributeType, ...] = tuple(attribute_types)
        self.object_classes: tuple[ObjectClass, ...] = tuple(object_classes)
        self._at: dict[str, AttributeType] = {}
        for at in self.attribute_types:
            self._at[at.oid] = at
            for n in at.names:
                self._at[n.lower()] = at
        self._oc: dict[str, ObjectClass] = {}
        for oc in self.object_classes:
            self._oc[oc.oid] = oc
            for n in oc.names:
                self._oc[n.lower()] = oc
        self._dn_cache: dict[str, Any] = {}  # used by ldapsync.directory.dn

    # -- loading ---------------------------------------------------------

    @classmethod
    def load(cls, paths: Iterable[Path]) -> "Schema":
        """Read OpenLDAP-format schema files (in order) and resolve them."""
        raw: list[_RawDef] = []
        macros: dict[str, str] = {}
        for path in paths:
            path = Path(path)
            text = path.read_text(encoding="utf-8")
            for kw, rest, loc in _read_statements(text, path.name):
                if kw in ("objectidentifier",):
                    parts = rest.split()
                    if len(parts) != 2:
                        raise SchemaError(f"{loc}: objectIdentifier needs a name and an OID")
                    macros[parts[0].lower()] = _expand_oid(parts[1], macros, loc)
                elif kw in ("attributetype", "attributetypes"):
                    d = _parse_description(rest, "at", loc)
                    d.oid = _expand_oid(d.oid, macros, loc)
                    if "SYNTAX" in d.fields:
                        d.fields["SYNTAX"] = _expand_syntax(d.fields["SYNTAX"], macros, loc)
                    raw.append(d)
                elif kw in ("objectclass", "objectclasses"):
                    d = _parse_description(rest, "oc", loc)
                    d.oid = _expand_oid(d.oid, macros, loc)
                    raw.append(d)
                else:
                    raise SchemaError(f"{loc}: unknown statement {kw!r}")
        return cls._resolve(raw)

    @classmethod
    def default_schema_dir(cls) -> Path:
        import ldapsync

        pkg = Path(ldapsync.__file__).resolve().parent
        for candidate in (pkg.parent / "schema", pkg / "_schema"):
            if (candidate / "core.schema").is_file():
                return candidate
        raise SchemaError(f"schema files not found in {pkg.parent / 'schema'} or {pkg / '_schema'}")

    @classmethod
    def load_default(cls) -> "Schema":
        """The standard schema set (system, core, cosine, inetorgperson, nis, ldapsync, monitor), cached."""
        if cls._default is None:
            d = cls.default_schema_dir()
            Schema._default = cls.load(d / name for name in DEFAULT_SCHEMA_FILES)
        assert Schema._default is not None
        return Schema._default

    @classmethod
    def _resolve(cls, raw: list[_RawDef]) -> "Schema":
        at_raw: dict[str, _RawDef] = {}
        oc_raw: dict[str, _RawDef] = {}
        at_key: dict[str, str] = {}
        oc_key: dict[str, str] = {}
        for d in raw:
            table, keys = (at_raw, at_key) if d.kind == "at" else (oc_raw, oc_key)
            what = "attribute type" if d.kind == "at" else "object class"
            if not _NUMERICOID_RE.match(d.oid):
                raise SchemaError(f"{d.source}: {what} OID {d.oid!r} is not a numeric OID")
            if d.oid in table:
                raise SchemaError(f"{d.source}: {what} {d.oid} is defined twice")
            table[d.oid] = d
            keys[d.oid] = d.oid
            for n in d.fields.get("NAME", []):
                if not _DESCR_RE.match(n):
                    raise SchemaError(f"{d.source}: bad name {n!r}")
                if n.lower() in keys:
                    raise SchemaError(f"{d.source}: {what} name {n!r} is defined twice")
                keys[n.lower()] = d.oid

        # attribute types, resolved through SUP
        resolved_at: dict[str, AttributeType] = {}

        def resolve_at(oid: str, stack: tuple[str, ...] = ()) -> AttributeType:
            if oid in resolved_at:
                return resolved_at[oid]
            if oid in stack:
                raise SchemaError(f"attribute type SUP loop through {oid}")
            d = at_raw[oid]
            f = d.fields
            sup_at: AttributeType | None = None
            sup_name = None
            if "SUP" in f:
                sups = f["SUP"]
                if len(sups) != 1:
                    raise SchemaError(f"{d.source}: attribute type {oid} has more than one SUP")
                sup_oid = at_key.get(sups[0].lower())
                if sup_oid is None:
                    raise SchemaError(f"{d.source}: attribute type {oid} has unknown SUP {sups[0]!r}")
                sup_at = resolve_at(sup_oid, stack + (oid,))
                sup_name = sup_at.name
            rules: dict[str, str | None] = {}
            for kw, attr in (("EQUALITY", "equality"), ("ORDERING", "ordering"), ("SUBSTR", "substr")):
                if kw in f:
                    rule = _RULE_BY_KEY.get(f[kw].lower()) or _RULE_BY_KEY.get(f[kw])
                    if rule is None:
                        raise SchemaError(f"{d.source}: attribute type {oid} uses unknown matching rule {f[kw]!r}")
                    rules[attr] = rule
                else:
                    rules[attr] = getattr(sup_at, attr) if sup_at else None
            syntax_len = None
            if "SYNTAX" in f:
                syntax, syntax_len = f["SYNTAX"]
                if syntax not in SYNTAXES:
                    raise SchemaError(f"{d.source}: attribute type {oid} uses unknown syntax {syntax}")
            elif sup_at is not None:
                syntax, syntax_len = sup_at.syntax, sup_at.syntax_len
            else:
                raise SchemaError(f"{d.source}: attribute type {oid} has neither SYNTAX nor SUP")
            usage = f.get("USAGE", "userApplications")
            if usage not in USAGES:
                raise SchemaError(f"{d.source}: attribute type {oid} has unknown USAGE {usage!r}")
            at = AttributeType(
                oid=oid,
                names=tuple(f.get("NAME", [])),
                sup=sup_name,
                equality=rules["equality"],
                ordering=rules["ordering"],
                substr=rules["substr"],
                syntax=syntax,
                single_value=bool(f.get("SINGLE-VALUE")),
                no_user_modification=bool(f.get("NO-USER-MODIFICATION")),
                collective=bool(f.get("COLLECTIVE")),
                usage=usage,
                definition=_at_definition(oid, f, sup_name),
                description=f.get("DESC", ""),
                obsolete=bool(f.get("OBSOLETE")),
                syntax_len=syntax_len,
            )
            resolved_at[oid] = at
            return at

        for oid in at_raw:
            resolve_at(oid)
        at_by_key = {k: resolved_at[v] for k, v in at_key.items()}

        resolved_oc: dict[str, ObjectClass] = {}

        def resolve_oc(oid: str, stack: tuple[str, ...] = ()) -> ObjectClass:
            if oid in resolved_oc:
                return resolved_oc[oid]
            if oid in stack:
                raise SchemaError(f"object class SUP loop through {oid}")
            d = oc_raw[oid]
            f = d.fields
            kinds = [k for k in KINDS if f.get(k)]
            if len(kinds) > 1:
                raise SchemaError(f"{d.source}: object class {oid} has more than one kind")
            kind = kinds[0] if kinds else "STRUCTURAL"
            must: set[str] = set()
            may: set[str] = set()
            ancestry: set[str] = set()
            sup_names: list[str] = []
            for s in f.get("SUP", []):
                sup_oid = oc_key.get(s.lower())
                if sup_oid is None:
                    raise SchemaError(f"{d.source}: object class {oid} has unknown SUP {s!r}")
                sup = resolve_oc(sup_oid, stack + (oid,))
                sup_names.append(sup.name)
                must |= sup.must
                may |= sup.may
                ancestry |= sup.ancestry
                if kind == "AUXILIARY" and sup.kind == "STRUCTURAL" or (
                    kind == "STRUCTURAL" and sup.kind == "AUXILIARY"
                ) or (kind == "ABSTRACT" and sup.kind != "ABSTRACT"):
                    raise SchemaError(
                        f"{d.source}: {kind.lower()} object class {oid} cannot inherit from "
                        f"{sup.kind.lower()} class {sup.name}"
                    )
            for kw, target in (("MUST", must), ("MAY", may)):
                for a in f.get(kw, []):
                    at = at_by_key.get(a.lower())
                    if at is None:
                        raise SchemaError(f"{d.source}: object class {oid} {kw} unknown attribute {a!r}")
                    target.add(at.name)
            may -= must
            names = tuple(f.get("NAME", []))
            oc = ObjectClass(
                oid=oid,
                names=names,
                sups=tuple(sup_names),
                kind=kind,
                must=frozenset(must),
                may=frozenset(may),
                definition=_oc_definition(oid, f, sup_names, kind),
                description=f.get("DESC", ""),
                obsolete=bool(f.get("OBSOLETE")),
                ancestry=frozenset(ancestry | {names[0] if names else oid}),
            )
            resolved_oc[oid] = oc
            return oc

        for oid in oc_raw:
            resolve_oc(oid)
        return cls(list(resolved_at.values()), list(resolved_oc.values()))

    # -- lookup ----------------------------------------------------------

    def attribute(self, name_or_oid: str) -> AttributeType | None:
        """The attribute type for a name or OID (any case; ``;options`` ignored)."""
        key = name_or_oid.split(";", 1)[0].strip()
        at = self._at.get(key)
        if at is None:
            at = self._at.get(key.lower())
        return at

    def object_class(self, name_or_oid: str) -> ObjectClass | None:
        key = name_or_oid.strip()
        return self._oc.get(key) or self._oc.get(key.lower())

    def require_attribute(self, name_or_oid: str) -> AttributeType:
        """Like :meth:`attribute` but raises undefinedAttributeType."""
        at = self.attribute(name_or_oid)
        if at is None:
            raise LDAPError(ResultCode.undefinedAttributeType, f"attribute type '{name_or_oid}' is not defined")
        return at

    # -- matching --------------------------------------------------------

    def normalize(self, attr: AttributeType, value: str) -> str:
        """Equality-normalized form of ``value`` (for indexes and equality matching).

        Lenient: a value that does not fit the syntax is returned in a
        best-effort form rather than raising (an assertion with such a value
        simply matches nothing).
        """
        return self._normalize_rule(attr.equality, value)

    def _normalize_rule(self, rule: str | None, value: str) -> str:
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
            return self._normalize_dn(value)
        if rule == "uniqueMemberMatch":
            dn_part, sep, uid = value.rpartition("#")
            if sep and _BITSTRING_RE.match(uid):
                return self._normalize_dn(dn_part) + "#" + uid
            return self._normalize_dn(value)
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
            return self._normalize_oid(value)
        if rule == "objectIdentifierFirstComponentMatch":
            v = value.strip()
            if v.startswith("("):
                rest = v[1:].split()
                v = rest[0] if rest else v
            return self._normalize_oid(v)
        return value

    def _normalize_oid(self, value: str) -> str:
        v = value.strip()
        oc = self.object_class(v)
        if oc is not None:
            return oc.name.lower()
        at = self.attribute(v)
        if at is not None:
            return at.name.lower()
        return v.lower()

    def _normalize_dn(self, value: str) -> str:
        from ldapsync.directory.dn import parse_dn

        try:
            return parse_dn(value, self).norm
        except LDAPError:
            return value.strip().lower()

    def substr_normalize(self, attr: AttributeType, value: str) -> str:
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
        return self._normalize_rule(rule, value)

    def ordering_key(self, attr: AttributeType, value: str) -> Any:
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
        return self._normalize_rule(rule, value)

    # -- syntax checks ---------------------------------------------------

    def validate_value(self, attr: AttributeType, value: str) -> None:
        """Raise invalidAttributeSyntax if ``value`` does not fit ``attr``'s syntax.

        The ``{len}`` bound of a SYNTAX is only a suggestion (RFC 4512 4.1.2)
        and is not enforced.
        """
        syntax = attr.syntax
        problem = self._syntax_problem(syntax, value)
        if problem is not None:
            raise LDAPError(
                ResultCode.invalidAttributeSyntax,
                f"{attr.name}: value {_show(value)} {problem} "
                f"({SYNTAXES.get(syntax or '', syntax)} syntax)",
            )

    def _syntax_problem(self, syntax: str | None, value: str) -> str | None:
        if syntax is None:
            return None
        name = SYNTAXES.get(syntax)
        if name == "Distinguished Name":
            return self._dn_problem(value)
        if name == "Name And Optional UID":
            dn_part, sep, uid = value.rpartition("#")
            if sep and _BITSTRING_RE.match(uid):
                return self._dn_problem(dn_part)
            return self._dn_problem(value)
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

    def _dn_problem(self, value: str) -> str | None:
        from ldapsync.directory.dn import parse_dn

        try:
            parse_dn(value, self)
        except LDAPError as e:
            return f"is not a valid DN ({e.message})"
        return None

    # -- entry checks ----------------------------------------------------

    def check_entry(self, attrs: Mapping[str, Sequence[str]]) -> str:
        """Check an entry's attributes against its object classes; return its structural class.

        ``attrs`` maps attribute names (canonical names expected; any spelling
        is resolved) to values and must include ``objectClass``.  Operational
        attributes are not checked against the object classes.
        """
        by_at: dict[AttributeType, Sequence[str]] = {}
        for key, values in attrs.items():
            at = self.attribute(key)
            if at is None:
                raise LDAPError(ResultCode.undefinedAttributeType, f"attribute type '{key}' is not defined")
            if at in by_at:
                by_at[at] = list(by_at[at]) + list(values)
            else:
                by_at[at] = values
        oc_at = self._at["2.5.4.0"]
        oc_values = [v for v in by_at.get(oc_at, ()) if v.strip()]
        if not oc_values:
            raise LDAPError(ResultCode.objectClassViolation, "no objectClass attribute")
        classes: list[ObjectClass] = []
        for v in oc_values:
            oc = self.object_class(v)
            if oc is None:
                raise LDAPError(ResultCode.objectClassViolation, f"unknown objectClass '{v.strip()}'")
            classes.append(oc)
        all_names: set[str] = set()
        for oc in classes:
            all_names |= oc.ancestry
        all_classes = [self._oc[n.lower()] for n in all_names]
        structural = [oc for oc in all_classes if oc.kind == "STRUCTURAL"]
        if not structural:
            raise LDAPError(ResultCode.objectClassViolation, "no structural object class provided")
        leaves = [oc for oc in structural
                  if not any(other is not oc and oc.name in other.ancestry for other in structural)]
        if len(leaves) > 1:
            names = sorted((oc.name for oc in leaves), key=str.lower)
            raise LDAPError(
                ResultCode.objectClassViolation,
                f"invalid structural object class chain ({'/'.join(names)})",
            )
        leaf = leaves[0]
        present = {at.name for at, vals in by_at.items() if any(True for _ in vals)}
        for oc in sorted(all_classes, key=lambda c: c.name.lower()):
            for req in sorted(oc.must, key=str.lower):
                if req not in present:
                    raise LDAPError(
                        ResultCode.objectClassViolation,
                        f"object class '{oc.name}' requires attribute '{req}'",
                    )
        extensible = "extensibleObject" in all_names
        allowed: set[str] = set()
        for oc in all_classes:
            allowed |= oc.must
            allowed |= oc.may
        for at, values in by_at.items():
            if at.operational:
                continue
            if not extensible and at.name not in allowed:
                raise LDAPError(ResultCode.objectClassViolation, f"attribute '{at.name}' not allowed")
            if at.single_value and len(values) > 1:
                raise LDAPError(
                    ResultCode.constraintViolation, f"attribute '{at.name}' cannot have multiple values"
                )
        return leaf.name

    # -- cn=Subschema ----------------------------------------------------

    def subschema_values(self) -> dict[str, list[str]]:
        """attributeTypes, objectClasses, ldapSyntaxes, matchingRules, matchingRuleUse (RFC 4512)."""
        uses: dict[str, list[str]] = {}
        for at in self.attribute_types:
            for rule in {at.equality, at.ordering, at.substr}:
                if rule:
                    uses.setdefault(rule, []).append(at.name)
        syntaxes = [f"( {oid} DESC '{desc}' )" for oid, desc in SYNTAXES.items()]
        rules = [f"( {oid} NAME '{name}' SYNTAX {syn} )" for name, (oid, syn) in MATCHING_RULES.items()]
        rule_use = []
        for name, (oid, _syn) in MATCHING_RULES.items():
            names = uses.get(name)
            if names:
                applies = names[0] if len(names) == 1 else "( " + " $ ".join(names) + " )"
                rule_use.append(f"( {oid} NAME '{name}' APPLIES {applies} )")
        return {
            "attributeTypes": [at.definition for at in self.attribute_types],
            "objectClasses": [oc.definition for oc in self.object_classes],
            "ldapSyntaxes": syntaxes,
            "matchingRules": rules,
            "matchingRuleUse": rule_use,
        }


# --------------------------------------------------------------------------
# Helpers for loading


def _expand_oid(token: str, macros: Mapping[str, str], loc: str) -> str:
    if _NUMERICOID_RE.match(token):
        return token
    name, sep, suffix = token.partition(":")
    base = macros.get(name.lower())
    if base is None:
        raise SchemaError(f"{loc}: unknown OID macro {name!r}")
    return f"{base}.{suffix}" if sep else base


def _expand_syntax(token: str, macros: Mapping[str, str], loc: str) -> tuple[str, int | None]:
    m = re.match(r"^([^{]+)(?:\{(\d+)\})?$", token)
    if not m:
        raise SchemaError(f"{loc}: bad SYNTAX {token!r}")
    return _expand_oid(m.group(1), macros, loc), int(m.group(2)) if m.group(2) else None


def _qd(s: str) -> str:
    return "'" + s.replace("\\", "\\5C").replace("'", "\\27") + "'"


def _qdlist(names: Sequence[str]) -> str:
    if len(names) == 1:
        return _qd(names[0])
    return "( " + " ".join(_qd(n) for n in names) + " )"


def _oidlist(names: Sequence[str]) -> str:
    if len(names) == 1:
        return names[0]
    return "( " + " $ ".join(names) + " )"


def _at_definition(oid: str, f: Mapping[str, Any], sup_name: str | None) -> str:
    parts = ["(", oid]
    if f.get("NAME"):
        parts += ["NAME", _qdlist(f["NAME"])]
    if f.get("DESC"):
        parts += ["DESC", _qd(f["DESC"])]
    if f.get("OBSOLETE"):
        parts.append("OBSOLETE")
    if sup_name:
        parts += ["SUP", sup_name]
    for kw in ("EQUALITY", "ORDERING", "SUBSTR"):
        if kw in f:
            parts += [kw, _RULE_BY_KEY.get(f[kw].lower(), f[kw])]
    if "SYNTAX" in f:
        syn, length = f["SYNTAX"]
        parts += ["SYNTAX", f"{syn}{{{length}}}" if length else syn]
    for kw in ("SINGLE-VALUE", "COLLECTIVE", "NO-USER-MODIFICATION"):
        if f.get(kw):
            parts.append(kw)
    if "USAGE" in f and f["USAGE"] != "userApplications":
        parts += ["USAGE", f["USAGE"]]
    parts.append(")")
    return " ".join(parts)


def _oc_definition(oid: str, f: Mapping[str, Any], sups: Sequence[str], kind: str) -> str:
    parts = ["(", oid]
    if f.get("NAME"):
        parts += ["NAME", _qdlist(f["NAME"])]
    if f.get("DESC"):
        parts += ["DESC", _qd(f["DESC"])]
    if f.get("OBSOLETE"):
        parts.append("OBSOLETE")
    if sups:
        parts += ["SUP", _oidlist(sups)]
    parts.append(kind)
    for kw in ("MUST", "MAY"):
        if f.get(kw):
            parts += [kw, _oidlist(f[kw])]
    parts.append(")")
    return " ".join(parts)


def _show(value: str) -> str:
    return repr(value if len(value) <= 64 else value[:61] + "...")
