"""``ldapsync`` admin commands: init, ldif load/dump (like slapadd/slapcat).

They work while the server runs (they share its database); what they change
goes through the same schema checks and change hooks as an LDAP write
(``ldapsync.directory.writes.Write``), one transaction per batch of entries.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from ldapsync import __version__
from ldapsync.config import Config, ConfigError, load_config
from ldapsync.directory.errors import LDAPError, ResultCode
from ldapsync.ldif import LDIFError, format_header, format_record, parse_ldif

LOAD_BATCH = 1000
COMPUTED = {"entryDN", "hasSubordinates", "subschemaSubentry"}


class CLIError(Exception):
    pass


TIME_FORMAT = "%Y-%m-%d %H:%M UTC"      # every time the CLI prints, e.g. 2026-12-07 14:03 UTC


def show_time(value: datetime | float | str) -> str:
    """A time in the CLI's one format: a datetime, a Unix time or an LDAP GeneralizedTime
    (``20261207140300Z``); a string that is none of them is shown as it is."""
    if isinstance(value, str):
        try:
            value = datetime.strptime(value[:14], "%Y%m%d%H%M%S").replace(tzinfo=timezone.utc)
        except ValueError:
            return value
    elif not isinstance(value, datetime):
        value = datetime.fromtimestamp(value, timezone.utc)
    return value.astimezone(timezone.utc).strftime(TIME_FORMAT)


def _database_missing(config: Config) -> str | None:
    """Why the CLI must not open the database (it would create an empty one), else None.

    The CLI looks for its config and database exactly as the server does (``--config``,
    $LDAPSYNC_CONFIG, ./ldapsync.toml, else the embedded defaults; a relative SQLite path is
    relative to the current directory).  Only ``ldapsync init`` creates a database: a backup job
    run from the wrong directory must fail, not dump an empty database it has just created."""
    from ldapsync.filemodes import sqlite_path
    from ldapsync.store.database import Database, display_url

    url = config.directory.database
    looked = f'database = "{display_url(url)}" from {config.source}'
    path = sqlite_path(url)
    if path is not None:
        if not Path(path).is_file():
            return f"no database at {Path(path).absolute()} ({looked}); create it with `ldapsync init`"
    db = Database(url, durability=config.directory.durability)
    try:
        present = db.has_schema()
    except Exception as e:  # noqa: BLE001 - unreachable server, bad credentials: one line, no traceback
        return f"cannot open the database {display_url(url)} (from {config.source}): {_first_line(e)}"
    finally:
        db.stop()
    if not present:
        return f"the database {display_url(url)} holds no ldapsync tables (from {config.source}); create them with `ldapsync init`"
    return None


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__


def _open_directory(config: Config, *, create: bool = False):  # type: ignore[no-untyped-def]
    """The directory on the config's database, with the connector's write hooks when enabled;
    refuses (CLIError) a database that does not exist yet unless ``create`` (``ldapsync init``)."""
    from ldapsync.directory.hooks import WriteHooks
    from ldapsync.directory.service import Directory
    from ldapsync.services import office365_hooks
    from ldapsync.store.database import Database
    from ldapsync.tap import _sqlite_dir

    if not create:
        missing = _database_missing(config)
        if missing:
            raise CLIError(missing)
    for line in _sqlite_dir(config):
        print(f"ldapsync: warning: {line}", file=sys.stderr)
    db = Database(config.directory.database, durability=config.directory.durability)
    hooks: list[WriteHooks] = []
    d = Directory(config, db, hooks=hooks)
    if config.office365.enabled:
        # CLI writes go through the same write hooks as LDAP writes: the outbox planner, and an
        # activation link for a user bound without a password (mailed by the server's poll).
        hooks.extend(office365_hooks(d))
    return d


def cmd_init(config: Config, args: argparse.Namespace) -> int:
    from ldapsync.store.database import display_url

    d = _open_directory(config, create=True)
    try:
        if args.empty:       # the tables only: what `ldif load` of a full dump goes into
            d.db.create_schema()
            lines = ["the tables are in place; no entry was added (load a dump with `ldapsync ldif load FILE`)"]
        else:
            lines = d.bootstrap_sync()
    finally:
        d.db.stop()
    for line in lines:
        print(line)
    if not lines:
        print(f"nothing to do: {d.suffix} and {d.admin_dn} exist")

    print(f"database: {display_url(config.directory.database)}")
    print(f"admin DN: {config.admin_dn} (password in {config.admin.password_file})")
    return 0


def _prepare_loaded(d, dn_text: str, raw: list[tuple[str, bytes]], lineno: int):  # type: ignore[no-untyped-def]
    """Record → (DN, attrs) with slapadd's rules: operational attributes are kept as given."""
    dn = d.dn(dn_text)
    grouped: dict[str, list[bytes]] = {}
    for desc, value in raw:
        grouped.setdefault(desc, []).append(value)
    attrs = d.convert_attrs(grouped.items(), for_add=True)
    for a, v in dn.rdns[0].avas if dn.rdns else ():
        at = d.attribute(a)
        vals = attrs.setdefault(at.name, [])
        if not any(d.schema.normalize(at, x) == d.schema.normalize(at, v) for x in vals):
            vals.append(v)
    # Like slapadd, operational values in the file are kept as given, except memberOf:
    # it is recomputed from the groups' member values (a forged one would grant a
    # group's rights or bind the user to Microsoft 365), so a dump still loads back unchanged.
    for name in COMPUTED:
        attrs.pop(name, None)
    attrs.pop("memberOf", None)
    if len(attrs.get("userPassword", ())) > 1:
        raise LDAPError(ResultCode.constraintViolation,
                        f'line {lineno}: "{dn}" has {len(attrs["userPassword"])} userPassword values; an entry holds one')
    structural = d.schema.check_entry(attrs)
    attrs.setdefault("structuralObjectClass", [structural])
    return dn, attrs


