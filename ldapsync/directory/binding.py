"""What "bound to Microsoft 365" means for an entry — the directory's rule, in one place.

An entry is bound when its ``ldapsyncDirectory`` has the value ``office365`` (direct binding) or
its ``memberOf`` names ``cn=Provisioning - Office 365,ou=tags,<suffix>`` (the tag).  The outbox
planner (``sync/outbox.py: OutboxPlanner.is_bound``) runs the same rule on every write with loops
tuned for that hot path; tests/sync/test_outbox_unit.py holds the two equal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ldapsync.store.entries import Attrs

if TYPE_CHECKING:
    from ldapsync.directory.service import Directory

DIRECTORY_VALUE = "office365"
TAG_CN = "Provisioning - Office 365"


def tag_dn(suffix: object) -> str:
    return f"cn={TAG_CN},ou=tags,{suffix}"


def is_bound(directory: Directory, attrs: Attrs | None) -> bool:
    """Whether the entry with ``attrs`` is bound to Microsoft 365 (directly or by the tag)."""
    if not attrs:
        return False
    if any(v.lower() == DIRECTORY_VALUE for v in attrs.get("ldapsyncDirectory", ())):
        return True
    tag = directory.dn(tag_dn(directory.suffix)).norm
    return any(directory.dn_norm_or_none(v) == tag for v in attrs.get("memberOf", ()))
