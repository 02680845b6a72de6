"""``ldapsync init`` and ``ldapsync ldif load|dump`` (like slapadd/slapcat).

They work while the server runs (they share its database); what they change goes through the
same schema checks and change hooks as an LDAP write (``ldapsync.directory.writes.Write``), one
transaction per batch of entries.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import BinaryIO

from ldapsync.cli.common import CLIError, open_directory
from ldapsync.config import Config
from ldapsync.directory.errors import LDAPError, ResultCode
from ldapsync.directory.hooks import Origin
from ldapsync.directory.writes import Write
from ldapsync.filemodes import ForeignFileError, open_private_output
from ldapsync.ldif import LDIFError, format_header, format_record, parse_ldif
from ldapsync.store import entries as store
from ldapsync.store.database import display_url

LOAD_BATCH = 1000
COMPUTED = {"entryDN", "hasSubordinates", "subschemaSubentry"}


def cmd_init(config: Config, args: argparse.Namespace) -> int:
    d = open_directory(config, create=True)
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
    try:
        stream: BinaryIO = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")
    except OSError as e:
        raise CLIError(f"{args.file}: {e.strerror}") from None
    try:
        d = open_directory(config)
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
    d = open_directory(config)
    d.db.create_schema()

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


