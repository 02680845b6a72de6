"""The outbox planner in-process on real SQLite/PostgreSQL: which writes leave which rows, atomically."""

from __future__ import annotations

import pytest
from helpers import SUFFIX

from conftest import create_pg_database, drop_pg_database  # type: ignore[import-not-found]
from ldapsync.config import AdminConfig, Config, DirectoryConfig, Office365Config, PasswordsConfig, SecretsConfig
from ldapsync.directory.errors import LDAPError, ResultCode
from ldapsync.directory.hooks import Origin, WriteHooks
from ldapsync.directory.facade import Directory
from ldapsync.directory.writes import Write
from ldapsync.store import entries as store
from ldapsync.store.database import Database
from ldapsync.sync.connector import ensure_entries_txn, write_status_txn
from ldapsync.sync.planner import DesiredUser, OutboxPlanner

PEOPLE = f"ou=people,{SUFFIX}"
TAG = f"cn=Provisioning - Office 365,ou=tags,{SUFFIX}"


@pytest.fixture(params=["sqlite", "postgresql"])
def d(request, tmp_path):
    pg = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'o.db'}"
    else:
        url, pg = create_pg_database()
    cfg = Config(
        directory=DirectoryConfig(suffix=SUFFIX, database=url),
        admin=AdminConfig(password_file=str(tmp_path / "pw")),
        passwords=PasswordsConfig(hash_time_cost=1, hash_memory_kib=8192),
        office365=Office365Config(enabled=True, tenant="contoso.onmicrosoft.com", client_id="x", disable_threshold=2),
        secrets=SecretsConfig(key_file=str(tmp_path / "key")),
    )
    hooks: list[WriteHooks] = []
    directory = Directory(cfg, Database(url), hooks=hooks)
    directory.bootstrap_sync()
    hooks.append(OutboxPlanner.from_config(directory))      # the fixture is the wiring
    directory.db.run_sync("entries", lambda txn: ensure_entries_txn(directory, txn))
    directory.db.run_sync("domains", lambda txn: write_status_txn(directory, txn, {"o365VerifiedDomain": ["contoso.com"]}))
    yield directory
    directory.db.stop()
    if pg:
        drop_pg_database(pg)


def write(d: Directory, fn, cleartext=None, origin=Origin.LDAP):
    def run(txn):
        w = Write(d, txn, f"cn=admin,{SUFFIX}", "modify", origin, cleartext=cleartext or {})
        fn(w)
        return w.finish()
    return d.db.run_sync("w", run)


def add_user(d, uid, *, bound=False, mail_domain="contoso.com", password=None):
    attrs = {"objectClass": ["inetOrgPerson", "ldapsyncUser"], "uid": [uid], "cn": [uid], "sn": ["S"],
             "mail": [f"{uid}@{mail_domain}"]}
    if bound:
        attrs["ldapsyncDirectory"] = ["office365"]
    if password:
        attrs["userPassword"] = [d.hasher.hash(password.encode())]
    dn = d.dn(f"uid={uid},{PEOPLE}")
    write(d, lambda w: w.create(dn, attrs, w.get(dn.parent)), {dn.norm: [password]} if password else None)


def rows(d):
    return d.db.run_sync("rows", lambda txn: txn.rows("SELECT entry_uuid, operation, payload, secret, state FROM o365_outbox ORDER BY id"), write=False)


def entry(d, uid):
    return d.db.run_sync("e", store.get_entry_txn, d.dn(f"uid={uid},{PEOPLE}").norm, write=False).attrs


def test_bind_with_password_queues_one_encrypted_row_and_pending(d):
    add_user(d, "ann", bound=True, password="Secret-Pass-1")
    (uuid, op, payload, secret, state), = rows(d)
    desired = DesiredUser.from_json(payload)
    assert op == "bind" and state == "ready" and desired.bound and desired.upn == "ann@contoso.com"
    assert desired.mail_nickname == "ann" and desired.entry_uuid == entry(d, "ann")["entryUUID"][0]
    assert secret and "Secret-Pass-1" not in secret and b"Secret-Pass-1" not in bytes.fromhex(secret)
    assert entry(d, "ann")["o365SyncState"] == ["pending"]