def _check_uuid_unique(d, txn, seen: dict[str, tuple[int, object]], lineno: int, dn, attrs) -> None:  # type: ignore[no-untyped-def]
    """entryUUID is unique (outbox, links and Microsoft 365 status key on it): a loaded entry may
    not take one already stored or given earlier in this batch.  The database's unique index
    (migration 0005) is the backstop; this names the line."""
    from ldapsync.store import entries as store

    for value in attrs.get("entryUUID", ()):
        norm = d.schema.normalize(d.attribute("entryUUID"), value)
        other = seen.get(norm)
        if other is not None:
            raise LDAPError(ResultCode.constraintViolation,
                            f'line {lineno}: entryUUID {value} of "{dn}" is already used by "{other[1]}" (line {other[0]})')
        taken = store.entries_with_value_txn(txn, "entryuuid", norm)
        if taken:
            raise LDAPError(ResultCode.constraintViolation,
                            f'line {lineno}: entryUUID {value} of "{dn}" is already used by "{taken[0].dn}"')
        seen[norm] = (lineno, dn)


def cmd_ldif_load(config: Config, args: argparse.Namespace) -> int:
    from ldapsync.directory.hooks import Origin
    from ldapsync.directory.writes import Write

    try:
        stream: BinaryIO = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")
    except OSError as e:
        raise CLIError(f"{args.file}: {e.strerror}") from None
    try:
        d = _open_directory(config)
        d.db.create_schema()
    except BaseException:
        if stream is not sys.stdin.buffer:
            stream.close()
        raise
    loaded = skipped = 0
    started = time.monotonic()
    batch: list[tuple[int, object, dict[str, list[str]]]] = []
    progress = sys.stderr.isatty()

    def flush() -> None:
        nonlocal loaded, skipped
        if not batch:
            return

        def run(txn):  # type: ignore[no-untyped-def]
            n_loaded = n_skipped = 0
            w = Write(d, txn, config.admin_dn, "load", Origin.CLI)
            uuids: dict[str, tuple[int, object]] = {}
            for lineno, dn, attrs in batch:
                if w.exists(dn):
                    if args.skip_existing:
                        n_skipped += 1
                        continue
                    raise LDAPError(ResultCode.entryAlreadyExists, f'line {lineno}: entry "{dn}" already exists (use --skip-existing to skip it)')
                _check_uuid_unique(d, txn, uuids, lineno, dn, attrs)
                parent = None
                if dn.norm != d.suffix.norm:
                    parent = w.get(dn.parent)
                    if parent is None:
                        raise LDAPError(ResultCode.noSuchObject, f'line {lineno}: the parent of "{dn}" does not exist; parents must come before their children')
                w.create(dn, attrs, parent, preserve=True)  # keeps the timestamps a dump carried
                n_loaded += 1
            w.finish()
            return n_loaded, n_skipped

        n_l, n_s = d.db.run_sync("ldif load", run)
        loaded += n_l
        skipped += n_s
        batch.clear()
        if progress:
            rate = loaded / max(time.monotonic() - started, 1e-6)
            sys.stderr.write(f"\rloaded {loaded} entries ({rate:.0f}/s), skipped {skipped}")
            sys.stderr.flush()

    try:
        for rec in parse_ldif(stream):
            dn, attrs = _prepare_loaded(d, rec.dn, rec.attrs, rec.lineno)
            pw = attrs.get("userPassword")
            if pw:
                attrs["userPassword"] = [v if d.hasher.is_hashed(v) else d.hasher.hash(v.encode("utf-8", "surrogateescape")) for v in pw]
            batch.append((rec.lineno, dn, attrs))
            if len(batch) >= LOAD_BATCH:
                flush()
        flush()
    except LDIFError as e:
        raise CLIError(f"{args.file}: {e} ({loaded} entries loaded before it)") from None
    except LDAPError as e:
        raise CLIError(f"{args.file}: {e.message or e.code.name} ({e.code.name}; {loaded} entries loaded before it)") from None
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
        d.db.stop()
    elapsed = time.monotonic() - started
    if progress:
        sys.stderr.write("\n")
    print(f"loaded {loaded} entries, skipped {skipped} existing, in {elapsed:.1f} s ({loaded / max(elapsed, 1e-6):.0f} entries/s)")
    return 0


