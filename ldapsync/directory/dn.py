"""Distinguished names (RFC 4514): parsing, normalization, comparison, tree keys.

This module owns the string form of names.  A :class:`DN` keeps what the
user typed (for display, with attribute types in their canonical spelling)
and a normalized form (``norm``) in which two names that LDAP considers equal
are byte-for-byte equal: attribute types lowercased canonical names, values
normalized by the attribute's equality rule, multi-valued RDNs sorted, and
RFC 4514 escaping applied the same way every time.  ``path_key`` turns the
tree into a string order so a subtree is a prefix range in an index.

Parsing needs the schema (to know attribute types and their matching rules)
but nothing else: no storage, no protocol.  Bad names raise
``LDAPError(invalidDNSyntax)``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ldapsync.directory.errors import LDAPError, ResultCode

if TYPE_CHECKING:
    from ldapsync.directory.schema import Schema

__all__ = ["RDN", "DN", "ROOT_DN", "parse_dn", "parse_rdn", "make_rdn", "escape_value"]

_CACHE_LIMIT = 20000
_DESCR_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-]*$")
_NUMERICOID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
_HEX = frozenset("0123456789abcdefABCDEF")
_SPECIAL = frozenset('"+,;<>\\')  # escaped on output
_ESCAPABLE = frozenset('"+,;<>\\= #')  # accepted after a backslash
_ESCAPE_NEEDED_RE = re.compile(r'["+,;<>\\\x00-\x1f\x7f]|^[ #]| $')
# A "plain" DN: ASCII, single-valued RDNs ``descr=value``, no spaces around the separators,
# values of printable ASCII without escapes, specials, '#' or '=' (spaces only inside).  It
# means the same as the characters say, so it is cut at the commas and each RDN built (and
# cached) on its own; everything else goes through the full parser (_parse).
_PLAIN_CHAR = r'[!\x24-\x2a\x2d-\x3a\x3f-\x5b\x5d-\x7e]'     # printable ASCII but "#+,;<=>\\
_PLAIN_VALUE = _PLAIN_CHAR + r'(?:[ ' + _PLAIN_CHAR[1:-1] + r']*' + _PLAIN_CHAR + r')?'
_PLAIN_RDN = r'[A-Za-z][A-Za-z0-9-]*=' + _PLAIN_VALUE
_PLAIN_DN_RE = re.compile(_PLAIN_RDN + r'(?:,' + _PLAIN_RDN + r')*')


def escape_value(value: str) -> str:
    """RFC 4514 escaping of an attribute value (specials, leading ``#``/space, trailing space, controls)."""
    if not value or not _ESCAPE_NEEDED_RE.search(value):
        return value
    out = []
    last = len(value) - 1
    for i, ch in enumerate(value):
        if ch in _SPECIAL:
            out.append("\\" + ch)
        elif ch < " " or ch == "\x7f":
            out.append("\\%02x" % ord(ch))
        elif ch == " " and (i == 0 or i == last):
            out.append("\\ ")
        elif ch == "#" and i == 0:
            out.append("\\#")
        else:
            out.append(ch)
    return "".join(out)


@dataclass(frozen=True, eq=False)
class RDN:
    """A relative distinguished name: one or more (attribute, value) assertions.

    ``avas`` holds (canonical attribute name, value) in the order given; a
    value given as ``#hex`` BER is kept as that raw text (flagged in ``ber``).
    Equality and hashing use ``norm``.
    """

    avas: tuple[tuple[str, str], ...]
    norm: str
    ber: tuple[bool, ...] = ()

    def __str__(self) -> str:
        text = self.__dict__.get("_text")      # computed once (an RDN is shared by many DNs)
        if text is None:
            ber = self.ber or (False,) * len(self.avas)
            text = "+".join(
                f"{name}={value if is_ber else escape_value(value)}"
                for (name, value), is_ber in zip(self.avas, ber)
            )
            self.__dict__["_text"] = text
        return text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RDN) and other.norm == self.norm

    def __hash__(self) -> int:
        return hash(self.norm)

    def value_of(self, attr_name: str) -> str | None:
        """The value for an attribute (canonical name, any case) in this RDN, else None."""
        key = attr_name.lower()
        for name, value in self.avas:
            if name.lower() == key:
                return value
        return None

    @property
    def attribute_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.avas)


