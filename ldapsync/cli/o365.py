"""``ldapsync o365 …``: the Microsoft 365 connector (sign-in, status, the bound users, bind and
unbind, import, reconcile, release, deactivate/reactivate).

``o365 bind``/``unbind`` write like an LDAP modify (``Directory.modify``, ``Origin.CLI``) with the
connector's hooks installed, so the outbox row is queued in the same transaction.
"""

from __future__ import annotations

import argparse
import json
import sys

from ldapsync.cli.common import CLIError, in_transaction, open_directory, run_async, show_time, with_directory
from ldapsync.config import Config
from ldapsync.directory.errors import LDAPError, ResultCode
from ldapsync.directory.hooks import Origin
from ldapsync.directory.facade import Actor
from ldapsync.graph.errors import GraphError
from ldapsync.mail import Mailer
from ldapsync.store import account_records as records_q
from ldapsync.store.entries import get_meta_txn
from ldapsync.store.outbox import queue_counts_txn, release_held_txn, retry_errors_txn
from ldapsync.sync.connector import (
    DIRECTORY_VALUE,
    Connector,
    ensure_entries_txn,
    is_deactivated,
    read_status_txn,
    set_deactivated_txn,
    tag_dn,
    unbind_everyone_txn,
    write_status_txn,
)
from ldapsync.sync.full_reconcile import META_FULL_AT
from ldapsync.sync.importer import Reporter, run_import
from ldapsync.sync.planner import OutboxPlanner
from ldapsync.sync.reconciler import Reconciler
from ldapsync.sync.users import bound_users_txn, user_counts


def _require_enabled(config: Config) -> None:
    """Every command that works on the connector refuses when it is not enabled (``status`` says so)."""
    if not config.office365.enabled:
        raise CLIError("the Microsoft 365 connector is not enabled: set [office365] enabled = true (and tenant, client_id) in the config")


def _connector(config: Config, reactor):  # type: ignore[no-untyped-def]
    _require_enabled(config)
    d = open_directory(config)
    d.db.create_schema()
    d.db.start()          # run_interaction needs its thread pools; stopped by run_async's caller
    reactor.addSystemEventTrigger("after", "shutdown", d.db.stop)
    mailer = None
    if config.mail.admin_address:
        mailer = Mailer(config.mail, reactor=reactor)
    return Connector(d, reactor=reactor, mailer=mailer)


async def _active_connector(config: Config, reactor, consequence: str):  # type: ignore[no-untyped-def]
    """The connector and its check: the state is printed and the command refused unless it is active."""
    conn = _connector(config, reactor)
    res = await conn.check()
    if res.state.value != "active":
        _print_check(res)
        raise CLIError(f"the connector is not active; {consequence}")
    return conn, res


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
    await conn.db.run_interaction("connector entries", lambda txn: ensure_entries_txn(conn.d, txn))
    conn.build_client()
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
    async def main(reactor):  # type: ignore[no-untyped-def]
        conn = _connector(config, reactor)
        if is_deactivated(conn.db):
            raise CLIError("the connector is deactivated: use `ldapsync o365 reactivate`")
        return await _sign_in(config, reactor, conn)

    return int(run_async(main))


def cmd_o365_reactivate(config: Config, args: argparse.Namespace) -> int:
    async def main(reactor):  # type: ignore[no-untyped-def]
        conn = _connector(config, reactor)
        conn.db.run_sync("reactivate", set_deactivated_txn, False)
        rc = await _sign_in(config, reactor, conn)
        print("reactivated: no user was unbound and nothing is provisioned again")
        return rc

    return int(run_async(main))


def cmd_o365_status(config: Config, args: argparse.Namespace) -> int:
    if not config.office365.enabled:
        print("Microsoft 365 connector: not enabled ([office365] enabled = false)")
        return 0

    def read(d, txn):  # type: ignore[no-untyped-def]
        return (read_status_txn(d, txn), bound_users_txn(d, txn), queue_counts_txn(txn),
                records_q.count_txn(txn), get_meta_txn(txn, META_FULL_AT))

    st, users, queue, records, full_at = in_transaction(config, "status", read, write=False)
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
    try:
        full_shown = show_time(float(full_at)) if full_at else "never"
    except ValueError:
        full_shown = "never"
    every = config.office365.full_reconcile_interval
    print(f"last full comparison: {full_shown} ({f'every {every:.0f}s' if every else 'not on a timer'}; "
          "`ldapsync o365 reconcile --full` runs one now)")
    counts = user_counts(users)
    print(f"bound users: {counts['bound']} ({counts['synced']} synced, {counts['pending']} pending, "
          f"{counts['error']} in error, {counts['disabled']} disabled)")
    print(f"users with a change held by the mass-disable guard: {counts['held']}")
    print(f"accounts kept blocked for users no longer bound: {records.get(records_q.UNBOUND, 0)} unbound, "
          f"{records.get(records_q.DELETED, 0)} deleted from the directory")
    print(f"queued changes: {queue.get('ready', 0)} ready, {queue.get('held', 0)} held "
          f"(`ldapsync o365 release`), {queue.get('error', 0)} stopped by an error (`ldapsync o365 reconcile --retry-errors`)")
    if counts["error"]:
        print("users in error: `ldapsync o365 users --state error` lists them with their last error")
    return 0 if st.get("o365ConnectorState") == ["active"] else 1


