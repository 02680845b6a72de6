"""Reading OpenLDAP-format ``.schema`` files: RFC 4512 descriptions into resolved types and classes.

This module owns the schema *files* (the ones in the project's ``schema/``
folder): splitting them into statements, ``objectIdentifier`` macros,
tokenizing and parsing RFC 4512 attribute type and object class
descriptions (:func:`read_definitions`), and resolving inheritance
(:func:`resolve`): an attribute type's effective matching rules and syntax,
an object class's effective MUST/MAY and ancestry, and the canonical
definition strings ``cn=Subschema`` shows.  Anything wrong in a file is a
:class:`SchemaError` (a start-up problem, not a client's).  It runs only
when a :class:`~ldapsync.directory.schema.Schema` is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldapsync.directory.schema_model import (
    _DESCR_RE,
    _NUMERICOID_RE,
    _RULE_BY_KEY,
    KINDS,
    SYNTAXES,
    USAGES,
    AttributeType,
    ObjectClass,
    SchemaError,
)

__all__ = ["read_definitions", "resolve"]


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


def read_definitions(paths: Iterable[Path]) -> list[_RawDef]:
    """Read OpenLDAP-format schema files (in order) into raw definitions; :func:`resolve` them next."""
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
    return raw


def resolve(raw: list[_RawDef]) -> tuple[list[AttributeType], list[ObjectClass]]:
    """Resolve raw definitions through SUP: effective matching rules, syntax, MUST/MAY, ancestry."""
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
    return list(resolved_at.values()), list(resolved_oc.values())


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