@dataclass(frozen=True, eq=False)
class DN:
    """A distinguished name, leaf RDN first; ``DN(())`` is the root DSE.

    Equality and hashing use ``norm``; ``str()`` is the user-facing form.
    """

    rdns: tuple[RDN, ...] = ()
    norm: str = field(init=False)
    path_key: str = field(init=False, repr=False)
    _text: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rdns = tuple(self.rdns)
        object.__setattr__(self, "rdns", rdns)
        object.__setattr__(self, "norm", ",".join(r.norm for r in rdns))
        object.__setattr__(self, "path_key", "".join(r.norm + "," for r in reversed(rdns)))
        object.__setattr__(self, "_text", ",".join(str(r) for r in rdns))

    def __str__(self) -> str:
        return self._text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DN) and other.norm == self.norm

    def __hash__(self) -> int:
        return hash(self.norm)

    def __len__(self) -> int:
        return len(self.rdns)

    @property
    def is_root(self) -> bool:
        return not self.rdns

    @property
    def rdn(self) -> RDN | None:
        return self.rdns[0] if self.rdns else None

    @property
    def parent(self) -> "DN | None":
        if not self.rdns:
            return None
        return DN(self.rdns[1:])

    @property
    def path_key_end(self) -> str:
        """Exclusive upper bound of the descendants' path keys: ``[path_key, path_key_end)``.

        For the root it is ``"\\U0010ffff"`` (every key sorts below it).
        """
        if not self.rdns:
            return "\U0010ffff"
        return self.path_key[:-1] + chr(ord(",") + 1)

    def child(self, rdn: RDN) -> "DN":
        return DN((rdn,) + self.rdns)

    def with_parent(self, new_parent: "DN") -> "DN":
        """This entry's RDN under ``new_parent`` (modDN with newSuperior)."""
        if not self.rdns:
            raise LDAPError(ResultCode.unwillingToPerform, "the root DSE cannot be moved")
        return DN((self.rdns[0],) + new_parent.rdns)

    def with_rdn(self, new_rdn: RDN) -> "DN":
        """This entry renamed to ``new_rdn`` under the same parent."""
        if not self.rdns:
            raise LDAPError(ResultCode.unwillingToPerform, "the root DSE cannot be renamed")
        return DN((new_rdn,) + self.rdns[1:])

    def rebase(self, old_base: "DN", new_base: "DN") -> "DN":
        """Replace the ancestor ``old_base`` (or self) by ``new_base`` (subtree moves)."""
        if not self.is_descendant_or_self(old_base):
            raise ValueError(f"{self} is not under {old_base}")
        keep = len(self.rdns) - len(old_base.rdns)
        return DN(self.rdns[:keep] + new_base.rdns)

    def is_descendant_of(self, other: "DN") -> bool:
        """True if ``self`` is strictly below ``other``."""
        n = len(other.rdns)
        if len(self.rdns) <= n:
            return False
        return n == 0 or self.path_key.startswith(other.path_key)

    def is_descendant_or_self(self, other: "DN") -> bool:
        return self.norm == other.norm or self.is_descendant_of(other)

    def is_child_of(self, other: "DN") -> bool:
        return len(self.rdns) == len(other.rdns) + 1 and self.is_descendant_of(other)


ROOT_DN = DN(())


def _invalid(text: str, reason: str) -> LDAPError:
    shown = text if len(text) <= 200 else text[:197] + "..."
    return LDAPError(ResultCode.invalidDNSyntax, f'invalid DN "{shown}": {reason}')


def _resolve_type(text: str, typ: str, schema: "Schema") -> str:
    if not typ:
        raise _invalid(text, "missing attribute type")
    if typ[:4].upper() == "OID." and _NUMERICOID_RE.match(typ[4:]):
        typ = typ[4:]
    elif not (_DESCR_RE.match(typ) or _NUMERICOID_RE.match(typ)):
        raise _invalid(text, f"bad attribute type '{typ}'")
    at = schema.attribute(typ)
    if at is None:
        raise _invalid(text, f"unknown attribute type '{typ}'")
    return at.name


def _norm_ava(text: str, name: str, value: str, is_ber: bool, schema: "Schema") -> str:
    if is_ber:
        return f"{name.lower()}={value.lower()}"
    at = schema.attribute(name)
    assert at is not None
    problem = schema._syntax_problem(at.syntax, value)
    if problem is not None:
        raise _invalid(text, f"value of '{name}' {problem}")
    return f"{name.lower()}={escape_value(schema.normalize(at, value))}"


def _build_rdn(text: str, avas: Sequence[tuple[str, str, bool]], schema: "Schema") -> RDN:
    seen: set[str] = set()
    norms = []
    for name, value, is_ber in avas:
        if name in seen:
            raise _invalid(text, f"attribute type '{name}' appears twice in one RDN")
        seen.add(name)
        norms.append(_norm_ava(text, name, value, is_ber, schema))
    norms.sort()
    return RDN(
        avas=tuple((n, v) for n, v, _ in avas),
        norm="+".join(norms),
        ber=tuple(b for _, _, b in avas),
    )


