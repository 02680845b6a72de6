"""Reading: search, compare, the root DSE and the subschema entry.

Owns what a requester may see (:meth:`Reads._select`: hidden and admin-only attributes,
computed operational attributes), paging and limits, and the virtual entries
(``cn=Subschema``, ``cn=Monitor`` through ``ldapsync.directory.monitor``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


import ldapsync
from ldapsync.directory.core import (ADMIN_ONLY_ATTRS, COMPUTED_OPERATIONAL, HIDDEN_ATTRS, SUBSCHEMA_DN,
                                     SUPPORTED_CONTROLS, SUPPORTED_EXTENSIONS, Actor, as_text, hidden_attrs)
from ldapsync.directory.errors import LDAPError, ResultCode
from ldapsync.directory.filters import Ext, Filter, And, Or, Not
from ldapsync.directory.password_changes import PasswordChanges
from ldapsync.store import entries as store
from ldapsync.store.database import Txn
from ldapsync.store.entries import Attrs, StoredEntry


@dataclass
class SearchRequest:
    base: str
    scope: str                   # base | one | sub | children
    filter: Filter
    attributes: Sequence[str] = ()
    types_only: bool = False
    size_limit: int = 0
    time_limit: int = 0
    page_size: int | None = None
    page_after: int = 0


@dataclass
class SearchResult:
    entries: list[tuple[str, list[tuple[str, list[str]]]]] = field(default_factory=list)
    next_after: int | None = None    # paging: id to continue after; None = done
    code: ResultCode = ResultCode.success
    message: str = ""


class Reads(PasswordChanges):
    """The directory part that answers searches and compares."""

    # -- search ----------------------------------------------------------------
    def root_dse(self) -> Attrs:
        return {
            "objectClass": ["top", "extensibleObject"],
            "namingContexts": [str(self.suffix)],
            "supportedLDAPVersion": ["3"],
            "supportedControl": list(SUPPORTED_CONTROLS),
            "supportedExtension": [x for x in SUPPORTED_EXTENSIONS
                                   if x != "1.3.6.1.4.1.1466.20037" or self.config.ldap.starttls_cert],
            "supportedFeatures": ["1.3.6.1.4.1.4203.1.5.1", "1.3.6.1.4.1.4203.1.5.2", "1.3.6.1.4.1.4203.1.5.3", "1.3.6.1.1.14"],
            "supportedSASLMechanisms": [],
            "vendorName": ["ldapsync"],
            "vendorVersion": [ldapsync.__version__],
            "subschemaSubentry": [SUBSCHEMA_DN],
        }

    def subschema_entry(self) -> Attrs:
        attrs: Attrs = {"objectClass": ["top", "subentry", "subschema", "extensibleObject"], "cn": ["Subschema"]}
        attrs.update(self.schema.subschema_values())
        return attrs

    def _select(self, attrs: Attrs, requested: Sequence[str], hidden: frozenset[str], types_only: bool,
                extra: Callable[[str], list[str] | None]) -> list[tuple[str, list[str]]]:
        """Project an entry onto the requested attribute list (``*``, ``+``, ``1.1``, names),
        without the ``hidden`` attributes (:func:`~ldapsync.directory.core.hidden_attrs`)."""
        want_user = not requested
        want_op = False
        names: list[str] = []
        for r in requested:
            if r == "*":
                want_user = True
            elif r == "+":
                want_op = True
            elif r == "1.1":
                continue
            else:
                at = self.schema.attribute(r.split(";", 1)[0])
                if at is not None:
                    names.append(at.name)
        if requested and all(r == "1.1" for r in requested):
            return []
        out: dict[str, list[str]] = {}
        operational = self._operational
        for name, values in attrs.items():
            if name in hidden:
                continue
            op = operational.get(name)
            if op is None:
                at = self.schema.attribute(name)
                op = operational[name] = at.operational if at is not None else False
            if (want_op if op else want_user) or name in names:
                out[name] = values
        for name in COMPUTED_OPERATIONAL:
            if want_op or name in names:
                v = extra(name)
                if v is not None:
                    out[name] = v
        if types_only:
            return [(n, []) for n in out]
        return list(out.items())

    async def search(self, actor: Actor, req: SearchRequest, abandoned: Callable[[], bool] = lambda: False) -> SearchResult:
        base_text = req.base
        try:
            base = self.dn(base_text)
        except LDAPError as e:
            raise LDAPError(ResultCode.invalidDNSyntax, e.message) from None
        # Root DSE and subschema are virtual and readable by anyone.
        if base.is_root and req.scope == "base":
            return self._virtual(await self.monitor.root_dse(actor, self.root_dse()), "", req, actor)
        if base.norm == self.dn(SUBSCHEMA_DN).norm and req.scope == "base":
            return self._virtual(self.subschema_entry(), SUBSCHEMA_DN, req, actor)
        if actor.dn is None and not self.config.ldap.allow_anonymous_read:
            raise LDAPError(ResultCode.insufficientAccessRights,
                            "anonymous clients may read only the root DSE and cn=Subschema; bind first")
        # Only a DN whose normalized form ends with cn=Monitor's can be it or below it: the
        # exact test (which builds every ancestor's DN) runs for those only.
        if base.norm.endswith(self.monitor.base.norm) and self.monitor.holds(base):
            return await self.monitor.search(actor, base, req)
        uses_dn_attrs = _uses_dn_attributes(req.filter)
        # Rights are looked up in the first chunk's transaction (per operation, never from bind),
        # and decide what the filter may see: what the requester may not read is Undefined in it.
        rights: list[tuple[bool, frozenset[str], Any, Any]] = []   # [(admin, hidden, predicate, plan)] once known
        want_children = any(r in ("+", "hasSubordinates") or r.lower() == "hassubordinates" for r in req.attributes)
        chunk = 200
        result = SearchResult()
        page_left = req.page_size if req.page_size else None

        def run(txn: Txn, after: int, limit: int) -> tuple[list[tuple[int, str, Attrs, bool | None]], int | None, bool]:
            fresh = None      # kept only once this transaction is through (it may be run again)
            if not rights:
                admin = self._is_admin_txn(txn, actor)
                hidden = hidden_attrs(admin)
                fresh = (admin, hidden, *self.filters.compile(req.filter, hidden))
            _, _, pred, plan = rights[0] if fresh is None else fresh
            rows = store.search_candidates_txn(txn, scope=req.scope, base_norm=base.norm, base_path=base.path_key,
                                               plan=plan, after_id=after, limit=limit)
            if not rows and after == req.page_after and not base.is_root and not store.entry_exists_txn(txn, base.norm):
                matched = store.existing_ancestor_txn(txn, [a.norm for a in self.ancestors(base)]) or ""
                raise LDAPError(ResultCode.noSuchObject, f'no entry "{base}"', matched_dn=matched)
            last = rows[-1].id if rows else None
            more = len(rows) == limit
            matched_rows = []
            for e in rows:
                a = e.attrs
                if uses_dn_attrs:
                    a = dict(a)
                    a["\x00dn_avas"] = [f"{n}={v}" for r in self.dn(e.dn).rdns for n, v in r.avas]
                if pred(a) is True:
                    matched_rows.append(e)
            kids = store.children_flags_txn(txn, [e.id for e in matched_rows]) if want_children else set()
            if fresh is not None:
                rights.append(fresh)
            return [(e.id, e.dn, e.attrs, (e.id in kids) if want_children else None) for e in matched_rows], last, more

        after = req.page_after
        last_returned = after
        size_limit = time_limit = 0
        deadline: float | None = None
        while True:
            if abandoned():
                return result
            if after == req.page_after:     # the first chunk: usually all there is; may run on the reactor thread
                rows, last, more = await self._read("search", run, after, chunk)
            else:
                rows, last, more = await self.transaction("search", run, after, chunk, write=False)
            admin, hidden = rights[0][:2]
            if after == req.page_after:         # the first chunk: the limits follow the rights
                size_limit = req.size_limit
                if not admin and self.config.directory.size_limit and req.page_size is None:
                    size_limit = min(size_limit or self.config.directory.size_limit, self.config.directory.size_limit)
                time_limit = req.time_limit
                if not admin and self.config.directory.time_limit:
                    time_limit = min(time_limit or int(self.config.directory.time_limit), int(self.config.directory.time_limit))
                deadline = time.monotonic() + time_limit if time_limit else None
            for eid, dn, attrs, has_kids in rows:
                if page_left is not None and page_left <= 0:
                    result.next_after = last_returned
                    return result
                if size_limit and len(result.entries) >= size_limit:
                    result.code = ResultCode.sizeLimitExceeded
                    result.message = f"size limit of {size_limit} entries exceeded"
                    return result

                def extra(name: str, dn: str = dn, has_kids: bool | None = has_kids) -> list[str] | None:
                    if name == "entryDN":
                        return [dn]
                    if name == "subschemaSubentry":
                        return [SUBSCHEMA_DN]
                    if name == "hasSubordinates":
                        return None if has_kids is None else ["TRUE" if has_kids else "FALSE"]
                    return None

                result.entries.append((dn, self._select(attrs, req.attributes, hidden, req.types_only, extra)))
                last_returned = eid
                if page_left is not None:
                    page_left -= 1
            if deadline is not None and time.monotonic() > deadline:
                result.code = ResultCode.timeLimitExceeded
                result.message = f"time limit of {time_limit} s exceeded"
                return result
            if not more or last is None:
                result.next_after = None
                return result
            if page_left is not None and page_left <= 0:
                result.next_after = last_returned
                return result
            after = last
            chunk = min(chunk * 2, 2000)

    def _virtual(self, attrs: Attrs, dn: str, req: SearchRequest, actor: Actor) -> SearchResult:
        pred, _ = self.filters.compile(req.filter)
        res = SearchResult()
        if pred(attrs) is True:
            # Virtual entries: all their attributes count as operational for '+' except objectClass.
            requested = list(req.attributes)
            if not requested or "*" in requested:
                sel = [(k, v) for k, v in attrs.items() if k == "objectClass" or k == "cn"]
            else:
                sel = []
            names = {r.lower() for r in requested}
            for k, v in attrs.items():
                if "+" in names or k.lower() in names:
                    if all(k != s for s, _ in sel):
                        sel.append((k, v))
            if req.types_only:
                sel = [(k, []) for k, _ in sel]
            res.entries.append((dn, sel))
        return res

    # -- compare -----------------------------------------------------------------
    async def compare(self, actor: Actor, dn_text: str, attr: str, value: bytes) -> bool:
        dn = self.dn(dn_text)
        if actor.dn is None and not self.config.ldap.allow_anonymous_read:
            raise LDAPError(ResultCode.insufficientAccessRights, "anonymous clients may not compare; bind first")
        at = self.attribute(attr)
        if at.name in HIDDEN_ATTRS:
            # Not even for admins: a compare would be a password oracle without lockout.
            raise LDAPError(ResultCode.insufficientAccessRights,
                            f"{at.name} may not be compared by anyone; a bind checks a password (and counts failures)")
        if at.equality is None:
            raise LDAPError(ResultCode.inappropriateMatching, f"{at.name} has no equality matching rule")
        self.schema.validate_value(at, as_text(value))
        want = self.schema.normalize(at, as_text(value))
        if self.monitor.holds(dn):
            return await self.monitor.compare(actor, dn, at.name, lambda vs: any(self.schema.normalize(at, v) == want for v in vs))

        def run(txn: Txn) -> StoredEntry:
            if at.name in ADMIN_ONLY_ATTRS and not self._is_admin_txn(txn, actor):
                raise LDAPError(ResultCode.insufficientAccessRights, f"{at.name} may be compared by admins only")
            e = store.get_entry_txn(txn, dn.norm)
            if e is None:
                matched = store.existing_ancestor_txn(txn, [a.norm for a in self.ancestors(dn)]) or ""
                raise LDAPError(ResultCode.noSuchObject, f'no entry "{dn}"', matched_dn=matched)
            return e

        e = await self._read("compare", run)
        if at.name == "entryDN":
            values = [e.dn]
        else:
            values = e.attrs.get(at.name)
        if not values:
            raise LDAPError(ResultCode.noSuchAttribute, f"{dn} has no {at.name}")
        return any(self.schema.normalize(at, v) == want for v in values)


def _uses_dn_attributes(f: Filter) -> bool:
    if isinstance(f, Ext):
        return f.dn_attributes
    if isinstance(f, (And, Or)):
        return any(_uses_dn_attributes(x) for x in f.items)
    if isinstance(f, Not):
        return _uses_dn_attributes(f.item)
    return False