def cmd_ldif_dump(config: Config, args: argparse.Namespace) -> int:
    from ldapsync.store import entries as store

    d = _open_directory(config)
    d.db.create_schema()
    from ldapsync.filemodes import ForeignFileError, open_private_output

    try:     # the dump holds every password hash: 0600, never into another user's file
        out: BinaryIO = sys.stdout.buffer if args.output in (None, "-") else open_private_output(args.output)
    except ForeignFileError as e:
        d.db.stop()
        raise CLIError(str(e)) from None
    except OSError as e:
        d.db.stop()
        raise CLIError(f"{args.output}: {e.strerror}") from None
    n = 0
    try:
        out.write(format_header())
        after = ""
        while True:
            rows = d.db.run_sync("ldif dump", store.all_entries_txn, after, 1000, write=False)
            if not rows:
                break
            for e in rows:
                attrs: list[tuple[str, str]] = []
                ocs = e.attrs.get("objectClass", [])
                attrs += [("objectClass", v) for v in ocs]
                for name, values in e.attrs.items():
                    if name == "objectClass":
                        continue
                    attrs += [(name, v) for v in values]
                out.write(format_record(e.dn, attrs))
                n += 1
            after = rows[-1].path
    finally:
        if out is not sys.stdout.buffer:
            out.close()
        d.db.stop()
    print(f"dumped {n} entries", file=sys.stderr)
    return 0


def run_async(fn):  # type: ignore[no-untyped-def]
    """Run ``await fn(reactor)`` on a reactor of our own and return its result (CLI only)."""
    from twisted.internet import defer, reactor

    out: dict[str, object] = {}

    def go() -> None:
        d = defer.ensureDeferred(fn(reactor))
        d.addCallbacks(lambda r: out.__setitem__("r", r), lambda f: out.__setitem__("f", f))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run(installSignalHandlers=False)
    if "f" in out:
        out["f"].raiseException()  # type: ignore[attr-defined]
    return out.get("r")


def _connector(config: Config, reactor):  # type: ignore[no-untyped-def]
    from ldapsync.sync.connector import Connector

    if not config.office365.enabled:
        raise CLIError("the Microsoft 365 connector is not enabled: set [office365] enabled = true (and tenant, client_id) in the config")
    d = _open_directory(config)
    d.db.create_schema()
    d.db.start()          # run_interaction needs its thread pools; stopped by run_async's caller
    reactor.addSystemEventTrigger("after", "shutdown", d.db.stop)
    mailer = None
    if config.mail.admin_address:
        from ldapsync.selfservice.mailer import Mailer

        mailer = Mailer(config.mail, reactor=reactor)
    return Connector(d, reactor=reactor, mailer=mailer)