def test_unbound_users_leave_nothing_and_tag_binding_works(d):
    add_user(d, "bob")
    assert rows(d) == []
    write(d, lambda w: w.update(st := w.get(d.dn(TAG)), {**st.attrs, "member": [f"uid=bob,{PEOPLE}"]}))
    (_, op, payload, secret, _), = rows(d)
    assert op == "bind" and secret is None and DesiredUser.from_json(payload).bound


def test_unverified_domain_rolls_the_write_back(d):
    with pytest.raises(LDAPError) as e:
        add_user(d, "cat", bound=True, mail_domain="fabrikam.com")
    assert e.value.code == ResultCode.constraintViolation and "fabrikam.com" in e.value.message
    assert rows(d) == []
    assert d.db.run_sync("e", store.get_entry_txn, d.dn(f"uid=cat,{PEOPLE}").norm, write=False) is None


def test_irrelevant_changes_queue_nothing(d):
    add_user(d, "dan", bound=True)
    n = len(rows(d))
    write(d, lambda w: w.update(st := w.get(d.dn(f"uid=dan,{PEOPLE}")), {**st.attrs, "description": ["x"]}))
    assert len(rows(d)) == n
    write(d, lambda w: w.update(st := w.get(d.dn(f"uid=dan,{PEOPLE}")), {**st.attrs, "sn": ["New"]}))
    assert len(rows(d)) == n + 1 and rows(d)[-1][1] == "update"


def test_update_rows_name_the_graph_properties_they_change(d):
    """What lets the worker PATCH an update without reading the account first."""
    add_user(d, "gus", bound=True, password="Secret-Pass-1")
    assert DesiredUser.from_json(rows(d)[-1][2]).changed is None            # a bind: read and diff
    dn = d.dn(f"uid=gus,{PEOPLE}")
    write(d, lambda w: w.update(st := w.get(dn), {**st.attrs, "sn": ["New"], "givenName": ["G"]}))
    assert DesiredUser.from_json(rows(d)[-1][2]).changed == ("givenName", "surname")
    write(d, lambda w: w.update(st := w.get(dn), {**st.attrs, "mail": ["gus2@contoso.com"], "cn": ["Gus"]}))
    last = DesiredUser.from_json(rows(d)[-1][2])
    assert last.reason == "update" and last.changed == ("userPrincipalName", "mail", "displayName")
    assert DesiredUser.from_json(last.to_json()) == last                      # a tuple again after JSON
    old = last.to_json().replace(',"changed":["userPrincipalName","mail","displayName"]', "")
    assert '"changed"' not in old and DesiredUser.from_json(old).changed is None   # rows from before the field


def test_queued_payload_is_the_desired_users_json(d):
    """The planner encodes DesiredUser's fields without building it: the text must be the same."""
    add_user(d, "hal", bound=True, password="Secret-Pass-1")
    dn = d.dn(f"uid=hal,{PEOPLE}")
    write(d, lambda w: w.update(st := w.get(dn), {**st.attrs, "displayName": ["Hal H"], "givenName": ["Hal"]}))
    payload = rows(d)[-1][2]
    planner = OutboxPlanner(d, box=None)
    entry = d.db.run_sync("e", store.get_entry_txn, dn.norm, write=False)
    fields = planner.desired_fields(entry.attrs, entry.dn, bound=True, reason="update",
                                    changed=("displayName", "givenName"))
    assert list(fields) == sorted(DesiredUser.__dataclass_fields__)      # a new field lands in both
    assert DesiredUser(**fields).to_json() == payload
    assert DesiredUser.from_json(payload) == planner.desired(entry.attrs, entry.dn, bound=True, reason="update",
                                                             changed=("displayName", "givenName"))
    assert DesiredUser.from_json(payload).display_name == "Hal H"


