"""Microsoft 365 → directory: ``ldapsync o365 import`` (README: "Importing the users Microsoft 365 already has").

Pages through the tenant's users (``$top=999``, ``$select`` of only what is
needed) and decides for each whether it can be imported (:func:`plan_user`, no
database) and whether it collides with the directory (:func:`collision_txn`).
An imported user becomes ``uid=<uid>,ou=people,<suffix>`` (inetOrgPerson +
ldapsyncUser) with its Graph object id in ``o365ObjectId``; it has no password
(inactive) and is not bound, so the outbox planner queues nothing for it.

Users are written ``BATCH`` at a time, each batch one transaction that
re-checks the collisions (with the directory and among the batch), so an
interrupted run leaves nothing half-created (a user is either wholly in or not
at all) and can simply be repeated: a user imported before carries its
``o365ObjectId`` and is reported as already imported.  If a batch fails, its
users are written again one per transaction, so one bad user fails alone.
Users are processed one page at a time; memory does not grow with the tenant
size (``--list``/``--dry-run`` remember the names they planned in a temporary
SQLite database that spills to disk, not in Python sets).
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
import unicodedata
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, TextIO

from ldapsync.clock import Timer
from ldapsync.directory.errors import LDAPError, ResultCode
from ldapsync.directory.hooks import Origin
from ldapsync.directory.writes import Write
from ldapsync.jsontypes import JSONObject
from ldapsync.store import entries as store
from ldapsync.store.database import Txn
from ldapsync.store.tables import INDEX_VALUE_MAX
from ldapsync.graph.errors import NotFound

if TYPE_CHECKING:
    from ldapsync.graph.client import GraphClient
    from ldapsync.directory.facade import Directory

PAGE_SIZE = 999
BATCH = 100          # users per write transaction (~50 ms of SQLite write lock)
SELECT = ("id", "userPrincipalName", "displayName", "givenName", "surname", "mail", "mailNickname", "userType")
OPERATION = "o365-import"

# skip reasons (keys of the summary) → label
GUEST = "guest"
UNVERIFIED = "no mail or UPN on a verified domain"
NO_UID = "no usable username"
REGISTERED = "already registered"
IMPORTED = "already imported"
NOT_FOUND = "not found in Microsoft 365"

_ALLOWED = re.compile(r"[^a-z0-9._-]")


def normalize_uid(text: str | None) -> str:
    """``Zoë O'Brien+x`` → ``zoe.obrienx``: lowercase, accents removed, whitespace → ``.``,
    only ``[a-z0-9._-]`` kept; no leading/trailing or doubled separators."""
    if not text:
        return ""
    s = unicodedata.normalize("NFKD", text)
    s = "".join(c for c in s if not unicodedata.combining(c)).lower()
    s = re.sub(r"\s+", ".", s.strip())
    s = _ALLOWED.sub("", s)
    s = re.sub(r"([._-])[._-]+", r"\1", s)
    return s.strip("._-")


def _local(addr: str | None) -> str:
    return (addr or "").rpartition("@")[0] if addr and "@" in addr else ""


def _domain(addr: str | None) -> str:
    return addr.rpartition("@")[2].lower() if addr and "@" in addr else ""


@dataclass
class Plan:
    """What would happen to one Microsoft 365 user."""
    object_id: str
    upn: str
    display_name: str
    uid: str
    mail: str
    attrs: dict[str, list[str]] | None = None   # set when importable
    reason: str | None = None                  # skip reason key (None: importable)
    detail: str = ""                           # human text for the reason
    dn: str = ""

    @property
    def importable(self) -> bool:
        return self.reason is None

    def skip(self, reason: str, detail: str = "") -> Plan:
        self.reason = reason
        self.detail = detail or reason
        self.attrs = None
        return self

    def as_json(self, status: str | None = None) -> JSONObject:
        return {"id": self.object_id, "userPrincipalName": self.upn, "displayName": self.display_name,
                "uid": self.uid, "mail": self.mail, "dn": self.dn,
                "status": status or ("importable" if self.importable else "skipped"),
                "reason": self.reason, "detail": self.detail if self.reason or status == "failed" else ""}


def plan_user(d: Directory, user: JSONObject, verified: set[str], *, include_guests: bool = False) -> Plan:
    """Decide from the Graph user alone (no database): uid, mail, attributes, or a skip reason."""
    upn = user.get("userPrincipalName") or ""
    display = (user.get("displayName") or "").strip()
    nick = user.get("mailNickname") or ""
    raw_mail = user.get("mail") or ""
    uid = normalize_uid(nick) or normalize_uid(_local(raw_mail)) or normalize_uid(_local(upn))
    if _domain(raw_mail) in verified:
        mail = raw_mail
    elif _domain(upn) in verified:
        mail = upn
    else:
        mail = raw_mail or upn
    p = Plan(str(user.get("id") or ""), upn, display, uid, mail)
    if not include_guests and (user.get("userType") or "").lower() == "guest":
        return p.skip(GUEST, "guest account (use --include-guests)")
    if _domain(mail) not in verified:
        doms = sorted({x for x in (_domain(raw_mail), _domain(upn)) if x})
        return p.skip(UNVERIFIED, f"no mail or UPN on a verified domain ({', '.join(doms) or 'none'})")
    if not uid:
        return p.skip(NO_UID, "no alias, mail or UPN gives a usable username")
    p.dn = f"uid={uid},ou=people,{d.suffix}"
    given = (user.get("givenName") or "").strip()
    surname = (user.get("surname") or "").strip()
    sn = surname or (display.split()[-1] if display.split() else "") or uid
    cn = display or " ".join(x for x in (given, surname) if x) or uid
    attrs: dict[str, list[str]] = {"objectClass": ["top", "inetOrgPerson", "ldapsyncUser"], "uid": [uid],
                                   "cn": [cn], "sn": [sn], "mail": [mail]}
    if display:
        attrs["displayName"] = [display]
    if given:
        attrs["givenName"] = [given]
    try:
        attrs["structuralObjectClass"] = [d.schema.check_entry(attrs)]
        d.dn(p.dn)
    except LDAPError as e:
        return p.skip(NO_UID, f"cannot make an entry: {e.message or e.code.name}")
    attrs["o365ObjectId"] = [p.object_id]
    p.attrs = attrs
    return p


def _norm(d: Directory, attr: str, value: str) -> str:
    return d.schema.normalize(d.attribute(attr), value)


def collision_txn(d: Directory, txn: Txn, p: Plan) -> None:
    """Mark ``p`` skipped if the directory already has it (same object id) or its uid/mail/DN."""
    if not p.importable:
        return
    if p.object_id:
        for e in store.entries_with_value_txn(txn, "o365objectid", _norm(d, "o365ObjectId", p.object_id)):
            p.skip(IMPORTED, f"already imported: {e.dn}")
            return
    for attr, value in (("uid", p.uid), ("mail", p.mail)):
        for e in store.entries_with_value_txn(txn, attr, _norm(d, attr, value)):
            p.skip(REGISTERED, f"already registered: {e.dn} (same {attr})")
            return
    found = store.get_entry_txn(txn, d.dn(p.dn).norm)
    if found is not None:
        p.skip(REGISTERED, f"already registered: {found.dn}")


def check_page_txn(d: Directory, txn: Txn, plans: Iterable[Plan]) -> None:
    """:func:`collision_txn` for a page, asking per user only about those a batch query flags."""
    plans = list(plans)
    for i in sorted(maybe_taken_txn(d, txn, plans)):
        collision_txn(d, txn, plans[i])


def maybe_taken_txn(d: Directory, txn: Txn, plans: list[Plan]) -> set[int]:
    """Indexes of the importable ``plans`` whose object id, uid, mail or DN may already be in the
    directory: one query per attribute for the whole batch (a round trip per user and attribute
    is what PostgreSQL pays for); only these need :func:`collision_txn`."""
    cand = [(i, p) for i, p in enumerate(plans) if p.importable]
    hit: set[int] = set()
    for attr, name, value_of in (("o365objectid", "o365ObjectId", lambda p: p.object_id),
                                 ("uid", "uid", lambda p: p.uid), ("mail", "mail", lambda p: p.mail)):
        by_value: dict[str, list[int]] = {}
        for i, p in cand:
            if value_of(p):
                by_value.setdefault(_norm(d, name, value_of(p))[:INDEX_VALUE_MAX], []).append(i)
        if by_value:
            marks = ",".join("?" * len(by_value))
            for (value,) in txn.rows(f"SELECT value FROM entry_index WHERE attr = ? AND value IN ({marks})",
                                     (attr, *by_value)):
                hit.update(by_value.get(value, ()))
    norms = {i: d.dn(p.dn).norm for i, p in cand}
    found = store.get_entries_txn(txn, norms.values())
    hit.update(i for i, n in norms.items() if n in found)
    return hit


def import_batch_txn(d: Directory, txn: Txn, plans: Iterable[Plan], actor_dn: str) -> list[Plan]:
    """Create the importable ones of ``plans`` in this one transaction, re-checking the
    collisions with the directory and among ``plans``.  Returns copies carrying the outcome; the
    originals are left untouched, so after a failed (rolled back) batch the caller can write
    them again one by one."""
    out = [replace(p) for p in plans]
    w = Write(d, txn, actor_dn, OPERATION, Origin.IMPORT)
    taken: dict[tuple[str, str], str] = {}      # (attr, normalized value) → DN made in this batch
    maybe = maybe_taken_txn(d, txn, out)
    for i, p in enumerate(out):
        if i in maybe:
            collision_txn(d, txn, p)
        if not p.importable:
            continue
        keys = (("uid", _norm(d, "uid", p.uid)), ("mail", _norm(d, "mail", p.mail)))
        other = next(((k[0], taken[k]) for k in keys if k in taken), None)
        if other is not None:
            p.skip(REGISTERED, f"already registered: {other[1]} (same {other[0]})")
            continue
        assert p.attrs is not None
        dn = d.dn(p.dn)
        parent = w.get(dn.parent) if dn.parent is not None else None
        if parent is None:
            raise LDAPError(ResultCode.noSuchObject, f"{dn.parent} does not exist (run `ldapsync init`)")
        w.create(dn, {k: list(v) for k, v in p.attrs.items()}, parent)
        for k in keys:
            taken[k] = p.dn
    w.finish()
    return out


class PlannedNames:
    """uids and mails planned so far by ``--list``/``--dry-run`` (which write nothing, so two
    tenant users giving the same uid or mail are caught here instead of by the database).

    A private temporary SQLite database (``sqlite3.connect("")``): its pages stay in a small
    cache and spill to a file deleted on close, so memory stays flat however large the tenant
    (Python sets cost ~100 bytes per user)."""
    def __init__(self, cache_kib: int = 2048) -> None:
        self.db = sqlite3.connect("")
        self.db.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        for table in ("uid", "mail"):
            self.db.execute(f"CREATE TABLE {table} (v TEXT PRIMARY KEY) WITHOUT ROWID")

    def add(self, uid: str, mail: str) -> bool:
        """Remember ``uid`` and ``mail``; False (and nothing remembered) if either was planned before."""
        ex = self.db.execute
        if ex("SELECT 1 FROM uid WHERE v = ?", (uid,)).fetchone() or \
                ex("SELECT 1 FROM mail WHERE v = ?", (mail,)).fetchone():
            return False
        ex("INSERT INTO uid VALUES (?)", (uid,))
        ex("INSERT INTO mail VALUES (?)", (mail,))
        return True

    def commit(self) -> None:
        self.db.commit()

    def close(self) -> None:
        self.db.close()


def import_user_txn(d: Directory, txn: Txn, p: Plan, actor_dn: str) -> Plan:
    """Create one entry (re-checking the collisions inside this transaction)."""
    collision_txn(d, txn, p)
    if not p.importable:
        return p
    assert p.attrs is not None
    w = Write(d, txn, actor_dn, OPERATION, Origin.IMPORT)
    dn = d.dn(p.dn)
    parent = w.get(dn.parent) if dn.parent is not None else None
    if parent is None:
        raise LDAPError(ResultCode.noSuchObject, f"{dn.parent} does not exist (run `ldapsync init`)")
    w.create(dn, {k: list(v) for k, v in p.attrs.items()}, parent)
    w.finish()
    return p


@dataclass
class Summary:
    imported: int = 0
    importable: int = 0              # dry-run / list: would be imported
    skipped: dict[str, int] = field(default_factory=dict)
    failed: int = 0
    seen: int = 0

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def as_json(self) -> JSONObject:
        return {"seen": self.seen, "imported": self.imported, "importable": self.importable,
                "skipped": dict(self.skipped), "failed": self.failed}


async def chunks(items: AsyncIterator[JSONObject], size: int = PAGE_SIZE) -> AsyncIterator[list[JSONObject]]:
    chunk: list[JSONObject] = []
    async for it in items:
        chunk.append(it)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def tenant_users(client: GraphClient, *, upns: list[str] | None = None, filter: str | None = None
                       ) -> AsyncIterator[JSONObject]:
    """The selected users: the ``upns`` given (``{"@notFound": upn}`` for a missing one), else
    every user matching ``filter`` (paged, ``$top=999``)."""
    if upns:
        for upn in upns:
            try:
                yield await client.get_user(upn, SELECT, expect_not_found=True)
            except NotFound:
                yield {"@notFound": upn}
        return
    async for u in client.list_users(SELECT, top=PAGE_SIZE, filter=filter):
        yield u


# -- the command -------------------------------------------------------------------------

class Reporter:
    """Table / JSON lines on stdout; a one-line progress on a terminal (stderr), plain lines otherwise."""

    TTY_INTERVAL = 0.25      # s between progress updates on a terminal …
    PLAIN_INTERVAL = 10.0    # … and between progress lines in a log

    def __init__(self, out: TextIO, err: TextIO, *, json_lines: bool, listing: bool, tty: bool | None = None,
                 monotonic: Timer = time.monotonic) -> None:
        self.out, self.err = out, err
        self.json = json_lines
        self.listing = listing
        self.tty = err.isatty() if tty is None else tty
        self.monotonic = monotonic
        self.started = monotonic()
        self._last_progress: float | None = None
        self._header = False
        self._progress_shown = False

    def _clear(self) -> None:
        if self._progress_shown:
            self.err.write("\r\033[K")
            self._progress_shown = False

    def row(self, p: Plan, status: str) -> None:
        if self.json:
            self.out.write(json.dumps(p.as_json(status)) + "\n")
            return
        if self.listing:
            if not self._header:
                self.out.write(f"{'UPN':<40} {'DISPLAY NAME':<28} {'USERNAME':<22} STATUS\n")
                self._header = True
            what = "importable" if p.importable else p.detail
            self.out.write(f"{p.upn[:40]:<40} {p.display_name[:28]:<28} {p.uid[:22]:<22} {what}\n")
            return
        if status == "imported" and self.tty:
            return   # counted in the progress line
        if status in ("imported", "would import"):
            line = f"{status}: {p.upn} → {p.dn}"
        elif status == "failed":
            line = f"failed: {p.upn}: {p.detail}"
        else:
            line = f"skipped: {p.upn or p.object_id}: {p.detail}"
        self._clear()
        self.out.write(line + "\n")
        self.out.flush()

    def progress(self, s: Summary, final: bool = False) -> None:
        """Called after every batch; shown at most every ``TTY_INTERVAL`` (terminal) or
        ``PLAIN_INTERVAL`` (log) seconds, and always for ``final`` on a terminal."""
        if self.json or self.listing:
            return
        now = self.monotonic()
        interval = self.TTY_INTERVAL if self.tty else self.PLAIN_INTERVAL
        if not final and self._last_progress is not None and now - self._last_progress < interval:
            return
        self._last_progress = now
        rate = s.seen / max(now - self.started, 1e-6)
        text = (f"{s.seen} users: {s.imported} imported, {s.n_skipped} skipped, {s.failed} failed "
                f"({rate:.0f} users/s)")
        if self.tty:
            self.err.write("\r\033[K" + text)
            self._progress_shown = True
            if final:
                self.err.write("\n")
                self._progress_shown = False
        elif not final:
            self.err.write(text + "\n")
        self.err.flush()

    def summary(self, s: Summary, *, dry_run: bool, listing: bool) -> None:
        if self.json:
            self.out.write(json.dumps({"summary": s.as_json()}) + "\n")
            return
        self._clear()
        done = (f"{s.importable} importable" if listing else
                f"{s.importable} would be imported (dry run)" if dry_run else f"{s.imported} imported")
        skipped = ", ".join(f"{n} {r}" for r, n in sorted(s.skipped.items())) or "none"
        self.out.write(f"{s.seen} Microsoft 365 user(s): {done}; skipped: {skipped}; failed: {s.failed}\n")


async def run_import(d: Directory, client: GraphClient, *, verified: set[str], actor_dn: str, reporter: Reporter,
                     upns: list[str] | None = None, filter: str | None = None, dry_run: bool = False,
                     listing: bool = False, include_guests: bool = False, batch: int = BATCH) -> Summary:
    """List or import the selected users page by page; returns the counts."""
    s = Summary()
    verified = {v.lower() for v in verified}
    planned = PlannedNames() if (dry_run or listing) else None

    def report(p: Plan, failed: bool = False) -> None:
        s.seen += 1
        if failed:
            s.failed += 1
            reporter.row(p, "failed")
        elif not p.importable:
            assert p.reason is not None
            s.skip(p.reason)
            reporter.row(p, "skipped")
        elif planned is not None:
            s.importable += 1
            reporter.row(p, "importable" if listing else "would import")
        else:
            s.imported += 1
            reporter.row(p, "imported")

    async def write_one(p: Plan) -> None:
        try:
            await d.db.run_interaction("o365 import", lambda txn: import_user_txn(d, txn, p, actor_dn))
        except LDAPError as e:
            p.detail = f"{e.message or e.code.name} ({e.code.name})"
            report(p, failed=True)
            return
        report(p)     # imported, or skipped: lost a race with another writer since the page check

    try:
        async for page in chunks(tenant_users(client, upns=upns, filter=filter)):
            plans: list[Plan] = []
            for u in page:
                if "@notFound" in u:
                    report(Plan("", u["@notFound"], "", "", "").skip(NOT_FOUND), failed=True)
                    continue
                plans.append(plan_user(d, u, verified, include_guests=include_guests))
            await d.db.run_interaction("o365 import check", lambda txn, plans=plans: check_page_txn(d, txn, plans),
                                       write=False)
            if planned is not None:
                for p in plans:
                    if p.importable and not planned.add(_norm(d, "uid", p.uid), _norm(d, "mail", p.mail)):
                        p.skip(REGISTERED, f"already registered: another Microsoft 365 user in this run has "
                                           f"uid {p.uid} or mail {p.mail}")
                    report(p)
                planned.commit()
                reporter.progress(s)
                continue
            for i in range(0, len(plans), max(1, batch)):
                part = plans[i:i + max(1, batch)]
                if not any(p.importable for p in part):
                    done: list[Plan] | None = part
                else:
                    try:
                        done = await d.db.run_interaction(
                            "o365 import", lambda txn, part=part: import_batch_txn(d, txn, part, actor_dn))
                    except LDAPError:
                        done = None        # rolled back: write them one by one, so only the bad one fails
                if done is None:
                    for p in part:
                        if p.importable:
                            await write_one(p)
                        else:
                            report(p)
                else:
                    for p in done:
                        report(p)
                reporter.progress(s)
    finally:
        if planned is not None:
            planned.close()
    reporter.progress(s, final=True)
    reporter.summary(s, dry_run=dry_run, listing=listing)
    return s
