"""The layering of ``ldapsync/``, checked on the import statements of every module (ast, no import).

Every ``import`` counts, at the top of a module or inside a function or ``TYPE_CHECKING``
block alike: a function-local import is still a dependency.  The rules (docs/architecture.md):

- the store knows no protocol and never calls out: ``store/`` imports neither ``directory/``,
  ``sync/``, ``ldap/``, ``graph/`` nor ``selfservice/`` (nor the wiring);
- the Graph client knows no database: ``graph/`` does not import ``store/``;
- an LDAP reply never waits on Microsoft 365: ``ldap/`` and ``directory/`` never import
  ``graph/`` or ``sync/``;
- the protocol edge talks to the rules only: ``ldap/`` does not import ``store/`` (the directory
  answers storage failures as LDAP results);
- production code never imports the fake tenant (``ldapsync.testing``), except the explicit demo
  (``ldapsync/demo.py``), which only the CLI imports;
- the wiring is on top: ``tap``, ``ldap_processes``, ``worker_process`` and ``services`` are imported
  by nothing but the CLI and each other, downwards (``tap`` → the process modules → ``services``);
  the twistd plugin names ``tap`` by string.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ldapsync"

# (importing package, imported package): never.
FORBIDDEN = [
    *(("ldapsync.store", p) for p in ("ldapsync.directory", "ldapsync.sync", "ldapsync.ldap", "ldapsync.graph",
                                      "ldapsync.selfservice", "ldapsync.services", "ldapsync.tap", "ldapsync.cli")),
    ("ldapsync.graph", "ldapsync.store"),
    *((a, b) for a in ("ldapsync.ldap", "ldapsync.directory") for b in ("ldapsync.graph", "ldapsync.sync")),
    ("ldapsync.ldap", "ldapsync.store"),
]
# The wiring and its floors, top down: a module imports only those on a lower floor than its own.
WIRING = {"ldapsync.tap": 0, "ldapsync.ldap_processes": 1, "ldapsync.worker_process": 1, "ldapsync.services": 2}
WIRING_USERS = {"ldapsync.cli"}
TESTING = "ldapsync.testing"
DEMO = "ldapsync.demo"              # `ldapsync demo`: runs the server with the test doubles
DEMO_USERS = {"ldapsync.cli"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement in the file, wherever it is."""
    name = module_name(path)
    return imports_in(path.read_text(encoding="utf-8"), name if path.name == "__init__.py" else name.rpartition(".")[0])


def imports_in(source: str, package: str) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            # ``from ldapsync import testing`` imports ldapsync.testing: count the names too.
            out.append((node.lineno, target))
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names if a.name != "*"]
    return out


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(files: dict[str, list[tuple[int, str]]]) -> list[str]:
    """One line per offending import statement and rule."""
    found: dict[tuple[str, int, str], str] = {}
    for mod, imports in sorted(files.items()):
        for line, target in imports:
            rules = [f"{importer} must not import {imported}" for importer, imported in FORBIDDEN
                     if within(mod, importer) and within(target, imported)]
            if within(target, TESTING) and not within(mod, TESTING) and mod != DEMO:
                rules.append("production code never imports the fake tenant")
            if within(target, DEMO) and mod != DEMO and mod not in DEMO_USERS:
                rules.append("only the CLI imports the demo (the one user of the test doubles)")
            if any(within(target, w) for w in WIRING) and not _may_import_wiring(mod, target):
                rules.append("only the CLI and the wiring above it import the wiring")
            for rule in rules:
                found.setdefault((mod, line, rule), f"{mod}:{line} imports {target} ({rule})")
    return sorted(found.values())


def _may_import_wiring(mod: str, target: str) -> bool:
    if any(within(mod, user) for user in WIRING_USERS):
        return True
    floor = next(f for w, f in WIRING.items() if within(target, w))
    return mod in WIRING and WIRING[mod] < floor


def package_imports() -> dict[str, list[tuple[int, str]]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_package_keeps_its_layers() -> None:
    files = package_imports()
    assert len(files) > 40 and "ldapsync.store.entries" in files      # the walk found the package
    assert violations(files) == []


@pytest.mark.parametrize(("module", "statement"), [
    ("ldapsync.store.entries", "from ldapsync.directory.hooks import ChangeSet"),
    ("ldapsync.store.outbox", "import ldapsync.sync.planner"),
    ("ldapsync.graph.client", "from ldapsync.store import outbox"),
    ("ldapsync.directory.facade", "from ldapsync.sync import planner"),
    ("ldapsync.ldap.server", "from ldapsync.graph.client import GraphClient"),
    ("ldapsync.ldap.server", "from ldapsync.store.database import StoreError"),
    ("ldapsync.sync.worker", "from ldapsync.testing import tenant"),
    ("ldapsync.tap", "from ldapsync import demo"),
    ("ldapsync.worker_process", "from ldapsync import tap"),
    ("ldapsync.services", "from ldapsync.ldap_processes import LDAPProcessesService"),
    ("ldapsync.ldap_processes", "from ldapsync.worker_process import WorkerProcessService"),
    ("ldapsync.selfservice.service", "from ldapsync.services import DirectoryService"),
    ("ldapsync.sync.worker", "from ldapsync.worker_process import build"),
])
def test_a_new_bad_import_is_caught(module: str, statement: str) -> None:
    """The check itself: one bad import, even inside a function, is reported."""
    files = package_imports()
    added = [(999, target) for _, target in imports_in(f"def f():\n    {statement}\n", module.rpartition(".")[0])]
    files[module] = files[module] + added
    assert any(v.startswith(f"{module}:999 ") for v in violations(files)), statement
