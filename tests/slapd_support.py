"""A private OpenLDAP slapd on loopback: the reference the e2e tests compare ldapsync with.

:func:`run_slapd` writes a slapd.conf (back-mdb; core, cosine, inetorgperson and
nis schema plus any ``extra_schema``; optionally the ppolicy overlay), starts
slapd on a free 127.0.0.1 port with a fresh rootdn password, and stops it
afterwards.  The directory is empty: callers add the entries they need.
``test_bad_input.py`` (the result-code reference) and ``e2e/security_support.py``
(ppolicy lockout and default limits) use it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port, wait_port  # type: ignore[import-not-found]
from helpers import ADMIN_DN, SUFFIX, unique

SLAPD = "/usr/sbin/slapd"
SCHEMA_DIR = Path("/etc/ldap/schema")


@dataclass
class SlapdProcess:
    """A running slapd: its port and rootdn (``ADMIN_DN``) password."""

    port: int
    admin_pw: str
    workdir: Path


@contextlib.contextmanager
def run_slapd(workdir: Path, *, extra_schema: tuple[Path, ...] = (),
              ppolicy_default: str | None = None) -> Iterator[SlapdProcess]:
    """slapd in ``workdir``; with ``ppolicy_default`` (a policy DN), the ppolicy overlay using it."""
    if not (os.path.exists(SLAPD) and (SCHEMA_DIR / "nis.schema").exists() and shutil.which("slappasswd")):
        pytest.fail("OpenLDAP slapd is not installed: tests/setup-and-run.sh installs it (apt-get install slapd)")
    (workdir / "db").mkdir(parents=True)
    pw = "secret-" + unique()
    hashed = subprocess.run(["slappasswd", "-s", pw], capture_output=True, text=True, check=True).stdout.strip()
    ppolicy = ppolicy_default is not None
    conf = workdir / "slapd.conf"
    conf.write_text("\n".join([
        *(f"include {SCHEMA_DIR / n}.schema" for n in ("core", "cosine", "inetorgperson", "nis")),
        *(f"include {p}" for p in extra_schema),
        f"pidfile {workdir / 'slapd.pid'}",
        "modulepath /usr/lib/ldap", "moduleload back_mdb", *(["moduleload ppolicy"] if ppolicy else []),
        "database mdb", f'suffix "{SUFFIX}"', f'rootdn "{ADMIN_DN}"', f"rootpw {hashed}",
        f"directory {workdir / 'db'}", "maxsize 104857600",
        *(["overlay ppolicy", f'ppolicy_default "{ppolicy_default}"'] if ppolicy else []),
        "access to attrs=userPassword by self write by anonymous auth by * none",
        "access to * by self write by users read by * none", "",
    ]))
    port = free_port()
    log = workdir / "slapd.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([SLAPD, "-f", str(conf), "-h", f"ldap://127.0.0.1:{port}/", "-d", "0"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc, log=log)
        yield SlapdProcess(port, pw, workdir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
