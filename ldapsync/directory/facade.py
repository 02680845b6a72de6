"""The directory: LDAP operations as rules over the store (the facade joining its parts).

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

The work is split by responsibility; :class:`Directory` joins the parts and is the one name
callers use:

- ``ldapsync.directory.core``: construction, access constants, :class:`Actor`, shared helpers;
- ``ldapsync.directory.bootstrap``: the admin password file and the base tree;
- ``ldapsync.directory.authn``: binds and the password policy state;
- ``ldapsync.directory.password_changes``: quality/history checks, Password Modify, set_password;
- ``ldapsync.directory.reads``: search, compare, root DSE, subschema entry;
- ``ldapsync.directory.operations``: add, delete, modify, modify DN.

Each part is a base class of the next (core, authn, password_changes, reads, operations), so
every part sees the helpers of the ones before it, typed; bootstrap needs only the core.
"""

from __future__ import annotations

from collections.abc import Sequence

from ldapsync.config import Config
from ldapsync.directory.authn import BindOutcome
from ldapsync.directory.bootstrap import Bootstrap
from ldapsync.directory.core import (ADMIN_ONLY_ATTRS, ANONYMOUS, COMPUTED_OPERATIONAL, GROUP_CLASSES, HIDDEN_ATTRS,
                                     NON_ADMIN_HIDDEN, ONE_PASSWORD_MESSAGE, SUBSCHEMA_DN, SUPPORTED_CONTROLS,
                                     SUPPORTED_EXTENSIONS, Actor)
from ldapsync.directory.hooks import WriteHooks
from ldapsync.directory.monitor import Monitor
from ldapsync.directory.operations import Operations
from ldapsync.directory.policy import describe_policy
from ldapsync.directory.reads import SearchRequest, SearchResult
from ldapsync.directory.schema import Schema
from ldapsync.store.database import Database

__all__ = [
    "ADMIN_ONLY_ATTRS", "ANONYMOUS", "COMPUTED_OPERATIONAL", "GROUP_CLASSES", "HIDDEN_ATTRS", "NON_ADMIN_HIDDEN",
    "ONE_PASSWORD_MESSAGE", "SUBSCHEMA_DN", "SUPPORTED_CONTROLS", "SUPPORTED_EXTENSIONS", "Actor", "BindOutcome",
    "Directory", "SearchRequest", "SearchResult", "describe_policy",
]


class Directory(Bootstrap, Operations):
    """The directory: every LDAP operation, bind and bootstrap step, as one object."""

    def __init__(self, config: Config, db: Database, schema: Schema | None = None, *, hash_threads: int = 2,
                 hash_queue: int = 256, hooks: Sequence[WriteHooks] = ()) -> None:
        super().__init__(config, db, schema, hash_threads=hash_threads, hash_queue=hash_queue, hooks=hooks)
        self.monitor = Monitor(self)            # cn=Monitor, admins only (ldapsync.directory.monitor)
