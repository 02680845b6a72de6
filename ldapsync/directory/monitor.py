"""``cn=Monitor``: the server's own figures as virtual entries, for admins only.

Owns :class:`MonitorStats` (the counters the LDAP edge updates, one call per event)
and :class:`Monitor` (the ``cn=Monitor`` subtree the directory answers searches and
compares under).  Modelled on OpenLDAP's back-monitor, with its names and schema
(``schema/monitor.schema``), so what works against slapd's ``cn=Monitor`` works here::

    cn=Monitor                                   monitorServer: monitoredInfo = version
      cn=Connections                             monitorContainer
        cn=Total / cn=Current                    monitorCounterObject: monitorCounter
      cn=Operations                              monitorContainer: monitorOpInitiated/Completed (all)
        cn=Bind, Unbind, Search, Compare,        monitorOperation: monitorOpInitiated, monitorOpCompleted
        Modify, Modrdn, Add, Delete, Abandon, Extended
      cn=Time                                    monitorContainer
        cn=Start / cn=Current                    monitoredObject: monitorTimestamp
        cn=Uptime                                monitoredObject: monitoredInfo = seconds
      cn=Connector                               monitoredObject: monitoredInfo = o365ConnectorState (or off)
        cn=Queue                                 monitorCounterObject: changes waiting (ready + held)
          cn=Ready / cn=Held / cn=Error          monitorCounterObject: queued rows in that state
        cn=Users                                 monitorContainer
          cn=Pending / Synced / Error / Disabled monitorCounterObject: bound users by o365SyncState

As in slapd, the figures are operational attributes: ask for them (``'*' '+'``).

The counters are **this process's**: connections and operations served by the LDAP
listeners of the process that answers the search, counted since it started.  Should
several LDAP processes serve one database (issue 17), each shows its own counts; the
connector's summary is read from the database and is the same everywhere.

Access: the directory admin and members of the admins group (looked up in the search's
own transaction, as every right).  Anyone else gets noSuchObject for every DN under
``cn=Monitor``, as for an entry that does not exist, and no ``monitorContext`` in the
root DSE.  Subtree searches from the root never include the monitor (like slapd,
whose monitor is a database of its own, and like ``cn=Subschema``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import ldapsync
from ldapsync.directory.core import HIDDEN_ATTRS, SUBSCHEMA_DN
from ldapsync.directory.dn import DN
from ldapsync.directory.errors import LDAPError, ResultCode
from ldapsync.directory.policy import format_time
from ldapsync.directory.reads import SearchResult
from ldapsync.store import entries as store
from ldapsync.store.database import Txn
from ldapsync.store.entries import Attrs
from ldapsync.store.stats import queue_stats_txn, users_by_sync_state_txn

if TYPE_CHECKING:
    from ldapsync.directory.facade import Actor, Directory, SearchRequest

MONITOR_DN = "cn=Monitor"
T = TypeVar("T")

#: The LDAP request types (``ldapsync.ldap.ber`` class names) → slapd's operation entries.
OPERATIONS: dict[str, str] = {
    "BindRequest": "Bind",
    "UnbindRequest": "Unbind",
    "SearchRequest": "Search",
    "CompareRequest": "Compare",
    "ModifyRequest": "Modify",
    "ModifyDNRequest": "Modrdn",
    "AddRequest": "Add",
    "DelRequest": "Delete",
    "AbandonRequest": "Abandon",
    "ExtendedRequest": "Extended",
}
USER_STATES = ("pending", "synced", "error", "disabled")
QUEUE_STATES = ("ready", "held", "error")


@dataclass
class MonitorStats:
    """What this process's LDAP listeners counted since it started (one call per event)."""

    started: float = field(default_factory=time.time)
    current: int = 0
    total: int = 0
    initiated: dict[str, int] = field(default_factory=dict)
    completed: dict[str, int] = field(default_factory=dict)

    def opened(self) -> None:
        self.current += 1
        self.total += 1

    def closed(self) -> None:
        self.current -= 1

    def op_started(self, request: str) -> None:
        name = OPERATIONS.get(request)
        if name is not None:
            self.initiated[name] = self.initiated.get(name, 0) + 1
            if name in ("Unbind", "Abandon"):       # no response: done once read
                self.completed[name] = self.completed.get(name, 0) + 1

    def op_done(self, request: str) -> None:
        name = OPERATIONS.get(request)
        if name is not None:
            self.completed[name] = self.completed.get(name, 0) + 1

    def op_finished(self, result: T, request: str) -> T:
        """:meth:`op_done` as a Deferred callback (passes ``result`` on)."""
        self.op_done(request)
        return result


