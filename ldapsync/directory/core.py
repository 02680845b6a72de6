"""The directory's shared base: its construction and the helpers every part uses.

Owns the access constants (hidden and admin-only attributes), :class:`Actor`, the
hash thread pool, DN parsing, index rows and the per-operation admin-rights check
(:meth:`DirectoryCore._is_admin_txn`).  The parts (bootstrap, authn, password_changes,
reads, operations) build on it; :class:`ldapsync.directory.facade.Directory` joins them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet import threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from ldapsync.clock import Clock, system_clock
from ldapsync.config import Config, PolicyConfig
from ldapsync.directory import policy as pp
from ldapsync.directory.binding import tag_dn
from ldapsync.directory.binds import AddressLimiter, DNGate
from ldapsync.directory.dn import DN, parse_dn
from ldapsync.directory.errors import LDAPError, ResultCode
from ldapsync.directory.filters import FilterCompiler
from ldapsync.directory.hooks import WriteHooks
from ldapsync.directory.passwords import HashParams, PasswordHasher
from ldapsync.directory.schema import AttributeType, Schema
from ldapsync.directory.writes import GROUP_ATTRS
from ldapsync.store import entries as store
from ldapsync.store.database import Database, StoreError, Txn
from ldapsync.store.entries import Attrs

if TYPE_CHECKING:
    from ldapsync.directory.monitor import Monitor      # type only: monitor.py imports this module


SUBSCHEMA_DN = "cn=Subschema"
HIDDEN_ATTRS = frozenset({"userPassword"})            # never returned to anyone, never in a filter
ADMIN_ONLY_ATTRS = pp.POLICY_ATTRS                     # password policy state: admins only
NON_ADMIN_HIDDEN = HIDDEN_ATTRS | ADMIN_ONLY_ATTRS     # what a non-admin can neither read nor filter on
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


log = Logger()
T = TypeVar("T")


@dataclass(frozen=True)
class Actor:
    """Who is asking: ``dn`` None means anonymous.

    ``is_admin`` is informational (bind sets it for the configured admin DN); access
    decisions never use it — rights are looked up per operation (:meth:`Directory._is_admin_txn`).
    """

    dn: DN | None = None
    is_admin: bool = False

    @property
    def dn_str(self) -> str:
        return str(self.dn) if self.dn is not None else ""


ANONYMOUS = Actor()


def hidden_attrs(admin: bool) -> frozenset[str]:
    """The attributes a requester may not read (nor match in a filter): one rule for both."""
    return HIDDEN_ATTRS if admin else NON_ADMIN_HIDDEN


def as_text(v: bytes | str) -> str:
    """A client's value as text (bytes decoded as UTF-8, undecodable bytes kept by surrogateescape)."""
    return v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v


class DirectoryCore:
    """Construction and the helpers every part of the directory uses (names, schema, index rows,
    admin rights, attribute conversion, the hash thread pool)."""

    monitor: Monitor        # set by Directory (the monitor reads through the whole facade)

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
        self.tag_norm = self.dn(tag_dn(self.suffix)).norm     # the provisioning tag (ldapsync.directory.binding)
        self._system_entries = {
            self.tag_norm: "the Microsoft 365 provisioning tag",
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

    async def transaction(self, desc: str, fn: Callable[..., T], *args: Any, write: bool = True) -> T:
        """``fn(txn, *args)`` in one database transaction.  A database failure (unreachable, locked
        too long) is answered here, by the rules, as LDAP ``unavailable`` with a message the client
        can act on; the details go to the log only (they may name the database host)."""
        try:
            return await self.db.run_interaction(desc, fn, *args, write=write)
        except StoreError as e:
            log.error("LDAP {desc} failed: {error}", desc=desc, error=str(e))
            raise LDAPError(ResultCode.unavailable, "the directory database is not available; try again") from None

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
        from twisted.internet import reactor   # not at the top: that would install a reactor before twistd picks one

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
        informational only, nor the actor's ``memberOf``, which a loaded file could forge)."""
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
            vals = [as_text(v) for v in values]
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
