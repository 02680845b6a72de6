"""Search filters: the protocol-neutral filter tree, its evaluation, its SQL plan.

A filter arrives from the protocol edge as a tree of the small dataclasses
below.  :func:`compile_filter` turns it, once per search, into

- a predicate ``entry attrs -> True | False | None`` implementing RFC 4511's
  three-valued logic with the schema's matching rules (caseIgnore for names and
  mail, DN matching for member, integer ordering, ...), and
- a SQL *plan* (see ``ldapsync.store.entries``) over the indexed attributes that
  selects a superset of the matching entries, so a search never walks the tree.

Every candidate the plan selects is checked with the predicate, so the plan
only has to be a superset — never exact.

Attributes the requester may not read (``hidden``: userPassword for everyone,
the password policy state for non-admins) are Undefined in every filter item —
presence, equality, substring, ordering, approx, extensible with or without an
attribute name, dnAttributes — and never reach the SQL plan, so no filter can
probe them (README: "Security").  Substring and ordering assertions on a type without
that matching rule are Undefined too (RFC 4511 §4.5.1.7), as in slapd.  NOT of
Undefined stays Undefined (three-valued logic), so ``(!(userPassword=x))``
matches nothing either.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from ldapsync.directory.errors import LDAPError
from ldapsync.directory.schema import AttributeType, Schema
from ldapsync.store.entries import like_pattern
from ldapsync.directory.dn import parse_dn


@dataclass(frozen=True)
class And:
    items: tuple["Filter", ...]


@dataclass(frozen=True)
class Or:
    items: tuple["Filter", ...]


@dataclass(frozen=True)
class Not:
    item: "Filter"


@dataclass(frozen=True)
class Eq:
    attr: str
    value: str


@dataclass(frozen=True)
class Approx:
    attr: str
    value: str


@dataclass(frozen=True)
class Ge:
    attr: str
    value: str


@dataclass(frozen=True)
class Le:
    attr: str
    value: str


@dataclass(frozen=True)
class Present:
    attr: str


@dataclass(frozen=True)
class Sub:
    attr: str
    initial: str | None
    any: tuple[str, ...]
    final: str | None


@dataclass(frozen=True)
class Ext:
    rule: str | None
    attr: str | None
    value: str
    dn_attributes: bool


Filter = Union[And, Or, Not, Eq, Approx, Ge, Le, Present, Sub, Ext]
Attrs = Mapping[str, Sequence[str]]
Pred = Callable[[Attrs], "bool | None"]

# Matching rules usable in extensible matches, by OID and name → (normalizer kind).
_RULES = {
    "2.5.13.2": "caseIgnoreMatch", "caseignorematch": "caseIgnoreMatch",
    "2.5.13.5": "caseExactMatch", "caseexactmatch": "caseExactMatch",
    "1.3.6.1.4.1.1466.109.114.2": "caseIgnoreIA5Match", "caseignoreia5match": "caseIgnoreIA5Match",
    "1.3.6.1.4.1.1466.109.114.1": "caseExactIA5Match", "caseexactia5match": "caseExactIA5Match",
    "2.5.13.1": "distinguishedNameMatch", "distinguishednamematch": "distinguishedNameMatch",
    "2.5.13.14": "integerMatch", "integermatch": "integerMatch",
    "2.5.13.17": "octetStringMatch", "octetstringmatch": "octetStringMatch",
    "2.5.13.8": "numericStringMatch", "numericstringmatch": "numericStringMatch",
    "2.5.13.13": "booleanMatch", "booleanmatch": "booleanMatch",
    "1.2.840.113556.1.4.803": "bitAnd", "1.2.840.113556.1.4.804": "bitOr",
}


# Plan size bounds: SQLite refuses expressions nested deeper than 1,000 ("Expression tree is too
# large"), and a flat OR/AND of N subqueries is N deep.  Equality items of an OR on one attribute
# become one IN list; an OR with more other items, or more values than below, scans the scope
# instead (the predicate decides anyway).  An AND keeps a few of its items' plans, and boolean
# nesting below PLAN_MAX_DEPTH is left to the predicate: at most 8 x (64 + the indexed attributes).
OR_MAX_OTHER_ITEMS = 64
OR_MAX_VALUES = 10000
AND_MAX_ITEMS = 16
PLAN_MAX_DEPTH = 8
NOTHING = ("none",)     # the plan of an item that is never True: selects no candidate


def _tri_and(results: list[bool | None]) -> bool | None:
    if any(r is False for r in results):
        return False
    if any(r is None for r in results):
        return None
    return True


class FilterCompiler:
    """Compiles filters against one schema; ``indexed`` holds lower-case attribute names."""

    def __init__(self, schema: Schema, indexed: frozenset[str]) -> None:
        self.schema = schema
        self.indexed = indexed
        self._subtypes: dict[str, tuple[str, ...]] = {}

    # -- attribute types ---------------------------------------------------
    def names_for(self, at: AttributeType) -> tuple[str, ...]:
        """Canonical names of ``at`` and all its subtypes (a filter on ``name`` matches cn, sn...)."""
        key = at.name
        got = self._subtypes.get(key)
        if got is None:
            subs = [at.name]
            for other in self.schema.attribute_types:
                cur = other
                seen = 0
                while cur.sup and seen < 16:
                    seen += 1
                    sup = self.schema.attribute(cur.sup)
                    if sup is None:
                        break
                    if sup.oid == at.oid:
                        subs.append(other.name)
                        break
                    cur = sup
            got = self._subtypes[key] = tuple(dict.fromkeys(subs))
        return got

    def _values(self, attrs: Attrs, names: tuple[str, ...]) -> list[str]:
        if len(names) == 1:
            return list(attrs.get(names[0], ()))
        out: list[str] = []
        for n in names:
            out.extend(attrs.get(n, ()))
        return out

    # -- compile -------------------------------------------------------------
    def compile(self, f: Filter, hidden: frozenset[str] = frozenset()) -> tuple[Pred, Any]:
        """(predicate, SQL plan) of ``f``; ``hidden`` holds the canonical names of the attributes
        the requester may not read: every item on them is Undefined."""
        return self._pred(f, hidden), self._plan(f, hidden, 0)

    def _pred(self, f: Filter, hidden: frozenset[str] = frozenset()) -> Pred:
        s = self.schema
        if isinstance(f, And):
            preds = [self._pred(x, hidden) for x in f.items]
            return lambda a: _tri_and([p(a) for p in preds])
        if isinstance(f, Or):
            preds = [self._pred(x, hidden) for x in f.items]

            def _or(a: Attrs) -> bool | None:
                rs = [p(a) for p in preds]
                if any(r is True for r in rs):
                    return True
                if any(r is None for r in rs):
                    return None
                return False
            return _or
        if isinstance(f, Not):
            p = self._pred(f.item, hidden)

            def _not(a: Attrs) -> bool | None:
                r = p(a)
                return None if r is None else not r
            return _not
        if isinstance(f, Present):
            if f.attr.lower() == "objectclass":
                return lambda a: True
            at = s.attribute(f.attr)
            if at is None:
                return lambda a: False
            if at.name in hidden:
                return lambda a: None
            names = self._visible_names(at, hidden)
            return lambda a: any(n in a and len(a[n]) > 0 for n in names)
        if isinstance(f, Ext):
            return self._ext(f, hidden)
        at = s.attribute(f.attr)
        if at is None or at.name in hidden:
            return lambda a: None
        names = self._visible_names(at, hidden)
        if isinstance(f, (Eq, Approx)):
            if at.equality is None:
                return lambda a: None
            try:
                s.validate_value(at, f.value) if at.is_dn else None
                want = s.normalize(at, f.value)
            except LDAPError:
                return lambda a: None
            norm = s.normalize

            def _eq(a: Attrs) -> bool | None:
                for v in self._values(a, names):
                    try:
                        if norm(at, v) == want:
                            return True
                    except LDAPError:
                        continue
                return False
            return _eq
        if isinstance(f, (Ge, Le)):
            if at.ordering is None:
                return lambda a: None       # RFC 4511 §4.5.1.7.3: no ORDERING rule → Undefined
            try:
                want_key = s.ordering_key(at, f.value)
            except (LDAPError, ValueError):
                return lambda a: None
            ge = isinstance(f, Ge)

            def _ord(a: Attrs) -> bool | None:
                for v in self._values(a, names):
                    try:
                        k = s.ordering_key(at, v)
                        if (k >= want_key) if ge else (k <= want_key):
                            return True
                    except (LDAPError, ValueError, TypeError):
                        continue
                return False
            return _ord
        if isinstance(f, Sub):
            if at.substr is None:
                return lambda a: None       # RFC 4511 §4.5.1.7.2: no SUBSTR rule → Undefined
            sn = s.substr_normalize
            try:
                ini = sn(at, f.initial) if f.initial else None
                anys = [sn(at, x) for x in f.any if x]
                fin = sn(at, f.final) if f.final else None
            except LDAPError:
                return lambda a: None

            def _sub(a: Attrs) -> bool | None:
                for v in self._values(a, names):
                    try:
                        n = sn(at, v)
                    except LDAPError:
                        continue
                    pos = 0
                    if ini is not None:
                        if not n.startswith(ini):
                            continue
                        pos = len(ini)
                    end = len(n)
                    if fin is not None:
                        if not n.endswith(fin) or end - len(fin) < pos:
                            continue
                        end -= len(fin)
                    ok = True
                    for part in anys:
                        i = n.find(part, pos, end)
                        if i < 0:
                            ok = False
                            break
                        pos = i + len(part)
                    if ok:
                        return True
                return False
            return _sub
        raise LDAPError(2, f"unsupported filter item {type(f).__name__}")

    def _visible_names(self, at: AttributeType, hidden: frozenset[str]) -> tuple[str, ...]:
        """``names_for(at)`` without the hidden ones (a filter on a supertype never sees them)."""
        names = self.names_for(at)
        return tuple(n for n in names if n not in hidden) if hidden else names

    def _ext(self, f: Ext, hidden: frozenset[str] = frozenset()) -> Pred:
        s = self.schema
        rule = _RULES.get((f.rule or "").lower()) if f.rule else None
        if f.rule and rule is None:
            return lambda a: None
        at = s.attribute(f.attr) if f.attr else None
        if f.attr and (at is None or at.name in hidden):
            return lambda a: None

        def norm_with(v: str, attr: AttributeType | None) -> Any:
            if rule == "caseIgnoreMatch" or rule == "caseIgnoreIA5Match":
                return " ".join(v.split()).casefold()
            if rule in ("caseExactMatch", "caseExactIA5Match"):
                return " ".join(v.split())
            if rule == "integerMatch" or rule in ("bitAnd", "bitOr"):
                return int(v.strip())
            if rule == "octetStringMatch":
                return v
            if rule == "numericStringMatch":
                return v.replace(" ", "")
            if rule == "booleanMatch":
                return v.strip().upper()
            if attr is not None:
                return s.normalize(attr, v)
            return " ".join(v.split()).casefold()

        def match(v: str, attr: AttributeType | None) -> bool:
            try:
                if rule == "distinguishedNameMatch" or (rule is None and attr is not None and attr.is_dn):
                    return parse_dn(v, s).norm == parse_dn(f.value, s).norm
                a, b = norm_with(v, attr), norm_with(f.value, attr)
                if rule == "bitAnd":
                    return (a & b) == b
                if rule == "bitOr":
                    return (a & b) != 0
                return bool(a == b)
            except (LDAPError, ValueError):
                return False

        names = self._visible_names(at, hidden) if at is not None else None

        def _pred(a: Attrs) -> bool | None:
            if names is not None:
                for v in self._values(a, names):
                    if match(v, at):
                        return True
            else:
                for n, vs in a.items():
                    if n in hidden:
                        continue            # never scanned: userPassword, the policy state
                    nat = s.attribute(n)
                    if nat is None or nat.operational:
                        continue
                    if any(match(v, nat) for v in vs):
                        return True
            if f.dn_attributes:
                # Matching against the RDN components of the entry DN is done by the caller.
                dn_avas = a.get("\x00dn_avas", ())
                for ava in dn_avas:
                    n, _, v = ava.partition("=")
                    if names is not None and n not in names:
                        continue
                    nat = s.attribute(n)
                    if nat is not None and nat.name in hidden:
                        continue
                    if match(v, nat):
                        return True
            return False
        return _pred

    # -- SQL plan ------------------------------------------------------------
    def _plan(self, f: Filter, hidden: frozenset[str] = frozenset(), depth: int = 0) -> Any:
        """A superset of the entries ``f`` matches, as a plan for the store; None: the scope."""
        s = self.schema
        if isinstance(f, (And, Or)) and depth >= PLAN_MAX_DEPTH:
            return None
        if isinstance(f, And):
            plans = [p for p in (self._plan(x, hidden, depth + 1) for x in f.items) if p is not None]
            if not plans:
                return None
            if NOTHING in plans:
                return NOTHING
            plans = plans[:AND_MAX_ITEMS]       # fewer items select more: still a superset
            return plans[0] if len(plans) == 1 else ("and", plans)
        if isinstance(f, Or):
            return self._or_plan([self._plan(x, hidden, depth + 1) for x in f.items])
        if isinstance(f, (Not, Ext)):
            return None
        attr = f.attr
        if isinstance(f, Present) and attr.lower() == "objectclass":
            return None
        at = s.attribute(attr)
        if at is None:
            return NOTHING          # False (presence) or Undefined: never True
        if at.name in hidden:
            return NOTHING          # Undefined: never True, and no index of it is ever read
        if (isinstance(f, (Ge, Le)) and at.ordering is None) or (isinstance(f, Sub) and at.substr is None):
            return NOTHING
        key = at.name.lower()
        if key not in self.indexed or len(self.names_for(at)) != 1:
            return None
        try:
            if isinstance(f, Eq) or isinstance(f, Approx):
                if at.equality is None:
                    return None
                return ("eq", key, s.normalize(at, f.value))
            if isinstance(f, Present) or isinstance(f, (Ge, Le)):
                return ("present", key)
            if isinstance(f, Sub):
                if at.equality is None:
                    return None
                if f.initial and not f.any and not f.final:
                    return ("prefix", key, s.substr_normalize(at, f.initial))
                ini = s.substr_normalize(at, f.initial) if f.initial else None
                anys = [s.substr_normalize(at, x) for x in f.any if x]
                fin = s.substr_normalize(at, f.final) if f.final else None
                return ("like", key, like_pattern(ini, anys, fin))
        except LDAPError:
            return None
        return None

    @staticmethod
    def _or_plan(plans: list[Any]) -> Any:
        """An OR's plan: its equality items grouped per attribute into IN lists (an OR of a
        thousand terms is a thousand-deep expression otherwise, which SQLite refuses)."""
        if not plans or any(p is None for p in plans):
            return None
        flat: list[Any] = []
        todo = list(plans)
        while todo:
            p = todo.pop()
            if p[0] == "or":
                todo.extend(p[1])
            elif p != NOTHING:
                flat.append(p)
        if not flat:
            return NOTHING
        values: dict[str, list[str]] = {}
        others: list[Any] = []
        for p in flat:
            if p[0] == "eq":
                values.setdefault(p[1], []).append(p[2])
            elif p[0] == "in":
                values.setdefault(p[1], []).extend(p[2])
            else:
                others.append(p)
        if len(others) > OR_MAX_OTHER_ITEMS or sum(len(v) for v in values.values()) > OR_MAX_VALUES:
            return None
        out = [("eq", k, v[0]) if len(v) == 1 else ("in", k, tuple(dict.fromkeys(v))) for k, v in values.items()]
        out += others
        return out[0] if len(out) == 1 else ("or", out)