def test_node_heartbeats_come_and_go(d):
    from ldapsync.store import outbox as q

    beat = lambda owner, now, alive=True, forget=0.0: d.db.run_sync(  # noqa: E731
        "hb", q.heartbeat_txn, owner, now, alive=alive, forget_before=forget)
    assert beat("a", 100.0) == {"a": "100.0"}
    assert beat("b", 101.0) == {"a": "100.0", "b": "101.0"}
    assert beat("a", 103.0) == {"a": "103.0", "b": "101.0"}
    assert beat("b", 104.0, alive=False) == {"a": "103.0"}                # a clean stop withdraws
    beat("c", 50.0)
    assert beat("a", 4000.0, forget=3000.0) == {"a": "4000.0"}           # long gone: forgotten


@pytest.mark.parametrize(("n", "state"), [(2, "ready"), (3, "held")], ids=["at-threshold", "one-over"])
def test_mass_unbind_is_held_and_deactivate_queues_nothing(d, n, state):
    """The fixture's threshold is 2: exactly 2 disables in one write go out, 3 are held."""
    users = [f"e{i}" for i in range(n)]
    for u in users:
        add_user(d, u, bound=True)
    before = len(rows(d))

    def unbind_all(w):
        for u in users:
            st = w.get(d.dn(f"uid={u},{PEOPLE}"))
            attrs = dict(st.attrs)
            del attrs["ldapsyncDirectory"]
            w.update(st, attrs)
    write(d, unbind_all)
    new = rows(d)[before:]
    assert [r[4] for r in new] == [state] * n and all(not DesiredUser.from_json(r[2]).bound for r in new)

    add_user(d, "f1", bound=True)
    before = len(rows(d))
    write(d, lambda w: w.update(st := w.get(d.dn(f"uid=f1,{PEOPLE}")), {k: v for k, v in st.attrs.items() if k != "ldapsyncDirectory"}),
          origin=Origin.DEACTIVATE)
    assert len(rows(d)) == before


def test_hooks_belong_to_their_directory(d, tmp_path):
    """Hooks are handed to one directory, not registered for the process: a second directory in
    the same process, built without hooks, queues nothing (with the store's global hook list,
    the first directory's planner ran inside the second one's writes and queued rows there)."""
    url = f"sqlite:///{tmp_path / 'other.db'}"
    other = Directory(Config(directory=DirectoryConfig(suffix=SUFFIX, database=url),
                             admin=AdminConfig(password_file=str(tmp_path / "other-pw")),
                             passwords=PasswordsConfig(hash_time_cost=1, hash_memory_kib=8192)), Database(url))
    try:
        other.bootstrap_sync()
        other.db.run_sync("entries", lambda txn: ensure_entries_txn(other, txn))
        add_user(other, "iris", bound=True, password="Secret-Pass-1")
        assert rows(other) == []
        assert "o365SyncState" not in entry(other, "iris")
        add_user(d, "ivy", bound=True)                         # the first one's hooks still run
        assert [r[1] for r in rows(d)] == ["bind"]
    finally:
        other.db.stop()


def test_the_origin_decides_whether_a_write_reaches_microsoft365(d):
    """One table (Origin) instead of a skip-list per hook: a name change of a bound user is queued
    for the origins that reach Microsoft 365 and for no other."""
    add_user(d, "jo", bound=True)
    dn = d.dn(f"uid=jo,{PEOPLE}")
    queued = set()
    for n, origin in enumerate(Origin):
        before = len(rows(d))
        write(d, lambda w: w.update(st := w.get(dn), {**st.attrs, "sn": [f"S{n}"]}), origin=origin)
        if len(rows(d)) > before:
            queued.add(origin)
    assert queued == {Origin.LDAP, Origin.PAGES, Origin.CLI, Origin.IMPORT}
    assert queued == {o for o in Origin if o.reaches_microsoft365}


