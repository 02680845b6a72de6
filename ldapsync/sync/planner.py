"""The Microsoft 365 outbox planner: which directory changes matter, and the rows they leave.

Handed to the directory as one of its write hooks (``ldapsync/directory/hooks.py``;
the wiring builds it), :class:`OutboxPlanner` runs inside every write
transaction whose origin reaches Microsoft 365 (``directory/writes.py``), looks
at the combined ChangeSet and, for each user whose Microsoft 365 state should
change, inserts one row
into ``o365_outbox`` *in that same transaction*.  The worker is woken only
after COMMIT (``txn.call_after``).  A write that cannot be propagated (a bound
user's mail on a domain the tenant has not verified) is refused here, which
rolls the whole LDAP operation back.

::

    LDAP write ──▶ Write.finish() ──▶ OutboxPlanner.on_change_txn(txn, changeset)
                                         │  bound before/after? names, mail, uid, password changed?
                                         ├─ refuse: constraintViolation (unverified domain, no mail)
                                         └─ INSERT o365_outbox (store/outbox.py queue_rows_txn;
                                               payload = DesiredUser, secret = encrypted password)
                                         └─ PostgreSQL: NOTIFY ldapsync_outbox (sent at COMMIT)
                    COMMIT ──▶ call_after(worker.wake); other nodes: LISTEN → wake (sync/notify.py)

A row's ``payload`` is the user's complete desired Microsoft 365 state at that
moment (:class:`DesiredUser` as JSON), so the worker may coalesce a user's rows
and apply only the newest: the final state always matches the directory.  A
``secret`` is the cleartext password the client sent, encrypted with the
``[secrets]`` key (AES-GCM); the worker deletes it once delivered.

Passwords of users who are not bound (issue 14): a cleartext set on an ``ldapsyncUser``
entry that is not bound at that moment is kept, sealed the same way, for ``[office365]
unbound_password_ttl`` (``store/unbound_passwords.py``; only the latest), and moves into
the bind's row when the user is bound within that time.  Whenever Microsoft 365 may lack
the directory's current password (a bind with no cleartext to push, a password changed
while unbound on a linked entry, a hash set, a cleartext that fails the policy) the
planner sets ``o365PasswordPending: TRUE`` in the same transaction, so the user's next
bind captures it (:meth:`OutboxPlanner.on_bind`) and the worker never enables an account
it blocked meanwhile (``graph_mapping.py``).  A cleartext that fails the password policy
is never queued (``sync/password_plan.py``): the user is mailed to choose a new one.

Columns of ``o365_outbox``: ``entry_uuid`` (the user, stable across renames),
``operation`` (why: bind, update, password, hash-only — changed without a
cleartext —, unbind, delete; drift from the reconciler), ``state``
(``ready``; ``held`` by the mass-disable guard; ``error`` after a permanent
Graph error), ``attempts``/``next_attempt_at``/``last_error`` (retry),
``lease_owner``/``lease_until`` (claims by a worker node).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.logger import Logger

from ldapsync.clock import Timer
from ldapsync.directory import binding
from ldapsync.directory.dn import DN
from ldapsync.directory.errors import LDAPError, ResultCode
from ldapsync.directory.hooks import ChangeSet, Origin
from ldapsync.directory.writes import Write
from ldapsync.jsontypes import JSONObject
from ldapsync.secretbox import SecretBox, load_or_create_key
from ldapsync.store import entries as store
from ldapsync.store import outbox as outbox_store
from ldapsync.store import unbound_passwords as kept_q
from ldapsync.store.database import Txn
from ldapsync.store.entries import Attrs, EntryChange, first
from ldapsync.sync import account_records, expiry
from ldapsync.sync.password_plan import (
    HASH_ONLY_CHANGE,
    ask_for_new_password_txn,
    fit_for_microsoft365,
    is_sync_user,
    password_fingerprint,
)
from ldapsync.sync.status import STATUS_OPERATION

if TYPE_CHECKING:
    from ldapsync.directory.facade import Directory

log = Logger()

# Attributes whose change matters to Microsoft 365 (besides binding and passwords).
RELEVANT = ("uid", "mail", "cn", "displayName", "givenName", "sn")
# ... and the Graph properties each one feeds (DesiredUser.changed).
GRAPH_PROPS = {"uid": ("mailNickname",), "mail": ("userPrincipalName", "mail"), "cn": ("displayName",),
               "displayName": ("displayName",), "givenName": ("givenName",), "sn": ("surname",)}


@dataclass(frozen=True)
class DesiredUser:
    """What Microsoft 365 should hold for one user, as the directory says now."""

    entry_uuid: str
    dn: str
    bound: bool                       # False: sign-in blocked (unbound or deleted); never deleted in Graph
    upn: str | None                   # = mail
    mail: str | None
    mail_nickname: str | None         # = uid
    display_name: str | None          # displayName, else cn
    given_name: str | None
    surname: str | None
    object_id: str | None = None      # o365ObjectId when the entry is linked already
    deleted: bool = False             # the entry was deleted (unbind with no entry to write status to)
    has_password: bool = False        # the directory holds a usable password for the user
    reason: str = ""                  # bind | rebind | update | password | unbind | delete (human-readable)
    held: bool = False                # written as state=held by the mass-disable guard
    # reason "update" only: the Graph properties this change touched (None: not known, e.g. rows
    # written before this field existed).  Lets the worker PATCH them without reading the account
    # first: the rows of a user still queued are every change since its last delivery.
    changed: tuple[str, ...] | None = None
    # password_plan.password_fingerprint of the entry's userPassword when the row was planned (None:
    # no password, or a row written before this field existed)
    password_fp: str | None = None

    def to_json(self) -> str:
        # (dataclasses.asdict deep-copies every field: it was a third of the outbox's cost per write;
        # json.dumps with any non-default option builds a new encoder per call: one, shared, here.
        # The fields go in sorted order, so the text is what sort_keys=True gave.)
        return _ENCODER.encode({f: getattr(self, f) for f in _SORTED_FIELDS})

    @classmethod
    def from_json(cls, text: str) -> "DesiredUser":
        raw = json.loads(text)
        if raw.get("changed") is not None:
            raw["changed"] = tuple(raw["changed"])
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


_SORTED_FIELDS = tuple(sorted(DesiredUser.__dataclass_fields__))
_ENCODER = json.JSONEncoder(separators=(",", ":"))


@dataclass
class OutboxPlanner:
    """The write hook (:class:`~ldapsync.directory.hooks.WriteHooks`): ChangeSet → outbox rows,
    and a bind's cleartext → the password row Microsoft 365 is missing (see the module docstring)."""

    directory: "Directory"
    box: SecretBox                             # encrypts queued passwords ([secrets] key)
    wake: Callable[[], None] | None = None     # called after COMMIT when rows were written
    disable_threshold: int = 500
    wall_time: Timer = time.time               # stamps rows the worker compares with its own wall_time
    unbound_password_ttl: float = 24 * 3600.0  # 0: passwords of unbound users are not kept

    @classmethod
    def from_config(cls, directory: "Directory", wake: Callable[[], None] | None = None) -> "OutboxPlanner":
        """The planner of a process whose writes propagate ([secrets] key, [office365] threshold);
        the wiring hands it to the directory as a write hook."""
        cfg = directory.config
        return cls(directory, SecretBox(load_or_create_key(cfg.secrets.key_file)), wake,
                   disable_threshold=cfg.office365.disable_threshold,
                   unbound_password_ttl=cfg.office365.unbound_password_ttl)

    # -- binding ------------------------------------------------------------------
    def is_bound(self, attrs: Attrs | None) -> bool:
        """The directory's rule (``ldapsync.directory.binding.is_bound``), for this planner's directory."""
        return binding.is_bound(self.directory, attrs)

    def desired_fields(self, attrs: Attrs, dn: str, *, bound: bool, reason: str, deleted: bool = False,
                       changed: tuple[str, ...] | None = None) -> JSONObject:
        """:class:`DesiredUser`'s fields for this entry, in sorted order (a queued row's JSON).

        The planner encodes this dict directly: building the frozen dataclass and reading it
        back field by field was a quarter of what a queued change cost the LDAP write."""
        if bound and expiry.blocks_sign_in(self.directory, attrs):
            bound, reason = False, expiry.REASON    # password expired: blocked while it is (sync/expiry.py)
        mail = first(attrs, "mail")
        return {"bound": bound, "changed": changed, "deleted": deleted,
                "display_name": first(attrs, "displayName") or first(attrs, "cn"), "dn": dn,
                "entry_uuid": first(attrs, "entryUUID") or "", "given_name": first(attrs, "givenName"),
                "has_password": bool(attrs.get("userPassword")), "held": False, "mail": mail,
                "mail_nickname": first(attrs, "uid"), "object_id": first(attrs, "o365ObjectId"),
                "password_fp": password_fingerprint(attrs),
                "reason": reason, "surname": first(attrs, "sn"), "upn": mail}

    def desired(self, attrs: Attrs, dn: str, *, bound: bool, reason: str, deleted: bool = False,
                changed: tuple[str, ...] | None = None) -> DesiredUser:
        return DesiredUser(**self.desired_fields(attrs, dn, bound=bound, reason=reason, deleted=deleted,
                                                 changed=changed))

    # -- the hook -------------------------------------------------------------------
    def on_change_txn(self, txn: Txn, cs: ChangeSet) -> None:
        if not cs.origin.reaches_microsoft365:
            return
        cleartext = cs.cleartext
        rows: list[tuple[JSONObject, str | None]] = []
        for ch in cs.changes:
            row = self._plan(txn, cs, ch, cleartext)
            if row is not None:
                rows.append(row)
                if ch.kind != "delete" and first(ch.new, "o365SyncState") != "pending":
                    # shown on the entry until the worker writes synced/disabled/error
                    cs.request_status(ch.dn_norm, {"o365SyncState": ["pending"]})
        if not rows:
            return
        disables = sum(1 for fields, _ in rows if not fields["bound"])
        held = disables > self.disable_threshold
        now = self.wall_time()
        encode = _ENCODER.encode         # the same text as DesiredUser.to_json()
        outbox_store.queue_rows_txn(txn, [
            outbox_store.QueuedRow(fields["entry_uuid"], now, fields["reason"], encode(fields), secret,
                                   "held" if (held and not fields["bound"]) else "ready")
            for fields, secret in rows])
        outbox_store.notify_txn(txn)    # PostgreSQL: every node's worker wakes at COMMIT (sync/notify.py)
        if held:
            log.warn("{n} users would be disabled in Microsoft 365 by one {op}: held until an admin runs "
                     "`ldapsync o365 release`", n=disables, op=cs.operation)
        if self.wake is not None:
            txn.call_after(self.wake)

    def _plan(self, txn: Txn, cs: ChangeSet, ch: EntryChange,
              cleartext: Mapping[str, list[str]]) -> tuple[JSONObject, str | None] | None:
        """The row this change queues: (:meth:`desired_fields`, encrypted password), or None.

        Also keeps (or drops) the password of a user who is not bound, and asks for
        ``o365PasswordPending: TRUE`` whenever Microsoft 365 may lack the current password."""
        old, new = ch.old, ch.new
        was = self.is_bound(old)
        now_bound = self.is_bound(new)
        if ch.kind == "delete" or was != now_bound:
            account_records.note_change_txn(self, txn, ch, was, now_bound)   # the account link outlives both
        if ch.kind == "delete":
            assert old is not None
            if self.unbound_password_ttl > 0 and is_sync_user(old):
                kept_q.delete_txn(txn, first(old, "entryUUID") or "")     # gone with the entry
            if not self.is_bound(old):
                return None
            return self.desired_fields(old, ch.dn, bound=False, reason="delete", deleted=True), None
        assert new is not None
        pw_changed = new.get("userPassword") != (old or {}).get("userPassword")
        if not was and not now_bound and not pw_changed:
            return None
        uuid = first(new, "entryUUID") or ""
        clear: str | None = None
        if pw_changed:
            passwords = cleartext.get(ch.dn_norm) or (cleartext.get(ch.old_dn_norm or "") if ch.old_dn_norm else None)
            clear = passwords[-1] if passwords else None
            if clear is not None and not fit_for_microsoft365(self.directory, clear):
                clear = None                 # never sent to Graph; the user is asked for a new one
                if now_bound or first(new, "o365ObjectId"):
                    ask_for_new_password_txn(txn, uuid, self.wall_time())
        if not now_bound:
            if pw_changed and is_sync_user(new):
                self._keep_unbound(txn, uuid, clear)
                if first(new, "o365ObjectId"):
                    # Microsoft 365 holds an older password now: a re-bind must not enable it
                    cs.request_status(ch.dn_norm, {"o365PasswordPending": ["TRUE"]})
            if not was:
                return None
            return self.desired_fields(new, ch.dn, bound=False, reason="unbind"), None
        self._check_mail(txn, ch.dn, first(new, "mail"), old if was else None)
        secret = self.box.seal_password(clear.encode("utf-8"), uuid).hex() if clear is not None else None
        if not was:
            if secret is None and not pw_changed and self.unbound_password_ttl > 0:
                secret = kept_q.take_txn(txn, uuid, self.wall_time())    # set while unbound, within the TTL
            elif self.unbound_password_ttl > 0:
                kept_q.delete_txn(txn, uuid)
            if secret is None and (pw_changed or not first(new, "o365ObjectId") or not new.get("userPassword")):
                # no cleartext to push: the user's next bind hands it over (even before the worker
                # has delivered this binding)
                cs.request_status(ch.dn_norm, {"o365PasswordPending": ["TRUE"]})
            elif secret is not None:
                self._nothing_to_capture(cs, ch)
            return self.desired_fields(new, ch.dn, bound=True, reason="bind"), secret
        if secret is not None:
            self._nothing_to_capture(cs, ch)
            return self.desired_fields(new, ch.dn, bound=True, reason="password"), secret
        if pw_changed:
            # a hash set, or a cleartext that failed the policy: Microsoft 365 keeps the password it
            # has; an older queued cleartext is stale now (password_plan.current_secret)
            cs.request_status(ch.dn_norm, {"o365PasswordPending": ["TRUE"]})
            return self.desired_fields(new, ch.dn, bound=True, reason=HASH_ONLY_CHANGE), None
        old = old or {}
        changed = [a for a in RELEVANT if old.get(a) != new.get(a)]
        if not changed and ch.kind != "rename":
            return None        # e.g. only memberOf of another group or o365* status changed
        props = tuple(dict.fromkeys(p for a in changed for p in GRAPH_PROPS[a]))
        return self.desired_fields(new, ch.dn, bound=True, reason="update", changed=props), None

    @staticmethod
    def _nothing_to_capture(cs: ChangeSet, ch: EntryChange) -> None:
        """The current password is queued: a bind before its delivery must not queue it again
        (Graph refuses to set the password an account already has)."""
        if first(ch.new, "o365PasswordPending"):
            cs.request_status(ch.dn_norm, {"o365PasswordPending": None})

    def _keep_unbound(self, txn: Txn, uuid: str, clear: str | None) -> None:
        """A password set while the user is not bound: keep it for the TTL (or drop a stale one)."""
        if self.unbound_password_ttl <= 0 or not uuid:
            return
        if clear is None:
            kept_q.delete_txn(txn, uuid)
            return
        now = self.wall_time()
        kept_q.put_txn(txn, uuid, self.box.seal_password(clear.encode("utf-8"), uuid).hex(), now,
                       now + self.unbound_password_ttl)

    def _check_mail(self, txn: Txn, dn: str, mail: str | None, old: Attrs | None) -> None:
        """A bound user needs a mail address on a domain the tenant has verified."""
        if not mail or "@" not in mail:
            raise LDAPError(ResultCode.constraintViolation,
                            f'"{dn}" is bound to Microsoft 365 and needs a mail address (it becomes the sign-in name)')
        if old is not None and first(old, "mail") == mail:
            return
        domain = mail.rsplit("@", 1)[1].lower()
        verified = self.verified_domains(txn)
        if verified and domain not in verified:
            raise LDAPError(ResultCode.constraintViolation,
                            f'mail domain "{domain}" is not a verified domain of the Microsoft 365 tenant '
                            f'(verified: {", ".join(sorted(verified))}); verify it in the Microsoft 365 admin centre first')

    async def on_bind(self, dn: DN, password: bytes) -> None:
        """Bind hook: the user bound with the password Microsoft 365 is missing; queue it.

        Only for a bound user (an unbound one keeps the flag until it is bound again); a
        password that fails the policy is never queued: the user is asked for a new one."""
        try:
            clear = password.decode("utf-8")
        except UnicodeDecodeError:
            clear = None
        fit = clear is not None and fit_for_microsoft365(self.directory, clear)

        def run(txn: Txn) -> bool:
            w = Write(self.directory, txn, str(dn), STATUS_OPERATION, Origin.SYNC_STATUS)
            st = w.get(dn)
            attrs = st.attrs if st is not None else None
            if not attrs or attrs.get("o365PasswordPending") != ["TRUE"] or not self.is_bound(attrs):
                return False
            if not fit:
                ask_for_new_password_txn(txn, first(attrs, "entryUUID") or "", self.wall_time())
                return False
            assert st is not None
            w.set_operational(st, {"o365PasswordPending": None})
            w.finish()
            desired = self.desired(attrs, str(dn), bound=True, reason="password")
            outbox_store.queue_rows_txn(txn, [outbox_store.QueuedRow(
                desired.entry_uuid, self.wall_time(), "password", desired.to_json(),
                self.box.seal_password(password, desired.entry_uuid).hex())])
            outbox_store.notify_txn(txn)
            return True

        if await self.directory.db.run_interaction("capture password", run) and self.wake is not None:
            self.wake()

    def verified_domains(self, txn: Txn) -> set[str]:
        d = self.directory
        e = store.get_entry_txn(txn, d.dn(f"cn=office365,ou=directories,{d.suffix}").norm)
        if e is None:
            return set()
        return {v.lower() for v in e.attrs.get("o365VerifiedDomain", ())}

