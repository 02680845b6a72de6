"""The twistd plugin is installed: ``twistd --help`` lists ldapsync, without importing our code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def test_twistd_lists_ldapsync():
    p = subprocess.run([str(BIN / "twistd"), "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert any(line.split()[:1] == ["ldapsync"] for line in p.stdout.splitlines()), (
        "twistd does not list the ldapsync plugin: is twisted/plugins/ldapsync_plugin.py installed? (pip install -e .)"
    )


def test_plugin_import_has_no_side_effects():
    code = (
        "import sys\n"
        "from twisted.plugin import getPlugins\n"
        "from twisted.application.service import IServiceMaker\n"
        "names = [p.tapname for p in getPlugins(IServiceMaker)]\n"
        "assert 'ldapsync' in names, names\n"
        "assert 'ldapsync.tap' not in sys.modules\n"
        "assert 'sqlalchemy' not in sys.modules\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_console_script_help():
    p = subprocess.run([str(BIN / "ldapsync"), "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "ldif" in p.stdout and "init" in p.stdout
