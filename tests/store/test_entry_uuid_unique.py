"""Migration 0005 on a database that already holds a duplicated entryUUID (issue 15, finding 4).

Real SQLite files and a real PostgreSQL server.  A database upgraded to 0004
with two entries sharing one entryUUID (what ``ldif load`` used to accept),
and a third whose entryUUID has no index row (an ``indexed`` list without
entryUUID), is upgraded to the newest schema: the first holder keeps its
entryUUID, the later one gets a fresh one, the missing index row is added, and
from then on the database refuses a duplicate.
"""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from conftest import fresh_database  # type: ignore[import-not-found]

from ldapsync.store.migrate import upgrade

SHARED = "0a1b2c3d-0000-4000-8000-00000000beef"
ALONE = "0a1b2c3d-0000-4000-8000-00000000cafe"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_upgrade_resolves_duplicates_then_enforces_uniqueness(backend, tmp_path):
    with fresh_database(backend, tmp_path, migrated=False) as db:
        upgrade(db.engine, "0004")
        with db.engine.begin() as c:
            for i, (uid, uuid_, indexed) in enumerate([("bob", SHARED, True), ("twin", SHARED.upper(), True),
                                                       ("solo", ALONE, False)], start=1):
                c.execute(sa.text("INSERT INTO entries (id, dn, dn_norm, path, parent_id, attrs) "
                                  "VALUES (:i, :dn, :n, :n, NULL, :a)"),
                          {"i": i, "dn": f"uid={uid}", "n": f"uid={uid}",
                           "a": json.dumps({"uid": [uid], "entryUUID": [uuid_]})})
                if indexed:
                    c.execute(sa.text("INSERT INTO entry_index (entry_id, attr, value) VALUES (:i, 'entryuuid', :v)"),
                              {"i": i, "v": uuid_.lower()})
        upgrade(db.engine)
        with db.engine.begin() as c:
            attrs = {r[0]: json.loads(r[1]) for r in c.execute(sa.text("SELECT dn, attrs FROM entries"))}
            index = dict(c.execute(sa.text("SELECT entry_id, value FROM entry_index WHERE attr = 'entryuuid'")).all())
        assert attrs["uid=bob"]["entryUUID"] == [SHARED]
        fresh = attrs["uid=twin"]["entryUUID"][0]
        assert fresh.lower() != SHARED and len(fresh) == 36
        assert index == {1: SHARED, 2: fresh, 3: ALONE}
        with db.engine.connect() as c, pytest.raises(sa.exc.IntegrityError):
            c.execute(sa.text("UPDATE entry_index SET value = :v WHERE entry_id = 3 AND attr = 'entryuuid'"),
                      {"v": SHARED})
