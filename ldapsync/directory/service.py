"""The directory: LDAP operations as rules over the store.

Owns schema checks, access control, password hashing and verification, and
turning each operation into one :class:`~ldapsync.directory.writes.Write`
(one SQL transaction).  Knows nothing of BER or sockets (that is
``ldapsync.ldap``) and never talks to Microsoft 365 (propagation hangs on the
change hooks handed in by the wiring: ``ldapsync.directory.hooks``).

Access rules:
- the admin DN and members of ``cn=admins,ou=groups,<suffix>`` may do everything;
  membership is the group's ``member`` values (never the member's ``memberOf``,
  which a loaded file could forge) and is looked up in every operation's own
  transaction, so a member removed from the group loses its rights at once,
  also on connections bound before (as slapd's group ACLs);
- an authenticated user may read the directory (never passwords, nor the
  password policy state) and change its own password;
- userPassword is never read, compared or matched by a filter, by anyone (a bind
  is the only way to check a password, and it counts failures); attributes the
  requester may not read are Undefined in filters (``ldapsync.directory.filters``);
- an entry holds one userPassword value (like slapd's ppolicy): a second one is
  refused, so an old password cannot stay valid beside a new one;
- anonymous clients may bind and read the root DSE and ``cn=Subschema`` only,
  unless ``[ldap] allow_anonymous_read``.

Password policy (``[policy]``, rules in ``ldapsync.directory.policy``): binds go
through :meth:`Directory.authenticate` (lockout, expiry, grace logins), and every
path that sets ``userPassword`` (add, modify, Password Modify,
:meth:`Directory.set_password`) checks quality and history before its write
transaction and stamps the policy state in it.  The configured admin DN is
exempt from lockout and expiry, so the directory can always be administered.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

import ldapsync
from ldapsync.clock import Clock, system_clock
from ldapsync.config import Config, PolicyConfig
from ldapsync.directory import policy as pp
from ldapsync.directory.binds import Admission, AddressLimiter, DNGate
from ldapsync.directory.dn import DN, parse_dn
from ldapsync.directory.errors import LDAPError, ResultCode
from ldapsync.directory.filters import Ext, Filter, FilterCompiler, And, Or, Not
from ldapsync.directory.hooks import ChangeSet, Origin, WriteHooks
from ldapsync.directory.monitor import Monitor
from ldapsync.directory.passwords import HashParams, PasswordHasher, generate_password
from ldapsync.directory.policy import PasswordState, PolicyError, PPError, PPolicyResponse, describe_policy
from ldapsync.directory.schema import AttributeType, Schema
from ldapsync.directory.writes import GROUP_ATTRS, Write
from ldapsync.store import entries as store
from ldapsync.store.database import Database, Txn
from ldapsync.store.entries import Attrs, StoredEntry

log = Logger()

SUBSCHEMA_DN = "cn=Subschema"
HIDDEN_ATTRS = frozenset({"userPassword"})            # never returned to anyone, never in a filter
ADMIN_ONLY_ATTRS = pp.POLICY_ATTRS                     # password policy state: admins only
NON_ADMIN_HIDDEN = HIDDEN_ATTRS | ADMIN_ONLY_ATTRS     # what a non-admin's filter cannot see
ONE_PASSWORD_MESSAGE = "userPassword: an entry holds one password ({n} values given)"
COMPUTED_OPERATIONAL = ("entryDN", "hasSubordinates", "subschemaSubentry")
GROUP_CLASSES = frozenset({"groupofnames", "groupofuniquenames", "ldapsynctag"})

SUPPORTED_CONTROLS = (
    "1.2.840.113556.1.4.319",   # simple paged results
    "2.16.840.1.113730.3.4.2",  # ManageDsaIT
    "1.3.6.1.4.1.42.2.27.8.5.1",  # password policy (draft-behera)
)
SUPPORTED_EXTENSIONS = (
    "1.3.6.1.4.1.1466.20037",   # StartTLS
    "1.3.6.1.4.1.4203.1.11.1",  # Password Modify
    "1.3.6.1.4.1.4203.1.11.3",  # Who am I?
)


@dataclass(frozen=True)
class Actor:
    """Who is asking: ``dn`` None means anonymous.

    ``is_admin`` is what bind saw; access decisions never use it — rights are
    looked up per operation (:meth:`Directory._is_admin_txn`).
    """

    dn: DN | None = None
    is_admin: bool = False

    @property
    def dn_str(self) -> str:
        return str(self.dn) if self.dn is not None else ""


ANONYMOUS = Actor()



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


def _b(v: bytes | str) -> str:
    return v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v


class Directory:
    def __init__(self, config: Config, db: Database, schema: Schema | None = None, *, hash_threads: int = 2,
                 hash_queue: int = 256, hooks: Sequence[WriteHooks] = ()) -> None:
        self.config = config
        self.policy: PolicyConfig = config.policy
        self.clock: Clock = system_clock()       # every policy decision asks this (tests move it)
        self.db = db
        self.schema = schema or Schema.load_default()
        p = config.passwords
        self.hasher = PasswordHasher(HashParams(time_cost=p.hash_time_cost, memory_cost_kib=p.hash_memory_kib, parallelism=p.hash_parallelism))
        self.suffix = self.dn(config.directory.suffix)
        self.admin_dn = self.dn(config.admin_dn)
        self.admins_group = self.dn(f"cn=admins,ou=groups,{config.directory.suffix}")
        self.nested_groups = config.directory.nested_groups
        self._system_entries = {
            self.dn(f"cn=Provisioning - Office 365,ou=tags,{self.suffix}").norm: "the Microsoft 365 provisioning tag",
            self.dn(f"cn=office365,ou=directories,{self.suffix}").norm: "the Microsoft 365 connector entry",
        }
        indexed = {a.lower() for a in config.directory.indexed}
        for a in config.directory.indexed:
            at = self.schema.attribute(a)
            if at is not None:
                indexed.add(at.name.lower())
        indexed.add("entryuuid")        # its index rows carry the uniqueness constraint (migration 0005)
        indexed -= {a.lower() for a in HIDDEN_ATTRS}    # never copied into the index, never probed
        self.indexed = frozenset(indexed)
        self.filters = FilterCompiler(self.schema, self.indexed)
        self._operational: dict[str, bool] = {}
        # What follows each write and each bind of an entry flagged o365PasswordPending
        # (ldapsync.directory.hooks): the wiring's sequence, run in its order.
        self.hooks = hooks
        self._hash_pool = ThreadPool(minthreads=0, maxthreads=hash_threads, name="ldapsync-hash")
        self._hash_pool_started = False
        self._hash_queue = hash_queue           # bind verifications waiting or running before binds get busy
        self._hash_pending = 0
        self._bind_gate: DNGate[Any] = DNGate()
        self.bind_limiter = AddressLimiter(config.ldap.bind_failures_per_address, slots=hash_threads)
        self._index_types = {self.schema.attribute(a).name: self.schema.attribute(a) for a in indexed if self.schema.attribute(a)}  # type: ignore[union-attr]
        self.monitor = Monitor(self)            # cn=Monitor, admins only (ldapsync.directory.monitor)

    def start(self) -> None:
        if not self._hash_pool_started:
            self._hash_pool.start()
            self._hash_pool_started = True

    def stop(self) -> None:
        if self._hash_pool_started:
            self._hash_pool.stop()
            self._hash_pool_started = False

    async def _in_hash_thread(self, fn: Callable[..., Any], *args: Any, bounded: bool = False) -> Any:
        """Run ``fn`` in the hash thread pool; ``bounded`` (LDAP binds) refuses with busy when
        ``hash_queue`` jobs are already waiting or running, so a flood cannot queue without end."""
        from twisted.internet import reactor

        if bounded and self._hash_pending >= self._hash_queue:
            raise LDAPError(ResultCode.busy, "the server is busy checking passwords; try again shortly")
        self.start()
        self._hash_pending += 1
        try:
            return await threads.deferToThreadPool(reactor, self._hash_pool, fn, *args)
        finally:
            self._hash_pending -= 1

    # -- names ---------------------------------------------------------------
    def dn(self, text: str) -> DN:
        return parse_dn(text, self.schema)

    def dn_norm_or_none(self, text: str) -> str | None:
        try:
            return parse_dn(text, self.schema).norm
        except LDAPError:
            return None

    def ancestors(self, dn: DN) -> list[DN]:
        out = []
        cur = dn.parent
        while cur is not None and not cur.is_root:
            out.append(cur)
            cur = cur.parent
        return out

    def attribute(self, name: str) -> AttributeType:
        at = self.schema.attribute(name)
        if at is None:
            raise LDAPError(ResultCode.undefinedAttributeType, f"{name}: attribute type undefined")
        return at

    # -- entry helpers ---------------------------------------------------------
    def index_rows(self, attrs: Attrs) -> set[tuple[str, str]]:
        rows: set[tuple[str, str]] = set()
        for name, values in attrs.items():
            at = self._index_types.get(name)
            if at is None:
                continue
            key = name.lower()
            for v in values:
                try:
                    rows.add((key, self.schema.normalize(at, v)))
                except LDAPError:
                    continue
        return rows

    def is_indexed(self, name: str) -> bool:
        return name in self._index_types

    def is_group(self, attrs: Attrs) -> bool:
        return any(oc.lower() in GROUP_CLASSES for oc in attrs.get("objectClass", ()))

    def _is_admin_txn(self, txn: Txn, actor: Actor) -> bool:
        """Does ``actor`` hold admin rights now?  The admin DN, or a member of the admins group
        by the group's own ``member`` values, read in this transaction (never ``actor.is_admin``,
        which is what bind saw, nor the actor's ``memberOf``, which a loaded file could forge)."""
        if actor.dn is None:
            return False
        if actor.dn.norm == self.admin_dn.norm:
            return True
        return self._admins_group_lists_txn(txn, actor.dn.norm)

    def _admins_group_lists_txn(self, txn: Txn, norm: str) -> bool:
        """``norm`` is in the admins group's member/uniqueMember values (through member groups
        too with ``nested_groups``, as memberOf would say)."""
        level = [self.admins_group.norm]
        seen = set(level)
        while level and len(seen) <= 10000:
            groups = [store.get_entry_txn(txn, level[0])] if len(level) == 1 else \
                list(store.get_entries_txn(txn, level).values())
            level = []
            for g in groups:
                if g is None or not self.is_group(g.attrs):
                    continue
                for a in GROUP_ATTRS:
                    for v in g.attrs.get(a, ()):
                        m = self.dn_norm_or_none(v)
                        if m == norm:
                            return True
                        if self.nested_groups and m is not None and m not in seen:
                            seen.add(m)
                            level.append(m)
        return False

    def _in_admins_group(self, attrs: Attrs) -> bool:
        """What bind records in ``Actor.is_admin`` (informational: never used for rights)."""
        return any(self.dn_norm_or_none(v) == self.admins_group.norm for v in attrs.get("memberOf", ()))

    def _require_admin_txn(self, txn: Txn, actor: Actor, what: str) -> None:
        if actor.dn is None:
            raise LDAPError(ResultCode.insufficientAccessRights, f"anonymous clients may not {what}; bind first")
        if not self._is_admin_txn(txn, actor):
            raise LDAPError(
                ResultCode.insufficientAccessRights,
                f"{actor.dn} may not {what}: only the directory admin and members of {self.admins_group} may",
            )

    def convert_attrs(self, raw: Iterable[tuple[str, Iterable[bytes | str]]], *, for_add: bool) -> Attrs:
        """Client attribute list → canonical names, validated values, duplicates refused."""
        s = self.schema
        out: Attrs = {}
        seen_norm: dict[str, set[str]] = {}
        for desc, values in raw:
            name = desc.split(";", 1)[0]
            at = self.attribute(name)
            vals = [_b(v) for v in values]
            if for_add and not vals:
                raise LDAPError(ResultCode.protocolError, f"{at.name}: no values given")
            lst = out.setdefault(at.name, [])
            norms = seen_norm.setdefault(at.name, set())
            for v in vals:
                s.validate_value(at, v)
                self._check_object_class_value(at, v, len(lst))
                n = s.normalize(at, v) if at.equality else v
                if n in norms:
                    raise LDAPError(ResultCode.attributeOrValueExists,
                                    f"{at.name}: value #{len(lst)} provided more than once")
                norms.add(n)
                lst.append(v)
        return out

    def _check_object_class_value(self, at: AttributeType, value: str, index: int) -> None:
        """Like slapd: an objectClass value naming no known class is invalidAttributeSyntax."""
        if at.name == "objectClass" and self.schema.object_class(value) is None:
            raise LDAPError(ResultCode.invalidAttributeSyntax,
                            f"objectClass: value #{index} invalid per syntax (unknown objectClass '{value.strip()}')")

    def _structural_class(self, oc_values: Sequence[str]) -> str | None:
        """The one structural class these objectClass values name, else None."""
        classes = [self.schema.object_class(v) for v in oc_values]
        if not classes or any(c is None for c in classes):
            return None
        names: set[str] = set()
        for c in classes:
            names |= c.ancestry
        structural = [c for c in (self.schema.object_class(n) for n in names) if c is not None and c.kind == "STRUCTURAL"]
        leaves = [c for c in structural if not any(o is not c and c.name in o.ancestry for o in structural)]
        return leaves[0].name if len(leaves) == 1 else None

    async def hash_cleartext(self, attrs: Attrs) -> dict[str, str]:
        """Hash cleartext userPassword values in place; return {hash: cleartext} for hooks."""
        clear: dict[str, str] = {}
        vals = attrs.get("userPassword")
        if not vals:
            return clear
        out = []
        for v in vals:
            if self.hasher.is_hashed(v):
                out.append(v)
            else:
                h = await self._in_hash_thread(self.hasher.hash, v.encode("utf-8", "surrogateescape"))
                clear[h] = v
                out.append(h)
        attrs["userPassword"] = out
        return clear

    # -- bootstrap ---------------------------------------------------------------
    def admin_password(self) -> tuple[str, bool]:
        """(password, generated?) from [admin] password_file, generating it when absent."""
        path = Path(self.config.admin.password_file)
        if path.exists():
            text = path.read_text(encoding="utf-8")
            if text.endswith("\n"):
                text = text[:-1]
            if text.endswith("\r"):
                text = text[:-1]
            if not text:
                raise LDAPError(ResultCode.other, f"admin password file {path} is empty")
            return text, False
        path.parent.mkdir(parents=True, exist_ok=True)
        pw = generate_password(20)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(pw)         # no newline: `ldapwhoami -y FILE` sends the file's bytes as they are
        return pw, True

    def bootstrap_sync(self) -> list[str]:
        """Create the base tree and admin (idempotent); keep the admin password in step with its file.

        Blocking: used by ``ldapsync init`` and at server start (in a thread).
        Returns human-readable lines of what was done.
        """
        self.db.create_schema()
        pw, generated = self.admin_password()
        done: list[str] = []
        if generated:
            done.append(f"generated an admin password and wrote it to {self.config.admin.password_file} (mode 0600)")
        suffix = self.suffix
        first = suffix.rdns[0]
        base_entries: list[tuple[DN, Attrs]] = []
        attr0, val0 = first.avas[0]
        if attr0.lower() == "dc":
            base_entries.append((suffix, {"objectClass": ["top", "dcObject", "organization"], "dc": [val0], "o": [val0]}))
        elif attr0.lower() == "o":
            base_entries.append((suffix, {"objectClass": ["top", "organization"], "o": [val0]}))
        elif attr0.lower() == "ou":
            base_entries.append((suffix, {"objectClass": ["top", "organizationalUnit"], "ou": [val0]}))
        else:
            base_entries.append((suffix, {"objectClass": ["top", "extensibleObject"], attr0: [val0]}))
        for ou in ("people", "groups", "tags", "directories"):
            base_entries.append((self.dn(f"ou={ou},{suffix}"), {"objectClass": ["top", "organizationalUnit"], "ou": [ou]}))

        def txn_fn(txn: Txn) -> list[str]:
            out: list[str] = []
            w = Write(self, txn, str(self.admin_dn), "init", Origin.BOOTSTRAP)
            for dn, attrs in base_entries:
                if w.get(dn) is None:
                    parent = w.get(dn.parent) if dn.parent is not None and not dn.parent.is_root else None
                    attrs["structuralObjectClass"] = [self.schema.check_entry(attrs)]
                    w.create(dn, attrs, parent)
                    out.append(f"created {dn}")
            admin = w.get(self.admin_dn)
            stored = (admin.attrs or {}).get("userPassword", []) if admin else []
            if admin is None or not any(self.hasher.verify(h, pw.encode()) for h in stored):
                hashed = self.hasher.hash(pw.encode())
                if admin is None:
                    parent = w.get(self.admin_dn.parent) if self.admin_dn.parent is not None else None
                    rdn_attr, rdn_val = self.admin_dn.rdns[0].avas[0]
                    attrs = {"objectClass": ["top", "organizationalRole", "simpleSecurityObject"], rdn_attr: [rdn_val],
                             "description": ["Directory administrator"], "userPassword": [hashed],
                             "pwdChangedTime": [pp.format_time(self.clock.now())]}
                    attrs["structuralObjectClass"] = [self.schema.check_entry(attrs)]
                    w.create(self.admin_dn, attrs, parent)
                    out.append(f"created {self.admin_dn}")
                else:
                    attrs = dict(admin.attrs or {})
                    attrs["userPassword"] = [hashed]
                    attrs["pwdChangedTime"] = [pp.format_time(self.clock.now())]
                    w.update(admin, attrs)
                    out.append(f"set the password of {self.admin_dn} from {self.config.admin.password_file}")
            w.finish()
            return out

        done += self.db.run_sync("bootstrap", txn_fn)
        return done

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
            attrs = await self.db.run_interaction("bind", fetch, write=False)
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
        is_admin = exempt or self._in_admins_group(attrs)
        async with self.bind_limiter.slot(source):
            wait = self.bind_limiter.refused_for(source)    # again: failures may have come in while we waited
            if wait:
                _bind_refused(dn, source, f"busy: too many wrong passwords from this address (for {wait:.0f}s more)")
                raise LDAPError(ResultCode.busy, f"too many wrong passwords from your address; try again in {wait:.0f} seconds")
            ok = await self._in_hash_thread(self._verify_any, list(attrs["userPassword"]), password,
                                            bounded=source is not None)
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
        actor = Actor(dn, is_admin)
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

        return await self.db.run_interaction("ppolicy", run)

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

        return await self.db.run_interaction("ppolicy", run)

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

        attrs = await self.db.run_interaction("password state", fetch, write=False)
        return None if attrs is None else self.password_state(attrs, dn)

    def describe_policy(self) -> list[str]:
        return describe_policy(self.policy)

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

        return await self.db.run_interaction("password check", run, write=False)

    def _verify_any(self, hashes: list[str], password: bytes) -> bool:
        return any(self.hasher.verify(h, password) for h in hashes)

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

    def _select(self, attrs: Attrs, requested: Sequence[str], admin: bool, types_only: bool,
                extra: Callable[[str], list[str] | None]) -> list[tuple[str, list[str]]]:
        """Project an entry onto the requested attribute list (``*``, ``+``, ``1.1``, names)."""
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
            if name in HIDDEN_ATTRS or (name in ADMIN_ONLY_ATTRS and not admin):
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
        if self.monitor.holds(base):
            return await self.monitor.search(actor, base, req)
        uses_dn_attrs = _uses_dn_attributes(req.filter)
        # Rights are looked up in the first chunk's transaction (per operation, never from bind),
        # and decide what the filter may see: what the requester may not read is Undefined in it.
        rights: list[tuple[bool, Any, Any]] = []       # [(admin, predicate, plan)] once known
        want_children = any(r in ("+", "hasSubordinates") or r.lower() == "hassubordinates" for r in req.attributes)
        chunk = 200
        result = SearchResult()
        page_left = req.page_size if req.page_size else None

        def run(txn: Txn, after: int, limit: int) -> tuple[list[tuple[int, str, Attrs, bool | None]], int | None, bool]:
            if not rights:
                admin = self._is_admin_txn(txn, actor)
                rights.append((admin, *self.filters.compile(req.filter, HIDDEN_ATTRS if admin else NON_ADMIN_HIDDEN)))
            _, pred, plan = rights[0]
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
            return [(e.id, e.dn, e.attrs, (e.id in kids) if want_children else None) for e in matched_rows], last, more

        after = req.page_after
        last_returned = after
        size_limit = time_limit = 0
        deadline: float | None = None
        while True:
            if abandoned():
                return result
            rows, last, more = await self.db.run_interaction("search", run, after, chunk, write=False)
            admin = rights[0][0]
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

                result.entries.append((dn, self._select(attrs, req.attributes, admin, req.types_only, extra)))
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
        self.schema.validate_value(at, _b(value))
        want = self.schema.normalize(at, _b(value))
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

        e = await self.db.run_interaction("compare", run, write=False)
        if at.name == "entryDN":
            values = [e.dn]
        else:
            values = e.attrs.get(at.name)
        if not values:
            raise LDAPError(ResultCode.noSuchAttribute, f"{dn} has no {at.name}")
        return any(self.schema.normalize(at, v) == want for v in values)

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

        return await self.db.run_interaction("add", run)

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

        return await self.db.run_interaction("delete", run)

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
            vals = [_b(v) for v in values]
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

        return await self.db.run_interaction("modify", run)

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

        return await self.db.run_interaction("modrdn", run)

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
            new_pw = _b(new)
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

        await self.db.run_interaction(operation, run)


def _uses_dn_attributes(f: Filter) -> bool:
    if isinstance(f, Ext):
        return f.dn_attributes
    if isinstance(f, (And, Or)):
        return any(_uses_dn_attributes(x) for x in f.items)
    if isinstance(f, Not):
        return _uses_dn_attributes(f.item)
    return False