def _print_check(res) -> int:  # type: ignore[no-untyped-def]
    print(f"state: {res.state.value}")
    if res.domains:
        print(f"verified domains: {', '.join(res.domains)}")
    if res.expiry:
        print(f"credential expires: {show_time(res.expiry)}")
    if res.error:
        print(f"problem: {res.error}")
    return 0 if res.state.value == "active" else 1


async def _sign_in(config: Config, reactor, conn) -> int:  # type: ignore[no-untyped-def]
    from twisted.internet import threads

    from ldapsync.sync.connector import ensure_entries_txn

    await threads.deferToThread(conn.db.run_sync, "connector entries", lambda txn: ensure_entries_txn(conn.d, txn))
    conn._build()
    if config.office365.auth == "delegated":
        print("Sign in as a Microsoft 365 administrator (Global Administrator or Privileged Role Administrator")
        print("the first time, to consent to the app's permissions):")
        await conn.provider.authorize(lambda message: print(message, flush=True))
        print("signed in; the refresh token is stored encrypted in the database")
    res = await conn.check()
    if conn.client is not None:
        await conn.client.close()
    return _print_check(res)


def cmd_o365_authorize(config: Config, args: argparse.Namespace) -> int:
    from ldapsync.sync.connector import is_deactivated

    async def main(reactor):  # type: ignore[no-untyped-def]
        conn = _connector(config, reactor)
        if is_deactivated(conn.db):
            raise CLIError("the connector is deactivated: use `ldapsync o365 reactivate`")
        return await _sign_in(config, reactor, conn)

    return int(run_async(main))


def cmd_o365_reactivate(config: Config, args: argparse.Namespace) -> int:
    from ldapsync.sync.connector import set_deactivated_txn

    async def main(reactor):  # type: ignore[no-untyped-def]
        conn = _connector(config, reactor)
        conn.db.run_sync("reactivate", set_deactivated_txn, False)
        rc = await _sign_in(config, reactor, conn)
        print("reactivated: no user was unbound and nothing is provisioned again")
        return rc

    return int(run_async(main))


def cmd_o365_status(config: Config, args: argparse.Namespace) -> int:
    from ldapsync.store.outbox import queue_counts_txn
    from ldapsync.sync.connector import read_status_txn
    from ldapsync.sync.users import bound_users_txn, user_counts

    if not config.office365.enabled:
        print("Microsoft 365 connector: not enabled ([office365] enabled = false)")
        return 0
    d = _open_directory(config)
    d.db.create_schema()

    def read(txn):  # type: ignore[no-untyped-def]
        return read_status_txn(d, txn), bound_users_txn(d, txn), queue_counts_txn(txn)

    try:
        st, users, queue = d.db.run_sync("status", read, write=False)
    finally:
        d.db.stop()
    if not st:
        print("Microsoft 365 connector: enabled, but the server has not started it yet (no connector entry)")
        return 1
    labels = {"o365ConnectorState": "state", "o365AuthMode": "sign-in", "o365VerifiedDomain": "verified domains",
              "o365CredentialExpiry": "credential expires",
              "o365LastSuccess": "last success", "o365LastReconcile": "last reconcile", "o365LastError": "last error"}
    times = {"o365CredentialExpiry", "o365LastSuccess", "o365LastReconcile"}
    print(f"tenant: {config.office365.tenant}")
    for k, label in labels.items():
        if k in st:
            print(f"{label}: {', '.join(show_time(v) if k in times else v for v in st[k])}")
    counts = user_counts(users)
    print(f"bound users: {len(users)} ({counts['synced']} synced, {counts['pending']} pending, "
          f"{counts['error']} in error, {counts['held']} held, {counts['disabled']} disabled)")
    print(f"queued changes: {queue.get('ready', 0)} ready, {queue.get('held', 0)} held "
          f"(`ldapsync o365 release`), {queue.get('error', 0)} stopped by an error (`ldapsync o365 reconcile --retry-errors`)")
    if counts["error"]:
        print("users in error: `ldapsync o365 users --state error` lists them with their last error")
    return 0 if st.get("o365ConnectorState") == ["active"] else 1


