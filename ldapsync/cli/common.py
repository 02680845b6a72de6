"""What every ``ldapsync`` command shares: finding and opening the database, errors, times, the reactor.

The CLI looks for its config and database as the server does; only ``ldapsync init`` may create
a database (``open_directory(create=True)``): any other command refuses a SQLite file that does
not exist or a database without ldapsync's tables, so a job run from the wrong directory fails
instead of working on a new, empty database.  A directory opened here has the same write hooks
as the server's (the outbox planner, activation links) when the connector is enabled.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

from twisted.internet import defer

from ldapsync.config import Config
from ldapsync.directory.hooks import WriteHooks
from ldapsync.directory.facade import Directory
from ldapsync.filemodes import prepare_sqlite_files, sqlite_path
from ldapsync.services import office365_hooks
from ldapsync.store.database import Database, display_url


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


def _refusal(config: Config, db: Database) -> str | None:
    """Why the CLI must not work on ``db`` (it holds no ldapsync tables, or cannot be reached), else None.

    The CLI looks for its config and database exactly as the server does (``--config``,
    $LDAPSYNC_CONFIG, ./ldapsync.toml, else the embedded defaults; a relative SQLite path is
    relative to the current directory).  Only ``ldapsync init`` creates a database: a backup job
    run from the wrong directory must fail, not dump an empty database it has just created."""

    url = config.directory.database
    try:
        present = db.has_schema()
    except Exception as e:  # noqa: BLE001 - unreachable server, bad credentials: one line, no traceback
        return f"cannot open the database {display_url(url)} (from {config.source}): {_first_line(e)}"
    if not present:
        return f"the database {display_url(url)} holds no ldapsync tables (from {config.source}); create them with `ldapsync init`"
    return None


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__


def open_directory(config: Config, *, create: bool = False):  # type: ignore[no-untyped-def]
    """The directory on the config's database, with the connector's write hooks when enabled;
    refuses (CLIError) a database that does not exist yet unless ``create`` (``ldapsync init``)."""

    url = config.directory.database
    path = sqlite_path(url)
    if not create and path is not None and not Path(path).is_file():
        raise CLIError(f'no database at {Path(path).absolute()} (database = "{display_url(url)}" from {config.source}); '
                       "create it with `ldapsync init`")
    warnings = prepare_sqlite_files(path) if path is not None else []   # SQLite: 0700 directory, 0600 file, before opening
    db = Database(url, durability=config.directory.durability)       # one engine: the check below and the directory
    if not create:
        refused = _refusal(config, db)
        if refused:
            db.stop()
            raise CLIError(refused)
    for line in warnings:
        print(f"ldapsync: warning: {line}", file=sys.stderr)
    hooks: list[WriteHooks] = []
    d = Directory(config, db, hooks=hooks)
    if config.office365.enabled:
        # CLI writes go through the same write hooks as LDAP writes: the outbox planner, and an
        # activation link for a user bound without a password (mailed by the server's poll).
        hooks.extend(office365_hooks(d))
    return d


def run_async(fn):  # type: ignore[no-untyped-def]
    """Run ``await fn(reactor)`` on a reactor of our own and return its result (CLI only)."""
    from twisted.internet import reactor     # installs the reactor: only the commands that run one

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


def in_transaction(config: Config, desc: str, fn, *, write: bool = True):  # type: ignore[no-untyped-def]
    """Run ``fn(directory, txn)`` in one transaction on the config's database (schema brought up
    to date first), then close it: the commands that read or change a few rows and print."""
    d = open_directory(config)
    try:
        d.db.create_schema()
        return d.db.run_sync(desc, lambda txn: fn(d, txn), write=write)
    finally:
        d.db.stop()


def with_directory(config: Config, fn):  # type: ignore[no-untyped-def]
    """Run ``await fn(directory)`` on a started directory (its thread pools), then stop it."""
    d = open_directory(config)
    d.db.create_schema()
    d.db.start()
    try:
        return run_async(lambda reactor: fn(d))
    finally:
        d.db.stop()


