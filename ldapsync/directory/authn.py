"""Binds: checking a password against the password policy.

Owns :meth:`Authn.authenticate` (lockout, expiry, grace logins, the per-entry bind gate of
``ldapsync.directory.binds``), the bind bookkeeping written after each attempt, and the
password policy state read back (:meth:`Authn.password_state`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.logger import Logger


from ldapsync.directory import policy as pp
from ldapsync.directory.binds import Admission
from ldapsync.directory.core import ANONYMOUS, Actor, DirectoryCore
from ldapsync.directory.dn import DN
from ldapsync.directory.errors import LDAPError, ResultCode
from ldapsync.directory.hooks import Origin
from ldapsync.directory.policy import PasswordState, PolicyError, PPError, PPolicyResponse, describe_policy
from ldapsync.directory.writes import Write
from ldapsync.store import entries as store
from ldapsync.store.database import StoreError, Txn
from ldapsync.store.entries import Attrs


# The namespace the bind lines had before the directory was split (the JSON log's "system" field).
log = Logger(namespace="ldapsync.directory.facade")
log_core = Logger(namespace="ldapsync.directory.core")   # where DirectoryCore.transaction logs a database failure
T = TypeVar("T")
FAST_VERIFY_MAX = 4096       # longer passwords go to a hash thread even for a digest scheme


@dataclass(frozen=True)
class BindOutcome:
    """What a password check found (:meth:`Directory.authenticate`).

    - ``actor``: who the password proves (set whenever ``password_ok``, also when
      expired, so that user may change it); None otherwise.
    - ``password_ok``: the password was right (never checked while ``locked``).
    - ``expired``: the password is past ``max_age``.  With ``grace_remaining``
      set, a grace login was used and the bind succeeded; without it, it failed.
    - ``locked``: the account is locked (or this failure locked it).
    - ``expires_at``: when the password expires (epoch seconds), None = never.
    - ``grace_remaining``: grace logins left after the one just used (only when one was used).
    - ``warning_seconds``: seconds until expiry when inside ``expire_warning``.
    """

    actor: Actor | None
    password_ok: bool
    expired: bool
    locked: bool
    expires_at: float | None
    grace_remaining: int | None
    warning_seconds: int | None

    @property
    def authenticated(self) -> bool:
        """True when a bind with this outcome succeeds."""
        return self.password_ok and not self.locked and (not self.expired or self.grace_remaining is not None)

    def ppolicy(self) -> PPolicyResponse:
        """What the password policy response control says about this outcome."""
        if self.locked:
            return PPolicyResponse(error=PPError.accountLocked)
        if self.password_ok and self.expired:
            if self.grace_remaining is None:
                return PPolicyResponse(error=PPError.passwordExpired)
            return PPolicyResponse(grace_authns_remaining=self.grace_remaining)
        if self.password_ok and self.warning_seconds is not None:
            return PPolicyResponse(time_before_expiration=self.warning_seconds)
        return PPolicyResponse()


_FAILED = BindOutcome(None, False, False, False, None, None, None)


def _bind_refused(dn: object, source: str | None, reason: str, level: str = "info") -> None:
    """The log line of a refused bind (a wrong password has its own, counted by the tests): the
    DN, the client and why — never the password.  ``source`` None: the self-service pages."""
    getattr(log, level)("bind refused for {dn} from {source}: {reason}", dn=str(dn),
                        source=source or "the self-service pages", reason=reason)


class Authn(DirectoryCore):
    """The directory part that checks passwords (simple binds and the self-service pages)."""

    async def _read(self, desc: str, fn: Callable[..., T], *args: Any) -> T:
        """:meth:`transaction` for a short read that may run on the reactor thread
        (:meth:`~ldapsync.store.database.Database.run_read`); database failures are answered alike."""
        try:
            return await self.db.run_read(desc, fn, *args)
        except StoreError as e:
            log_core.error("LDAP {desc} failed: {error}", desc=desc, error=str(e))
            raise LDAPError(ResultCode.unavailable, "the directory database is not available; try again") from None

    # -- bind ------------------------------------------------------------------
    async def bind(self, dn_text: str, password: bytes) -> Actor:
        return (await self.bind_with_policy(dn_text, password))[0]

    async def bind_with_policy(self, dn_text: str, password: bytes, *, source: str | None = None) -> tuple[Actor, PPolicyResponse]:
        """A simple bind: (actor, what the password policy control says).

        Refusals raise :class:`~ldapsync.directory.policy.PolicyError` (an LDAPError)
        whose ``ppolicy`` the protocol edge sends when the client asked for it.  The
        message is the same whether the password was wrong, expired or locked.
        ``source`` is the client's address: too many wrong passwords from it within
        a minute get ``busy`` without a look at the password (``[ldap]
        bind_failures_per_address``, :class:`~ldapsync.directory.binds.AddressLimiter`).
        """
        if not dn_text:
            if password:
                raise LDAPError(ResultCode.unwillingToPerform, "a password was given without a DN")
            return ANONYMOUS, PPolicyResponse()
        try:
            self.dn(dn_text)
        except LDAPError as e:
            _bind_refused(dn_text, source, f"invalid DN ({e.message})")
            raise LDAPError(ResultCode.invalidDNSyntax, e.message) from None
        if not password:
            _bind_refused(dn_text, source, "no password (unauthenticated bind)")
            raise LDAPError(ResultCode.unwillingToPerform, "unauthenticated bind (DN with no password) disallowed")
        wait = self.bind_limiter.refused_for(source)
        if wait:
            _bind_refused(dn_text, source, f"busy: too many wrong passwords from this address (for {wait:.0f}s more)")
            raise LDAPError(ResultCode.busy, f"too many wrong passwords from your address; try again in {wait:.0f} seconds")
        out = await self.authenticate(dn_text, password, source=source)
        if not out.authenticated or out.actor is None:
            raise PolicyError(ResultCode.invalidCredentials, "invalid credentials", out.ppolicy())
        return out.actor, out.ppolicy()

    async def authenticate(self, dn_text: str, password: bytes, *, source: str | None = None) -> BindOutcome:
        """Check a password under the policy, as a bind does; policy outcomes are returned, not raised.

        Counts a wrong password towards lockout (one write), refuses a locked
        account without looking at the password, records a grace login, clears
        failures after a success, and hands the cleartext to the bind hooks (the
        Microsoft 365 capture) when the bind succeeds.  An unknown DN, an entry
        without a password or an empty password give a plain failure.

        Lock check, verification and failure recording are atomic per DN: at most
        ``lockout_failures`` wrong passwords are verified however many binds race
        (:class:`~ldapsync.directory.binds.DNGate`).  ``source`` (the LDAP client's
        address) shares the hash threads fairly between addresses, counts wrong
        passwords per address and bounds the queue (busy when full); without it
        (the self-service pages, which have their own limits) none of that applies.
        """
        try:
            dn = self.dn(dn_text)
        except LDAPError as e:
            _bind_refused(dn_text, source, f"invalid DN ({e.message})")
            return _FAILED
        if not password or dn.is_root:
            _bind_refused(dn_text, source, "no password" if not password else "the root DSE cannot bind")
            return _FAILED
        cfg = self.policy
        exempt = dn.norm == self.admin_dn.norm
        counted = bool(cfg.lockout_failures) and not exempt

        def fetch(txn: Txn) -> Attrs | None:
            e = store.get_entry_txn(txn, dn.norm)
            return e.attrs if e is not None else None

        async def decide(in_flight: int) -> tuple[Attrs | BindOutcome, Admission]:
            attrs = await self._read("bind", fetch)
            if attrs is None or not attrs.get("userPassword"):
                # No such entry, or an entry without a usable password (an inactive user).
                _bind_refused(dn, source, "no such entry" if attrs is None else "the entry has no password")
                return _FAILED, Admission.PASS
            if not counted:
                return attrs, Admission.PASS
            now = self.clock.now()
            if pp.lock_state(cfg, attrs, now)[0]:
                _bind_refused(dn, source, "account locked")
                return BindOutcome(None, False, False, True, None, None, None), Admission.PASS
            if in_flight and pp.failure_count(cfg, attrs, now) + in_flight >= cfg.lockout_failures:
                return attrs, Admission.WAIT    # the binds in progress may lock it: wait for their outcome
            return attrs, Admission.TAKE

        got, took = await self._bind_gate.enter(dn.norm, decide)
        if isinstance(got, BindOutcome):
            return got
        try:
            return await self._check_password(dn, got, password, exempt, source)
        finally:
            if took:
                await self._bind_gate.release(dn.norm)

    async def _check_password(self, dn: DN, attrs: Attrs, password: bytes, exempt: bool, source: str | None) -> BindOutcome:
        """Verify (holding the DN's slot, see :meth:`authenticate`) and record the outcome."""
        cfg = self.policy
        async with self.bind_limiter.slot(source):
            wait = self.bind_limiter.refused_for(source)    # again: failures may have come in while we waited
            if wait:
                _bind_refused(dn, source, f"busy: too many wrong passwords from this address (for {wait:.0f}s more)")
                raise LDAPError(ResultCode.busy, f"too many wrong passwords from your address; try again in {wait:.0f} seconds")
            hashes = list(attrs["userPassword"])
            if len(password) <= FAST_VERIFY_MAX and all(self.hasher.is_fast(h) for h in hashes):
                # A digest ({SSHA}...) costs microseconds: verified here, not in a hash thread (a
                # second thread hop per bind).  The same busy answer as the hash queue's below.
                if source is not None and self._hash_pending >= self._hash_queue:
                    raise LDAPError(ResultCode.busy, "the server is busy checking passwords; try again shortly")
                ok = self._verify_any(hashes, password)
            else:
                ok = await self._in_hash_thread(self._verify_any, hashes, password, bounded=source is not None)
        now = self.clock.now()
        if not ok:
            self.bind_limiter.note_failure(source)
            locked, failures = False, 0
            if not exempt and cfg.lockout_failures:
                locked, failures = await self._record_bind_failure(dn)
            if locked:
                log.warn("wrong password for {dn} from {source}: account locked after {n} failed binds",
                         dn=str(dn), source=source or "the self-service pages", n=failures)
            elif exempt or not cfg.lockout_failures:
                log.info("wrong password for {dn} from {source} (no lockout for it)",
                         dn=str(dn), source=source or "the self-service pages")
            else:
                log.info("wrong password for {dn} from {source} ({n} of {max} before lockout)",
                         dn=str(dn), source=source or "the self-service pages", n=failures, max=cfg.lockout_failures)
            return BindOutcome(None, False, False, locked, None, None, None)
        actor = Actor(dn, exempt)
        exp = pp.expires_at(cfg, attrs, exempt=exempt)
        expired = exp is not None and now >= exp
        grace: int | None = None
        if expired:
            grace = await self._record_bind_success(dn, grace=True) if pp.grace_remaining(cfg, attrs) > 0 else None
            if grace is None:
                _bind_refused(dn, source, "password expired")
                return BindOutcome(actor, True, True, False, exp, None, None)
            log.info("grace login for {dn} with an expired password ({n} left)", dn=str(dn), n=grace)
        elif pp.values_after_success(cfg, attrs, now, exempt=exempt):
            await self._record_bind_success(dn, grace=False)    # only when something changes
        warning = None
        if exp is not None and not expired and cfg.expire_warning and exp - now <= cfg.expire_warning:
            warning = max(int(exp - now), 0)
        if attrs.get("o365PasswordPending") == ["TRUE"]:
            # Microsoft 365 still lacks this user's password: hand the cleartext to the
            # bind hooks (the outbox) now that we have it.  Ordinary binds cost nothing extra.
            for hook in self.hooks:
                try:
                    await hook.on_bind(dn, password)
                except Exception:
                    log.failure("bind hook failed for {dn}", dn=str(dn))
        return BindOutcome(actor, True, expired, False, exp, grace, warning)

    async def _record_bind_failure(self, dn: DN) -> tuple[bool, int]:
        """One write: add a pwdFailureTime, lock at lockout_failures.  Returns (locked?, failures counted).

        The entry is read under a row lock in the same transaction, so failures
        from other processes and nodes are counted, never lost."""
        cfg = self.policy

        def run(txn: Txn) -> tuple[bool, int]:
            w = Write(self, txn, str(dn), "ppolicy", Origin.POLICY)
            st = w.get(dn)
            if st is None or not st.attrs or not st.attrs.get("userPassword"):
                return False, 0
            now = self.clock.now()
            values, locked = pp.values_after_failure(cfg, st.attrs, now)
            if values and w.set_operational(st, values):
                w.finish()
            return locked, len(values.get("pwdFailureTime") or ()) if values else pp.failure_count(cfg, st.attrs, now)

        return await self.transaction("ppolicy", run)

    async def _record_bind_success(self, dn: DN, *, grace: bool) -> int | None:
        """One write after a right password: clear failures/expired lock, date an undated password,
        and with ``grace`` use one grace login.  Returns the grace logins left (None: none was left)."""
        cfg = self.policy
        exempt = dn.norm == self.admin_dn.norm

        def run(txn: Txn) -> int | None:
            w = Write(self, txn, str(dn), "ppolicy", Origin.POLICY)
            st = w.get(dn)
            if st is None or not st.attrs:
                return None
            left = None
            if grace:
                have = pp.grace_remaining(cfg, st.attrs)
                if have <= 0:
                    return None         # used up meanwhile by a concurrent bind
                left = have - 1
            values = pp.values_after_success(cfg, st.attrs, self.clock.now(), grace_used=grace, exempt=exempt)
            if values and w.set_operational(st, values):
                w.finish()
            return left

        return await self.transaction("ppolicy", run)

    # -- password policy helpers ---------------------------------------------------
    def password_state(self, attrs: Attrs, dn: str | DN | None = None) -> PasswordState:
        """The policy state of an entry's attributes now (by the directory's clock).

        Pass ``dn`` to apply the admin's exemption (no expiry, no lockout).
        """
        exempt = False
        if dn is not None:
            norm = dn.norm if isinstance(dn, DN) else self.dn_norm_or_none(dn)
            exempt = norm == self.admin_dn.norm
        return pp.password_state(self.policy, attrs, self.clock.now(), exempt=exempt)

    async def password_state_of(self, dn_text: str) -> PasswordState | None:
        """:meth:`password_state` of the entry at ``dn_text`` (None when there is no such entry)."""
        dn = self.dn(dn_text)

        def fetch(txn: Txn) -> Attrs | None:
            e = store.get_entry_txn(txn, dn.norm)
            return e.attrs if e is not None else None

        attrs = await self.transaction("password state", fetch, write=False)
        return None if attrs is None else self.password_state(attrs, dn)

    def describe_policy(self) -> list[str]:
        return describe_policy(self.policy)

    def _verify_any(self, hashes: list[str], password: bytes) -> bool:
        return any(self.hasher.verify(h, password) for h in hashes)