def cmd_o365_users(config: Config, args: argparse.Namespace) -> int:
    """The bound users, one line each: DN, mail (the userPrincipalName), o365SyncState, last error."""
    users = in_transaction(config, "o365 users", bound_users_txn, write=False)
    if args.state:
        users = [u for u in users if u.is_in(args.state)]
    if args.json:
        for u in users:
            print(json.dumps({"dn": u.dn, "mail": u.mail, "state": u.state, "bound": u.bound, "held": u.held,
                              "last_error": u.last_error}))
        return 0
    if not users:
        print(f"no bound users{' in state ' + args.state if args.state else ''}")
        return 0
    rows = [(u.dn, u.mail or "(no mail)", (u.state or "-") + (" held" if u.held else "") + ("" if u.bound else " (unbound)"),
             u.last_error or "") for u in users]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    for dn, mail, state, error in rows:
        print(f"{dn:<{w0}}  {mail:<{w1}}  {state:<{w2}}  {error}".rstrip())
    return 0


def cmd_o365_bind(config: Config, args: argparse.Namespace) -> int:
    """``o365 bind|unbind DN...``: add or remove ``ldapsyncDirectory: office365`` through the LDAP
    modify path (schema, mail-domain check, the outbox row in the same transaction)."""

    _require_enabled(config)
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
    for dn, ok, what in with_directory(config, go):
        print(f"{dn}: {what}", file=sys.stdout if ok else sys.stderr)
        failed += not ok
    return 1 if failed else 0


def cmd_o365_deactivate(config: Config, args: argparse.Namespace) -> int:
    _require_enabled(config)
    if not args.yes:
        if not sys.stdin.isatty():
            raise CLIError("deactivate unbinds every user; confirm with --yes")
        answer = input("Deactivate the Microsoft 365 connector? Sync stops and every user is unbound "
                       "(Microsoft 365 accounts are left as they are). Type 'yes': ")
        if answer.strip().lower() != "yes":
            print("nothing done")
            return 1

    def run(d, txn):  # type: ignore[no-untyped-def]
        ensure_entries_txn(d, txn)
        set_deactivated_txn(txn, True)
        n = unbind_everyone_txn(d, txn)
        write_status_txn(d, txn, {"o365ConnectorState": ["deactivated"], "o365LastError": None})
        return n

    n = in_transaction(config, "deactivate", run)
    print(f"deactivated: {n} binding(s) removed; Microsoft 365 accounts were left untouched")
    return 0


def _outbox_update(config: Config, desc: str, fn) -> int:  # type: ignore[no-untyped-def]
    _require_enabled(config)
    return int(in_transaction(config, desc, lambda d, txn: fn(txn)))


def cmd_o365_release(config: Config, args: argparse.Namespace) -> int:
    n = _outbox_update(config, "o365 release", release_held_txn)
    print(f"released {n} held change(s); the server delivers them now" if n else "no held changes")
    return 0


def cmd_o365_reconcile(config: Config, args: argparse.Namespace) -> int:
    if args.retry_errors:
        n = _outbox_update(config, "o365 retry errors", retry_errors_txn)
        print(f"{n} change(s) stopped by an error will be tried again" if n else "no changes stopped by an error")

    async def main(reactor):  # type: ignore[no-untyped-def]
        conn, _ = await _active_connector(config, reactor, "nothing was compared")
        planner = OutboxPlanner(conn.d, conn.box, None, disable_threshold=config.office365.disable_threshold)
        report = await Reconciler(conn.d, planner, conn.client).run_once(full=args.full)
        await conn.client.close()
        if report is None:
            print("another server is reconciling right now; try again in a moment")
            return 1
        kind = " (full comparison of every bound and ever-bound user)" if report.full else (
            " (full scan)" if report.full_scan else "")
        print(f"compared {report.seen} Microsoft 365 user(s){kind}")
        for dn in report.drifted:
            print(f"drift, queued to put the directory's values back: {dn}")
        for dn in report.deleted:
            print(f"deleted in Microsoft 365 (not recreated): {dn}")
        return 0

    return int(run_async(main))


def cmd_o365_import(config: Config, args: argparse.Namespace) -> int:
    """List or import Microsoft 365 users (README: "Importing the users Microsoft 365 already has"); non-zero exit only when users failed."""
    listing = bool(args.list)
    if not listing and not (args.all or args.user or args.filter):
        raise CLIError("choose the users: --all, --user UPN (repeatable) or --filter EXPR (or --list to see them)")

    async def main(reactor):  # type: ignore[no-untyped-def]
        conn, res = await _active_connector(config, reactor, "nothing was imported")
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