def make_rdn(pairs: Iterable[tuple[str, str]], schema: "Schema") -> RDN:
    """Build an RDN from (attribute, unescaped value) pairs, e.g. ``[("uid", "alice")]``."""
    items = [(_resolve_type(str(pairs), a, schema), v, False) for a, v in pairs]
    text = "+".join(f"{a}={escape_value(v)}" for a, v, _ in items)
    if not items:
        raise _invalid(text, "an RDN needs at least one attribute value")
    for a, v, _ in items:
        if v == "":
            raise _invalid(text, f"empty value for '{a}'")
    return _build_rdn(text, items, schema)


def _parse(text: str, schema: "Schema") -> DN:
    s = text
    n = len(s)
    i = 0
    while i < n and s[i] == " ":
        i += 1
    if i == n:
        return ROOT_DN
    rdns: list[RDN] = []
    while True:
        avas: list[tuple[str, str, bool]] = []
        while True:
            while i < n and s[i] == " ":
                i += 1
            start = i
            while i < n and s[i] not in "= ,+\\":
                i += 1
            typ = s[start:i]
            while i < n and s[i] == " ":
                i += 1
            if i >= n or s[i] != "=":
                if not typ:
                    raise _invalid(text, "missing attribute type")
                raise _invalid(text, f"missing '=' after '{typ}'")
            name = _resolve_type(text, typ, schema)
            i += 1
            while i < n and s[i] == " ":
                i += 1
            if i < n and s[i] == "#":
                start = i
                i += 1
                while i < n and s[i] in _HEX:
                    i += 1
                hexpart = s[start + 1:i]
                if not hexpart or len(hexpart) % 2:
                    raise _invalid(text, f"bad hex value for '{name}'")
                while i < n and s[i] == " ":
                    i += 1
                if i < n and s[i] not in ",+":
                    raise _invalid(text, f"unexpected character after hex value of '{name}'")
                avas.append((name, s[start:i].rstrip(" "), True))
            else:
                buf = bytearray()
                keep = 0  # length of buf up to the last significant character
                while i < n:
                    ch = s[i]
                    if ch == "\\":
                        if i + 1 >= n:
                            raise _invalid(text, "'\\' at end of DN")
                        nxt = s[i + 1]
                        if nxt in _HEX and i + 2 < n and s[i + 2] in _HEX:
                            buf.append(int(s[i + 1:i + 3], 16))
                            i += 3
                        elif nxt in _ESCAPABLE:
                            buf.extend(nxt.encode())
                            i += 2
                        else:
                            raise _invalid(text, f"bad escape '\\{nxt}'")
                        keep = len(buf)
                        continue
                    if ch == "," or ch == "+":
                        break
                    buf.extend(ch.encode("utf-8", "surrogatepass"))
                    i += 1
                    if ch != " ":
                        keep = len(buf)
                try:
                    value = bytes(buf[:keep]).decode("utf-8")
                except UnicodeDecodeError:
                    raise _invalid(text, f"value of '{name}' is not valid UTF-8") from None
                if value == "":
                    raise _invalid(text, f"empty value for '{name}'")
                if "\x00" in value:
                    raise _invalid(text, f"value of '{name}' contains a NUL character")
                avas.append((name, value, False))
            if i < n and s[i] == "+":
                i += 1
                continue
            break
        rdns.append(_build_rdn(text, avas, schema))
        if i >= n:
            break
        # s[i] == ","
        i += 1
        j = i
        while j < n and s[j] == " ":
            j += 1
        if j >= n:
            raise _invalid(text, "ends with a ','")
    return DN(tuple(rdns))


def _parse_plain(text: str, schema: "Schema") -> DN:
    """:func:`_parse` of a text that matches ``_PLAIN_DN_RE``: the same DN, each RDN cached.

    A bad name (unknown type, a value its syntax refuses) is left to :func:`_parse`, so the
    error is the full parser's.
    """
    cache = schema._rdn_cache
    rdns = []
    for part in text.split(","):
        rdn = cache.get(part)
        if rdn is None:
            typ, _, value = part.partition("=")
            try:
                name = _resolve_type(text, typ, schema)
                rdn = _build_rdn(text, ((name, value, False),), schema)
            except LDAPError:
                return _parse(text, schema)
            if len(cache) >= _CACHE_LIMIT:
                cache.clear()
            cache[part] = rdn
        rdns.append(rdn)
    return DN(tuple(rdns))


def parse_dn(text: str, schema: "Schema") -> DN:
    """Parse an RFC 4514 string DN; ``""`` is the root DSE.  Cached per schema."""
    cache = schema._dn_cache
    dn = cache.get(text)
    if dn is None:
        dn = _parse_plain(text, schema) if _PLAIN_DN_RE.fullmatch(text) else _parse(text, schema)
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        cache[text] = dn
    return dn


def parse_rdn(text: str, schema: "Schema") -> RDN:
    """Parse a single RDN such as ``uid=alice`` or ``cn=a+sn=b``."""
    dn = parse_dn(text, schema)
    if len(dn.rdns) != 1:
        raise _invalid(text, "expected exactly one RDN")
    return dn.rdns[0]
