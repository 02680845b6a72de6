"""First start: the admin password file and the base tree.

Owns :meth:`Bootstrap.admin_password` (read, or generate into ``[admin] password_file``)
and :meth:`Bootstrap.bootstrap_sync` (suffix, ou=people/groups/tags/directories, the admin
entry, its password kept in step with the file).
"""

from __future__ import annotations

import os
from pathlib import Path


from ldapsync.directory import policy as pp
from ldapsync.directory.core import DirectoryCore
from ldapsync.directory.dn import DN
from ldapsync.directory.errors import LDAPError, ResultCode
from ldapsync.directory.hooks import Origin
from ldapsync.directory.passwords import generate_password
from ldapsync.directory.writes import Write
from ldapsync.store.database import Txn
from ldapsync.store.entries import Attrs


class Bootstrap(DirectoryCore):
    """The directory part that creates the base tree and the admin entry."""

    # -- bootstrap ---------------------------------------------------------------
    def admin_password(self) -> tuple[str, bool]:
        """(password, generated?) from [admin] password_file, generating it when absent."""
        path = Path(self.config.admin.password_file)
        if path.exists():
            text = path.read_text(encoding="utf-8")
            if text.endswith("\n"):
                text = text[:-1]
            if text.endswith("\r"):
                text = text[:-1]
            if not text:
                raise LDAPError(ResultCode.other, f"admin password file {path} is empty")
            return text, False
        path.parent.mkdir(parents=True, exist_ok=True)
        pw = generate_password(20)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(pw)         # no newline: `ldapwhoami -y FILE` sends the file's bytes as they are
        return pw, True

    def bootstrap_sync(self) -> list[str]:
        """Create the base tree and admin (idempotent); keep the admin password in step with its file.

        Blocking: used by ``ldapsync init`` and at server start (in a thread).
        Returns human-readable lines of what was done.
        """
        self.db.create_schema()
        pw, generated = self.admin_password()
        done: list[str] = []
        if generated:
            done.append(f"generated an admin password and wrote it to {self.config.admin.password_file} (mode 0600)")
        suffix = self.suffix
        first = suffix.rdns[0]
        base_entries: list[tuple[DN, Attrs]] = []
        attr0, val0 = first.avas[0]
        if attr0.lower() == "dc":
            base_entries.append((suffix, {"objectClass": ["top", "dcObject", "organization"], "dc": [val0], "o": [val0]}))
        elif attr0.lower() == "o":
            base_entries.append((suffix, {"objectClass": ["top", "organization"], "o": [val0]}))
        elif attr0.lower() == "ou":
            base_entries.append((suffix, {"objectClass": ["top", "organizationalUnit"], "ou": [val0]}))
        else:
            base_entries.append((suffix, {"objectClass": ["top", "extensibleObject"], attr0: [val0]}))
        for ou in ("people", "groups", "tags", "directories"):
            base_entries.append((self.dn(f"ou={ou},{suffix}"), {"objectClass": ["top", "organizationalUnit"], "ou": [ou]}))

        def txn_fn(txn: Txn) -> list[str]:
            out: list[str] = []
            w = Write(self, txn, str(self.admin_dn), "init", Origin.BOOTSTRAP)
            for dn, attrs in base_entries:
                if w.get(dn) is None:
                    parent = w.get(dn.parent) if dn.parent is not None and not dn.parent.is_root else None
                    attrs["structuralObjectClass"] = [self.schema.check_entry(attrs)]
                    w.create(dn, attrs, parent)
                    out.append(f"created {dn}")
            admin = w.get(self.admin_dn)
            stored = (admin.attrs or {}).get("userPassword", []) if admin else []
            if admin is None or not any(self.hasher.verify(h, pw.encode()) for h in stored):
                hashed = self.hasher.hash(pw.encode())
                if admin is None:
                    parent = w.get(self.admin_dn.parent) if self.admin_dn.parent is not None else None
                    rdn_attr, rdn_val = self.admin_dn.rdns[0].avas[0]
                    attrs = {"objectClass": ["top", "organizationalRole", "simpleSecurityObject"], rdn_attr: [rdn_val],
                             "description": ["Directory administrator"], "userPassword": [hashed],
                             "pwdChangedTime": [pp.format_time(self.clock.now())]}
                    attrs["structuralObjectClass"] = [self.schema.check_entry(attrs)]
                    w.create(self.admin_dn, attrs, parent)
                    out.append(f"created {self.admin_dn}")
                else:
                    attrs = dict(admin.attrs or {})
                    attrs["userPassword"] = [hashed]
                    attrs["pwdChangedTime"] = [pp.format_time(self.clock.now())]
                    w.update(admin, attrs)
                    out.append(f"set the password of {self.admin_dn} from {self.config.admin.password_file}")
            w.finish()
            return out

        done += self.db.run_sync("bootstrap", txn_fn)
        return done
