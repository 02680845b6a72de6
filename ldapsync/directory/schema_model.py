"""The schema model: the syntaxes and matching rules the server knows, attribute types, object classes.

This module owns the values a loaded schema is made of: the tables of known
syntaxes (RFC 4517, RFC 4530, RFC 2307, X.509) and matching rules, the
:class:`AttributeType` and :class:`ObjectClass` records with their
*effective* (inherited) properties, the RFC 4512 lexical forms of an OID and
a name, and :class:`SchemaError` for a broken schema file.  It holds data
only: reading files is ``schema_loader.py``, the rules built on the model
are ``schema_matching.py``, ``schema_syntax.py`` and
``schema_entry_checks.py``, joined by :class:`ldapsync.directory.schema.Schema`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "AttributeType",
    "ObjectClass",
    "SchemaError",
    "SYNTAXES",
    "MATCHING_RULES",
    "DN_SYNTAX",
    "NAME_AND_OPTIONAL_UID_SYNTAX",
    "USAGES",
    "KINDS",
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


# RFC 4512 numericoid and descr: the loader's OIDs and names, the OID syntax check
_NUMERICOID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
_DESCR_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-]*$")
