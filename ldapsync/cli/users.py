"""``ldapsync user …``: activation links (invite, invitations) and password-policy lockouts (unlock)."""

from __future__ import annotations

import argparse

from ldapsync.cli.common import show_time, with_directory
from ldapsync.config import Config
from ldapsync.directory.errors import LDAPError, ResultCode
from ldapsync.directory.hooks import Origin
from ldapsync.directory.facade import Actor
from ldapsync.selfservice.links import LinkService


def cmd_user_invite(config: Config, args: argparse.Namespace) -> int:
    """Queue (or re-send) the activation mail; the running server mails it within seconds."""
    async def go(d) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
        links = LinkService(d, None)
        return [(dn, await links.invite(dn, "ldapsync user invite")) for dn in args.dn]

    for dn, to in with_directory(config, go):
        print(f"{dn}: activation link queued for {to} (mailed by the running server; "
              f"it works for {config.selfservice.activation_ttl / 3600:g} hours; earlier links no longer work)")
    return 0


def cmd_user_invitations(config: Config, args: argparse.Namespace) -> int:
    """Links not yet used: who, state, sent to, until when, last error."""
    async def go(d):  # type: ignore[no-untyped-def]
        links = LinkService(d, None)
        return await links.pending(), links.now()

    rows, now = with_directory(config, go)
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

    for dn, what in with_directory(config, go):
        print(f"{dn}: {what}")
    return 0


