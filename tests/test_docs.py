"""The user documentation in the repository covers what users need.

Every configuration key (every field of every section dataclass in ``ldapsync.config``) appears in
``docs/configuration.md`` under its section, and nothing a user reads points outside the
repository (``../shared`` is not shipped).
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from ldapsync import config

ROOT = Path(__file__).resolve().parent.parent


def _sections_of_reference() -> dict[str, str]:
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    parts = re.split(r"^## `\[(\w+)\]`.*$", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def test_every_config_key_is_in_the_reference() -> None:
    documented = _sections_of_reference()
    missing = []
    for section, cls in config._SECTIONS.items():
        body = documented.get(section)
        if body is None:
            missing.append(f"[{section}] (whole section)")
            continue
        for f in fields(cls):
            key = f.name.rstrip("_")
            if f"`{key}`" not in body:
                missing.append(f"[{section}] {key}")
    assert not missing, f"docs/configuration.md does not document: {', '.join(missing)}"


def test_user_docs_do_not_point_outside_the_repository() -> None:
    """Neither the user docs nor the code and tests cite the design notes the repository does not
    ship (``../shared``, ``design.md``, graph-notes)."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "ldapsync").rglob("*.py")), *sorted((ROOT / "tests").rglob("*.py"))]
    me = Path(__file__).resolve()
    offenders = [str(p.relative_to(ROOT)) for p in files if p.resolve() != me
                 and any(s in p.read_text(encoding="utf-8") for s in ("../shared", "design.md", "graph-notes"))]
    assert not offenders, f"these point at notes users do not have: {offenders}"
