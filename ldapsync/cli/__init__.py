"""``ldapsync`` admin commands: the parser and ``main``; the commands live in the modules beside it.

- ``common.py``: finding and opening the database (only ``init`` creates one), errors, times;
- ``entries.py``: ``init``, ``ldif load``, ``ldif dump``;
- ``users.py``: ``user invite|invitations|unlock``;
- ``o365.py``: ``o365 …``, the Microsoft 365 connector;
- here: ``demo`` (the one command that imports the test doubles, ``ldapsync/demo.py``).

Errors a person can act on are one line ``ldapsync: …`` on stderr and exit 2 (usage, config,
files, a missing database); an LDAP error exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ldapsync import __version__
from ldapsync.cli.common import CLIError
from ldapsync.cli.entries import cmd_init, cmd_ldif_dump, cmd_ldif_load
from ldapsync.cli.o365 import (
    cmd_o365_authorize,
    cmd_o365_bind,
    cmd_o365_deactivate,
    cmd_o365_import,
    cmd_o365_reactivate,
    cmd_o365_reconcile,
    cmd_o365_release,
    cmd_o365_status,
    cmd_o365_users,
)
from ldapsync.cli.users import cmd_user_invitations, cmd_user_invite, cmd_user_unlock
from ldapsync.config import Config, ConfigError, load_config
from ldapsync.directory.errors import LDAPError
from ldapsync.sync.users import USER_STATES


def cmd_demo(config: Config, args: argparse.Namespace) -> int:
    from ldapsync import demo  # the one command that runs the test doubles (the fake tenant, the SMTP sink)

    return demo.run(args.dir)


def cmd_demo_users(config: Config, args: argparse.Namespace) -> int:
    from ldapsync import demo

    return demo.users(args.dir)


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
    rc.add_argument("--full", action="store_true",
                    help="compare every bound and ever-bound user in full (not only what changed since the last pass)")
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
    except BrokenPipeError:      # `ldapsync ldif dump | head`: the reader has gone; nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:         # a file the command needs: what and why, not a traceback
        print(f"ldapsync: {e.filename or 'file'}: {e.strerror or e}", file=sys.stderr)
        return 2
    except LDAPError as e:
        print(f"ldapsync: {e.message or e.code.name} ({e.code.name})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
