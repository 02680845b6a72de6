"""What "bound to Microsoft 365" means for an entry — the directory's rule, in one place.

An entry is bound when its ``ldapsyncDirectory`` has the value ``office365`` (direct binding) or
its ``memberOf`` names ``cn=Provisioning - Office 365,ou=tags,<suffix>`` (the tag).  The outbox
planner (``sync/planner.py: OutboxPlanner.is_bound``) calls :func:`is_bound` on every write, so
it is written for that hot path: loops rather than generators, and the tag's normalized DN
parsed once per directory (``DirectoryCore.tag_norm``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ldapsync.store.entries import Attrs

if TYPE_CHECKING:
    from ldapsync.directory.core import DirectoryCore

DIRECTORY_VALUE = "office365"
TAG_CN = "Provisioning - Office 365"


def tag_dn(suffix: object) -> str:
    return f"cn={TAG_CN},ou=tags,{suffix}"


def is_bound(directory: DirectoryCore, attrs: Attrs | None) -> bool:
    """Whether the entry with ``attrs`` is bound to Microsoft 365 (directly or by the tag)."""
    if not attrs:
        return False
    # Loops, not any(genexpr): this runs twice per write of every user, and the generators
    # cost more than the rest of it.
    for v in attrs.get("ldapsyncDirectory", ()):
        if v.lower() == DIRECTORY_VALUE:
            return True
    tag = directory.tag_norm
    for v in attrs.get("memberOf", ()):
        if directory.dn_norm_or_none(v) == tag:        # parse_dn caches each DN
            return True
    return False