#: The process's counters (process-local by design; see the module docstring).
STATS = MonitorStats()


@dataclass(frozen=True)
class ConnectorSummary:
    state: str
    queue_rows: dict[str, int]
    users: dict[str, int]


def _below(dn: DN, base: DN) -> bool:
    """Is ``dn`` a descendant of ``base`` (by RDNs, not by text)?"""
    cur = dn.parent
    while cur is not None and not cur.is_root:
        if cur.norm == base.norm:
            return True
        cur = cur.parent
    return False


def _counter(cn: str, n: int) -> Attrs:
    return {"objectClass": ["monitorCounterObject"], "cn": [cn], "monitorCounter": [str(n)]}


class Monitor:
    """The ``cn=Monitor`` subtree of one directory, built afresh for each operation."""

    def __init__(self, directory: "Directory", stats: MonitorStats = STATS) -> None:
        self.directory = directory
        self.stats = stats
        self.base = directory.dn(MONITOR_DN)
        self.connector_dn = directory.dn(f"cn=office365,ou=directories,{directory.suffix}")

    def holds(self, dn: DN) -> bool:
        """Is ``dn`` ``cn=Monitor`` or below it?"""
        return dn.norm == self.base.norm or _below(dn, self.base)

    # -- access --------------------------------------------------------------------
    def _read_txn(self, txn: Txn, actor: "Actor") -> ConnectorSummary | None:
        """The connector's summary when ``actor`` is an admin now, else None."""
        if not self.directory._is_admin_txn(txn, actor):
            return None
        e = store.get_entry_txn(txn, self.connector_dn.norm)
        state = next(iter(e.attrs.get("o365ConnectorState") or ()), "off") if e is not None else "off"
        return ConnectorSummary(state, queue_stats_txn(txn).rows_by_state, users_by_sync_state_txn(txn))

    async def _summary(self, actor: "Actor") -> ConnectorSummary | None:
        if actor.dn is None:
            return None
        return await self.directory.transaction("monitor", self._read_txn, actor, write=False)

    async def root_dse(self, actor: "Actor", attrs: Attrs) -> Attrs:
        """The root DSE, with ``monitorContext`` for admins (as slapd lists it)."""
        if actor.dn is None:
            return attrs
        admin = await self.directory.transaction(
            "monitor", lambda txn: self.directory._is_admin_txn(txn, actor), write=False)
        return {**attrs, "monitorContext": [MONITOR_DN]} if admin else attrs

    def _no_such(self, dn: DN) -> LDAPError:
        return LDAPError(ResultCode.noSuchObject, f'no entry "{dn}"')

    # -- the tree --------------------------------------------------------------------
    def entries(self, summary: ConnectorSummary, now: float | None = None) -> list[tuple[str, Attrs]]:
        """Every entry of the subtree, parents before children, DNs as slapd spells them."""
        s = self.stats
        now = time.time() if now is None else now
        out: list[tuple[str, Attrs]] = []

        def add(rdn: str, attrs: Attrs, parent: str = MONITOR_DN) -> str:
            dn = f"{rdn},{parent}" if rdn else MONITOR_DN
            out.append((dn, attrs))
            return dn

        add("", {"objectClass": ["monitorServer"], "cn": ["Monitor"],
                 "description": ["This subtree contains monitoring/managing objects.",
                                 "Most of the information is held in operational attributes, "
                                 "which must be explicitly requested."],
                 "monitoredInfo": [f"ldapsync {ldapsync.__version__}"]})
        conns = add("cn=Connections", {"objectClass": ["monitorContainer"], "cn": ["Connections"],
                                       "description": ["Connections to this process's LDAP listeners."]})
        add("cn=Total", _counter("Total", s.total), conns)
        add("cn=Current", _counter("Current", s.current), conns)
        ops = add("cn=Operations", {
            "objectClass": ["monitorContainer"], "cn": ["Operations"],
            "description": ["Operations requested of this process, by type."],
            "monitorOpInitiated": [str(sum(s.initiated.values()))],
            "monitorOpCompleted": [str(sum(s.completed.values()))]})
        for name in OPERATIONS.values():
            add(f"cn={name}", {"objectClass": ["monitorOperation"], "cn": [name],
                               "monitorOpInitiated": [str(s.initiated.get(name, 0))],
                               "monitorOpCompleted": [str(s.completed.get(name, 0))]}, ops)
        tm = add("cn=Time", {"objectClass": ["monitorContainer"], "cn": ["Time"],
                             "description": ["This process's start time, the current time and the uptime."]})
        add("cn=Start", {"objectClass": ["monitoredObject"], "cn": ["Start"], "monitorTimestamp": [format_time(s.started)]}, tm)
        add("cn=Current", {"objectClass": ["monitoredObject"], "cn": ["Current"], "monitorTimestamp": [format_time(now)]}, tm)
        add("cn=Uptime", {"objectClass": ["monitoredObject"], "cn": ["Uptime"],
                          "monitoredInfo": [str(int(max(0.0, now - s.started)))]}, tm)
        con = add("cn=Connector", {"objectClass": ["monitoredObject"], "cn": ["Connector"],
                                   "description": ["The Microsoft 365 connector: its state (monitoredInfo), "
                                                   "its queue and the bound users by sync state."],
                                   "monitoredInfo": [summary.state]})
        q = summary.queue_rows
        queue = add("cn=Queue", {**_counter("Queue", q.get("ready", 0) + q.get("held", 0)),
                                 "description": ["Changes waiting for delivery (ready and held)."]}, con)
        for state in QUEUE_STATES:
            add(f"cn={state.capitalize()}", _counter(state.capitalize(), q.get(state, 0)), queue)
        users = add("cn=Users", {"objectClass": ["monitorContainer"], "cn": ["Users"],
                                 "description": ["Users bound to Microsoft 365, by o365SyncState."]}, con)
        for state in sorted({*USER_STATES, *summary.users}):
            add(f"cn={state.capitalize()}", _counter(state.capitalize(), summary.users.get(state, 0)), users)
        return out

    async def search(self, actor: "Actor", base: DN, req: "SearchRequest") -> "SearchResult":
        """Answer a search whose base is under ``cn=Monitor`` (noSuchObject for non-admins)."""
        summary = await self._summary(actor)
        if summary is None:
            raise self._no_such(base)
        d = self.directory
        tree = [(d.dn(dn), dn, attrs) for dn, attrs in self.entries(summary)]
        if all(dn.norm != base.norm for dn, _, _ in tree):
            matched = max((dn for dn, _, _ in tree if _below(base, dn)), key=lambda x: len(x.norm))
            raise LDAPError(ResultCode.noSuchObject, f'no entry "{base}"', matched_dn=str(matched))
        parents = {dn.parent.norm for dn, _, _ in tree if dn.parent is not None}
        pred, _ = d.filters.compile(req.filter, HIDDEN_ATTRS)
        out = SearchResult()
        for dn, text, attrs in tree:
            below = _below(dn, base)
            if not {"base": dn.norm == base.norm, "one": dn.parent is not None and dn.parent.norm == base.norm,
                    "sub": dn.norm == base.norm or below, "children": below}[req.scope]:
                continue
            if pred(attrs) is not True:
                continue

            def extra(name: str, text: str = text, kids: bool = dn.norm in parents) -> list[str] | None:
                return {"entryDN": [text], "subschemaSubentry": [SUBSCHEMA_DN],
                        "hasSubordinates": ["TRUE" if kids else "FALSE"]}.get(name)

            if req.size_limit and len(out.entries) >= req.size_limit:
                out.code = ResultCode.sizeLimitExceeded
                out.message = f"size limit of {req.size_limit} entries exceeded"
                break
            out.entries.append((text, d._select(attrs, req.attributes, HIDDEN_ATTRS, req.types_only, extra)))
        return out

    async def compare(self, actor: "Actor", dn: DN, name: str, equal: Callable[[list[str]], bool]) -> bool:
        """Answer a compare of an entry under ``cn=Monitor`` (noSuchObject for non-admins)."""
        summary = await self._summary(actor)
        if summary is None:
            raise self._no_such(dn)
        for text, attrs in self.entries(summary):
            if self.directory.dn(text).norm == dn.norm:
                values = [text] if name == "entryDN" else attrs.get(name)
                if not values:
                    raise LDAPError(ResultCode.noSuchAttribute, f"{dn} has no {name}")
                return equal(values)
        raise self._no_such(dn)
