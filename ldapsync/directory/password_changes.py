"""Setting passwords: quality and history checks, the policy state stamped with a new password.

Owns :meth:`PasswordChanges.check_new_passwords` (run before the write transaction),
the Password Modify extended operation (RFC 3062) and :meth:`PasswordChanges.set_password`
(the self-service pages and the CLI).  Hashing itself is ``ldapsync.directory.passwords``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


from ldapsync.directory import policy as pp
from ldapsync.directory.authn import Authn
from ldapsync.directory.core import Actor, as_text
from ldapsync.directory.dn import DN
from ldapsync.directory.errors import LDAPError, ResultCode
from ldapsync.directory.hooks import ChangeSet, Origin
from ldapsync.directory.passwords import generate_password
from ldapsync.directory.policy import PolicyError, PPError, PPolicyResponse
from ldapsync.directory.writes import Write
from ldapsync.store import entries as store
from ldapsync.store.database import Txn
from ldapsync.store.entries import Attrs, StoredEntry


class PasswordChanges(Authn):
    """The directory part that changes passwords."""

    def _stored_match(self, stored: list[str], cleartext: str) -> str | None:
        pw = cleartext.encode("utf-8", "surrogateescape")
        return next((h for h in stored if self.hasher.verify(h, pw)), None)

    def _matches_any(self, hashes: list[str], passwords: list[bytes]) -> bool:
        return any(self.hasher.verify(h, p) for p in passwords for h in hashes)

    async def check_new_passwords(self, cleartext: Sequence[str], prehashed: Sequence[str], current: Attrs | None,
                                  *, by_admin: bool, own: bool = True) -> None:
        """The policy for passwords about to be set: quality, pre-hashed values, history.

        ``current`` is the entry as stored (None: a new entry); ``own`` says the
        holder sets it (history applies), else an admin resets someone else's
        (quality applies, history does not: like Active Directory and Entra resets).
        Runs before the write transaction (history comparisons hash in the hash
        thread pool).  Raises PolicyError (constraintViolation) naming the rule.
        """
        cfg = self.policy
        for pw in cleartext:
            err = pp.check_quality(cfg, pw)
            if err is not None:
                raise err
        if prehashed and not by_admin:
            raise PolicyError(ResultCode.constraintViolation,
                              "only administrators may set a pre-hashed password (its quality cannot be checked)",
                              PPolicyResponse(error=PPError.insufficientPasswordQuality))
        if current is None or not cfg.history or not own:
            return
        hashes = pp.history_hashes(cfg, current)
        if not hashes:
            return
        if any(h in hashes for h in prehashed):
            raise pp.history_error(cfg)
        if cleartext and await self._in_hash_thread(
                self._matches_any, hashes, [c.encode("utf-8", "surrogateescape") for c in cleartext]):
            raise pp.history_error(cfg)

    def _policy_values_txn(self, old: Attrs, new_hashes: Sequence[str]) -> dict[str, list[str] | None]:
        return pp.values_after_change(self.policy, old, self.clock.now(), new_hashes=new_hashes)

    @staticmethod
    def _apply_values(attrs: Attrs, values: dict[str, list[str] | None]) -> None:
        for k, v in values.items():
            if v:
                attrs[k] = list(v)
            else:
                attrs.pop(k, None)

    def _check_unchanged(self, st_attrs: Attrs | None, snapshot: Attrs | None) -> None:
        """The password state we checked history against must still be the stored one."""
        if snapshot is None or st_attrs is None:
            return
        for k in ("userPassword", "pwdHistory"):
            if st_attrs.get(k) != snapshot.get(k):
                raise LDAPError(ResultCode.busy, "the password was changed at the same moment; try again")

    async def _snapshot(self, actor: Actor, dn: DN) -> tuple[Attrs | None, bool]:
        """(the entry's attributes, is the actor an admin?) — read before a password write."""
        def run(txn: Txn) -> tuple[Attrs | None, bool]:
            e = store.get_entry_txn(txn, dn.norm)
            return (e.attrs if e is not None else None), self._is_admin_txn(txn, actor)

        return await self.transaction("password check", run, write=False)

    # -- password modify (RFC 3062) -----------------------------------------------------
    async def password_modify(self, actor: Actor, user: str | None, old: bytes | None, new: bytes | None) -> str | None:
        """Returns the generated password when none was given."""
        if actor.dn is None:
            raise LDAPError(ResultCode.insufficientAccessRights, "anonymous clients may not change passwords; bind first")
        target = user if user else str(actor.dn)
        generated = None
        if new is None or new == b"":
            generated = generate_password(max(16, self.policy.min_length))
            new_pw = generated
        else:
            new_pw = as_text(new)
        await self.set_password(actor, target, new_pw, old_password=old or None, operation="passwd")
        return generated

    async def set_password(self, actor: Actor, target_dn: str, new_password: str, *, old_password: bytes | None = None,
                           in_txn: Callable[[Txn, StoredEntry], None] | None = None, operation: str = "passwd",
                           origin: Origin = Origin.LDAP) -> None:
        """Set ``target_dn``'s password under the policy, in one write transaction.

        Allowed to the target itself and to admins.  ``old_password``, when given,
        must be the current password (invalidCredentials otherwise).  Quality and
        history are checked first (PolicyError, constraintViolation, naming the
        rule); a pre-hashed value (``{ARGON2}…``) skips the quality rule and is
        allowed to admins only.  ``in_txn(txn, entry)`` runs inside the write
        transaction before the entry is updated and may raise LDAPError to abort
        it.  The cleartext goes to the change hooks (the Microsoft 365 outbox) as
        the write's ``cleartext``; ``operation`` names the write, ``origin`` says who makes it.
        """
        if actor.dn is None:
            raise LDAPError(ResultCode.insufficientAccessRights, "anonymous clients may not change passwords; bind first")
        target = self.dn(target_dn)
        snapshot, admin = await self._snapshot(actor, target)
        is_self = target.norm == actor.dn.norm
        if not is_self and not admin:
            raise LDAPError(ResultCode.insufficientAccessRights, f"{actor.dn} may change only its own password")
        if snapshot is not None and old_password:
            stored = list(snapshot.get("userPassword", ()))
            if not await self._in_hash_thread(self._verify_any, stored, old_password):
                raise LDAPError(ResultCode.invalidCredentials, "the old password is not correct")
        prehashed = self.hasher.is_hashed(new_password)
        await self.check_new_passwords([] if prehashed else [new_password], [new_password] if prehashed else [],
                                       snapshot, by_admin=admin, own=is_self)
        if prehashed:
            hashed, clear = new_password, None
        else:
            hashed = await self._in_hash_thread(self.hasher.hash, new_password.encode("utf-8", "surrogateescape"))
            clear = new_password

        def run(txn: Txn) -> ChangeSet:
            if not is_self and not self._is_admin_txn(txn, actor):
                raise LDAPError(ResultCode.insufficientAccessRights, f"{actor.dn} may change only its own password")
            w = Write(self, txn, actor.dn_str, operation, origin, cleartext={target.norm: [clear]} if clear else {})
            st = w.require(target)
            assert st.old is not None
            self._check_unchanged(st.attrs, snapshot)
            if in_txn is not None:
                in_txn(txn, st.old)
            attrs = {k: list(v) for k, v in (st.attrs or {}).items()}
            self._apply_values(attrs, self._policy_values_txn(attrs, [hashed]))
            attrs["userPassword"] = [hashed]
            try:
                self.schema.check_entry(attrs)
            except LDAPError as e:
                raise LDAPError(ResultCode.objectClassViolation, f"{target} cannot hold a password: {e.message}") from None
            w.update(st, attrs)
            return w.finish()

        await self.transaction(operation, run)
