"""ldapsync.ldap.ber: requests decode as ldaptor encodes them, responses encode as ldaptor decodes them,
and anything malformed raises BERError (never another exception)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ldaptor import ldapfilter
from ldaptor.protocols import pureber, pureldap

from ldapsync.directory import filters as F
from ldapsync.ldap import ber
from ldapsync.ldap.ber import BERError

DN = "uid=alice,ou=people,dc=example,dc=com"


def wire(op, msgid: int = 5, controls=None) -> bytes:
    return pureldap.LDAPMessage(op, id=msgid, controls=controls).toWire()


def decode(op, msgid: int = 5, controls=None) -> ber.Message:
    pdu = wire(op, msgid, controls)
    assert ber.pdu_length(pdu, 1 << 20) == len(pdu)
    m = ber.decode_message(pdu)
    assert m.msgid == msgid
    return m


def attr(name: str, *values: str):
    return (pureldap.LDAPAttributeDescription(name), pureber.BERSet([pureldap.LDAPAttributeValue(v) for v in values]))


def ldaptor_decode(data: bytes):
    ctx = pureldap.LDAPBERDecoderContext_TopLevel(
        inherit=pureldap.LDAPBERDecoderContext_LDAPMessage(
            fallback=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext()),
            inherit=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext())))
    obj, used = pureber.berDecodeObject(ctx, data)
    assert used == len(data)
    return obj


# -- requests -------------------------------------------------------------------------

def test_bind_simple() -> None:
    r = decode(pureldap.LDAPBindRequest(version=3, dn=DN, auth="s3cret")).op
    assert r == ber.BindRequest(3, DN, b"s3cret")


def test_bind_anonymous_and_v2() -> None:
    assert decode(pureldap.LDAPBindRequest(dn="", auth="")).op == ber.BindRequest(3, "", b"")
    assert decode(pureldap.LDAPBindRequest(version=2, dn=DN, auth="x")).op.version == 2


def test_bind_sasl() -> None:
    r = decode(pureldap.LDAPBindRequest(dn="", auth=("EXTERNAL", None), sasl=True)).op
    assert r.password is None and r.sasl_mechanism == "EXTERNAL"
    r = decode(pureldap.LDAPBindRequest(dn="", auth=("PLAIN", b"\0u\0p"), sasl=True)).op
    assert r.sasl_mechanism == "PLAIN"


def test_unbind() -> None:
    assert isinstance(decode(pureldap.LDAPUnbindRequest()).op, ber.UnbindRequest)


@pytest.mark.parametrize("scope", [0, 1, 2, 3])
def test_search(scope: int) -> None:
    r = decode(pureldap.LDAPSearchRequest(baseObject=DN, scope=scope, derefAliases=3, sizeLimit=100, timeLimit=30,
                                          typesOnly=True, filter=ldapfilter.parseFilter("(uid=alice)"),
                                          attributes=["cn", "+", "*", "1.1"])).op
    assert r == ber.SearchRequest(DN, scope, 3, 100, 30, True, F.Eq("uid", "alice"), ["cn", "+", "*", "1.1"])


def test_add() -> None:
    r = decode(pureldap.LDAPAddRequest(entry=DN, attributes=[attr("objectClass", "top", "inetOrgPerson"),
                                                             attr("cn", "Alice"), attr("description", "é ü")])).op
    assert r == ber.AddRequest(DN, [("objectClass", [b"top", b"inetOrgPerson"]), ("cn", [b"Alice"]),
                                    ("description", ["é ü".encode()])])


def test_modify_all_operations() -> None:
    mods = [pureber.BERSequence([pureber.BEREnumerated(op), pureber.BERSequence(list(attr(name, *vals)))])
            for op, name, vals in [(0, "mail", ["a@x"]), (1, "description", []), (2, "sn", ["S", "T"]), (3, "uidNumber", ["1"])]]
    r = decode(pureldap.LDAPModifyRequest(object=DN, modification=mods)).op
    assert r == ber.ModifyRequest(DN, [("add", "mail", [b"a@x"]), ("delete", "description", []),
                                       ("replace", "sn", [b"S", b"T"]), ("increment", "uidNumber", [b"1"])])


def test_delete() -> None:
    assert decode(pureldap.LDAPDelRequest(entry=DN)).op == ber.DelRequest(DN)


def test_modify_dn() -> None:
    r = decode(pureldap.LDAPModifyDNRequest(entry=DN, newrdn="uid=bob", deleteoldrdn=True)).op
    assert r == ber.ModifyDNRequest(DN, "uid=bob", True, None)
    r = decode(pureldap.LDAPModifyDNRequest(entry=DN, newrdn="uid=bob", deleteoldrdn=False,
                                            newSuperior="ou=groups,dc=example,dc=com")).op
    assert r == ber.ModifyDNRequest(DN, "uid=bob", False, "ou=groups,dc=example,dc=com")


def test_compare() -> None:
    ava = pureldap.LDAPAttributeValueAssertion(pureber.BEROctetString("sn"), pureber.BEROctetString("Smith"))
    assert decode(pureldap.LDAPCompareRequest(entry=DN, ava=ava)).op == ber.CompareRequest(DN, "sn", b"Smith")


def test_abandon() -> None:
    assert decode(pureldap.LDAPAbandonRequest(id=42)).op == ber.AbandonRequest(42)


def test_extended() -> None:
    assert decode(pureldap.LDAPExtendedRequest(requestName="1.3.6.1.4.1.4203.1.11.3")).op == \
        ber.ExtendedRequest("1.3.6.1.4.1.4203.1.11.3", None)
    assert decode(pureldap.LDAPStartTLSRequest()).op.name == "1.3.6.1.4.1.1466.20037"
    r = decode(pureldap.LDAPPasswordModifyRequest(userIdentity=DN, oldPasswd="old", newPasswd="new")).op
    assert r.name == "1.3.6.1.4.1.4203.1.11.1"
    assert ber.decode_sequence_values(r.value) == [(0x80, DN.encode()), (0x81, b"old"), (0x82, b"new")]


def test_unknown_operation_is_reported_not_raised() -> None:
    pdu = ber.tlv(0x30, ber.enc_int(3) + ber.tlv(0x79, b""))
    assert ber.decode_message(pdu).op == ber.UnknownRequest(0x79)


def test_controls() -> None:
    search = pureldap.LDAPSearchRequest(baseObject="", filter=ldapfilter.parseFilter("(objectClass=*)"))
    m = decode(search, controls=[("1.2.840.113556.1.4.319", True, b"\x30\x05\x02\x01\x0a\x04\x00"),
                                 ("2.16.840.1.113730.3.4.2", None, None), ("1.2.3", False, b"v")])
    assert m.controls == [ber.Control("1.2.840.113556.1.4.319", True, b"\x30\x05\x02\x01\x0a\x04\x00"),
                          ber.Control("2.16.840.1.113730.3.4.2", False, None), ber.Control("1.2.3", False, b"v")]
    parts = ber.decode_sequence_values(m.controls[0].value)
    assert ber.decode_int(parts[0][1]) == 10 and parts[1] == (0x04, b"")


@pytest.mark.parametrize("msgid", [1, 127, 128, 255, 256, 65535, 2**31 - 1])
def test_message_ids(msgid: int) -> None:
    assert decode(pureldap.LDAPDelRequest(entry=DN), msgid=msgid).msgid == msgid


# -- filters ----------------------------------------------------------------------------

FILTERS = [
    ("(cn=Alice)", F.Eq("cn", "Alice")),
    ("(cn>=b)", F.Ge("cn", "b")),
    ("(cn<=b)", F.Le("cn", "b")),
    ("(cn~=alise)", F.Approx("cn", "alise")),
    ("(mail=*)", F.Present("mail")),
    ("(cn=al*)", F.Sub("cn", "al", (), None)),
    ("(cn=*ce)", F.Sub("cn", None, (), "ce")),
    ("(cn=a*l*i*e)", F.Sub("cn", "a", ("l", "i"), "e")),
    ("(cn=*li*)", F.Sub("cn", None, ("li",), None)),
    ("(cn:2.5.13.2:=alice)", F.Ext("2.5.13.2", "cn", "alice", False)),
    ("(cn:dn:=people)", F.Ext(None, "cn", "people", True)),
    ("(:2.5.13.1:=x)", F.Ext("2.5.13.1", None, "x", False)),
    ("(!(cn=a))", F.Not(F.Eq("cn", "a"))),
    ("(&(cn=a)(sn=b))", F.And((F.Eq("cn", "a"), F.Eq("sn", "b")))),
    ("(|(cn=a)(!(sn=b))(&(uid=c)(mail=*)))",
     F.Or((F.Eq("cn", "a"), F.Not(F.Eq("sn", "b")), F.And((F.Eq("uid", "c"), F.Present("mail")))))),
    (r"(cn=a\2ab\00)", F.Eq("cn", "a*b\x00")),
    ("(cn=é)", F.Eq("cn", "é")),
]


@pytest.mark.parametrize("text,want", FILTERS, ids=[f[0] for f in FILTERS])
def test_filters(text: str, want: F.Filter) -> None:
    r = decode(pureldap.LDAPSearchRequest(baseObject="", filter=ldapfilter.parseFilter(text))).op
    assert r.filter == want


def test_absolute_true_false() -> None:
    assert decode(pureldap.LDAPSearchRequest(baseObject="", filter=pureldap.LDAPFilter_and([]))).op.filter == F.And(())
    assert decode(pureldap.LDAPSearchRequest(baseObject="", filter=pureldap.LDAPFilter_or([]))).op.filter == F.Or(())


def test_filter_nesting_limit() -> None:
    def nested(n: int) -> bytes:
        f = ber.tlv(0x87, b"cn")
        for _ in range(n):
            f = ber.tlv(0xA2, f)
        body = ber.enc_str("") + ber.enc_int(2, 0x0A) + ber.enc_int(0, 0x0A) + ber.enc_int(0) + ber.enc_int(0) + ber.enc_bool(False)
        return ber.enc_message(1, ber.tlv(0x63, body + f + ber.tlv(0x30, b"")))
    assert isinstance(ber.decode_message(nested(30)).op.filter, F.Not)
    with pytest.raises(BERError):
        ber.decode_message(nested(5000))


# -- malformed input ---------------------------------------------------------------------

VALID = [
    wire(pureldap.LDAPBindRequest(dn=DN, auth="pw")),
    wire(pureldap.LDAPSearchRequest(baseObject=DN, scope=2, filter=ldapfilter.parseFilter(
        "(|(cn=a*b*c)(!(sn>=x))(cn:dn:2.5.13.2:=y)(mail=*))"), attributes=["cn"]),
         controls=[("1.2.840.113556.1.4.319", True, b"\x30\x05\x02\x01\x0a\x04\x00")]),
    wire(pureldap.LDAPAddRequest(entry=DN, attributes=[attr("objectClass", "inetOrgPerson"), attr("cn", "A", "B")])),
    wire(pureldap.LDAPModifyRequest(object=DN, modification=[
        pureber.BERSequence([pureber.BEREnumerated(2), pureber.BERSequence(list(attr("sn", "S")))])])),
    wire(pureldap.LDAPModifyDNRequest(entry=DN, newrdn="uid=b", deleteoldrdn=True, newSuperior="dc=example,dc=com")),
    wire(pureldap.LDAPCompareRequest(entry=DN, ava=pureldap.LDAPAttributeValueAssertion(
        pureber.BEROctetString("sn"), pureber.BEROctetString("S")))),
    wire(pureldap.LDAPPasswordModifyRequest(userIdentity=DN, newPasswd="n")),
    wire(pureldap.LDAPDelRequest(entry=DN)),
    wire(pureldap.LDAPAbandonRequest(id=3)),
]

MALFORMED = [
    b"",
    b"\x30",
    b"\x30\x00",                                      # empty envelope
    b"\x30\x80\x02\x01\x01\x42\x00\x00\x00",          # indefinite length
    b"\x30\x03\x02\x01\x01",                          # no operation
    b"\x30\x05\x04\x01\x01\x42\x00",                  # message id not an INTEGER
    b"\x30\x05\x02\x01\xff\x42\x00",                  # negative message id
    b"\x30\x0d\x02\x09\x01\x00\x00\x00\x00\x00\x00\x00\x00\x42\x00",  # huge message id
    b"\x30\x06\x02\x01\x01\x4a\x02\xc3\x28",          # DN not UTF-8
    b"\x30\x06\x02\x01\x01\x1f\x01\x00",              # multi-byte tag
    b"\x30\x07\x02\x01\x01\x4a\x84\xff\xff",          # length longer than the container
    b"\x30\x08\x02\x01\x01\x42\x00\x04\x00\x00",      # controls not [0]
    b"\x31\x05\x02\x01\x01\x42\x00",                  # not a SEQUENCE
    b"\x30\x05\x02\x01\x01\x42\x00trailing",          # bytes after the envelope
    ber.enc_message(1, ber.tlv(0x60, ber.enc_int(3) + ber.enc_str(DN))),                          # bind without auth
    ber.enc_message(1, ber.tlv(0x60, ber.enc_int(3) + ber.enc_str(DN) + ber.enc_str("x", 0x85))),  # unknown auth
    ber.enc_message(1, ber.tlv(0x66, ber.enc_str(DN) + ber.tlv(0x30, ber.tlv(0x30, ber.enc_int(7, 0x0A)
                                                                              + ber.tlv(0x30, ber.enc_str("sn") + ber.tlv(0x31, b"")))))),
    ber.enc_message(1, ber.tlv(0x63, ber.enc_str("") + ber.enc_int(0, 0x0A))),                   # short search
    ber.enc_message(1, ber.tlv(0x77, ber.enc_str("1.2.3"))),                                     # ext name not [0]
    ber.enc_message(1, ber.tlv(0x6C, ber.enc_str(DN) + ber.enc_str("uid=x"))),                   # moddn w/o deleteoldrdn
    ber.enc_message(1, ber.tlv(0x60, ber.enc_int(3) + ber.enc_str(DN) + ber.enc_str("x", 0x80)),
                    [("1.2.3", True, None)]).replace(b"\x01\x01\xff", b"\x01\x02\xff\xff"),        # bad BOOLEAN
]


@pytest.mark.parametrize("pdu", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_raise_bererror(pdu: bytes) -> None:
    with pytest.raises(BERError):
        ber.decode_message(pdu)


@pytest.mark.parametrize("pdu", VALID, ids=range(len(VALID)))
def test_every_truncation_raises_bererror(pdu: bytes) -> None:
    ber.decode_message(pdu)
    for n in range(len(pdu)):
        with pytest.raises(BERError):
            ber.decode_message(pdu[:n])


def test_pdu_length() -> None:
    pdu = VALID[1]
    assert ber.pdu_length(b"", 100) is None
    assert ber.pdu_length(pdu[:1], 1000) is None
    assert ber.pdu_length(pdu, 1000) == len(pdu)
    assert ber.pdu_length(b"\x30\x82\x01", 1000) is None               # length octets still missing
    with pytest.raises(BERError):
        ber.pdu_length(pdu, len(pdu) - 1)                              # over the limit
    with pytest.raises(BERError):
        ber.pdu_length(b"\x30\x84\xff\xff\xff\xff", 10 * 1024 * 1024)  # 4 GiB announced
    with pytest.raises(BERError):
        ber.pdu_length(b"\x30\x85\x01\x00\x00\x00\x00", 1 << 40)      # length of length > 4
    with pytest.raises(BERError):
        ber.pdu_length(b"GET / HTTP/1.1\r\n", 1000)
    with pytest.raises(BERError):
        ber.pdu_length(b"\x30\x80", 1000)


FUZZ = settings(max_examples=1500, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def _only_bererror(data: bytes) -> None:
    try:
        ber.decode_message(data)
    except BERError:
        pass
    try:
        ber.pdu_length(data, 4096)
    except BERError:
        pass


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_bererror(data: bytes) -> None:
    _only_bererror(data)
    _only_bererror(b"\x30" + bytes([len(data)]) + data if len(data) < 128 else data)


@FUZZ
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(0, 400), st.binary(max_size=16))
def test_mutated_pdus_only_raise_bererror(pdu: bytes, flips: list[tuple[int, int]], cut: int, tail: bytes) -> None:
    b = bytearray(pdu)
    for pos, val in flips:
        b[pos % len(b)] = val
    _only_bererror(bytes(b))
    _only_bererror(bytes(b[:cut]) + tail)


@FUZZ
@given(st.recursive(
    st.builds(lambda a, v: ber.tlv(0xA3, ber.enc_str(a) + ber.enc_str(v)), st.text(max_size=5), st.binary(max_size=5))
    | st.builds(lambda a: ber.tlv(0x87, a), st.binary(max_size=5))
    | st.builds(lambda t, c: ber.tlv(t, c), st.integers(0x80, 0xBE), st.binary(max_size=8)),
    lambda kids: st.builds(lambda t, xs: ber.tlv(t, b"".join(xs)), st.sampled_from([0xA0, 0xA1, 0xA2, 0xA4, 0xA9]),
                           st.lists(kids, max_size=3)),
    max_leaves=20))
def test_random_filter_trees_only_raise_bererror(f: bytes) -> None:
    body = ber.enc_str("") + ber.enc_int(2, 0x0A) + ber.enc_int(0, 0x0A) + ber.enc_int(0) + ber.enc_int(0) + ber.enc_bool(False)
    try:
        ber.decode_message(ber.enc_message(1, ber.tlv(0x63, body + f + ber.tlv(0x30, b""))))
    except BERError:
        pass


# -- encoders ----------------------------------------------------------------------------

@pytest.mark.parametrize("tag,cls", [
    (ber.BIND_RESPONSE, pureldap.LDAPBindResponse), (ber.SEARCH_DONE, pureldap.LDAPSearchResultDone),
    (ber.MODIFY_RESPONSE, pureldap.LDAPModifyResponse), (ber.ADD_RESPONSE, pureldap.LDAPAddResponse),
    (ber.DEL_RESPONSE, pureldap.LDAPDelResponse), (ber.MODDN_RESPONSE, pureldap.LDAPModifyDNResponse),
    (ber.COMPARE_RESPONSE, pureldap.LDAPCompareResponse), (ber.EXTENDED_RESPONSE, pureldap.LDAPExtendedResponse),
])
def test_results_decode_in_ldaptor(tag: int, cls: type) -> None:
    msg = ldaptor_decode(ber.enc_message(300, ber.enc_result(tag, 32, "ou=people,dc=example,dc=com", "no entry é " * 20)))
    assert msg.id == 300 and isinstance(msg.value, cls)
    assert msg.value.resultCode == 32
    assert msg.value.matchedDN in (b"ou=people,dc=example,dc=com", "ou=people,dc=example,dc=com")
    err = msg.value.errorMessage
    assert (err.decode() if isinstance(err, bytes) else err) == "no entry é " * 20


def test_search_entry_decodes_in_ldaptor() -> None:
    big = "x" * 70000
    data = ber.enc_message(2, ber.enc_search_entry(DN, [("cn", ["Alice", "Ali"]), ("description", [big]), ("empty", [])]))
    msg = ldaptor_decode(data)
    e = msg.value
    assert isinstance(e, pureldap.LDAPSearchResultEntry)
    name = e.objectName.decode() if isinstance(e.objectName, bytes) else e.objectName
    assert name == DN
    got = {(k.decode() if isinstance(k, bytes) else k): [v.decode() if isinstance(v, bytes) else v for v in vs]
           for k, vs in e.attributes}
    assert got == {"cn": ["Alice", "Ali"], "description": [big], "empty": []}


def test_extended_response_and_controls_decode_in_ldaptor() -> None:
    data = ber.enc_message(4, ber.enc_result(ber.EXTENDED_RESPONSE, 0, "", "", ber.enc_str("dn:" + DN, 0x8B)),
                           [("1.2.840.113556.1.4.319", False, ber.tlv(0x30, ber.enc_int(0) + ber.enc_str(b"17")))])
    msg = ldaptor_decode(data)
    assert msg.value.resultCode == 0
    resp = msg.value.response
    assert (resp.decode() if isinstance(resp, bytes) else resp) == "dn:" + DN
    oid, crit, value = msg.controls[0]
    assert (oid.decode() if isinstance(oid, bytes) else oid) == "1.2.840.113556.1.4.319"
    parts = ber.decode_sequence_values(value)
    assert parts == [(0x02, b"\x00"), (0x04, b"17")]


@pytest.mark.parametrize("n", [0, 1, 127, 128, 255, 256, 32767, 32768, 65535, 2**31 - 1, -1, -128, -129])
def test_integers_round_trip(n: int) -> None:
    enc = ber.enc_int(n)
    assert pureber.berDecodeObject(pureber.BERDecoderContext(), enc)[0].value == n
    t, s, e = ber.read_header(enc, 0, len(enc))
    assert ber.decode_int(enc[s:e]) == n


@pytest.mark.parametrize("n", [0, 127, 128, 255, 256, 65535, 65536, 2**24 - 1, 2**24])
def test_lengths_round_trip(n: int) -> None:
    enc = ber.enc_str(b"a" * n)
    t, s, e = ber.read_header(enc, 0, len(enc))
    assert (t, e - s, e) == (0x04, n, len(enc))
    assert pureber.berDecodeObject(pureber.BERDecoderContext(), enc)[0].value == b"a" * n


@pytest.mark.parametrize("args, expected", [
    # the bytes OpenLDAP's ppolicy overlay sends (create_passcontrol): warning = [0] { [0]|[1] INTEGER }, error = [1] ENUMERATED
    ((None, None, None), "3000"),
    ((259199, None, None), "3007a005800303f47f"),
    ((None, 0, None), "3005a003810100"),
    ((None, None, 1), "3003810101"),
    ((None, None, 6), "3003810106"),
    ((100, 2, 0), "3008a003800164810100"),      # expiry wins over grace, as in OpenLDAP
])
def test_ppolicy_response_value(args: tuple, expected: str) -> None:
    assert ber.enc_ppolicy_response(*args).hex() == expected


def test_short_encodings_equal_the_general_ones():
    """enc_int's one-byte path and enc_result's empty-message path give the general encodings."""
    def general_int(n: int, tag: int = 0x02) -> bytes:
        return ber.tlv(tag, n.to_bytes(max(1, (n.bit_length() + 8) // 8), "big", signed=True))

    for n in [*range(-300, 300), 2**31 - 1, -(2**31)]:
        assert ber.enc_int(n) == general_int(n) and ber.enc_int(n, 0x0A) == general_int(n, 0x0A)
    for tag in (ber.BIND_RESPONSE, ber.SEARCH_DONE):
        for code in (0, 32, 49, 127, 128, 4096):
            assert ber.enc_result(tag, code) == ber.tlv(tag, general_int(code, 0x0A) + ber.enc_str("") + ber.enc_str(""))
        assert ber.enc_result(tag, 0, "", "x") == ber.tlv(tag, general_int(0, 0x0A) + ber.enc_str("") + ber.enc_str("x"))
