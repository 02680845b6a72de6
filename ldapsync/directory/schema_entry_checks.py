"""Entry checks: an entry's attributes against its object classes (MUST/MAY, structural class).

This module owns :func:`check_entry`: every objectClass value is known, the
classes name exactly one structural chain (whose leaf is the entry's
``structuralObjectClass``), every MUST attribute is present, every user
attribute is allowed by some class (or ``extensibleObject``), and a
SINGLE-VALUE attribute has one value.  Refusals are ``objectClassViolation``,
``undefinedAttributeType`` or ``constraintViolation``, as a standard server
gives.  The function is a :class:`~ldapsync.directory.schema.Schema`
method; call it as such.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ldapsync.directory.errors import LDAPError, ResultCode
from ldapsync.directory.schema_model import AttributeType, ObjectClass

if TYPE_CHECKING:
    from ldapsync.directory.schema import Schema

__all__ = ["check_entry"]


def check_entry(schema: Schema, attrs: Mapping[str, Sequence[str]]) -> str:
    """Check an entry's attributes against its object classes; return its structural class.

    ``attrs`` maps attribute names (canonical names expected; any spelling
    is resolved) to values and must include ``objectClass``.  Operational
    attributes are not checked against the object classes.
    """
    by_at: dict[AttributeType, Sequence[str]] = {}
    for key, values in attrs.items():
        at = schema.attribute(key)
        if at is None:
            raise LDAPError(ResultCode.undefinedAttributeType, f"attribute type '{key}' is not defined")
        if at in by_at:
            by_at[at] = list(by_at[at]) + list(values)
        else:
            by_at[at] = values
    oc_at = schema._at["2.5.4.0"]
    oc_values = [v for v in by_at.get(oc_at, ()) if v.strip()]
    if not oc_values:
        raise LDAPError(ResultCode.objectClassViolation, "no objectClass attribute")
    classes: list[ObjectClass] = []
    for v in oc_values:
        oc = schema.object_class(v)
        if oc is None:
            raise LDAPError(ResultCode.objectClassViolation, f"unknown objectClass '{v.strip()}'")
        classes.append(oc)
    all_names: set[str] = set()
    for oc in classes:
        all_names |= oc.ancestry
    all_classes = [schema._oc[n.lower()] for n in all_names]
    structural = [oc for oc in all_classes if oc.kind == "STRUCTURAL"]
    if not structural:
        raise LDAPError(ResultCode.objectClassViolation, "no structural object class provided")
    leaves = [oc for oc in structural
              if not any(other is not oc and oc.name in other.ancestry for other in structural)]
    if len(leaves) > 1:
        names = sorted((oc.name for oc in leaves), key=str.lower)
        raise LDAPError(
            ResultCode.objectClassViolation,
            f"invalid structural object class chain ({'/'.join(names)})",
        )
    leaf = leaves[0]
    present = {at.name for at, vals in by_at.items() if any(True for _ in vals)}
    for oc in sorted(all_classes, key=lambda c: c.name.lower()):
        for req in sorted(oc.must, key=str.lower):
            if req not in present:
                raise LDAPError(
                    ResultCode.objectClassViolation,
                    f"object class '{oc.name}' requires attribute '{req}'",
                )
    extensible = "extensibleObject" in all_names
    allowed: set[str] = set()
    for oc in all_classes:
        allowed |= oc.must
        allowed |= oc.may
    for at, values in by_at.items():
        if at.operational:
            continue
        if not extensible and at.name not in allowed:
            raise LDAPError(ResultCode.objectClassViolation, f"attribute '{at.name}' not allowed")
        if at.single_value and len(values) > 1:
            raise LDAPError(
                ResultCode.constraintViolation, f"attribute '{at.name}' cannot have multiple values"
            )
    return leaf.name
