"""Writing: the add, delete, modify and modify DN operations and their checks.

Owns the access, schema and system-entry checks of each LDAP write and turns it into one
:class:`~ldapsync.directory.writes.Write` (the staging of one SQL transaction).
"""

from __future__ import annotations

from collections.abc import Sequence


from ldapsync.directory import policy as pp
from ldapsync.directory.core import ONE_PASSWORD_MESSAGE, Actor, as_text
from ldapsync.directory.dn import DN
from ldapsync.directory.errors import LDAPError, ResultCode
from ldapsync.directory.hooks import ChangeSet, Origin
from ldapsync.directory.reads import Reads
from ldapsync.directory.schema import AttributeType
from ldapsync.directory.writes import GROUP_ATTRS, Write
from ldapsync.store import entries as store
from ldapsync.store.database import Txn
from ldapsync.store.entries import Attrs


class Operations(Reads):
    """The directory part that carries out LDAP writes."""

    # -- add -------------------------------------------------------------------
    async def add(self, actor: Actor, dn_text: str, raw_attrs: Sequence[tuple[str, Sequence[bytes]]]) -> ChangeSet:
        dn = self.dn(dn_text)
        if actor.dn is None:
            raise LDAPError(ResultCode.insufficientAccessRights, "anonymous clients may not add entries; bind first")
        if dn.is_root:
            raise LDAPError(ResultCode.entryAlreadyExists, "the root DSE cannot be added")
        attrs = self.convert_attrs(raw_attrs, for_add=True)
        for name in list(attrs):
            at = self.schema.attribute(name)
            if at is not None and at.no_user_modification:
                raise LDAPError(ResultCode.constraintViolation, f"{name}: no user modification allowed")
        # RDN values must be in the entry (added if missing, as OpenLDAP does)
        for a, v in dn.rdns[0].avas:
            at = self.attribute(a)
            vals = attrs.setdefault(at.name, [])
            if not any(self.schema.normalize(at, x) == self.schema.normalize(at, v) for x in vals):
                vals.append(v)
        structural = self.schema.check_entry(attrs)
        attrs["structuralObjectClass"] = [structural]
        self._check_not_suffix_sibling(dn)
        pw_values = attrs.get("userPassword", [])
        if len(pw_values) > 1:
            raise LDAPError(ResultCode.constraintViolation, ONE_PASSWORD_MESSAGE.format(n=len(pw_values)))
        if pw_values:
            # add is for admins (checked again in the transaction): pre-hashed values are allowed
            await self.check_new_passwords([v for v in pw_values if not self.hasher.is_hashed(v)],
                                           [v for v in pw_values if self.hasher.is_hashed(v)], None, by_admin=True)
        clear = await self.hash_cleartext(attrs)

        def run(txn: Txn) -> ChangeSet:
            self._require_admin_txn(txn, actor, "add entries")
            w = Write(self, txn, actor.dn_str, "add", Origin.LDAP, cleartext={dn.norm: list(clear.values())} if clear else {})
            if w.exists(dn):
                raise LDAPError(ResultCode.entryAlreadyExists, f'entry "{dn}" already exists')
            parent = None
            if dn.norm != self.suffix.norm:
                assert dn.parent is not None
                parent = w.get(dn.parent)
                if parent is None:
                    raise w.no_such_object(dn.parent)
            self._check_group_members_txn(txn, attrs)
            if attrs.get("userPassword"):
                attrs["pwdChangedTime"] = [pp.format_time(self.clock.now())]
            w.create(dn, attrs, parent)
            return w.finish()

        return await self.transaction("add", run)

    def _check_system_entry(self, dn: DN, what: str) -> None:
        """The provisioning tag and the connector entry exist while the connector is enabled."""
        if not self.config.office365.enabled:
            return
        what_entry = self._system_entries.get(dn.norm)
        if what_entry is not None:
            raise LDAPError(ResultCode.unwillingToPerform,
                            f"{what_entry} cannot be {what} while the connector is enabled "
                            "([office365] enabled = true); remove its members to unbind users instead")

    def _check_not_suffix_sibling(self, dn: DN) -> None:
        if dn.norm != self.suffix.norm and not dn.is_descendant_of(self.suffix):
            raise LDAPError(ResultCode.noSuchObject, f'"{dn}" is outside the naming context "{self.suffix}"')

    def _check_group_members_txn(self, txn: Txn, attrs: Attrs) -> None:
        """member values must be valid DNs (their entries may not exist yet, as in OpenLDAP)."""
        for a in GROUP_ATTRS:
            for v in attrs.get(a, ()):
                self.dn(v)

    # -- delete ----------------------------------------------------------------
    async def delete(self, actor: Actor, dn_text: str) -> ChangeSet:
        dn = self.dn(dn_text)
        if actor.dn is None:
            raise LDAPError(ResultCode.insufficientAccessRights, "anonymous clients may not delete entries; bind first")

        def run(txn: Txn) -> ChangeSet:
            self._require_admin_txn(txn, actor, "delete entries")
            w = Write(self, txn, actor.dn_str, "delete", Origin.LDAP)
            st = w.require(dn)
            assert st.old is not None
            if store.has_children_txn(txn, st.old.id):
                raise LDAPError(ResultCode.notAllowedOnNonLeaf, f'"{dn}" has subordinate entries; delete them first')
            if dn.norm == self.admin_dn.norm:
                raise LDAPError(ResultCode.unwillingToPerform, "the directory admin entry cannot be deleted")
            self._check_system_entry(dn, "deleted")
            w.delete(st)
            return w.finish()

        return await self.transaction("delete", run)

    # -- modify ------------------------------------------------------------------
    async def modify(self, actor: Actor, dn_text: str, mods: Sequence[tuple[str, str, Sequence[bytes]]], *,
                     origin: Origin = Origin.LDAP) -> ChangeSet:
        """``mods``: (op, attribute description, values) with op in add|delete|replace|increment."""
        dn = self.dn(dn_text)
        if actor.dn is None:
            raise LDAPError(ResultCode.insufficientAccessRights, "anonymous clients may not modify entries; bind first")
        s = self.schema
        prepared: list[tuple[str, AttributeType, list[str]]] = []
        for op, desc, values in mods:
            at = self.attribute(desc.split(";", 1)[0])
            vals = [as_text(v) for v in values]
            if at.no_user_modification and not self._admin_may_modify(at.name, op, vals):
                raise LDAPError(ResultCode.constraintViolation, f"{at.name}: no user modification allowed")
            if op != "delete":
                for i, v in enumerate(vals):
                    s.validate_value(at, v)
                    self._check_object_class_value(at, v, i)
            if op == "increment":
                if len(vals) != 1:
                    raise LDAPError(ResultCode.protocolError, f"{at.name}: increment needs exactly one value")
                if at.syntax != "1.3.6.1.4.1.1466.115.121.1.27":
                    raise LDAPError(ResultCode.constraintViolation, f"{at.name}: increment needs an Integer attribute")
            prepared.append((op, at, vals))
        only_password = all(at.name == "userPassword" for _, at, _ in prepared)
        is_self = actor.dn is not None and actor.dn.norm == dn.norm
        # Passwords being set: the policy (quality, history) is checked and cleartext is
        # hashed before the write transaction starts (no argon2 inside it).
        new_clear = [v for op, at, vals in prepared if at.name == "userPassword" and op in ("add", "replace")
                     for v in vals if not self.hasher.is_hashed(v)]
        new_hashed = [v for op, at, vals in prepared if at.name == "userPassword" and op in ("add", "replace")
                      for v in vals if self.hasher.is_hashed(v)]
        sets_password = bool(new_clear or new_hashed)
        for op, at, vals in prepared:
            if at.name == "userPassword" and op in ("add", "replace") and len(vals) > 1:
                raise LDAPError(ResultCode.constraintViolation, ONE_PASSWORD_MESSAGE.format(n=len(vals)))
        deletes_password = any(at.name == "userPassword" and op == "delete" and vals for op, at, vals in prepared)
        snapshot: Attrs | None = None
        if sets_password or deletes_password:
            snapshot, admin = await self._snapshot(actor, dn)
            if not admin and not (is_self and only_password):
                raise LDAPError(ResultCode.insufficientAccessRights,
                                f"{actor.dn} may not modify \"{dn}\": only the directory admin and members of {self.admins_group} may")
            if sets_password:
                await self.check_new_passwords(new_clear, new_hashed, snapshot, by_admin=admin, own=is_self)
            if deletes_password and snapshot is not None:
                # Cleartext values to delete are matched to the stored hashes here, in the hash
                # pool, so the transaction compares strings only (no argon2 inside it).
                stored = list(snapshot.get("userPassword", ()))
                for i, (op, at, vals) in enumerate(prepared):
                    if at.name == "userPassword" and op == "delete" and vals:
                        resolved = []
                        for v in vals:
                            if v not in stored:
                                v = await self._in_hash_thread(self._stored_match, stored, v) or v
                            resolved.append(v)
                        prepared[i] = (op, at, resolved)
        clear: list[str] = []
        for i, (op, at, vals) in enumerate(prepared):
            if at.name == "userPassword" and op in ("add", "replace"):
                tmp: Attrs = {"userPassword": list(vals)}
                got = await self.hash_cleartext(tmp)
                clear += list(got.values())
                prepared[i] = (op, at, tmp["userPassword"])

        def run(txn: Txn) -> ChangeSet:
            if not (is_self and only_password):
                self._require_admin_txn(txn, actor, f'modify "{dn}"')
            w = Write(self, txn, actor.dn_str, "modify", origin, cleartext={dn.norm: clear} if clear else {})
            st = w.require(dn)
            attrs = {k: list(v) for k, v in (st.attrs or {}).items()}
            for op, at, vals in prepared:
                self._apply_mod(attrs, op, at, vals, dn)
            if sets_password and len(attrs.get("userPassword", ())) > 1:
                # A second value would keep the old password valid beside the new one (and dodge
                # the history): like slapd's ppolicy, an entry holds one.
                raise LDAPError(ResultCode.constraintViolation,
                                f'userPassword: "{dn}" already has a password and an entry holds only one; '
                                "change it with replace (or ldappasswd), or delete the old value in the same modify")
            if sets_password or deletes_password:
                self._check_unchanged(st.attrs, snapshot)
            if sets_password:
                new_pw = [h for h in attrs.get("userPassword", ()) if h not in (st.attrs or {}).get("userPassword", ())]
                self._apply_values(attrs, self._policy_values_txn(st.attrs or {}, new_pw))
            elif any(at.name == "pwdAccountLockedTime" and op == "delete" for op, at, _ in prepared) \
                    and not any(at.name == "pwdFailureTime" for _, at, _ in prepared):
                attrs.pop("pwdFailureTime", None)   # unlocking forgets the failures that locked (as OpenLDAP)
            if attrs.get("objectClass") != (st.attrs or {}).get("objectClass"):
                old_sc = (st.attrs or {}).get("structuralObjectClass")
                new_sc = self._structural_class(attrs.get("objectClass", []))
                if old_sc and new_sc and new_sc.lower() != old_sc[0].lower():
                    raise LDAPError(ResultCode.objectClassModsProhibited,
                                    f"structural object class modification from '{old_sc[0]}' to '{new_sc}' not allowed")
                structural = s.check_entry(attrs)
                if structural.lower() != (st.attrs or {}).get("structuralObjectClass", [structural])[0].lower():
                    raise LDAPError(ResultCode.objectClassModsProhibited, "the structural object class of an entry cannot be changed")
            else:
                s.check_entry(attrs)
            self._check_group_members_txn(txn, attrs)
            w.update(st, attrs)
            return w.finish()

        return await self.transaction("modify", run)

    @staticmethod
    def _admin_may_modify(name: str, op: str, vals: list[str]) -> bool:
        """Policy state admins may change (checked for admin rights in the transaction):
        delete pwdAccountLockedTime/pwdFailureTime/pwdGraceUseTime to unlock, or set
        pwdAccountLockedTime to lock an account by hand."""
        if name not in pp.ADMIN_RESETTABLE:
            return False
        if op == "delete" or (op == "replace" and not vals):
            return True
        return name == "pwdAccountLockedTime" and op in ("add", "replace")

    def _apply_mod(self, attrs: Attrs, op: str, at: AttributeType, vals: list[str], dn: DN) -> None:
        s = self.schema
        name = at.name
        cur = attrs.get(name, [])
        norm = (lambda v: s.normalize(at, v)) if at.equality else (lambda v: v)
        rdn_norms = {s.normalize(self.attribute(a), v) for a, v in dn.rdns[0].avas if self.attribute(a).name == name}
        if op == "add":
            if not vals:
                raise LDAPError(ResultCode.protocolError, f"{name}: add needs at least one value")
            have = {norm(v) for v in cur}
            for v in vals:
                n = norm(v)
                if n in have:
                    raise LDAPError(ResultCode.attributeOrValueExists, f"{name}: value #{vals.index(v)} already exists")
                have.add(n)
            attrs[name] = cur + vals
        elif op == "delete":
            if name not in attrs:
                raise LDAPError(ResultCode.noSuchAttribute, f"{name}: no such attribute")
            if not vals:
                if rdn_norms:
                    raise LDAPError(ResultCode.namingViolation, f"{name}: cannot delete the naming attribute of the entry")
                del attrs[name]
                return
            keep = list(cur)
            for v in vals:
                n = norm(v)
                if name == "userPassword":
                    # modify() matched cleartext to the stored hash before the transaction
                    idx = next((i for i, h in enumerate(keep) if h == v), None)
                else:
                    idx = next((i for i, h in enumerate(keep) if norm(h) == n), None)
                if idx is None:
                    raise LDAPError(ResultCode.noSuchAttribute, f"{name}: no such value")
                if norm(keep[idx]) in rdn_norms:
                    raise LDAPError(ResultCode.namingViolation, f"{name}: cannot delete the naming value of the entry")
                keep.pop(idx)
            if keep:
                attrs[name] = keep
            else:
                del attrs[name]
        elif op == "replace":
            have = set()
            for v in vals:
                n = norm(v)
                if n in have:
                    raise LDAPError(ResultCode.attributeOrValueExists, f"{name}: value provided more than once")
                have.add(n)
            if rdn_norms and not rdn_norms <= have:
                raise LDAPError(ResultCode.namingViolation, f"{name}: cannot remove the naming value of the entry")
            if vals:
                attrs[name] = list(vals)
            else:
                attrs.pop(name, None)
        elif op == "increment":
            if name not in attrs:
                raise LDAPError(ResultCode.noSuchAttribute, f"{name}: no such attribute to increment")
            try:
                attrs[name] = [str(int(v) + int(vals[0])) for v in cur]
            except ValueError:
                raise LDAPError(ResultCode.constraintViolation, f"{name}: value is not an integer") from None
            if rdn_norms:
                raise LDAPError(ResultCode.namingViolation, f"{name}: cannot change the naming value of the entry")
        else:
            raise LDAPError(ResultCode.protocolError, f"unknown modify operation {op}")

    # -- modify DN -----------------------------------------------------------------
    async def modify_dn(self, actor: Actor, dn_text: str, new_rdn_text: str, delete_old: bool, new_superior: str | None) -> ChangeSet:
        dn = self.dn(dn_text)
        if actor.dn is None:
            raise LDAPError(ResultCode.insufficientAccessRights, "anonymous clients may not rename entries; bind first")
        new_rdn_dn = self.dn(new_rdn_text)
        if len(new_rdn_dn.rdns) != 1:
            raise LDAPError(ResultCode.invalidDNSyntax, f'new RDN "{new_rdn_text}" must be a single RDN')
        new_rdn = new_rdn_dn.rdns[0]
        sup = self.dn(new_superior) if new_superior is not None else dn.parent
        if dn.norm == self.suffix.norm:
            raise LDAPError(ResultCode.unwillingToPerform, "the naming context itself cannot be renamed")
        assert sup is not None
        new_dn = sup.child(new_rdn)
        if new_dn.is_descendant_of(dn):
            raise LDAPError(ResultCode.unwillingToPerform, "an entry cannot be moved below itself")
        self._check_not_suffix_sibling(new_dn)
        s = self.schema

        def run(txn: Txn) -> ChangeSet:
            self._require_admin_txn(txn, actor, "rename entries")
            w = Write(self, txn, actor.dn_str, "modrdn", Origin.LDAP)
            st = w.require(dn)
            assert st.old is not None
            if new_dn.norm != dn.norm and w.exists(new_dn):
                raise LDAPError(ResultCode.entryAlreadyExists, f'entry "{new_dn}" already exists')
            parent = w.get(sup) if sup.norm != "" and new_dn.norm != self.suffix.norm else None
            if parent is None and sup.norm != "":
                raise w.no_such_object(sup)
            if dn.norm == self.admin_dn.norm:
                raise LDAPError(ResultCode.unwillingToPerform, "the directory admin entry cannot be renamed")
            self._check_system_entry(dn, "renamed")
            attrs = {k: list(v) for k, v in (st.attrs or {}).items()}
            new_norms = {(self.attribute(a).name, s.normalize(self.attribute(a), v)) for a, v in new_rdn.avas}
            if delete_old:
                for a, v in dn.rdns[0].avas:
                    at = self.attribute(a)
                    if (at.name, s.normalize(at, v)) in new_norms:
                        continue
                    vals = attrs.get(at.name, [])
                    vals = [x for x in vals if s.normalize(at, x) != s.normalize(at, v)]
                    if vals:
                        attrs[at.name] = vals
                    else:
                        attrs.pop(at.name, None)
            for a, v in new_rdn.avas:
                at = self.attribute(a)
                if at.no_user_modification:
                    raise LDAPError(ResultCode.constraintViolation, f"{at.name} cannot be used in an RDN")
                s.validate_value(at, v)
                vals = attrs.setdefault(at.name, [])
                if not any(s.normalize(at, x) == s.normalize(at, v) for x in vals):
                    if at.single_value and vals:
                        raise LDAPError(ResultCode.constraintViolation, f"{at.name}: single-valued attribute already has a value")
                    vals.append(v)
            s.check_entry(attrs)
            has_kids = store.has_children_txn(txn, st.old.id)
            old_path = st.old.path
            w.rename(st, new_dn, parent, attrs)
            if has_kids:
                for e in store.descendants_txn(txn, old_path):
                    child_dn = self.dn(e.dn).rebase(dn, new_dn)
                    cst = w.track(e)
                    w.rename(cst, child_dn, None, dict(cst.attrs or {}))
                    cst.parent_id = e.parent_id
            return w.finish()

        return await self.transaction("modrdn", run)
