"""One desired user to Microsoft Graph: which requests a user's newest desired state turns into.

Owns the mapping of a ``DesiredUser`` (the newest of a user's queued rows, ``sync/planner.py``)
and, if queued, its password onto Graph calls, and the ``Outcome`` they end in: the status to
write on the entry and a line for the log.  The queue around it (claims, leases, retries, the
completion transaction, heartbeats) is ``sync/worker.py``'s, which calls :meth:`GraphMapping.apply`
once per claimed user and turns what it raises into a retry or a permanent error::

    apply ─▶ unbound / deleted ─▶ _unbind: PATCH accountEnabled false ─▶ POST revokeSignInSessions
          └▶ bound, only updates, last delivery fine ─▶ _update_known: PATCH the properties the rows name (no GET)
          └▶ bound ─▶ _bind: id known? GET ─▶ PATCH what differs (_diff, + passwordProfile, accountEnabled)
                             unknown: UPN exists? link (soft match) : POST /users (noted first, in a
                             transaction that finds the worker's claim still its own: a lost reply's
                             account is recognised as ours on the retry, and a node that lost its
                             claim meanwhile makes no account the new owner does not know of)

Raises ``PermanentError`` (retrying will not help) or the Graph client's errors
(``graph/errors.py``); sorting those into retry and permanent is the worker's.  A password is
decrypted only right before the request that carries it and never appears in a log line, an
error attribute or an exception message.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.logger import Logger

from ldapsync.directory.hooks import StatusValues
from ldapsync.directory.passwords import generate_password
from ldapsync.directory.writes import now_generalized
from ldapsync.graph.errors import BadRequest, NotFound, ObjectConflict
from ldapsync.jsontypes import JSONObject
from ldapsync.store import outbox as outbox_q
from ldapsync.store.database import Txn
from ldapsync.store.entries import StoredEntry
from ldapsync.sync import expiry
from ldapsync.sync.planner import DesiredUser
from ldapsync.sync.password_plan import HASH_ONLY_CHANGE
from ldapsync.sync.status import SyncState

if TYPE_CHECKING:
    from ldapsync.graph.client import GraphClient
    from ldapsync.sync.connector import Connector
    from ldapsync.directory.facade import Directory

log = Logger()

USER_SELECT = ("id", "userPrincipalName", "mail", "mailNickname", "displayName", "givenName", "surname",
               "accountEnabled", "passwordPolicies", "usageLocation")
NO_EXPIRY = "DisablePasswordExpiration"
DRIFT_BLOCK = "drift-block"   # a reconciler row: block the account (ours, waiting for the password)
NOT_CLEARABLE = frozenset({"displayName", "mailNickname", "userPrincipalName", "mail"})   # Graph refuses null


def _wanted(desired: DesiredUser) -> JSONObject:
    """The Graph properties the directory masters (names, mail), as it says now."""
    return {"displayName": desired.display_name, "givenName": desired.given_name, "surname": desired.surname,
            "mailNickname": desired.mail_nickname, "userPrincipalName": desired.upn, "mail": desired.mail}


def known_changes(payloads: list[DesiredUser]) -> tuple[str, ...] | None:
    """The Graph properties a user's queued rows changed, if all are plain updates that say so.

    Rows are deleted only once delivered, so the queued rows are every change since the
    last delivery: their union is all a PATCH has to carry.  None: read the account and diff."""
    out: dict[str, None] = {}
    for p in payloads:
        if p.reason != "update" or p.changed is None:
            return None
        out.update(dict.fromkeys(p.changed))
    return tuple(out)


class PermanentError(Exception):
    """Retrying the same request will not help; shown on the entry as ``o365LastError``."""


class ClaimLost(Exception):
    """The worker's claim on the user's rows is no longer its own (its lease expired, or its node
    was presumed dead): a create is not sent, the node that took the rows over decides."""


class PasswordRefused(Exception):
    """Microsoft 365 refused the password itself the first time it was sent (its banned-password
    list, stricter than any local rule): :meth:`GraphMapping.apply` delivers the rest without it."""


def _password_note(secret: str) -> str:
    """What a password try is noted as (``store/outbox.py``): a digest of its sealed value."""
    return hashlib.sha256(secret.encode("ascii")).hexdigest()[:32]


def _refuses_password(e: BadRequest) -> bool:
    return "password" in (e.message or str(e)).lower()


@dataclass
class Outcome:
    status: StatusValues | None    # None: no entry to write to (deleted)
    object_id: str | None = None
    what: str = ""
    # Created with sign-in blocked although the user has a directory password (only its hash):
    # mail the user to sign in once (self-service), which hands the password to Microsoft 365.
    welcome: bool = False
    # A queued password that never reached Microsoft 365 (the user was bound and unbound again
    # before the binding was delivered): kept again like one set while unbound, so binding the
    # user once more pushes it (``[office365] unbound_password_ttl``).
    unsent_secret: str | None = None
    # Microsoft 365 refused the directory's password (its banned-password list): the user is
    # mailed to choose a new one; nothing is left in error for it.
    password_refused: bool = False


class GraphMapping:
    """Applies one user's desired state to Graph.  ``connector`` gives ``client`` (GraphClient) and ``box``."""

    def __init__(self, directory: Directory, connector: Connector) -> None:
        self.db = directory.db
        self.config = directory.config.office365
        self.connector = connector

    @property
    def _client(self) -> GraphClient:
        client = self.connector.client
        assert client is not None, "no Graph client"    # the worker delivers only while the connector is active
        return client

    def _password(self, secret_hex: str, entry_uuid: str) -> str:
        return self.connector.box.open_password(bytes.fromhex(secret_hex), entry_uuid).decode("utf-8")

    async def apply(self, desired: DesiredUser, secret: str | None, entry: StoredEntry | None, *,
                    rebind: bool = False, changed: tuple[str, ...] | None = None,
                    claimed: Callable[[Txn], bool] | None = None) -> Outcome:
        """Make the account what ``desired`` says, pushing the queued password ``secret`` if any.

        When Microsoft 365 refuses that password itself (its banned-password list: a password
        our policy accepted, e.g. ``P@ssw0rd1!``), the rest is delivered without it, as for a
        password Microsoft 365 does not have: an account we blocked stays blocked with
        ``o365PasswordPending``, one created now is created blocked, an enabled one keeps the
        password it had; the caller mails the user to choose a new one.

        ``claimed(txn)``: whether the caller's claim on the user's rows is still its own; a create
        is sent only after a transaction that finds it so (else :class:`ClaimLost`)."""
        try:
            return await self._apply(desired, secret, entry, rebind=rebind, changed=changed, claimed=claimed)
        except PasswordRefused:
            log.info("Microsoft 365: {upn}: the password was refused by Microsoft 365 (its banned-password "
                     "list?); the rest is delivered without it and the user is asked to choose another",
                     upn=desired.upn or desired.dn)
        out = await self._apply(desired, None, entry, rebind=rebind, changed=None, refused=True, claimed=claimed)
        out.welcome = False               # signing in once would hand over the same refused password
        out.unsent_secret = None
        out.password_refused = True
        return out

    async def _apply(self, desired: DesiredUser, secret: str | None, entry: StoredEntry | None, *,
                     rebind: bool, changed: tuple[str, ...] | None, refused: bool = False,
                     claimed: Callable[[Txn], bool] | None = None) -> Outcome:
        attrs = entry.attrs if entry is not None else {}
        object_id = next(iter(attrs.get("o365ObjectId") or ()), None) or desired.object_id
        prev_state = next(iter(attrs.get("o365SyncState") or ()), None)
        if rebind and object_id:
            prev_state = SyncState.disabled.value   # bound again after an unbind we delivered
        # Microsoft 365 may hold a password other than the directory's current one (set by the
        # planner, cleared when the current one is pushed or captured)
        pw_pending = refused or attrs.get("o365PasswordPending") == ["TRUE"]
        if not desired.bound:
            return await self._unbind(desired, secret, object_id, has_entry=entry is not None)
        if (changed is not None and object_id and not secret and not rebind and desired.upn
                and attrs.get("o365ObjectId") and attrs.get("o365SyncedAt") and not attrs.get("o365LastError")):
            # Only name/mail changes to an account we have delivered to before, the last time
            # without an error: PATCH what changed, no GET to diff (half the Graph round trips).
            return await self._update_known(desired, object_id, changed)
        # the reconciler found an account of ours enabled in the portal while it waits for the password
        block = desired.reason == DRIFT_BLOCK and pw_pending
        return await self._bind(desired, secret, object_id, prev_state, pw_pending, block=block, claimed=claimed)

    async def _update_known(self, desired: DesiredUser, object_id: str, changed: tuple[str, ...]) -> Outcome:
        """PATCH the properties the queued updates touched, with the directory's values now.

        Drift made elsewhere (the portal) is the reconciler's business, as with the diff."""
        want = _wanted(desired)
        patch = {k: want[k] for k in changed if k in want and (want[k] or k not in NOT_CLEARABLE)}
        if not patch:
            return Outcome(self._synced(object_id), object_id, "updated: nothing Microsoft 365 holds changed")
        try:
            await self._client.update_user(object_id, patch)
        except NotFound:
            raise self._gone(object_id) from None
        return Outcome(self._synced(object_id), object_id, "updated: " + ", ".join(sorted(patch)))

    @staticmethod
    def _gone(object_id: str) -> PermanentError:
        return PermanentError(f"the Microsoft 365 account {object_id} no longer exists (deleted in Microsoft "
                              "365?); remove o365ObjectId with `ldapsync o365 reconcile` or recreate it")

    async def _create_sent(self, desired: DesiredUser) -> str | None:
        """The UPN of a create of ours whose reply never came ("" if an earlier version noted it
        without one); None when no create is pending for the user (``store/outbox.py``)."""
        return await self.db.run_interaction("o365 create sent?", outbox_q.create_sent_upn_txn, desired.entry_uuid,
                                             write=False)

    async def _find_lost(self, desired: DesiredUser, sent: str, *, looked: str | None = None) -> JSONObject | None:
        """The account a lost create made: by the UPN it was sent with, else the user's current
        one (unless that was ``looked`` up already)."""
        for upn in dict.fromkeys(u for u in (sent, desired.upn) if u and u != looked):
            user = await self._client.find_user_by_upn(upn, USER_SELECT)
            if user is not None:
                return user
        return None

    async def _unbind(self, desired: DesiredUser, secret: str | None, object_id: str | None, *,
                      has_entry: bool) -> Outcome:
        client = self._client
        if not object_id:
            # A create sent before the unbind (or the delete) whose reply was lost still made an
            # account, enabled when it carried a password: it is blocked like any other of ours.
            sent = await self._create_sent(desired)
            made = await self._find_lost(desired, sent) if sent is not None else None
            if made is not None:
                object_id = made["id"]
        if not object_id:
            # Never reached Microsoft 365 (e.g. a bind undone before it was delivered): nothing to block.
            cleared: StatusValues = {"o365SyncState": None, "o365LastError": expiry.entry_error(desired), "o365SyncedAt": None}
            status = None if desired.deleted or not has_entry else cleared
            return Outcome(status, None, "unbound before it was provisioned: nothing to do",
                           unsent_secret=None if desired.deleted else secret)
        try:
            user = await client.get_user(object_id, ("id", "accountEnabled"), expect_not_found=True)
        except NotFound:
            user = None
        what = "account already gone from Microsoft 365"
        pushed = False
        if user is not None:
            patch: JSONObject = {}
            if user.get("accountEnabled") is not False:
                patch["accountEnabled"] = False
            if secret and not desired.deleted:
                # a password set while bound, coalesced with the unbind: it goes along, so a
                # re-bind finds Microsoft 365 holding the directory's current password
                patch["passwordProfile"] = {"password": self._password(secret, desired.entry_uuid),
                                            "forceChangePasswordNextSignIn": False}
                pushed = True
            if patch:
                await self._update(object_id, patch, desired, secret if pushed else None)
            what = "sign-in blocked" + (", password set" if pushed else "")
            if self.config.unbind_action != "block":
                await client.revoke_sessions(object_id)
                what += ", sessions revoked"
        disabled: StatusValues = {"o365ObjectId": [object_id], "o365SyncState": [SyncState.disabled.value],
                            "o365SyncedAt": [now_generalized()], "o365LastError": expiry.entry_error(desired)}
        if pushed:
            disabled["o365PasswordPending"] = None
        status = None if desired.deleted else disabled
        return Outcome(status, object_id, what)

    async def _update(self, oid: str, patch: JSONObject, desired: DesiredUser, secret: str | None) -> None:
        """PATCH the account; ``secret`` is the queued password the patch sets, if it sets one.

        Graph refuses to set the password an account already has.  When the reply to an earlier
        try of this same queued password was lost after Graph applied it (a reset connection, a
        node killed before it recorded the delivery), the retry is refused with a 400, which would
        stop the user for good.  So the try is noted first (a digest of the sealed value, never
        the password); a 400 to a try that was noted before (an earlier delivery attempt), or to a
        resend within this one (``GraphError.repeated``), means the password is set: the rest of
        the patch goes without it.  A 400 to a first send is Graph's answer to this password."""
        client = self._client
        if secret is None:
            await client.update_user(oid, patch)
            return
        note = _password_note(secret)
        uuid = desired.entry_uuid
        sent_before = await self.db.run_interaction("o365 password sent", outbox_q.note_password_sent_txn, uuid, note)
        try:
            await client.update_user(oid, patch)
        except BadRequest as e:
            if not (sent_before or e.repeated or await self._holds_it(desired)):
                await self.db.run_interaction("o365 password refused", outbox_q.clear_password_sent_txn, uuid)
                if _refuses_password(e):
                    raise PasswordRefused() from None
                raise
            rest = {k: v for k, v in patch.items() if k != "passwordProfile"}
            if rest:
                await client.update_user(oid, rest)
            log.info("Microsoft 365: {upn}: the password was set by an earlier try whose reply was lost",
                     upn=desired.upn or desired.dn)

    async def _holds_it(self, desired: DesiredUser) -> bool:
        """Microsoft 365 already holds this password: the last one we pushed to the account had
        the stored hashes this one has (e.g. a password captured at a bind after a re-binding,
        which Microsoft 365 had all along: Graph refuses to set the same password again)."""
        if not desired.password_fp:
            return False
        pushed = await self.db.run_interaction("o365 password pushed?", outbox_q.password_pushed_txn,
                                               desired.entry_uuid, write=False)
        return pushed == desired.password_fp

    def _create_body(self, desired: DesiredUser, password: str | None) -> JSONObject:
        body: JSONObject = {
            "accountEnabled": password is not None,
            "userPrincipalName": desired.upn,
            "mail": desired.mail,
            "mailNickname": desired.mail_nickname or (desired.upn or "").split("@")[0],
            "displayName": desired.display_name or desired.mail_nickname or desired.upn,
            "passwordPolicies": NO_EXPIRY,
            "passwordProfile": {"password": password if password is not None else generate_password(24),
                                "forceChangePasswordNextSignIn": False},
        }
        if desired.given_name:
            body["givenName"] = desired.given_name
        if desired.surname:
            body["surname"] = desired.surname
        if self.config.usage_location:
            body["usageLocation"] = self.config.usage_location
        return body

    def _conflict(self, upn: str | None) -> PermanentError:
        return PermanentError(f'a Microsoft 365 account with the sign-in name "{upn}" already exists and '
                              "[office365] soft_match = false forbids linking to it")

    async def _bind(self, desired: DesiredUser, secret: str | None, object_id: str | None,
                    prev_state: str | None, pw_pending: bool = False, *, block: bool = False,
                    claimed: Callable[[Txn], bool] | None = None) -> Outcome:
        client = self._client
        if not desired.upn:
            raise PermanentError("the entry has no mail address (it becomes the Microsoft 365 sign-in name)")
        user: JSONObject | None = None
        what = "updated"
        sent: str | None = None        # the UPN of a create of ours whose reply never came
        if object_id:
            try:
                user = await client.get_user(object_id, USER_SELECT)
            except NotFound:
                raise self._gone(object_id) from None
        else:
            sent = await self._create_sent(desired)
            user = await client.find_user_by_upn(desired.upn, USER_SELECT)
            ours = False
            if user is None and sent is not None:
                # a create of ours whose reply was lost, sent when the user had another mail
                user = await self._find_lost(desired, sent, looked=desired.upn)
                ours = user is not None
            if user is not None:
                if not ours and not self.config.soft_match:
                    raise self._conflict(desired.upn)
                what = "linked to the existing account"
            else:
                password = self._password(secret, desired.entry_uuid) if secret else None
                # Durably note the attempt first, with the UPN and the password it carries: if the
                # reply is lost, the retry will know the account it then finds is ours, and that it
                # has this password (see store/outbox.py).  Only while the claim is ours: a node
                # frozen since it claimed the user must not make an account after the node that
                # took over has dealt with the user (deleted it, say) without one.
                note = _password_note(secret) if secret else None

                def note_create(txn: Txn) -> bool:
                    if claimed is not None and not claimed(txn):
                        return False
                    outbox_q.mark_create_sent_txn(txn, desired.entry_uuid, desired.upn, note)
                    return True
                if not await self.db.run_interaction("o365 create sent", note_create):
                    raise ClaimLost()
                sent = desired.upn
                try:
                    created = await client.create_user(self._create_body(desired, password))
                except BadRequest as e:
                    if password is not None and _refuses_password(e):
                        raise PasswordRefused() from None
                    raise
                except ObjectConflict:
                    user = await client.find_user_by_upn(desired.upn, USER_SELECT)
                    if user is None:
                        raise
                    if not self.config.soft_match:
                        raise self._conflict(desired.upn) from None
                    what = "linked to the existing account"
                else:
                    del password
                    # Created with a random password (blocked): the directory's password, if it
                    # has one, is captured at the user's next bind; without one, the user sets one.
                    return Outcome(self._synced(created["id"], pending=not secret),
                                   created["id"],
                                   "created" + ("" if secret else " (sign-in blocked until a password is set)"),
                                   welcome=bool(desired.has_password and not secret))
        assert user is not None
        oid = user["id"]
        patch = self._diff(user, desired)
        delivered_at_create = False
        if sent is not None and what.startswith("linked"):
            # We sent a create for this user whose reply was lost (connection reset, node killed):
            # the account is our own.  It has the password the create carried, noted like a
            # password PATCH: pushing the queued password again is taken as set if Graph refuses
            # it as the one the account has, and sets it if it changed since (``_update``).
            what = "linked to the account our lost create made"
            if secret and not sent:
                # noted by an earlier version, without the password: it is the queued one
                secret = None
                delivered_at_create = True
        ours_blocked = prev_state == SyncState.disabled.value     # bound again after an unbind we delivered
        # the reconciler found a bound user's account disabled (the portal): enabled again when
        # Microsoft 365 has the directory's current password, as at a re-bind
        put_back = desired.reason == "drift"
        welcome = False
        if secret:
            patch["passwordProfile"] = {"password": self._password(secret, desired.entry_uuid), "forceChangePasswordNextSignIn": False}
            if user.get("accountEnabled") is False:
                patch["accountEnabled"] = True
        elif block:
            if user.get("accountEnabled") is not False:
                patch["accountEnabled"] = False         # ours, enabled in the portal while it waits for the password
        elif (ours_blocked or put_back) and desired.has_password and not pw_pending:
            if user.get("accountEnabled") is False:
                patch["accountEnabled"] = True          # Microsoft 365 has the directory's current password
        elif ours_blocked:
            # We blocked it, and Microsoft 365 may hold another password than the directory's
            # current one (or the user has none): it stays blocked until that is pushed or captured.
            if user.get("accountEnabled") is not False:
                patch["accountEnabled"] = False
            welcome = desired.has_password
        if patch:
            await self._update(oid, patch, desired, secret if "passwordProfile" in patch else None)
            shown = sorted("password" if k == "passwordProfile" else k for k in patch)
            what += ": " + ", ".join(shown)
        else:
            what += ": already up to date" if what == "updated" else ""
        pending: bool | None = None
        if secret or delivered_at_create:
            pending = False                              # Microsoft 365 has the directory's password now
        elif what.startswith("linked") and desired.has_password:
            pending = True                               # a linked account has a password we never set
        elif ours_blocked and patch.get("accountEnabled", user.get("accountEnabled")) is False:
            pending = True                               # still blocked for want of the current password
        elif desired.reason == HASH_ONLY_CHANGE:
            pending = True                               # a hash set: the next bind captures the cleartext
        return Outcome(self._synced(oid, pending=pending), oid, what, welcome=welcome)

    def _synced(self, oid: str, *, pending: bool | None = None) -> StatusValues:
        status: StatusValues = {"o365ObjectId": [oid], "o365SyncState": [SyncState.synced.value],
                          "o365SyncedAt": [now_generalized()], "o365LastError": None}
        if pending is not None:
            # o365PasswordPending: the next successful bind hands the cleartext to the outbox.
            status["o365PasswordPending"] = ["TRUE"] if pending else None
        return status

    def _diff(self, user: JSONObject, desired: DesiredUser) -> JSONObject:
        patch: JSONObject = {}
        for key, value in _wanted(desired).items():
            if key in NOT_CLEARABLE and not value:
                continue                                  # cannot be cleared in Graph
            if (user.get(key) or None) != (value or None):
                patch[key] = value
        policies = [p.strip() for p in (user.get("passwordPolicies") or "").split(",") if p.strip() and p.strip() != "None"]
        if NO_EXPIRY not in policies:
            patch["passwordPolicies"] = ",".join([*policies, NO_EXPIRY])
        if self.config.usage_location and user.get("usageLocation") != self.config.usage_location:
            patch["usageLocation"] = self.config.usage_location
        return patch