def cmd_o365_users(config: Config, args: argparse.Namespace) -> int:
    """The bound users, one line each: DN, mail (the userPrincipalName), o365SyncState, last error."""
    import json

    from ldapsync.sync.users import bound_users_txn

    d = _open_directory(config)
    try:
        users = d.db.run_sync("o365 users", lambda txn: bound_users_txn(d, txn), write=False)
    finally:
        d.db.stop()
    if args.state:
        users = [u for u in users if u.is_in(args.state)]
    if args.json:
        for u in users:
            print(json.dumps({"dn": u.dn, "mail": u.mail, "state": u.state, "held": u.held, "last_error": u.last_error}))
        return 0
    if not users:
        print(f"no bound users{' in state ' + args.state if args.state else ''}")
        return 0
    rows = [(u.dn, u.mail or "(no mail)", (u.state or "-") + (" held" if u.held else ""), u.last_error or "") for u in users]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    for dn, mail, state, error in rows:
        print(f"{dn:<{w0}}  {mail:<{w1}}  {state:<{w2}}  {error}".rstrip())
    return 0


def cmd_o365_bind(config: Config, args: argparse.Namespace) -> int:
    """``o365 bind|unbind DN...``: add or remove ``ldapsyncDirectory: office365`` through the LDAP
    modify path (schema, mail-domain check, the outbox row in the same transaction)."""
    from ldapsync.directory.hooks import Origin
    from ldapsync.directory.service import Actor
    from ldapsync.sync.connector import DIRECTORY_VALUE, tag_dn

    if not config.office365.enabled:
        raise CLIError("the Microsoft 365 connector is not enabled: set [office365] enabled = true (and tenant, client_id) in the config")
    op = "add" if args.bind else "delete"

    async def go(d) -> list[tuple[str, bool, str]]:  # type: ignore[no-untyped-def]
        admin = Actor(d.dn(config.admin_dn), True)
        out = []
        for dn in args.dn:
            try:
                await d.modify(admin, dn, [(op, "ldapsyncDirectory", [DIRECTORY_VALUE.encode()])], origin=Origin.CLI)
            except LDAPError as e:
                if e.code == ResultCode.attributeOrValueExists:
                    out.append((dn, True, "already bound"))
                elif e.code == ResultCode.noSuchAttribute:
                    out.append((dn, False, f"not bound by ldapsyncDirectory (a member of {tag_dn(d)} is bound "
                                           "through that group: remove it there)"))
                else:
                    out.append((dn, False, f"{e.message or e.code.name} ({e.code.name})"))
                continue
            out.append((dn, True, "bound: queued for Microsoft 365" if args.bind
                        else "unbound: its Microsoft 365 account gets sign-in blocked"))
        return out

    failed = 0
    for dn, ok, what in _with_directory(config, go):
        print(f"{dn}: {what}", file=sys.stdout if ok else sys.stderr)
        failed += not ok
    return 1 if failed else 0


def cmd_o365_deactivate(config: Config, args: argparse.Namespace) -> int:
    from ldapsync.sync.connector import (
        ensure_entries_txn,
        set_deactivated_txn,
        unbind_everyone_txn,
        write_status_txn,
    )

    if not config.office365.enabled:
        raise CLIError("the Microsoft 365 connector is not enabled")
    if not args.yes:
        if not sys.stdin.isatty():
            raise CLIError("deactivate unbinds every user; confirm with --yes")
        answer = input("Deactivate the Microsoft 365 connector? Sync stops and every user is unbound "
                       "(Microsoft 365 accounts are left as they are). Type 'yes': ")
        if answer.strip().lower() != "yes":
            print("nothing done")
            return 1
    d = _open_directory(config)
    d.db.create_schema()

    def run(txn):  # type: ignore[no-untyped-def]
        ensure_entries_txn(d, txn)
        set_deactivated_txn(txn, True)
        n = unbind_everyone_txn(d, txn)
        write_status_txn(d, txn, {"o365ConnectorState": ["deactivated"], "o365LastError": None})
        return n

    try:
        n = d.db.run_sync("deactivate", run)
    finally:
        d.db.stop()
    print(f"deactivated: {n} binding(s) removed; Microsoft 365 accounts were left untouched")
    return 0


