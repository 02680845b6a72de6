"""``mail`` is unique, case-insensitively, among ``ldapsyncUser`` entries (bound or not).

Owns the check every write makes before it is stored (``Write.finish``, ``directory/writes.py``):
an add, modify or rename — over LDAP, from the self-service pages, ``ldif load``, the importer —
that would give a ``ldapsyncUser`` entry a ``mail`` address another ``ldapsyncUser`` entry already
holds is refused with ``constraintViolation``.  The address becomes the Microsoft 365 sign-in name
(userPrincipalName), so two entries holding one would fight over one account.

Only addresses an entry *gains* in this write are checked (a new entry, a new value, a rename whose
RDN adds one, an entry becoming ``ldapsyncUser``): duplicates already in a database (loaded before
this rule) never stop the server nor block unrelated changes; an admin finds them as the README
says and fixes them by hand.

Race safety: the check looks up the ``mail`` index (``[directory] indexed``; a full scan when the
configuration leaves ``mail`` out) after taking a transaction-scoped lock on each address it checks
(``store.lock_values_txn``: a PostgreSQL advisory lock; SQLite writes run one at a time), so of two
clients adding the same address at once, on any number of nodes, exactly one wins.

Normal form: the schema's equality rule for ``mail`` (caseIgnoreIA5Match: case and surrounding or
repeated spaces ignored).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ldapsync.directory.errors import LDAPError, ResultCode
from ldapsync.directory.hooks import Origin
from ldapsync.store import entries as store
from ldapsync.store.entries import Attrs, StoredEntry

if TYPE_CHECKING:
    from ldapsync.directory.writes import Staged, Write

UNIQUE_CLASS = "ldapsyncuser"     # objectClass (lower case) whose entries share one address space
ATTR = "mail"
RULE = "mail is unique among ldapsyncUser entries, case-insensitively"


def is_unique_class(attrs: Attrs | None) -> bool:
    return bool(attrs) and any(oc.lower() == UNIQUE_CLASS for oc in (attrs or {}).get("objectClass", ()))


def _norms(w: Write, attrs: Attrs | None) -> dict[str, str]:
    """normalized address → the value as written, for a ldapsyncUser entry's mail values."""
    if not is_unique_class(attrs):
        return {}
    assert attrs is not None
    vals = attrs.get(ATTR) or ()
    if not vals:
        return {}
    at = w.directory.schema.attribute(ATTR)
    out: dict[str, str] = {}
    for v in vals:
        try:
            out.setdefault(w.directory.schema.normalize(at, v) if at is not None else v.lower(), v)
        except LDAPError:
            out.setdefault(v.strip().lower(), v)
    return out


def _gained(w: Write, st: Staged) -> dict[str, str]:
    """The addresses this write gives the staged entry that it did not hold as a ldapsyncUser."""
    new = st.attrs
    if not new or not new.get(ATTR):
        return {}
    old = st.old.attrs if st.old is not None else None
    if old is not None and old.get(ATTR) == new.get(ATTR) and old.get("objectClass") == new.get("objectClass"):
        return {}                                   # the common case: mail untouched
    have = _norms(w, old)
    return {n: v for n, v in _norms(w, new).items() if n not in have}


def check_txn(w: Write) -> None:
    """Refuse (constraintViolation) the write if an address it gives a ldapsyncUser entry is held
    by another ldapsyncUser entry; run inside the write's transaction, before it is stored.
    Linear in the entries of the write (``ldif load`` checks a batch of a thousand at once)."""
    staged = w.staged()
    claims = [(st, n, v) for st in staged for n, v in _gained(w, st).items()]
    if not claims:
        return
    store.lock_values_txn(w.txn, ATTR, [n for _, n, _ in claims])
    held: dict[str, list[str]] = {}                    # address → DNs of the staged entries holding it
    for st in staged:
        for n in _norms(w, st.attrs):
            held.setdefault(n, []).append(str(st.dn))
    for st, norm, value in claims:
        others = [dn for dn in held[norm] if dn != str(st.dn)]
        if others:
            raise _in_use(w, value, others[0])
    wanted = {n for _, n, _ in claims}
    for e in _candidates(w, sorted(wanted)):
        if w.staged_by_id(e.id) is not None:
            continue              # staged in this write: judged above, as the write leaves it
        for n in wanted.intersection(_norms(w, e.attrs)):
            value = next(v for _, c, v in claims if c == n)
            raise _in_use(w, value, e.dn)


def _candidates(w: Write, norms: list[str]) -> list[StoredEntry]:
    """Stored entries that may hold one of ``norms`` (from the mail index; a scan of the
    ldapsyncUser entries when the configuration does not index mail)."""
    if w.directory.is_indexed(ATTR):
        return [e for _, e in store.entries_with_values_txn(w.txn, ATTR, norms)]
    return [e for e in store.entries_containing_txn(w.txn, UNIQUE_CLASS) if is_unique_class(e.attrs)]


def _in_use(w: Write, value: str, holder: str) -> LDAPError:
    if _may_name_holder(w):
        return LDAPError(ResultCode.constraintViolation,
                         f'mail: the address "{value}" is already in use by "{holder}" ({RULE}); '
                         "choose another address or change that entry's first")
    return LDAPError(ResultCode.constraintViolation,
                     f'mail: the address "{value}" is already in use by another entry ({RULE}); choose another address')


def _may_name_holder(w: Write) -> bool:
    """Admins (and the admin commands) learn which entry holds the address; nobody else does."""
    if w.origin == Origin.LDAP:
        from ldapsync.directory.core import Actor     # core imports writes, which imports this module

        d = w.directory
        try:
            actor = Actor(d.dn(w.actor_dn)) if w.actor_dn else None
        except LDAPError:
            actor = None
        return actor is not None and d._is_admin_txn(w.txn, actor)
    return w.origin in (Origin.CLI, Origin.IMPORT, Origin.BOOTSTRAP)
