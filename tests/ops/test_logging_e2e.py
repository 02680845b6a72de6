"""The server's log as an operator reads it (``[log]``, ``ldapsync/logs.py`` wired in ``tap.py``).

A really listening server (twistd -n, its stdout is ``server.log``) and ldap-utils clients:
``format = "json"`` makes every line of the log — ours, Twisted's own, the Microsoft 365 worker
process's re-emitted ones — one JSON object; ``level = "warn"`` drops info lines; ``access = true``
writes one line per operation (like slapd's stats level) and per connection; failed binds are
logged with their reason and never with the password.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import office365_config  # type: ignore[import-not-found]
from helpers import ADMIN_DN, PEOPLE, add_user, unique, wait_for

pytestmark = pytest.mark.e2e

RIGHT = "Right-Pass-1-kq7"
WRONG = "Wrong-Pass-zx9-never-logged"


def lines(log: Path) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines() if line.strip()]


def records(log: Path) -> list[dict]:
    """Every line of the log as JSON (fails, naming the line, when one is not)."""
    out = []
    for line in lines(log):
        try:
            rec = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line in the server log: {line!r}") from None
        assert isinstance(rec, dict), line
        assert {"time", "level", "system", "message"} <= set(rec), line
        out.append(rec)
    return out


def logged(log: Path, text: str) -> str | None:
    got = log.read_text(errors="replace")
    return got if text in got else None


def wrong_binds(srv, dn: str, times: int) -> None:
    """``times`` binds as ``dn`` with the wrong password, each refused with invalidCredentials (49)."""
    for _ in range(times):
        assert srv.run("ldapwhoami", bind=dn, password=WRONG).returncode == 49


def test_json_format_every_line_is_an_object(make_server) -> None:
    srv = make_server("sqlite", '[log]\nformat = "json"\naccess = true\n')
    uid = unique("js")
    add_user(srv, uid, password=RIGHT)
    srv.run("ldapwhoami", bind=f"uid={uid},{PEOPLE}", password=WRONG)
    srv.run("ldapsearch", "-b", "ou=nowhere,dc=example,dc=com", "(objectClass=*)")
    wait_for("the failed bind logged", lambda: logged(srv.log, f"wrong password for uid={uid}"))
    srv.stop()                                     # the shutdown lines too
    recs = records(srv.log)
    by_message = {r["message"]: r for r in recs}
    # Twisted's own lines go through the same observer.
    assert any("starting up" in m for m in by_message), sorted(by_message)[:20]
    assert any(r["level"] == "info" and r["system"].startswith("ldapsync") for r in recs)
    failed = [r for r in recs if r["message"].startswith(f"wrong password for uid={uid}")]
    assert failed and failed[0]["dn"] == f"uid={uid},{PEOPLE}" and failed[0]["source"] == "127.0.0.1"
    access = [r for r in recs if r["system"] == "ldapsync.access" and r.get("operation") == "SEARCH"]
    assert access and access[-1]["code"] == 32 and access[-1]["result"] == "noSuchObject"
    assert isinstance(access[-1]["duration_ms"], (int, float)) and access[-1]["conn"] >= 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", recs[0]["time"]), recs[0]["time"]


def test_json_format_covers_the_worker_process(make_server, fake_tenant) -> None:
    from sync.test_worker import DOMAIN, PASSWORD, wait_active, wait_tenant  # type: ignore[import-not-found]
    srv = make_server("sqlite", office365_config(fake_tenant.info) + '\n[log]\nformat = "json"\n')
    wait_active(srv)
    uid = unique("jw")
    add_user(srv, uid, bound=True, password=PASSWORD)
    wait_tenant(fake_tenant, f"{uid}@{DOMAIN}")
    wait_for("the delivery logged", lambda: logged(srv.log, f"{uid}@{DOMAIN}: created"))
    srv.stop()
    recs = records(srv.log)
    created = [r for r in recs if f"{uid}@{DOMAIN}: created" in r["message"]]
    assert created and created[0]["system"] == "ldapsync.sync.worker" and created[0]["level"] == "info", created


def test_level_warn_drops_info_lines(make_server) -> None:
    srv = make_server("sqlite", '[log]\nlevel = "warn"\n[policy]\nlockout_failures = 2\n')
    dn = add_user(srv, unique("lw"), password=RIGHT)
    wrong_binds(srv, dn, 2)
    # The lockout is a warning: it is there; the first wrong password (info) and the start lines are not.
    text = wait_for("the lockout logged", lambda: logged(srv.log, f"wrong password for {dn} from 127.0.0.1: account locked"))
    assert "(1 of 2 before lockout)" not in text
    bad = [line for line in lines(srv.log) if "#info]" in line or "#debug]" in line]
    assert not bad, bad[:10]


def test_access_log_has_a_line_per_operation(make_server) -> None:
    srv = make_server("sqlite", "[log]\naccess = true\n")
    uid = unique("ac")
    dn = add_user(srv, uid, password=RIGHT)
    srv.run("ldapmodify", input=f"dn: {dn}\nchangetype: modify\nreplace: sn\nsn: Other\n", check=True)
    srv.run("ldapsearch", "-b", PEOPLE, f"(uid={uid})", check=True)
    srv.run("ldapcompare", dn, "sn:Other", check=False)
    srv.run("ldapwhoami", check=True)
    srv.run("ldapmodrdn", dn, f"uid={uid}x", check=True)
    srv.run("ldapdelete", f"uid={uid}x,{PEOPLE}", check=True)
    srv.run("ldapdelete", f"uid={uid}x,{PEOPLE}")                   # again: noSuchObject
    srv.run("ldapwhoami", bind=dn, password=WRONG)                     # a failed bind
    expected = [
        rf'BIND dn="{ADMIN_DN}" result=success\(0\)',
        rf'ADD dn="{dn}" result=success\(0\)',
        rf'MODIFY dn="{dn}" result=success\(0\)',
        rf'SEARCH dn="{PEOPLE}" result=success\(0\)',
        rf'COMPARE dn="{dn}" result=compareTrue\(6\)',
        r'EXTENDED dn="" oid=1\.3\.6\.1\.4\.1\.4203\.1\.11\.3 result=success\(0\)',
        rf'MODRDN dn="{dn}" result=success\(0\)',
        rf'DELETE dn="uid={uid}x,{PEOPLE}" result=success\(0\)',
        rf'DELETE dn="uid={uid}x,{PEOPLE}" result=noSuchObject\(32\)',
        rf'BIND dn="{dn}" result=invalidCredentials\(49\)',
    ]
    wait_for("the last access line", lambda: logged(srv.log, "result=invalidCredentials(49)"))
    text = srv.log.read_text(errors="replace")
    prefix = r"\[ldapsync\.access#info\] conn=(\d+) msgid=\d+ peer=127\.0\.0\.1:\d+ "
    for pattern in expected:
        assert re.search(prefix + pattern + r" \d+\.\dms$", text, re.M), pattern
    def conns(what: str) -> set[str]:
        return set(re.findall(rf"conn=(\d+) peer=127\.0\.0\.1:\d+ connection {what}", srv.log.read_text()))

    assert len(conns("opened")) >= 10
    wait_for("every connection's close logged", lambda: conns("opened") == conns("closed"))
    assert WRONG not in text and RIGHT not in text


def test_failed_binds_say_why_and_never_the_password(make_server) -> None:
    srv = make_server("sqlite", '[policy]\nlockout_failures = 3\nmax_age = "30d"\nexpire_warning = "1d"\n')
    uid = unique("fb")
    dn, other_dn = add_user(srv, uid, password=RIGHT), add_user(srv, unique("fx"), password=RIGHT)
    wrong_binds(srv, dn, 1)
    assert srv.run("ldapwhoami", bind=f"uid=nobody-{uid},{PEOPLE}", password=WRONG).returncode == 49
    wrong_binds(srv, dn, 2)
    assert srv.run("ldapwhoami", bind=dn, password=RIGHT).returncode == 49         # locked
    srv.advance_clock(31 * 86400)
    assert srv.run("ldapwhoami", bind=other_dn, password=RIGHT).returncode == 49   # expired
    want = [
        f"wrong password for {dn} from 127.0.0.1 (1 of 3 before lockout)",
        f"bind refused for uid=nobody-{uid},{PEOPLE} from 127.0.0.1: no such entry",
        f"wrong password for {dn} from 127.0.0.1: account locked after 3 failed binds",
        f"bind refused for {dn} from 127.0.0.1: account locked",
        f"bind refused for {other_dn} from 127.0.0.1: password expired",
    ]
    text = wait_for("the expired bind logged", lambda: logged(srv.log, want[-1]))
    for line in want:
        assert line in text, line
    assert WRONG not in text and RIGHT not in text
    srv.stop()
    assert WRONG not in srv.log.read_text(errors="replace")


def test_busy_binds_are_logged(make_server) -> None:
    srv = make_server("sqlite", "[ldap]\nbind_failures_per_address = 2\n[policy]\nlockout_failures = 0\n")
    dn = add_user(srv, unique("bz"), password=RIGHT)
    wrong_binds(srv, dn, 2)
    assert srv.run("ldapwhoami", bind=dn, password=RIGHT).returncode == 51
    text = wait_for("the busy bind logged", lambda: logged(srv.log, f"bind refused for {dn} from 127.0.0.1: busy"))
    assert WRONG not in text and RIGHT not in text


def test_log_file_setting_takes_the_lines_off_stdout(make_server, tmp_path) -> None:
    target = tmp_path / "ldapsync.log"
    srv = make_server("sqlite", f'[log]\nformat = "json"\nfile = "{target}"\n')
    srv.run("ldapwhoami", check=True)
    srv.stop()
    assert any("starting up" in r["message"] for r in records(target))
    assert not [line for line in lines(srv.log) if "starting up" in line or "wrong password" in line]