def _outbox_update(config: Config, desc: str, fn) -> int:  # type: ignore[no-untyped-def]
    if not config.office365.enabled:
        raise CLIError("the Microsoft 365 connector is not enabled")
    d = _open_directory(config)
    d.db.create_schema()
    try:
        return int(d.db.run_sync(desc, fn))
    finally:
        d.db.stop()


def cmd_o365_release(config: Config, args: argparse.Namespace) -> int:
    from ldapsync.store.outbox import release_held_txn

    n = _outbox_update(config, "o365 release", release_held_txn)
    print(f"released {n} held change(s); the server delivers them now" if n else "no held changes")
    return 0


def cmd_o365_reconcile(config: Config, args: argparse.Namespace) -> int:
    from ldapsync.store.outbox import retry_errors_txn

    if args.retry_errors:
        n = _outbox_update(config, "o365 retry errors", retry_errors_txn)
        print(f"{n} change(s) stopped by an error will be tried again" if n else "no changes stopped by an error")

    async def main(reactor):  # type: ignore[no-untyped-def]
        from ldapsync.sync.outbox import OutboxPlanner
        from ldapsync.sync.reconciler import Reconciler

        conn = _connector(config, reactor)
        res = await conn.check()
        if res.state.value != "active":
            _print_check(res)
            raise CLIError("the connector is not active; nothing was compared")
        planner = OutboxPlanner(conn.d, conn.box, None, disable_threshold=config.office365.disable_threshold)
        report = await Reconciler(conn.d, planner, conn.client).run_once()
        await conn.client.close()
        if report is None:
            print("another server is reconciling right now; try again in a moment")
            return 1
        print(f"compared {report.seen} Microsoft 365 user(s){' (full scan)' if report.full_scan else ''}")
        for dn in report.drifted:
            print(f"drift, queued to put the directory's values back: {dn}")
        for dn in report.deleted:
            print(f"deleted in Microsoft 365 (not recreated): {dn}")
        return 0

    return int(run_async(main))


def cmd_o365_import(config: Config, args: argparse.Namespace) -> int:
    """List or import Microsoft 365 users (design.md §5); non-zero exit only when users failed."""
    from ldapsync.graph.errors import GraphError
    from ldapsync.sync.importer import Reporter, run_import

    listing = bool(args.list)
    if not listing and not (args.all or args.user or args.filter):
        raise CLIError("choose the users: --all, --user UPN (repeatable) or --filter EXPR (or --list to see them)")

    async def main(reactor):  # type: ignore[no-untyped-def]
        conn = _connector(config, reactor)
        res = await conn.check()
        if res.state.value != "active":
            _print_check(res)
            raise CLIError("the connector is not active; nothing was imported")
        reporter = Reporter(sys.stdout, sys.stderr, json_lines=args.json, listing=listing)
        try:
            summary = await run_import(conn.d, conn.client, verified=set(res.domains), actor_dn=config.admin_dn,
                                       reporter=reporter, upns=args.user or None, filter=args.filter,
                                       dry_run=args.dry_run, listing=listing, include_guests=args.include_guests)
        except GraphError as e:
            raise CLIError(f"Microsoft Graph: {e} (users imported so far stay; run the command again to continue)") from None
        finally:
            await conn.client.close()
        return 1 if summary.failed else 0

    return int(run_async(main))


def _with_directory(config: Config, fn):  # type: ignore[no-untyped-def]
    """Run ``await fn(directory)`` on a started directory (its thread pools), then stop it."""
    d = _open_directory(config)
    d.db.create_schema()
    d.db.start()
    try:
        return run_async(lambda reactor: fn(d))
    finally:
        d.db.stop()


def cmd_user_invite(config: Config, args: argparse.Namespace) -> int:
    """Queue (or re-send) the activation mail; the running server mails it within seconds."""
    from ldapsync.selfservice.links import LinkService

    async def go(d) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
        links = LinkService(d, None)
        return [(dn, await links.invite(dn, "ldapsync user invite")) for dn in args.dn]

    for dn, to in _with_directory(config, go):
        print(f"{dn}: activation link queued for {to} (mailed by the running server; "
              f"it works for {config.selfservice.activation_ttl / 3600:g} hours; earlier links no longer work)")
    return 0