def test_policy_bookkeeping_of_a_bound_user_without_mail_is_never_refused(d):
    """Counting a wrong password (ppolicy bookkeeping) must not depend on the outbox planner's
    checks: a bound user without a usable mail (bound while the connector was off, say) would
    otherwise have every failed bind's recording refused, and so never be locked out."""
    dn = d.dn(f"uid=nomail,{PEOPLE}")
    attrs = {"objectClass": ["inetOrgPerson", "ldapsyncUser"], "uid": ["nomail"], "cn": ["n"], "sn": ["N"],
             "ldapsyncDirectory": ["office365"]}
    write(d, lambda w: w.create(dn, attrs, w.get(dn.parent)), origin=Origin.BOOTSTRAP)   # the planner not asked
    with pytest.raises(LDAPError) as e:
        write(d, lambda w: w.update(st := w.get(dn), {**st.attrs, "sn": ["M"]}))
    assert e.value.code == ResultCode.constraintViolation          # an LDAP client's write is refused, as before
    for origin in (Origin.POLICY, Origin.LINKS):
        write(d, lambda w: w.set_operational(w.get(dn), {"pwdFailureTime": ["20261207000000Z"]}), origin=origin)
    assert rows(d) == []


def test_guard_threshold_defaults_to_500(tmp_path):
    """The README's default: a config that does not set disable_threshold holds more than 500."""
    from ldapsync.config import load_config

    path = tmp_path / "ldapsync.toml"
    path.write_text('[office365]\nenabled = true\ntenant = "contoso.onmicrosoft.com"\nclient_id = "x"\n')
    assert load_config(path).office365.disable_threshold == 500


def test_the_planners_bound_rule_is_the_directorys(d):
    """The planner's hot-path is_bound and directory/binding.py's is_bound say the same."""
    from ldapsync.directory import binding

    planner = next(h for h in d.hooks if isinstance(h, OutboxPlanner))
    tag = binding.tag_dn(d.suffix)
    cases = [None, {}, {"ldapsyncDirectory": ["office365"]}, {"ldapsyncDirectory": ["OFFICE365"]},
             {"ldapsyncDirectory": ["other"]}, {"memberOf": [tag]}, {"memberOf": [tag.upper()]},
             {"memberOf": [f"cn=staff,ou=groups,{SUFFIX}"]}, {"memberOf": ["not a dn"]}]
    for attrs in cases:
        assert planner.is_bound(attrs) == binding.is_bound(d, attrs), attrs
    assert [binding.is_bound(d, a) for a in cases] == [False, False, True, True, False, True, True, False, False]


def test_a_delivery_in_flight_does_not_cover_drift_found_after_it_read_the_account(d):
    """The reconciler leaves drift to a queued row only while no worker has taken it: a delivery
    in flight may have read the account before the portal edit the reconciler sees (seed 59: a
    deleted user's account enabled in the portal while its blocking delivery was finishing stayed
    enabled, the delta link having moved past the edit)."""
    from ldapsync.store import outbox as outbox_q

    add_user(d, "cy", bound=True, password="Secret-Pass-1")
    uuid = entry(d, "cy")["entryUUID"][0]
    assert d.db.run_sync("r", outbox_q.queue_covers_txn, uuid, write=False)          # queued, not taken
    claimed = d.db.run_sync("claim", outbox_q.claim_users_txn, "node-a", 1e12, 60.0, 10)
    assert claimed == [uuid]
    assert not d.db.run_sync("r", outbox_q.queue_covers_txn, uuid, write=False)      # in flight: queue the drift
    d.db.run_sync("release", outbox_q.release_leases_txn, "node-a", [uuid])
    assert d.db.run_sync("r", outbox_q.queue_covers_txn, uuid, write=False)
