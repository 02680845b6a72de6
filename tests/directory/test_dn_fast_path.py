"""parse_dn's fast path for plain DNs (dn.py: _PLAIN_DN_RE, _parse_plain, the RDN cache) gives
exactly the DN objects, and the errors, of the full RFC 4514 parser (_parse)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ldapsync.directory import dn as D
from ldapsync.directory.errors import LDAPError
from ldapsync.directory.schema import Schema

SCHEMA = Schema.load_default()

PLAIN = [
    "dc=com",
    "uid=alice,ou=people,dc=example,dc=com",
    "UID=Alice,OU=People,DC=Example,DC=COM",
    "cn=Bench User 000010,ou=people,dc=example,dc=com",
    "cn=Ann  Lee,ou=people,dc=example,dc=com",              # inner spaces collapse in norm only
    "mail=a.b-c_d@example.com,ou=x,dc=example,dc=com",
    "cn=it's (me)! $%&*/:?@[]^_`{|}~,dc=com",
    "cn=admin,dc=example,dc=com",
    "o=Example,c=DE",
    "commonName=x,domainComponent=y",                        # aliases give the canonical names
    "ou=a,ou=a,ou=a",
    "l=1,st=2,street=3",
]

# must take the full parser: escapes, multi-valued, hex, spaces at the edges, non-ASCII, OIDs, ...
TRICKY = [
    "cn=a\\,b,dc=com", "cn=a\\2cb,dc=com", "cn=a+sn=b,dc=com", "sn=b+cn=a,dc=com", "cn=#04024869,dc=com",
    " cn=a,dc=com", "cn=a ,dc=com", "cn= a,dc=com", "cn =a,dc=com", "cn=a, dc=com", "cn=a,dc=com ",
    "cn=Ärger,dc=com", "cn=a\\ ,dc=com", "cn=\\ a,dc=com", "2.5.4.3=a,dc=com", "OID.2.5.4.3=a,dc=com",
    'cn="a",dc=com', "cn=a;b,dc=com", "cn=a<b>,dc=com", "cn=a=b,dc=com", "cn=a#b,dc=com", "cn=a\tb,dc=com",
    "cn=a\\\\b,dc=com", "", "   ", "cn=a,,dc=com", "cn=a,", ",cn=a", "cn=,dc=com", "cn", "=a", "cn=a+", "cn=a+cn=b",
    "cn=a\\", "cn=a\\zz", "cn=#0", "cn=#zz", "cn=a\x00b", "cn=\\c3\\28", "cn=a\u00a0b,dc=com", "cn=a\x7fb",
]

# plain-looking, but refused: the error must be the full parser's
PLAIN_BAD = ["foo=bar,dc=com", "uniqueMember=x,dc=com", "uid=a,nosuchattr=b", "c=USA,dc=com", "x-y=1", "cn=a,dc=com,bad-=x"]


def fresh() -> None:
    SCHEMA._dn_cache.clear()
    SCHEMA._rdn_cache.clear()


def shape(dn: D.DN) -> tuple:
    return (type(dn), dn.norm, dn.path_key, str(dn),
            tuple((type(r), r.avas, r.norm, r.ber, str(r)) for r in dn.rdns))


def outcome(fn, text: str) -> tuple:
    try:
        return ("ok", shape(fn(text, SCHEMA)))
    except LDAPError as e:
        return ("error", e.code, str(e))


@pytest.mark.parametrize("text", PLAIN)
def test_plain_dns_take_the_fast_path_and_match_the_parser(text: str) -> None:
    assert D._PLAIN_DN_RE.fullmatch(text)
    fresh()
    assert outcome(D._parse_plain, text) == outcome(D._parse, text)
    fresh()
    assert outcome(D.parse_dn, text) == outcome(D._parse, text)
    assert SCHEMA._rdn_cache                                   # the fast path ran
    # again, now from the RDN cache (not the DN cache)
    SCHEMA._dn_cache.clear()
    assert outcome(D.parse_dn, text) == outcome(D._parse, text)


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_dns_take_the_full_parser(text: str) -> None:
    assert not D._PLAIN_DN_RE.fullmatch(text)
    fresh()
    assert outcome(D.parse_dn, text) == outcome(D._parse, text)
    assert not SCHEMA._rdn_cache


@pytest.mark.parametrize("text", PLAIN_BAD)
def test_refused_plain_dns_give_the_parser_error(text: str) -> None:
    assert D._PLAIN_DN_RE.fullmatch(text)
    fresh()
    got = outcome(D.parse_dn, text)
    assert got[0] == "error" and got == outcome(D._parse, text)
    # with the good RDNs of the name already cached too
    assert outcome(D.parse_dn, text) == got


def test_shared_rdns_across_many_dns() -> None:
    fresh()
    texts = [f"uid=user{i:06d},ou=people,dc=example,dc=com" for i in range(2000)]
    texts += [f"cn=Group {i},ou=groups,dc=example,dc=com" for i in range(200)]
    texts += [f"UID=User{i:06d},OU=People,dc=Example,dc=com" for i in range(200)]
    for t in texts:
        assert outcome(D.parse_dn, t) == outcome(D._parse, t)
    assert D.parse_dn(texts[0], SCHEMA).parent is not None
    assert D.parse_dn(texts[1], SCHEMA).rdns[1] is D.parse_dn(texts[2], SCHEMA).rdns[1]
    assert D.parse_dn("uid=User000001,OU=People,dc=Example,dc=com", SCHEMA) == D.parse_dn(
        "uid=user000001,ou=people,dc=example,dc=com", SCHEMA)


ALPHABET = "abcXYZ019 =,+#\\\"; <>.-_@'\t\u00e4"
TYPES = st.sampled_from(["cn", "CN", "uid", "ou", "dc", "sn", "c", "foo", "2.5.4.3", "mail", "x-", "o"])
VALUES = st.text(alphabet=ALPHABET, min_size=0, max_size=8)


@settings(max_examples=600, deadline=None)
@given(st.lists(st.tuples(TYPES, VALUES), min_size=1, max_size=4), st.booleans())
def test_random_names_agree_with_the_parser(rdns, clear: bool) -> None:
    text = ",".join(f"{t}={v}" for t, v in rdns)
    if clear:
        fresh()
    SCHEMA._dn_cache.clear()                                   # the RDN cache may be warm
    assert outcome(D.parse_dn, text) == outcome(D._parse, text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=ALPHABET + "=,", max_size=30))
def test_random_text_agrees_with_the_parser(text: str) -> None:
    SCHEMA._dn_cache.clear()
    assert outcome(D.parse_dn, text) == outcome(D._parse, text)
