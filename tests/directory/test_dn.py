"""Tests for ldapsync.directory.dn: RFC 4514 parsing, normalization and tree keys."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ldapsync.directory.dn import DN, ROOT_DN, escape_value, make_rdn, parse_dn, parse_rdn
from ldapsync.directory.errors import LDAPError, ResultCode
from ldapsync.directory.schema import Schema


@pytest.fixture(scope="module")
def schema() -> Schema:
    return Schema.load_default()


SCHEMA = Schema.load_default()


def p(text: str) -> DN:
    return parse_dn(text, SCHEMA)


def test_basic_and_root() -> None:
    dn = p("uid=alice,ou=people,dc=example,dc=com")
    assert str(dn) == "uid=alice,ou=people,dc=example,dc=com"
    assert dn.norm == "uid=alice,ou=people,dc=example,dc=com"
    assert dn.path_key == "dc=com,dc=example,ou=people,uid=alice,"
    assert len(dn) == 4 and not dn.is_root
    assert dn.rdn is not None and dn.rdn.avas == (("uid", "alice"),)
    assert str(dn.parent) == "ou=people,dc=example,dc=com"
    root = p("")
    assert root.is_root and root == ROOT_DN and root.norm == "" and root.path_key == "" and str(root) == ""
    assert root.parent is None and root.rdn is None
    assert p("   ").is_root


def test_case_and_space_insensitive() -> None:
    a = p("UID=Alice , OU=People,  DC=Example,DC=COM")
    b = p("uid=alice,ou=people,dc=example,dc=com")
    assert a == b and hash(a) == hash(b) and a.norm == b.norm
    assert str(a) == "uid=Alice,ou=People,dc=Example,dc=COM"  # canonical type names, values as typed
    assert p("cn = John   Smith ,dc=x").norm == "cn=john smith,dc=x"
    assert p("commonName=x,domainComponent=y") == p("cn=x,dc=y")
    assert str(p("commonName=x,domainComponent=y")) == "cn=x,dc=y"


def test_oid_attribute_types() -> None:
    dn = p("2.5.4.3=Bob,0.9.2342.19200300.100.1.25=com")
    assert str(dn) == "cn=Bob,dc=com" and dn.norm == "cn=bob,dc=com"
    assert p("OID.2.5.4.3=Bob,dc=com") == dn


def test_escapes() -> None:
    dn = p(r"cn=Smith\, John,dc=example,dc=com")
    assert dn.rdn.avas == (("cn", "Smith, John"),)
    assert str(dn) == r"cn=Smith\, John,dc=example,dc=com"
    assert dn.norm == r"cn=smith\, john,dc=example,dc=com"
    assert len(dn) == 3
    # hex escapes: UTF-8 bytes
    assert p(r"cn=J\C3\BCrgen,dc=x").rdn.avas == (("cn", "J\u00fcrgen"),)
    assert p(r"cn=J\c3\bcrgen,dc=x") == p("cn=J\u00fcrgen,dc=x")
    # all specials
    dn = p(r'cn=a\+b\"c\\d\<e\>f\;g\=h,dc=x')
    assert dn.rdn.avas == (("cn", 'a+b"c\\d<e>f;g=h'),)
    assert p(str(dn)) == dn
    # leading/trailing spaces and leading '#'
    dn = p(r"cn=\ lead and trail\ ,dc=x")
    assert dn.rdn.avas == (("cn", " lead and trail "),)
    assert str(dn) == r"cn=\ lead and trail\ ,dc=x"
    dn = p(r"cn=\#hash,dc=x")
    assert dn.rdn.avas == (("cn", "#hash"),) and str(dn) == r"cn=\#hash,dc=x"
    # unescaped trailing spaces are dropped, escaped ones kept
    assert p("cn=a   ,dc=x").rdn.avas == (("cn", "a"),)
    assert p(r"cn=a\20,dc=x").rdn.avas == (("cn", "a "),)


def test_semicolon_is_not_a_separator() -> None:
    dn = p("cn=a;b,dc=x")
    assert len(dn) == 2 and dn.rdn.avas == (("cn", "a;b"),)
    assert str(dn) == r"cn=a\;b,dc=x"
    assert p(r"cn=a\;b,dc=x") == dn


def test_hex_ber_values_kept_raw() -> None:
    dn = p("cn=#04024869,dc=x")
    assert dn.rdn.avas == (("cn", "#04024869"),) and dn.rdn.ber == (True,)
    assert str(dn) == "cn=#04024869,dc=x"
    assert p("CN=#04024869 , DC=x") == dn
    assert p("cn=#04024869,dc=x").norm == "cn=#04024869,dc=x"


def test_multi_valued_rdn() -> None:
    a = p("cn=John+uid=jsmith,dc=x")
    b = p("UID=JSmith + CN=john,dc=x")
    assert a == b and a.norm == "cn=john+uid=jsmith,dc=x"
    assert str(b) == "uid=JSmith+cn=john,dc=x"  # order kept for display
    assert a.rdn.value_of("UID") == "jsmith" and a.rdn.value_of("sn") is None
    assert a.rdn.attribute_names == ("cn", "uid")
    with pytest.raises(LDAPError) as e:
        p("cn=a+cn=b,dc=x")
    assert e.value.code == ResultCode.invalidDNSyntax


def test_dn_valued_and_integer_rdns() -> None:
    """RDN values are syntax-checked; a DN-valued RDN is normalized as a DN."""
    for bad in ("uidNumber=abc,dc=x", "uidNumber=0042,dc=x"):  # values are checked against the syntax
        with pytest.raises(LDAPError):
            p(bad)
    assert p("member=cn\\=a\\,dc\\=x,dc=x").rdn.avas == (("member", "cn=a,dc=x"),)
    assert p("member=CN\\=A\\,DC\\=X,dc=x").norm == "member=cn=a\\,dc=x,dc=x"
    assert p("uidNumber=42,dc=x").norm == "uidnumber=42,dc=x"


@pytest.mark.parametrize(
    "text, reason",
    [
        ("uid", "missing '='"),
        ("uid=alice,", "ends with a ','"),
        ("uid=alice, ", "ends with a ','"),
        (",dc=x", "missing attribute type"),
        ("=alice,dc=x", "missing attribute type"),
        ("uid=alice,,dc=x", "missing attribute type"),
        ("bogus=1,dc=x", "unknown attribute type 'bogus'"),
        ("1bad=1", "bad attribute type"),
        ("cn=,dc=x", "empty value"),
        ("cn=a\\", "at end of DN"),
        ("cn=a\\q,dc=x", "bad escape"),
        ("cn=#0g,dc=x", "hex value"),
        ("cn=#123,dc=x", "bad hex value"),
        ("cn=\\ff\\fe,dc=x", "not valid UTF-8"),
        ("cn=a\\00b,dc=x", "NUL"),
        ("dc=\u00e9,dc=x", "non-ASCII"),  # dc is IA5String
        ("cn=a+,dc=x", "missing attribute type"),
    ],
)
def test_invalid(text: str, reason: str) -> None:
    with pytest.raises(LDAPError) as e:
        p(text)
    assert e.value.code == ResultCode.invalidDNSyntax
    assert e.value.message.startswith(f'invalid DN "{text}": ')
    assert reason in e.value.message


def test_parse_rdn_and_make_rdn(schema: Schema) -> None:
    r = parse_rdn("UID=Alice", schema)
    assert r == make_rdn([("uid", "alice")], schema)
    assert str(make_rdn([("cn", "Smith, John")], schema)) == r"cn=Smith\, John"
    with pytest.raises(LDAPError):
        parse_rdn("uid=a,dc=x", schema)
    with pytest.raises(LDAPError):
        parse_rdn("", schema)
    with pytest.raises(LDAPError) as e:
        make_rdn([("nope", "x")], schema)
    assert e.value.code == ResultCode.invalidDNSyntax
    with pytest.raises(LDAPError):
        make_rdn([("cn", "")], schema)


def test_tree_operations(schema: Schema) -> None:
    base = p("dc=example,dc=com")
    people = p("ou=people,dc=example,dc=com")
    alice = p("uid=alice,ou=people,dc=example,dc=com")
    assert alice.is_descendant_of(people) and alice.is_descendant_of(base) and alice.is_descendant_of(ROOT_DN)
    assert not people.is_descendant_of(people) and people.is_descendant_or_self(people)
    assert not base.is_descendant_of(people)
    assert alice.is_child_of(people) and not alice.is_child_of(base)
    assert not ROOT_DN.is_descendant_of(ROOT_DN)
    assert people.child(parse_rdn("uid=alice", schema)) == alice
    groups = p("ou=groups,dc=example,dc=com")
    moved = alice.with_parent(groups)
    assert str(moved) == "uid=alice,ou=groups,dc=example,dc=com"
    renamed = alice.with_rdn(parse_rdn("uid=alicia", schema))
    assert str(renamed) == "uid=alicia,ou=people,dc=example,dc=com"
    assert alice.rebase(people, groups) == moved
    assert people.rebase(people, groups) == groups
    with pytest.raises(ValueError):
        groups.rebase(people, base)
    with pytest.raises(LDAPError):
        ROOT_DN.with_parent(base)
    assert {alice, p("UID=ALICE,ou=People,dc=example,dc=com")} == {alice}


def test_path_key_cannot_be_faked_by_escaped_comma() -> None:
    x = p(r"ou=a\,b,dc=x")  # one RDN whose value contains a comma
    y = p("ou=b,ou=a,dc=x")
    z = p(r"cn=q,ou=a\,b,dc=x")
    assert len(x) == 2
    assert x.path_key == r"dc=x,ou=a\,b,"
    assert not y.path_key.startswith(x.path_key) and not y.is_descendant_of(x)
    assert z.path_key.startswith(x.path_key) and z.is_descendant_of(x)
    a = p("ou=a,dc=x")
    assert not x.path_key.startswith(a.path_key)
    assert not x.is_descendant_of(a)
    # a value that is a prefix of another value is not an ancestor
    assert not p("ou=ab,dc=x").path_key.startswith(a.path_key)
    # a backslash at the end of a value
    w = p(r"ou=a\\,dc=x")
    assert w.rdn.avas == (("ou", "a\\"),)
    assert not p(r"cn=z,ou=a\\,dc=x").path_key.startswith(x.path_key)


def test_path_key_range() -> None:
    people = p("ou=people,dc=example,dc=com")
    inside = [p("uid=a,ou=people,dc=example,dc=com"), p("cn=x,uid=a,ou=people,dc=example,dc=com"),
              p("uid=\U0001f600,ou=people,dc=example,dc=com")]
    outside = [p("ou=people2,dc=example,dc=com"), p("ou=peoplf,dc=example,dc=com"), p("dc=example,dc=com"),
               p("ou=people,dc=example2,dc=com")]
    for dn in inside:
        assert people.path_key <= dn.path_key < people.path_key_end
    for dn in outside:
        assert not (people.path_key < dn.path_key < people.path_key_end)
    assert ROOT_DN.path_key <= inside[2].path_key < ROOT_DN.path_key_end


def test_cache_returns_same_object(schema: Schema) -> None:
    assert parse_dn("cn=cached,dc=x", schema) is parse_dn("cn=cached,dc=x", schema)


def test_escape_value() -> None:
    assert escape_value("plain") == "plain"
    assert escape_value(" #a, b ") == r"\ #a\, b\ "
    assert escape_value("#x") == r"\#x"
    assert escape_value("a\nb") == r"a\0ab"
    assert p("cn=" + escape_value("a\nb") + ",dc=x").rdn.avas == (("cn", "a\nb"),)


_values = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=12
).filter(lambda s: s.strip() != "")


@settings(max_examples=300, deadline=None)
@given(st.lists(_values, min_size=1, max_size=4), st.lists(_values, min_size=1, max_size=4))
def test_roundtrip_and_prefix_property(xs: list[str], ys: list[str]) -> None:
    """str() parses back to an equal DN; path_key prefix <=> descendant-or-self."""
    a = DN(tuple(make_rdn([("cn", v)], SCHEMA) for v in xs))
    b = DN(tuple(make_rdn([("cn", v)], SCHEMA) for v in ys))
    assert p(str(a)) == a and p(a.norm) == a
    same_or_below = len(b) >= len(a) and all(
        r1 == r2 for r1, r2 in zip(reversed(a.rdns), reversed(b.rdns))
    )
    assert b.path_key.startswith(a.path_key) == same_or_below
    assert b.is_descendant_or_self(a) == same_or_below
