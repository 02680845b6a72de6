"""The systemd unit under contrib/ is valid, hardened, and its ExecStart runs our twistd plugin."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "contrib" / "ldapsync.service"
TWISTD = Path(sys.executable).parent / "twistd"


def _unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's twistd (verify checks the binary exists)."""
    text = UNIT.read_text(encoding="utf-8").replace("/opt/ldapsync/bin/twistd", str(TWISTD))
    out = tmp_path / "ldapsync.service"
    out.write_text(text, encoding="utf-8")
    return out


def test_systemd_analyze_verify_finds_nothing(tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze is missing: tests/setup-and-run.sh installs the systemd package")
    unit = _unit_for_this_machine(tmp_path)
    r = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    ours = [line for line in (r.stdout + r.stderr).splitlines() if unit.name in line]
    assert r.returncode == 0 and not ours, f"systemd-analyze verify: rc={r.returncode}\n{r.stdout}{r.stderr}"


def test_unit_is_hardened() -> None:
    directives = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            k, v = line.split("=", 1)
            directives.setdefault(k, []).append(v)
    expected = {"User": "ldapsync", "NoNewPrivileges": "true", "ProtectSystem": "strict",
                "StateDirectory": "ldapsync", "StateDirectoryMode": "0700", "UMask": "0077",
                "ReadWritePaths": "/var/lib/ldapsync", "WorkingDirectory": "/var/lib/ldapsync",
                "PrivateTmp": "true", "ProtectHome": "true"}
    wrong = {k: directives.get(k) for k, v in expected.items() if directives.get(k) != [v]}
    assert not wrong, f"hardening directives missing or different: {wrong}"


def test_exec_start_arguments_are_understood_by_twistd() -> None:
    line = next(l for l in UNIT.read_text(encoding="utf-8").splitlines() if l.startswith("ExecStart="))
    argv = shlex.split(line.split("=", 1)[1])
    assert argv[0] == "/opt/ldapsync/bin/twistd"
    r = subprocess.run([str(TWISTD), *argv[1:], "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--config" in r.stdout