def cmd_user_invitations(config: Config, args: argparse.Namespace) -> int:
    """Links not yet used: who, state, sent to, until when, last error."""
    from ldapsync.selfservice.links import LinkService

    async def go(d):  # type: ignore[no-untyped-def]
        links = LinkService(d, None)
        return await links.pending(), links.now()

    rows, now = _with_directory(config, go)
    if not rows:
        print("no pending invitations or reset links")
        return 0
    for row, dn in rows:
        state = row.state
        if state == "sent" and row.expires_at is not None and row.expires_at <= now:
            state = "expired"
        parts = [dn or f"(deleted entry {row.entry_uuid})", row.purpose, state]
        if row.sent_to:
            parts.append(f"to {row.sent_to}")
        if row.expires_at and row.state == "sent":
            parts.append(f"until {show_time(row.expires_at)}")
        if row.last_error:
            parts.append(f"last error: {row.last_error}")
        print("  ".join(parts))
    return 0


def cmd_user_unlock(config: Config, args: argparse.Namespace) -> int:
    """Lift a password-policy lockout (what deleting pwdAccountLockedTime over LDAP does)."""
    from ldapsync.directory.hooks import Origin
    from ldapsync.directory.service import Actor

    async def go(d) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
        admin = Actor(d.dn(config.admin_dn), True)
        out = []
        for dn in args.dn:
            got = await d.password_state_of(dn)
            if got is None:
                raise LDAPError(ResultCode.noSuchObject, f'no entry "{dn}"')
            if not got.locked and not got.failures:
                out.append((dn, "not locked"))
                continue
            mods = [("delete", "pwdAccountLockedTime", [])] if got.locked else [("delete", "pwdFailureTime", [])]
            await d.modify(admin, dn, mods, origin=Origin.CLI)
            out.append((dn, "unlocked" if got.locked else f"{got.failures} failed attempt(s) forgotten"))
        return out

    for dn, what in _with_directory(config, go):
        print(f"{dn}: {what}")
    return 0


def cmd_demo(config: Config, args: argparse.Namespace) -> int:
    from ldapsync import demo  # the one command that runs the test doubles (the fake tenant, the SMTP sink)

    return demo.run(args.dir)


def cmd_demo_users(config: Config, args: argparse.Namespace) -> int:
    from ldapsync import demo

    return demo.users(args.dir)


