"""The database becomes unreachable under a running server: every LDAP operation is answered
``unavailable`` (52) with a message the client can act on — no "internal server error", no
database host or driver text on the wire, the connection stays usable — and when the database is
back the same connection works again.  (The rules layer, ``DirectoryCore.transaction``, turns
storage failures into LDAP results; the protocol edge knows nothing of the store.)

PostgreSQL is made unreachable for real: the test database refuses new connections and the
server's open ones are ended (``pg_terminate_backend``), as when the database server restarts or
a failover moves it.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from conftest import pg_admin_url  # type: ignore[import-not-found]
from helpers import ADMIN_DN, PEOPLE, SUFFIX, unique, user_ldif, wait_for
from ldap3 import MODIFY_REPLACE, NONE, SIMPLE, Connection, Server

pytestmark = pytest.mark.e2e


def _set_reachable(db_name: str, reachable: bool) -> None:
    eng = sa.create_engine(pg_admin_url(), isolation_level="AUTOCOMMIT")
    try:
        with eng.connect() as c:
            c.exec_driver_sql(f'ALTER DATABASE "{db_name}" ALLOW_CONNECTIONS {"true" if reachable else "false"}')
            if not reachable:
                c.exec_driver_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                                  (db_name,))
    finally:
        eng.dispose()


def test_operations_answer_unavailable_while_the_database_is_down(make_server):
    srv = make_server("postgresql")
    db_name = srv.db_url.rsplit("/", 1)[1]
    uid = unique("down")
    dn = f"uid={uid},{PEOPLE}"
    srv.run("ldapadd", input=user_ldif(uid, password="Quiet-Meadow-73"), check=True)
    conn = Connection(Server("127.0.0.1", port=srv.port, get_info=NONE), ADMIN_DN, srv.admin_password,
                      authentication=SIMPLE, auto_bind=True, raise_exceptions=False, receive_timeout=60)
    _set_reachable(db_name, False)
    try:
        answers: dict[str, tuple[int, str]] = {}
        conn.search(SUFFIX, f"(uid={uid})", attributes=["uid"])
        answers["search"] = (conn.result["result"], conn.result["message"])
        conn.add(f"uid={unique('down')},{PEOPLE}", ["inetOrgPerson"], {"cn": "x", "sn": "x"})
        answers["add"] = (conn.result["result"], conn.result["message"])
        conn.modify(dn, {"sn": [(MODIFY_REPLACE, ["X"])]})
        answers["modify"] = (conn.result["result"], conn.result["message"])
        conn.compare(dn, "sn", "X")
        answers["compare"] = (conn.result["result"], conn.result["message"])
        conn.delete(dn)
        answers["delete"] = (conn.result["result"], conn.result["message"])
        who = srv.run("ldapwhoami", bind=dn, password="Quiet-Meadow-73")     # a new connection's bind
        answers["bind"] = (who.returncode, who.stdout + who.stderr)
        for op, (code, text) in answers.items():
            assert code == 52, (op, code, text)
            assert "the directory database is not available; try again" in text, (op, text)
            assert "psycopg" not in text and "5432" not in text and db_name not in text, (op, text)
        log = srv.log.read_text(errors="replace")
        for op in ("search", "add", "modify", "compare", "delete", "bind"):
            assert f"LDAP {op} failed: database error" in log, (op, log[-2000:])
    finally:
        _set_reachable(db_name, True)
    # back: the same connection works again (the server reconnects by itself)
    wait_for("the search to work again once the database is back",
             lambda: conn.search(SUFFIX, f"(uid={uid})", attributes=["uid"]) and len(conn.entries) == 1, timeout=60)
    conn.unbind()
