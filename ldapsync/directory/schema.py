"""The LDAP schema: :class:`Schema`, the one object callers hold, and the names they import.

A :class:`Schema` is a loaded, resolved set of attribute types and object
classes; it answers lookups, matching, syntax and entry checks, and the
values of the ``cn=Subschema`` entry.  The work is split by responsibility
over the modules below, and ``from ldapsync.directory.schema import ...``
keeps giving every name callers use:

- ``schema_model.py``: syntaxes and matching rules the server knows,
  :class:`AttributeType`, :class:`ObjectClass`, :class:`SchemaError`;
- ``schema_loader.py``: OpenLDAP-format ``.schema`` files, RFC 4512
  descriptions, inheritance (start-up only);
- ``schema_matching.py``: normalized forms for equality, substring and
  ordering matching and index rows (the hot path);
- ``schema_syntax.py``: value syntax checks, GeneralizedTime;
- ``schema_entry_checks.py``: an entry against its object classes.

It knows nothing about storage, the protocol or access control, and it never
does I/O after :meth:`Schema.load`.  Refusals are :class:`LDAPError` with the
result code a standard server gives; a broken schema *file* is a
:class:`SchemaError` at load time (a start-up problem, not a client's).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import ldapsync
from ldapsync.directory import schema_entry_checks, schema_matching, schema_syntax
from ldapsync.directory.errors import LDAPError, ResultCode
from ldapsync.directory.schema_loader import _parse_description as _parse_description  # test_schema.py uses it
from ldapsync.directory.schema_loader import read_definitions, resolve
from ldapsync.directory.schema_model import (
    DN_SYNTAX,
    MATCHING_RULES,
    NAME_AND_OPTIONAL_UID_SYNTAX,
    SYNTAXES,
    AttributeType,
    ObjectClass,
    SchemaError,
)
from ldapsync.directory.schema_syntax import format_generalized_time, parse_generalized_time

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


class Schema:
    """A loaded, resolved schema.  Immutable after construction; safe to share.

    The matching, syntax and entry-check methods are the functions of
    ``schema_matching.py``, ``schema_syntax.py`` and ``schema_entry_checks.py``
    bound here as they are (no wrapper call on the hot path): each takes the
    schema as its first argument.
    """

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
        self._rdn_cache: dict[str, Any] = {}  # used by ldapsync.directory.dn (plain RDNs)

    # -- loading ---------------------------------------------------------

    @classmethod
    def load(cls, paths: Iterable[Path]) -> "Schema":
        """Read OpenLDAP-format schema files (in order) and resolve them."""
        return cls(*resolve(read_definitions(paths)))

    @classmethod
    def default_schema_dir(cls) -> Path:
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

    # -- matching (schema_matching.py) ------------------------------------

    normalize = schema_matching.normalize
    substr_normalize = schema_matching.substr_normalize
    ordering_key = schema_matching.ordering_key

    # -- syntax checks (schema_syntax.py) ---------------------------------

    validate_value = schema_syntax.validate_value
    _syntax_problem = schema_syntax._syntax_problem  # dn.py checks RDN values with it

    # -- entry checks (schema_entry_checks.py) ----------------------------

    check_entry = schema_entry_checks.check_entry

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