USER_STATES = ("error", "pending", "held", "synced", "disabled")    # ldapsync.sync.users.USER_STATES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldapsync", description="ldapsync admin commands")
    p.add_argument("--config", "-c", help="config file (default: $LDAPSYNC_CONFIG, ./ldapsync.toml, else embedded defaults)")
    p.add_argument("--version", action="version", version=f"ldapsync {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create the database, the base tree and the admin entry "
                          "(the only command that creates a database)")
    init.add_argument("--empty", action="store_true", help="create the tables only, no entries (to load a full dump into)")
    init.set_defaults(func=cmd_init)
    ldif = sub.add_parser("ldif", help="bulk load and export (like slapadd/slapcat)")
    lsub = ldif.add_subparsers(dest="ldif_command", required=True)
    load = lsub.add_parser("load", help="load entries from an LDIF file ('-' for stdin)")
    load.add_argument("file")
    load.add_argument("--skip-existing", action="store_true", help="skip entries that already exist instead of stopping")
    load.set_defaults(func=cmd_ldif_load)
    dump = lsub.add_parser("dump", help="write every entry as LDIF (loads back unchanged)")
    dump.add_argument("-o", "--output", help="file to write (default: stdout)")
    dump.set_defaults(func=cmd_ldif_dump)
    user = sub.add_parser("user", help="activation links and lockouts of users")
    usub = user.add_subparsers(dest="user_command", required=True)
    inv = usub.add_parser("invite", help="mail (again) an activation link to users without a password")
    inv.add_argument("dn", nargs="+", help="the user's DN")
    inv.set_defaults(func=cmd_user_invite)
    usub.add_parser("invitations", help="list activation and reset links not yet used (state, address, expiry)"
                    ).set_defaults(func=cmd_user_invitations)
    un = usub.add_parser("unlock", help="lift a password-policy lockout (and forget failed attempts)")
    un.add_argument("dn", nargs="+", help="the user's DN")
    un.set_defaults(func=cmd_user_unlock)
    o365 = sub.add_parser("o365", help="the Microsoft 365 connector")
    osub = o365.add_subparsers(dest="o365_command", required=True)
    osub.add_parser("authorize", help="sign in (delegated: device code) or check the app credentials").set_defaults(func=cmd_o365_authorize)
    osub.add_parser("status", help="show the connector state").set_defaults(func=cmd_o365_status)
    osub.add_parser("reactivate", help="sign in again / resume after deactivate; unbinds nobody, re-provisions nothing").set_defaults(func=cmd_o365_reactivate)
    de = osub.add_parser("deactivate", help="stop sync and unbind every user (Microsoft 365 accounts are left untouched)")
    de.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    de.set_defaults(func=cmd_o365_deactivate)
    osub.add_parser("release", help="deliver the disables held by the mass-disable guard").set_defaults(func=cmd_o365_release)
    us = osub.add_parser("users", help="list the users bound to Microsoft 365 with their sync state and last error")
    us.add_argument("--state", choices=USER_STATES, help="only users in this state (held: a change held by the mass-disable guard)")
    us.add_argument("--json", action="store_true", help="one JSON object per user (for scripts)")
    us.set_defaults(func=cmd_o365_users)
    bi = osub.add_parser("bind", help="bind users to Microsoft 365 (adds ldapsyncDirectory: office365, like an LDAP modify)")
    bi.add_argument("dn", nargs="+", help="the user's DN")
    bi.set_defaults(func=cmd_o365_bind, bind=True)
    ub = osub.add_parser("unbind", help="unbind users (removes ldapsyncDirectory: office365; the Microsoft 365 account is disabled)")
    ub.add_argument("dn", nargs="+", help="the user's DN")
    ub.set_defaults(func=cmd_o365_bind, bind=False)
    rc = osub.add_parser("reconcile", help="compare Microsoft 365 with the directory and fix drift")
    rc.add_argument("--retry-errors", action="store_true", help="try again the changes stopped by a Graph error")
    rc.set_defaults(func=cmd_o365_reconcile)
    im = osub.add_parser("import", help="list Microsoft 365 users and import them into the directory (inactive, not bound)")
    im.add_argument("--list", action="store_true", help="only show each user (all of them, or those of --user/--filter), "
                    "the username it would get and whether it can be imported")
    which = im.add_mutually_exclusive_group()     # one way of choosing the users
    which.add_argument("--all", action="store_true", help="import every importable user")
    which.add_argument("--user", action="append", metavar="UPN", help="import this user (repeatable)")
    which.add_argument("--filter", metavar="EXPR", help="only users matching this Graph $filter, e.g. \"startswith(displayName,'A')\"")
    im.add_argument("--dry-run", action="store_true", help="show what would be imported; write nothing")
    im.add_argument("--json", action="store_true", help="one JSON object per user, then {\"summary\": ...} (for scripts)")
    im.add_argument("--include-guests", action="store_true", help="import guest accounts too")
    im.set_defaults(func=cmd_o365_import)
    demo = sub.add_parser("demo", help="run the server with a fake Microsoft 365 tenant and an SMTP sink (try it out)")
    demo.add_argument("--dir", help="where the demo keeps its state (default: a new temporary directory)")
    demo.set_defaults(func=cmd_demo)
    dsub = demo.add_subparsers(dest="demo_command")
    du = dsub.add_parser("users", help="list the users the demo's fake Microsoft 365 tenant holds")
    du.add_argument("--dir", required=True, help="the directory `ldapsync demo` printed")
    du.set_defaults(func=cmd_demo_users)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        try:
            config = load_config(args.config)
        except OSError as e:     # unreadable, a directory...: ConfigError covers the missing file
            raise CLIError(f"config file {e.filename or args.config}: {e.strerror}") from None
        return int(args.func(config, args))
    except (ConfigError, CLIError) as e:
        print(f"ldapsync: {e}", file=sys.stderr)
        return 2
    except OSError as e:         # a file the command needs: what and why, not a traceback
        print(f"ldapsync: {e.filename or 'file'}: {e.strerror or e}", file=sys.stderr)
        return 2
    except LDAPError as e:
        print(f"ldapsync: {e.message or e.code.name} ({e.code.name})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
