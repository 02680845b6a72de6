"""LDAPv3 messages on the wire (RFC 4511 BER): strict decoding, fast encoding.

ldaptor's ``pureldap`` builds an object per BER element and accepts several
malformed forms through ``assert``; on the hot path (every search and its
result entries) that dominates the cost of a request.  This module decodes a
request PDU straight into the small dataclasses below and encodes responses
straight to bytes.  Anything that is not well-formed raises :class:`BERError`
and the protocol closes that one connection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ldapsync.directory import filters as F


class BERError(Exception):
    """The bytes are not a well-formed LDAP message."""


class PDUTooLarge(BERError):
    """The message's declared length is over the size limit."""


# -- decoding primitives -----------------------------------------------------------

def read_header(buf: bytes | bytearray | memoryview, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, content_start, content_end) of the element at ``pos``; BERError if truncated/malformed."""
    if pos + 2 > end:
        raise BERError("truncated element")
    tag = buf[pos]
    if tag & 0x1F == 0x1F:
        raise BERError("multi-byte tags are not used by LDAP")
    b = buf[pos + 1]
    pos += 2
    if b < 0x80:
        length = b
    elif b == 0x80:
        raise BERError("indefinite length is not allowed in LDAP")
    else:
        n = b & 0x7F
        if n > 4 or pos + n > end:
            raise BERError("bad length")
        length = int.from_bytes(buf[pos:pos + n], "big")
        pos += n
    if pos + length > end:
        raise BERError("element longer than its container")
    return tag, pos, pos + length


def pdu_length(buf: bytes | bytearray, max_size: int) -> int | None:
    """Total length of the first PDU in ``buf``, None if more bytes are needed.

    Raises BERError for a stream that is not an LDAP message or a PDU over ``max_size``.
    """
    if not buf:
        return None
    if buf[0] != 0x30:
        raise BERError("not an LDAP message (expected a SEQUENCE)")
    if len(buf) < 2:
        return None
    b = buf[1]
    if b < 0x80:
        total = 2 + b
    elif b == 0x80:
        raise BERError("indefinite length is not allowed in LDAP")
    else:
        n = b & 0x7F
        if n > 4:
            raise BERError("length field too long")
        if len(buf) < 2 + n:
            return None
        total = 2 + n + int.from_bytes(buf[2:2 + n], "big")
    if total > max_size:
        raise PDUTooLarge(f"message of {total} bytes exceeds the {max_size}-byte limit")
    return total


def _int(buf: Any, s: int, e: int) -> int:
    if e <= s or e - s > 8:
        raise BERError("bad integer")
    return int.from_bytes(buf[s:e], "big", signed=True)


def _bool(buf: Any, s: int, e: int) -> bool:
    if e - s != 1:
        raise BERError("bad boolean")
    return buf[s] != 0


def _children(buf: Any, s: int, e: int) -> list[tuple[int, int, int]]:
    out = []
    while s < e:
        t, cs, ce = read_header(buf, s, e)
        out.append((t, cs, ce))
        s = ce
    return out


def _str(buf: Any, s: int, e: int) -> str:
    try:
        return bytes(buf[s:e]).decode("utf-8")
    except UnicodeDecodeError:
        raise BERError("string is not valid UTF-8") from None


def _val(buf: Any, s: int, e: int) -> bytes:
    return bytes(buf[s:e])


# -- requests ---------------------------------------------------------------------

@dataclass
class Control:
    oid: str
    critical: bool
    value: bytes | None


@dataclass
class Message:
    msgid: int
    op: Any
    controls: list[Control] = field(default_factory=list)


@dataclass
class BindRequest:
    version: int
    dn: str
    password: bytes | None          # None for SASL
    sasl_mechanism: str | None = None


@dataclass
class UnbindRequest:
    pass


@dataclass
class SearchRequest:
    base: str
    scope: int
    deref: int
    size_limit: int
    time_limit: int
    types_only: bool
    filter: F.Filter
    attributes: list[str]


@dataclass
class ModifyRequest:
    dn: str
    changes: list[tuple[str, str, list[bytes]]]   # (add|delete|replace|increment, attr, values)


@dataclass
class AddRequest:
    dn: str
    attributes: list[tuple[str, list[bytes]]]


@dataclass
class DelRequest:
    dn: str


@dataclass
class ModifyDNRequest:
    dn: str
    new_rdn: str
    delete_old: bool
    new_superior: str | None


@dataclass
class CompareRequest:
    dn: str
    attr: str
    value: bytes


@dataclass
class AbandonRequest:
    msgid: int


@dataclass
class ExtendedRequest:
    name: str
    value: bytes | None


@dataclass
class UnknownRequest:
    tag: int


_MOD_OPS = {0: "add", 1: "delete", 2: "replace", 3: "increment"}


def _filter(buf: Any, t: int, s: int, e: int, depth: int = 0) -> F.Filter:
    if depth > 64:
        raise BERError("filter nested too deeply")
    if t == 0xA0 or t == 0xA1:
        items = tuple(_filter(buf, ct, cs, ce, depth + 1) for ct, cs, ce in _children(buf, s, e))
        if not items:
            # RFC 4526 absolute true/false
            return F.And(()) if t == 0xA0 else F.Or(())
        return F.And(items) if t == 0xA0 else F.Or(items)
    if t == 0xA2:
        ch = _children(buf, s, e)
        if len(ch) != 1:
            raise BERError("not filter needs exactly one item")
        return F.Not(_filter(buf, *ch[0], depth=depth + 1))
    if t in (0xA3, 0xA5, 0xA6, 0xA8):
        ch = _children(buf, s, e)
        if len(ch) != 2 or ch[0][0] != 0x04 or ch[1][0] != 0x04:
            raise BERError("bad attribute value assertion")
        attr = _str(buf, ch[0][1], ch[0][2])
        value = _val(buf, ch[1][1], ch[1][2]).decode("utf-8", "surrogateescape")
        return {0xA3: F.Eq, 0xA5: F.Ge, 0xA6: F.Le, 0xA8: F.Approx}[t](attr, value)
    if t == 0x87:
        return F.Present(_str(buf, s, e))
    if t == 0xA4:
        ch = _children(buf, s, e)
        if len(ch) != 2 or ch[0][0] != 0x04 or ch[1][0] != 0x30:
            raise BERError("bad substring filter")
        attr = _str(buf, ch[0][1], ch[0][2])
        initial = final = None
        anys: list[str] = []
        parts = _children(buf, ch[1][1], ch[1][2])
        if not parts:
            raise BERError("substring filter without substrings")
        for i, (pt, ps, pe) in enumerate(parts):
            v = _val(buf, ps, pe).decode("utf-8", "surrogateescape")
            if pt == 0x80 and i == 0:
                initial = v
            elif pt == 0x81:
                anys.append(v)
            elif pt == 0x82 and i == len(parts) - 1:
                final = v
            else:
                raise BERError("bad substring filter element")
        return F.Sub(attr, initial, tuple(anys), final)
    if t == 0xA9:
        rule = attr = None
        value: str | None = None
        dn_attrs = False
        for ct, cs, ce in _children(buf, s, e):
            if ct == 0x81:
                rule = _str(buf, cs, ce)
            elif ct == 0x82:
                attr = _str(buf, cs, ce)
            elif ct == 0x83:
                value = _val(buf, cs, ce).decode("utf-8", "surrogateescape")
            elif ct == 0x84:
                dn_attrs = _bool(buf, cs, ce)
            else:
                raise BERError("bad extensible match")
        if value is None or (rule is None and attr is None):
            raise BERError("extensible match needs a value and a rule or type")
        return F.Ext(rule, attr, value, dn_attrs)
    raise BERError(f"unknown filter choice 0x{t:02x}")


def _partial_attr(buf: Any, s: int, e: int) -> tuple[str, list[bytes]]:
    """Content of a PartialAttribute SEQUENCE { type, SET OF value }."""
    ch = _children(buf, s, e)
    if len(ch) != 2 or ch[0][0] != 0x04 or ch[1][0] != 0x31:
        raise BERError("bad attribute")
    vals = []
    for vt, vs, ve in _children(buf, ch[1][1], ch[1][2]):
        if vt != 0x04:
            raise BERError("bad attribute value")
        vals.append(_val(buf, vs, ve))
    return _str(buf, ch[0][1], ch[0][2]), vals


def _partial_attrs(buf: Any, s: int, e: int) -> list[tuple[str, list[bytes]]]:
    out = []
    for t, cs, ce in _children(buf, s, e):
        if t != 0x30:
            raise BERError("bad attribute")
        out.append(_partial_attr(buf, cs, ce))
    return out


def decode_message(pdu: bytes) -> Message:
    """Decode one complete LDAPMessage PDU (as delimited by :func:`pdu_length`)."""
    t, s, e = read_header(pdu, 0, len(pdu))
    if t != 0x30 or e != len(pdu):
        raise BERError("bad LDAPMessage envelope")
    ch = _children(pdu, s, e)
    if len(ch) < 2 or len(ch) > 3 or ch[0][0] != 0x02:
        raise BERError("bad LDAPMessage")
    msgid = _int(pdu, ch[0][1], ch[0][2])
    if msgid < 0 or msgid > 2**31 - 1:
        raise BERError("message id out of range")
    controls: list[Control] = []
    if len(ch) == 3:
        if ch[2][0] != 0xA0:
            raise BERError("bad controls")
        for ct, cs, ce in _children(pdu, ch[2][1], ch[2][2]):
            if ct != 0x30:
                raise BERError("bad control")
            parts = _children(pdu, cs, ce)
            if not parts or parts[0][0] != 0x04:
                raise BERError("bad control")
            oid = _str(pdu, parts[0][1], parts[0][2])
            crit = False
            value = None
            for pt, ps, pe in parts[1:]:
                if pt == 0x01:
                    crit = _bool(pdu, ps, pe)
                elif pt == 0x04:
                    value = _val(pdu, ps, pe)
                else:
                    raise BERError("bad control element")
            controls.append(Control(oid, crit, value))
    return Message(msgid, _decode_op(pdu, *ch[1]), controls)


def _decode_op(buf: bytes, t: int, s: int, e: int) -> Any:
    if t == 0x60:
        ch = _children(buf, s, e)
        if len(ch) != 3 or ch[0][0] != 0x02 or ch[1][0] != 0x04:
            raise BERError("bad bind request")
        version = _int(buf, ch[0][1], ch[0][2])
        dn = _str(buf, ch[1][1], ch[1][2])
        at, as_, ae = ch[2]
        if at == 0x80:
            return BindRequest(version, dn, _val(buf, as_, ae))
        if at == 0xA3:
            sc = _children(buf, as_, ae)
            if not sc or sc[0][0] != 0x04:
                raise BERError("bad SASL credentials")
            return BindRequest(version, dn, None, _str(buf, sc[0][1], sc[0][2]))
        raise BERError("unknown authentication choice")
    if t == 0x42:
        return UnbindRequest()
    if t == 0x63:
        ch = _children(buf, s, e)
        if len(ch) != 8:
            raise BERError("bad search request")
        types = [c[0] for c in ch]
        if types[0] != 0x04 or types[1] != 0x0A or types[2] != 0x0A or types[3] != 0x02 or types[4] != 0x02 or types[5] != 0x01 or types[7] != 0x30:
            raise BERError("bad search request")
        attrs = []
        for at, as_, ae in _children(buf, ch[7][1], ch[7][2]):
            if at != 0x04:
                raise BERError("bad attribute selection")
            attrs.append(_str(buf, as_, ae))
        return SearchRequest(
            base=_str(buf, ch[0][1], ch[0][2]),
            scope=_int(buf, ch[1][1], ch[1][2]),
            deref=_int(buf, ch[2][1], ch[2][2]),
            size_limit=_int(buf, ch[3][1], ch[3][2]),
            time_limit=_int(buf, ch[4][1], ch[4][2]),
            types_only=_bool(buf, ch[5][1], ch[5][2]),
            filter=_filter(buf, *ch[6]),
            attributes=attrs,
        )
    if t == 0x66:
        ch = _children(buf, s, e)
        if len(ch) != 2 or ch[0][0] != 0x04 or ch[1][0] != 0x30:
            raise BERError("bad modify request")
        changes = []
        for ct, cs, ce in _children(buf, ch[1][1], ch[1][2]):
            parts = _children(buf, cs, ce)
            if ct != 0x30 or len(parts) != 2 or parts[0][0] != 0x0A or parts[1][0] != 0x30:
                raise BERError("bad modification")
            op = _int(buf, parts[0][1], parts[0][2])
            if op not in _MOD_OPS:
                raise BERError(f"unknown modify operation {op}")
            attr, vals = _partial_attr(buf, parts[1][1], parts[1][2])
            changes.append((_MOD_OPS[op], attr, vals))
        return ModifyRequest(_str(buf, ch[0][1], ch[0][2]), changes)
    if t == 0x68:
        ch = _children(buf, s, e)
        if len(ch) != 2 or ch[0][0] != 0x04 or ch[1][0] != 0x30:
            raise BERError("bad add request")
        return AddRequest(_str(buf, ch[0][1], ch[0][2]), _partial_attrs(buf, ch[1][1], ch[1][2]))
    if t == 0x4A:
        return DelRequest(_str(buf, s, e))
    if t == 0x6C:
        ch = _children(buf, s, e)
        if len(ch) not in (3, 4) or ch[0][0] != 0x04 or ch[1][0] != 0x04 or ch[2][0] != 0x01:
            raise BERError("bad modify DN request")
        sup = None
        if len(ch) == 4:
            if ch[3][0] != 0x80:
                raise BERError("bad newSuperior")
            sup = _str(buf, ch[3][1], ch[3][2])
        return ModifyDNRequest(_str(buf, ch[0][1], ch[0][2]), _str(buf, ch[1][1], ch[1][2]), _bool(buf, ch[2][1], ch[2][2]), sup)
    if t == 0x6E:
        ch = _children(buf, s, e)
        if len(ch) != 2 or ch[0][0] != 0x04 or ch[1][0] != 0x30:
            raise BERError("bad compare request")
        ava = _children(buf, ch[1][1], ch[1][2])
        if len(ava) != 2 or ava[0][0] != 0x04 or ava[1][0] != 0x04:
            raise BERError("bad compare assertion")
        return CompareRequest(_str(buf, ch[0][1], ch[0][2]), _str(buf, ava[0][1], ava[0][2]), _val(buf, ava[1][1], ava[1][2]))
    if t == 0x50:
        return AbandonRequest(_int(buf, s, e))
    if t == 0x77:
        ch = _children(buf, s, e)
        if not ch or ch[0][0] != 0x80 or len(ch) > 2 or (len(ch) == 2 and ch[1][0] != 0x81):
            raise BERError("bad extended request")
        return ExtendedRequest(_str(buf, ch[0][1], ch[0][2]), _val(buf, ch[1][1], ch[1][2]) if len(ch) == 2 else None)
    return UnknownRequest(t)


def decode_sequence_values(value: bytes) -> list[tuple[int, bytes]]:
    """Children of a SEQUENCE value (used for control and extended operation values)."""
    t, s, e = read_header(value, 0, len(value))
    if t != 0x30 or e != len(value):
        raise BERError("expected a SEQUENCE")
    return [(ct, value[cs:ce]) for ct, cs, ce in _children(value, s, e)]


def decode_int(b: bytes) -> int:
    return _int(b, 0, len(b))


# -- encoding -----------------------------------------------------------------------

def _len(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    if n < 0x100:
        return bytes((0x81, n))
    if n < 0x10000:
        return bytes((0x82, n >> 8, n & 0xFF))
    if n < 0x1000000:
        return bytes((0x83, n >> 16, (n >> 8) & 0xFF, n & 0xFF))
    return b"\x84" + n.to_bytes(4, "big")


def tlv(tag: int, content: bytes) -> bytes:
    return bytes((tag,)) + _len(len(content)) + content


def enc_int(n: int, tag: int = 0x02) -> bytes:
    if 0 <= n < 0x80:                   # message ids, result codes: one content byte
        return bytes((tag, 1, n))
    length = max(1, (n.bit_length() + 8) // 8)
    return tlv(tag, n.to_bytes(length, "big", signed=True))


def enc_str(s: str | bytes, tag: int = 0x04) -> bytes:
    b = s.encode("utf-8", "surrogateescape") if isinstance(s, str) else s
    return tlv(tag, b)


def enc_bool(v: bool, tag: int = 0x01) -> bytes:
    return tlv(tag, b"\xff" if v else b"\x00")


def enc_message(msgid: int, op: bytes, controls: list[tuple[str, bool, bytes | None]] | None = None) -> bytes:
    body = enc_int(msgid) + op
    if controls:
        cs = b""
        for oid, crit, value in controls:
            c = enc_str(oid)
            if crit:
                c += enc_bool(True)
            if value is not None:
                c += enc_str(value)
            cs += tlv(0x30, c)
        body += tlv(0xA0, cs)
    return tlv(0x30, body)


def enc_result(tag: int, code: int, matched: str = "", message: str = "", extra: bytes = b"") -> bytes:
    if not (matched or message or extra) and 0 <= code < 0x80:
        # the usual answer: code, empty matchedDN, empty diagnosticMessage
        return bytes((tag, 7, 0x0A, 1, code, 0x04, 0, 0x04, 0))
    return tlv(tag, enc_int(code, 0x0A) + enc_str(matched) + enc_str(message) + extra)


def enc_search_entry(dn: str, attrs: list[tuple[str, list[str]]]) -> bytes:
    parts = []
    for name, values in attrs:
        vs = b"".join(enc_str(v) for v in values)
        parts.append(tlv(0x30, enc_str(name) + tlv(0x31, vs)))
    return tlv(0x64, enc_str(dn) + tlv(0x30, b"".join(parts)))


# Response tags by request type
def enc_ppolicy_response(time_before_expiration: int | None = None, grace_authns_remaining: int | None = None,
                        error: int | None = None) -> bytes:
    """The password policy response control value (draft-behera-ldap-password-policy §6.2).

    ``SEQUENCE { warning [0] CHOICE { timeBeforeExpiration [0] INTEGER,
    graceAuthNsRemaining [1] INTEGER } OPTIONAL, error [1] ENUMERATED OPTIONAL }``,
    encoded as OpenLDAP's ppolicy overlay does: the warning is a constructed [0]
    holding one primitive [0] or [1] integer (expiry wins over grace).
    """
    body = b""
    if time_before_expiration is not None:
        body += tlv(0xA0, enc_int(time_before_expiration, 0x80))
    elif grace_authns_remaining is not None:
        body += tlv(0xA0, enc_int(grace_authns_remaining, 0x81))
    if error is not None:
        body += enc_int(int(error), 0x81)
    return tlv(0x30, body)


BIND_RESPONSE = 0x61
SEARCH_DONE = 0x65
MODIFY_RESPONSE = 0x67
ADD_RESPONSE = 0x69
DEL_RESPONSE = 0x6B
MODDN_RESPONSE = 0x6D
COMPARE_RESPONSE = 0x6F
EXTENDED_RESPONSE = 0x78
