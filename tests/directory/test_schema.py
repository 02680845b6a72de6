"""Tests for ldapsync.directory.schema: loading, normalization, syntaxes, entry checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldapsync.directory.errors import LDAPError, ResultCode
from ldapsync.directory.schema import (
    DEFAULT_SCHEMA_FILES,
    MATCHING_RULES,
    SYNTAXES,
    Schema,
    SchemaError,
    format_generalized_time,
    parse_generalized_time,
)


@pytest.fixture(scope="module")
def schema() -> Schema:
    return Schema.load_default()


def at(schema: Schema, name: str):
    a = schema.attribute(name)
    assert a is not None, name
    return a


# ---------------------------------------------------------------- loading


def test_default_files_exist_and_load(schema: Schema) -> None:
    d = Schema.default_schema_dir()
    for name in DEFAULT_SCHEMA_FILES:
        assert (d / name).is_file()
    assert Schema.load_default() is schema  # cached
    assert len(schema.attribute_types) > 150
    assert len(schema.object_classes) > 50


@pytest.mark.parametrize(
    "source, names",
    [
        ("system", ("objectClass", "entryUUID", "memberOf", "pwdReset", "namingContexts", "uid", "cn")),
        ("core", ("sn", "mail", "dc", "member", "telephoneNumber")),
        ("cosine", ("manager", "homePhone", "mobile", "info")),
        ("inetorgperson", ("displayName", "employeeNumber", "jpegPhoto")),
        ("nis", ("homeDirectory", "loginShell", "memberUid", "shadowMax")),
        ("ldapsync", ("ldapsyncDirectory", "o365SyncState", "o365QueueDepth", "ldapsyncAltMail")),
    ],
)
def test_each_file_contributes(schema: Schema, source: str, names: tuple[str, ...]) -> None:
    for name in names:
        assert schema.attribute(name) is not None, name


def test_every_definition_resolves(schema: Schema) -> None:
    for a in schema.attribute_types:
        assert a.syntax in SYNTAXES, a.name
        for rule in (a.equality, a.ordering, a.substr):
            assert rule is None or rule in MATCHING_RULES
        if a.sup:
            assert schema.attribute(a.sup) is not None
        assert a.definition.startswith(f"( {a.oid} ") and a.definition.endswith(" )")
    for oc in schema.object_classes:
        assert oc.kind in ("STRUCTURAL", "AUXILIARY", "ABSTRACT")
        for s in oc.sups:
            assert schema.object_class(s) is not None
        for name in oc.must | oc.may:
            assert schema.attribute(name) is not None and schema.attribute(name).name == name


def test_each_file_loads_with_its_dependencies() -> None:
    d = Schema.default_schema_dir()
    files = list(DEFAULT_SCHEMA_FILES)
    for i in range(1, len(files) + 1):  # each prefix of the load order is self-contained
        Schema.load(d / f for f in files[:i])


def test_core_alone_has_unknown_references() -> None:
    d = Schema.default_schema_dir()
    with pytest.raises(SchemaError, match="unknown SUP 'name'"):
        Schema.load([d / "core.schema"])


def test_effective_inheritance(schema: Schema) -> None:
    sn = at(schema, "surname")
    assert sn.name == "sn" and sn.sup == "name"
    assert sn.equality == "caseIgnoreMatch" and sn.substr == "caseIgnoreSubstringsMatch"
    assert sn.syntax == "1.3.6.1.4.1.1466.115.121.1.15"
    member = at(schema, "member")
    assert member.is_dn and member.equality == "distinguishedNameMatch"
    assert at(schema, "uniqueMember").is_dn
    assert not at(schema, "cn").is_dn
    person = schema.object_class("inetorgperson")
    assert person is not None and person.name == "inetOrgPerson"
    assert person.must == {"objectClass", "sn", "cn"}
    assert {"uid", "mail", "title", "telephoneNumber", "userPassword", "ou"} <= person.may
    assert "cn" not in person.may
    assert schema.object_class("2.5.6.6") is schema.object_class("person")


def test_lookup_is_case_insensitive_and_ignores_options(schema: Schema) -> None:
    assert at(schema, "GIVENNAME").name == "givenName"
    assert at(schema, "gn").name == "givenName"
    assert at(schema, "2.5.4.42").name == "givenName"
    assert at(schema, "userCertificate;binary").name == "userCertificate"
    assert at(schema, "cn;lang-en").name == "cn"
    assert schema.attribute("noSuchThing") is None
    assert schema.object_class("noSuchClass") is None
    with pytest.raises(LDAPError) as e:
        schema.require_attribute("bogus")
    assert e.value.code == ResultCode.undefinedAttributeType


def test_system_and_ldapsync_attributes(schema: Schema) -> None:
    uuid = at(schema, "entryUUID")
    assert uuid.oid == "1.3.6.1.1.16.4" and uuid.syntax == "1.3.6.1.1.16.1"
    assert uuid.operational and uuid.no_user_modification and uuid.single_value
    assert at(schema, "entryDN").oid == "1.3.6.1.1.20"
    mo = at(schema, "memberOf")
    assert mo.oid == "1.2.840.113556.1.2.102" and mo.is_dn and mo.operational and mo.no_user_modification
    for name in ("pwdChangedTime", "pwdAccountLockedTime", "pwdFailureTime", "pwdHistory",
                 "pwdGraceUseTime", "pwdReset"):
        a = at(schema, name)
        assert a.oid.startswith("1.3.6.1.4.1.42.2.27.8.1.")
        assert a.no_user_modification and a.usage == "directoryOperation"
    assert not at(schema, "cn").operational
    d = at(schema, "ldapsyncDirectory")
    assert not d.operational and not d.single_value and d.equality == "caseIgnoreMatch"
    arcs = set()
    for name in ("ldapsyncDirectory", "ldapsyncAltMail", "o365ObjectId", "o365SyncState", "o365SyncedAt",
                 "o365LastError", "o365ConnectorState", "o365VerifiedDomain", "o365CredentialExpiry",
                 "o365QueueDepth", "o365LastReconcile"):
        a = at(schema, name)
        assert a.oid.startswith("2.25.")
        arcs.add(a.oid.split(".")[1])
        if name.startswith("o365"):
            assert a.operational and a.no_user_modification, name
            assert a.single_value == (name != "o365VerifiedDomain"), name
    assert len(arcs) == 1
    assert at(schema, "ldapsyncAltMail").syntax == "1.3.6.1.4.1.1466.115.121.1.26"
    assert at(schema, "o365QueueDepth").syntax == "1.3.6.1.4.1.1466.115.121.1.27"
    assert at(schema, "o365SyncedAt").syntax == "1.3.6.1.4.1.1466.115.121.1.24"
    user = schema.object_class("ldapsyncUser")
    assert user is not None and user.kind == "AUXILIARY" and user.may == {"ldapsyncDirectory", "ldapsyncAltMail"}
    tag = schema.object_class("ldapsyncTag")
    assert tag is not None and tag.kind == "STRUCTURAL" and "member" in tag.may and "cn" in tag.must
    conn = schema.object_class("ldapsyncConnector")
    assert conn is not None and conn.must == {"objectClass", "cn"}


def test_oid_macros_and_errors(tmp_path: Path) -> None:
    sysfile = Schema.default_schema_dir() / "system.schema"
    good = tmp_path / "good.schema"
    good.write_text(
        "objectIdentifier base 1.2.3\nobjectIdentifier at base:1\n"
        "attributetype ( at:7 NAME 'fooBar'\n\tSUP name )\n"
        "objectclass ( base:2.1 NAME 'fooClass' SUP top\n  AUXILIARY MAY fooBar )\n"
    )
    s = Schema.load([sysfile, good])
    assert s.attribute("foobar").oid == "1.2.3.1.7"
    assert s.object_class("fooclass").oid == "1.2.3.2.1"
    for body, message in [
        ("attributetype ( 1.2.3.4 NAME 'x' SYNTAX 9.9.9 )", "unknown syntax"),
        ("attributetype ( 1.2.3.4 NAME 'x' EQUALITY fooMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 )",
         "unknown matching rule"),
        ("attributetype ( 1.2.3.4 NAME 'x' SUP nope )", "unknown SUP"),
        ("attributetype ( 1.2.3.4 NAME 'x' )", "neither SYNTAX nor SUP"),
        ("attributetype ( 2.5.4.3 NAME 'x' SUP name )", "defined twice"),
        ("attributetype ( 1.2.3.4 NAME 'cn' SUP name )", "defined twice"),
        ("objectclass ( 1.2.3.5 NAME 'y' SUP top MUST nope )", "unknown attribute"),
        ("objectclass ( 1.2.3.5 NAME 'y' SUP nope )", "unknown SUP"),
        ("attributetype ( nomacro:1 NAME 'x' SUP name )", "unknown OID macro"),
        ("attributetype ( 1.2.3.4 NAME 'x' WHATEVER SUP name )", "unknown keyword"),
        ("frobnicate 1.2.3", "unknown statement"),
    ]:
        bad = tmp_path / "bad.schema"
        bad.write_text(body + "\n")
        with pytest.raises(SchemaError, match=message):
            Schema.load([sysfile, bad])


# ---------------------------------------------------------------- normalization


@pytest.mark.parametrize(
    "attr, value, expected",
    [
        ("cn", "  John   SMITH ", "john smith"),
        ("cn", "Stra\u00dfe", "strasse"),
        ("mail", " Alice@Example.COM ", "alice@example.com"),  # caseIgnoreIA5Match
        ("dc", "Example", "example"),
        ("labeledURI", "  http://X.org   Home ", "http://X.org Home"),  # caseExactMatch
        ("homeDirectory", "/home/Alice ", "/home/Alice"),  # caseExactIA5Match
        ("member", "UID=Alice , OU=People,DC=Example,DC=com", "uid=alice,ou=people,dc=example,dc=com"),
        ("uidNumber", " 0042 ", "42"),
        ("uidNumber", "-7", "-7"),
        ("uidNumber", "abc", "abc"),
        ("createTimestamp", "20240131235959Z", "20240131235959Z"),
        ("createTimestamp", "202401312359+0100", "20240131225900Z"),
        ("createTimestamp", "20240131235959.500Z", "20240131235959.5Z"),
        ("createTimestamp", "2024013123Z", "20240131230000Z"),
        ("x121Address", "12 34 5", "12345"),  # numericStringMatch
        ("telephoneNumber", "+1 555-123 4567", "+15551234567"),
        ("userPassword", " {X}Secret ", " {X}Secret "),  # octetStringMatch
        ("jpegPhoto", "raw bytes ", "raw bytes "),  # no equality rule
        ("entryUUID", "0AF5A1B2-0000-4000-8000-00000000ABCD", "0af5a1b2-0000-4000-8000-00000000abcd"),
        ("hasSubordinates", "true", "TRUE"),
        ("objectClass", "InetOrgPerson", "inetorgperson"),
        ("objectClass", "2.5.6.6", "person"),
        ("ldapsyncDirectory", "Office365", "office365"),
    ],
)
def test_normalize(schema: Schema, attr: str, value: str, expected: str) -> None:
    assert schema.normalize(at(schema, attr), value) == expected


def test_normalize_unique_member(schema: Schema) -> None:
    um = at(schema, "uniqueMember")
    assert schema.normalize(um, "CN=Bob,DC=X#'0101'B") == "cn=bob,dc=x#'0101'B"
    assert schema.normalize(um, "CN=Bob,DC=X") == "cn=bob,dc=x"


def test_substr_normalize(schema: Schema) -> None:
    assert schema.substr_normalize(at(schema, "cn"), "Al  ICE ") == "al ice "
    assert schema.substr_normalize(at(schema, "mail"), "@Example") == "@example"
    assert schema.substr_normalize(at(schema, "memberUid"), "Bob") == "Bob"
    assert schema.substr_normalize(at(schema, "telephoneNumber"), "555-12") == "55512"


def test_ordering_key(schema: Schema) -> None:
    n = at(schema, "uidNumber")
    assert schema.ordering_key(n, "10") > schema.ordering_key(n, "9")
    assert schema.ordering_key(n, "x") is None
    t = at(schema, "modifyTimestamp")
    a = schema.ordering_key(t, "20240101000000Z")
    b = schema.ordering_key(t, "20240101000000.5Z")
    c = schema.ordering_key(t, "20240101010000+0200")  # 2023-12-31T23:00Z
    assert c < a < b
    assert schema.ordering_key(t, "garbage") is None
    cn = at(schema, "cn")
    assert schema.ordering_key(cn, "B") > schema.ordering_key(cn, "a")


def test_generalized_time_helpers() -> None:
    dt = parse_generalized_time("20240229120000,25Z")
    assert format_generalized_time(dt) == "20240229120000.25Z"
    for bad in ("20240230120000Z", "2024", "20240101120000", "20241301000000Z", "20240101250000Z"):
        with pytest.raises(ValueError):
            parse_generalized_time(bad)


# ---------------------------------------------------------------- syntaxes


@pytest.mark.parametrize(
    "attr, good, bad",
    [
        ("member", ["uid=a,dc=x", "", "cn=a\\,b+sn=c,dc=x"], ["nonsense", "uid=a,", "bogusAttr=1"]),
        ("uidNumber", ["0", "42", "-42"], ["", "4.2", "042", "-0", "abc", " 1"]),
        ("hasSubordinates", ["TRUE", "FALSE"], ["true", "yes", ""]),
        ("createTimestamp", ["20240131235959Z", "202401312359-0500", "20240131235959.123Z"],
         ["2024-01-31", "20240131235959", "20241331000000Z", ""]),
        ("mail", ["alice@example.com"], ["\u00e4lice@example.com"]),
        ("serialNumber", ["ABC-123 (x)"], ["abc_123", "\u00e9"]),  # PrintableString
        ("c", ["DE"], ["DEU", "D"]),
        ("x121Address", ["123 45"], ["12a"]),  # NumericString
        ("objectClass", ["person", "2.5.6.6"], ["", "1..2", "per son"]),  # OID
        ("cn", ["x", "J\u00fcrgen"], ["", "   "]),  # DirectoryString
        ("entryUUID", ["0af5a1b2-0000-4000-8000-00000000abcd"], ["0af5a1b2", "not-a-uuid"]),
        ("uniqueMember", ["cn=a,dc=x#'01'B", "cn=a,dc=x"], ["nonsense#'01'B", "nonsense"]),
        ("userPassword", ["anything at all", ""], []),
        ("jpegPhoto", ["\x00\x01"], []),
    ],
)
def test_validate_value(schema: Schema, attr: str, good: list[str], bad: list[str]) -> None:
    a = at(schema, attr)
    for v in good:
        schema.validate_value(a, v)
    for v in bad:
        with pytest.raises(LDAPError) as e:
            schema.validate_value(a, v)
        assert e.value.code == ResultCode.invalidAttributeSyntax
        assert a.name in e.value.message


# ---------------------------------------------------------------- entries


def check(schema: Schema, **attrs: list[str]) -> str:
    return schema.check_entry(attrs)


def test_inetorgperson_with_aux_classes(schema: Schema) -> None:
    entry = {
        "objectClass": ["top", "person", "organizationalPerson", "inetOrgPerson", "ldapsyncUser", "posixAccount"],
        "uid": ["alice"],
        "cn": ["Alice Smith"],
        "sn": ["Smith"],
        "givenName": ["Alice"],
        "mail": ["alice@example.com"],
        "ldapsyncDirectory": ["office365"],
        "ldapsyncAltMail": ["alice@home.example"],
        "uidNumber": ["1000"],
        "gidNumber": ["1000"],
        "homeDirectory": ["/home/alice"],
        "loginShell": ["/bin/bash"],
        "userPassword": ["{ARGON2}x"],
        "entryUUID": ["0af5a1b2-0000-4000-8000-00000000abcd"],
        "memberOf": ["cn=g1,ou=groups,dc=example,dc=com", "cn=g2,ou=groups,dc=example,dc=com"],
        "o365SyncState": ["synced"],
    }
    assert schema.check_entry(entry) == "inetOrgPerson"
    # superclasses may be left out; the structural class is still found
    entry["objectClass"] = ["inetOrgPerson", "ldapsyncUser", "posixAccount"]
    assert schema.check_entry(entry) == "inetOrgPerson"
    # posixAccount requires homeDirectory
    missing = dict(entry)
    del missing["homeDirectory"]
    with pytest.raises(LDAPError) as e:
        schema.check_entry(missing)
    assert e.value.code == ResultCode.objectClassViolation
    assert e.value.message == "object class 'posixAccount' requires attribute 'homeDirectory'"
    # ldapsyncDirectory needs ldapsyncUser
    no_aux = dict(entry, objectClass=["inetOrgPerson", "posixAccount"])
    with pytest.raises(LDAPError) as e:
        schema.check_entry(no_aux)
    assert e.value.message == "attribute 'ldapsyncDirectory' not allowed"
    # displayName is single-valued
    with pytest.raises(LDAPError) as e:
        schema.check_entry(dict(entry, displayName=["a", "b"]))
    assert e.value.code == ResultCode.constraintViolation
    assert e.value.message == "attribute 'displayName' cannot have multiple values"


def test_group_of_names(schema: Schema) -> None:
    assert check(schema, objectClass=["groupOfNames"], cn=["staff"],
                 member=["uid=a,dc=x", "uid=b,dc=x"], description=["Staff"]) == "groupOfNames"
    with pytest.raises(LDAPError) as e:
        check(schema, objectClass=["groupOfNames"], cn=["staff"])
    assert e.value.message == "object class 'groupOfNames' requires attribute 'member'"


def test_organizational_unit(schema: Schema) -> None:
    assert check(schema, objectClass=["top", "organizationalUnit"], ou=["people"]) == "organizationalUnit"
    with pytest.raises(LDAPError) as e:
        check(schema, objectClass=["organizationalUnit"], ou=["people"], mail=["x@y"])
    assert e.value.code == ResultCode.objectClassViolation
    assert "'mail' not allowed" in e.value.message
    # extensibleObject allows anything
    assert check(schema, objectClass=["organizationalUnit", "extensibleObject"], ou=["people"],
                 mail=["x@y"]) == "organizationalUnit"


def test_ldapsync_tag_without_members(schema: Schema) -> None:
    assert check(schema, objectClass=["top", "ldapsyncTag"], cn=["Provisioning - Office 365"]) == "ldapsyncTag"
    assert check(schema, objectClass=["ldapsyncTag"], cn=["t"], member=["uid=a,dc=x"],
                 owner=["cn=admin,dc=x"], businessCategory=["x"]) == "ldapsyncTag"
    assert check(schema, objectClass=["ldapsyncConnector"], cn=["office365"],
                 o365ConnectorState=["active"], o365VerifiedDomain=["a.com", "b.com"],
                 o365QueueDepth=["0"]) == "ldapsyncConnector"


def test_dcobject_organization(schema: Schema) -> None:
    assert check(schema, objectClass=["top", "dcObject", "organization"], dc=["example"],
                 o=["Example Inc."]) == "organization"
    with pytest.raises(LDAPError) as e:
        check(schema, objectClass=["dcObject"], dc=["example"])
    assert e.value.message == "no structural object class provided"
    with pytest.raises(LDAPError) as e:
        check(schema, objectClass=["dcObject", "organization"], dc=["a", "b"], o=["x"])
    assert e.value.code == ResultCode.constraintViolation


def test_organizational_role_simple_security_object(schema: Schema) -> None:
    assert check(schema, objectClass=["organizationalRole", "simpleSecurityObject"], cn=["admin"],
                 userPassword=["{ARGON2}x"], description=["Directory administrator"]) == "organizationalRole"
    with pytest.raises(LDAPError) as e:
        check(schema, objectClass=["organizationalRole", "simpleSecurityObject"], cn=["admin"])
    assert e.value.message == "object class 'simpleSecurityObject' requires attribute 'userPassword'"


def test_structural_chain_and_unknown_class(schema: Schema) -> None:
    with pytest.raises(LDAPError) as e:
        check(schema, objectClass=["person", "organizationalUnit"], cn=["a"], sn=["b"], ou=["c"])
    assert e.value.code == ResultCode.objectClassViolation
    assert e.value.message == "invalid structural object class chain (organizationalUnit/person)"
    with pytest.raises(LDAPError) as e:
        check(schema, objectClass=["person", "fooBar"], cn=["a"], sn=["b"])
    assert e.value.code == ResultCode.objectClassViolation
    assert e.value.message == "unknown objectClass 'fooBar'"
    with pytest.raises(LDAPError) as e:
        check(schema, cn=["a"])
    assert e.value.code == ResultCode.objectClassViolation
    with pytest.raises(LDAPError) as e:
        check(schema, objectClass=["person"], cn=["a"], sn=["b"], bogus=["x"])
    assert e.value.code == ResultCode.undefinedAttributeType


def test_check_entry_accepts_any_spelling(schema: Schema) -> None:
    assert schema.check_entry({"objectclass": ["PERSON"], "CN": ["a"], "surname": ["b"]}) == "person"


# ---------------------------------------------------------------- subschema


def test_subschema_values(schema: Schema) -> None:
    v = schema.subschema_values()
    assert set(v) == {"attributeTypes", "objectClasses", "ldapSyntaxes", "matchingRules", "matchingRuleUse"}
    assert len(v["attributeTypes"]) == len(schema.attribute_types)
    assert ("( 2.5.4.4 NAME ( 'sn' 'surname' ) DESC 'RFC2256: last (family) name(s) for which the entity "
            "is known by' SUP name )") in v["attributeTypes"]
    assert any(d.startswith("( 1.3.6.1.1.16.4 NAME 'entryUUID'") and "USAGE directoryOperation" in d
               for d in v["attributeTypes"])
    assert any("NAME 'inetOrgPerson'" in d and "SUP organizationalPerson STRUCTURAL" in d
               for d in v["objectClasses"])
    assert "( 1.3.6.1.4.1.1466.115.121.1.15 DESC 'Directory String' )" in v["ldapSyntaxes"]
    assert "( 2.5.13.2 NAME 'caseIgnoreMatch' SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 )" in v["matchingRules"]
    assert any(d.startswith("( 2.5.13.14 NAME 'integerMatch' APPLIES (") and "uidNumber" in d
               for d in v["matchingRuleUse"])
    # every definition can be parsed back by our own parser
    import ldapsync.directory.schema as mod

    for d in v["attributeTypes"] + v["objectClasses"]:
        mod._parse_description(d, "x", "roundtrip")
