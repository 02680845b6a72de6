"""The password policy: pure rules (FixedClock, no sleeping) and the directory's use of them in-process.

The in-process part runs the real Directory on real SQLite and PostgreSQL with a
FixedClock: binds, lockout, expiry, grace logins, set_password, history.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from helpers import SUFFIX

from conftest import create_pg_database, drop_pg_database  # type: ignore[import-not-found]
from ldapsync.clock import FixedClock
from ldapsync.config import AdminConfig, Config, ConfigError, DirectoryConfig, PasswordsConfig, PolicyConfig, load_config
from ldapsync.directory import policy as pp
from ldapsync.directory.errors import LDAPError, ResultCode
from ldapsync.directory.policy import PolicyError, PPError
from ldapsync.directory.facade import Actor, Directory, describe_policy
from ldapsync.directory.hooks import Origin
from ldapsync.directory.writes import Write
from ldapsync.store import entries as store
from ldapsync.store.database import Database

T0 = 1_800_000_000.0
DAY = 86400.0
CFG = PolicyConfig()


# -- config ----------------------------------------------------------------------------

def _load(tmp_path, text: str) -> Config:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return load_config(p)


def test_policy_defaults_and_durations(tmp_path):
    c = Config().policy
    assert (c.min_length, c.complexity, c.history, c.grace_logins, c.lockout_failures) == (8, True, 5, 0, 5)
    assert (c.max_age, c.expire_warning, c.lockout_duration, c.failure_window) == (90 * DAY, 14 * DAY, 900, 900)
    got = _load(tmp_path, '[policy]\nmax_age = "0"\nlockout_duration = "0"\nfailure_window = "1h"\nmin_length = 12\n').policy
    assert (got.max_age, got.lockout_duration, got.failure_window, got.min_length) == (0, 0, 3600, 12)


@pytest.mark.parametrize("text, fragment", [
    ("min_length = 6", "min_length: expected at least 8, got 6 (Microsoft 365 refuses"),
    ("min_length = 300", "at most 256"),
    ('max_age = "soon"', "[policy] max_age: expected a duration"),
    ('max_age = "10d"\nexpire_warning = "14d"', "expire_warning (1.2096e+06s) must be shorter than max_age"),
    ("history = -1", "[policy] history: expected a non-negative whole number"),
    ("complexity = 1", "[policy] complexity: expected true or false"),
    ("lockout = 5", "[policy]: unknown key(s) lockout"),
])
def test_policy_config_errors_are_clear(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, f"[policy]\n{text}\n")
    assert fragment in str(e.value)


# -- quality -----------------------------------------------------------------------------

@pytest.mark.parametrize("pw, rule, error", [
    ("Ab1!", "password must be at least 8 characters", PPError.passwordTooShort),
    ("alllowercase", "password must contain at least 3 of: lowercase, uppercase, digits, symbols", PPError.insufficientPasswordQuality),
    ("Ünïcode-Pass1", "password must not contain non-ASCII characters", PPError.insufficientPasswordQuality),
])
def test_quality_names_the_rule_and_never_the_password(pw, rule, error):
    err = pp.check_quality(CFG, pw)
    assert isinstance(err, PolicyError)
    assert err.code == ResultCode.constraintViolation and err.message == rule
    assert err.ppolicy.error == error
    assert pw not in err.message


def test_quality_accepts_good_and_respects_config():
    assert pp.check_quality(CFG, "Good-Pass1") is None
    assert pp.check_quality(PolicyConfig(complexity=False), "alllowercase") is None
    err = pp.check_quality(PolicyConfig(min_length=12), "Good-Pass1")
    assert err is not None and err.message == "password must be at least 12 characters"


# -- history, expiry, lockout ------------------------------------------------------------

def test_change_stamps_pushes_history_and_keeps_n():
    attrs: dict[str, list[str]] = {"userPassword": ["{ARGON2}h0"]}
    for i in range(1, 8):
        vals = pp.values_after_change(PolicyConfig(history=3), attrs, T0 + i, new_hashes=[f"{{ARGON2}}h{i}"])
        assert vals["pwdChangedTime"] == [pp.format_time(T0 + i)]
        assert vals["pwdFailureTime"] is None and vals["pwdAccountLockedTime"] is None
        attrs = {k: v for k, v in {**attrs, **vals}.items() if v}
        attrs["userPassword"] = [f"{{ARGON2}}h{i}"]
    hist = attrs["pwdHistory"]
    assert [v.split("#")[3] for v in hist] == ["{ARGON2}h6", "{ARGON2}h5", "{ARGON2}h4"]
    t, syntax, n, h = hist[0].split("#", 3)
    assert syntax == pp.OCTET_STRING_SYNTAX and int(n) == len(h) and t == pp.format_time(T0 + 7)
    assert pp.history_hashes(PolicyConfig(history=3), attrs) == ["{ARGON2}h7", "{ARGON2}h6", "{ARGON2}h5", "{ARGON2}h4"]
    assert pp.history_hashes(PolicyConfig(history=0), attrs) == []
    assert pp.values_after_change(PolicyConfig(history=0), attrs, T0)["pwdHistory"] is None


def test_expiry_and_missing_changed_time():
    attrs = {"userPassword": ["x"], "pwdChangedTime": [pp.format_time(T0)]}
    assert pp.expires_at(CFG, attrs) == T0 + 90 * DAY
    assert pp.expires_at(CFG, attrs, exempt=True) is None
    assert pp.expires_at(PolicyConfig(max_age=0), attrs) is None
    st = pp.password_state(CFG, attrs, T0 + 91 * DAY)
    assert st.expired and st.expires_at == T0 + 90 * DAY and st.grace_remaining == 0
    # no pwdChangedTime: not expired; the next successful bind dates it
    undated = {"userPassword": ["x"]}
    assert pp.expires_at(CFG, undated) is None
    assert pp.values_after_success(CFG, undated, T0) == {"pwdChangedTime": [pp.format_time(T0)]}
    assert pp.values_after_success(CFG, undated, T0, exempt=True) == {}
    assert pp.values_after_success(CFG, attrs, T0) == {}      # an ordinary bind writes nothing


def test_lockout_counts_inside_the_window_and_expires():
    cfg = PolicyConfig(lockout_failures=3, lockout_duration=900, failure_window=600)
    attrs: dict[str, list[str]] = {"userPassword": ["x"], "pwdChangedTime": [pp.format_time(T0)]}
    clock = FixedClock(T0)

    def fail() -> bool:
        vals, locked = pp.values_after_failure(cfg, attrs, clock.now())
        for k, v in vals.items():
            if v:
                attrs[k] = v
            else:
                attrs.pop(k, None)
        return locked

    assert not fail()
    clock.advance(601)                  # the first failure leaves the window
    assert not fail() and not fail()
    assert len(attrs["pwdFailureTime"]) == 2
    assert fail()                       # third inside the window locks
    assert pp.lock_state(cfg, attrs, clock.now()) == (True, clock.now() + 900)
    st = pp.password_state(cfg, attrs, clock.now())
    assert st.locked and st.failures == 3
    clock.advance(900)
    assert pp.lock_state(cfg, attrs, clock.now()) == (False, None)
    assert pp.password_state(cfg, attrs, clock.now()).failures == 0    # spent by the lock
    assert not fail()                   # one more failure after the lock does not relock at once
    assert "pwdAccountLockedTime" not in attrs
    assert pp.values_after_success(cfg, attrs, clock.now()) == {"pwdFailureTime": None}


def test_failures_in_the_same_instant_stay_distinct():
    attrs: dict[str, list[str]] = {"userPassword": ["x"]}
    for _ in range(3):
        vals, _ = pp.values_after_failure(CFG, attrs, T0)
        attrs.update({k: v for k, v in vals.items() if v})
    assert len(set(attrs["pwdFailureTime"])) == 3


def test_permanent_and_unbounded_locks():
    assert pp.lock_state(CFG, {"pwdAccountLockedTime": [pp.PERMANENT_LOCK]}, T0) == (True, None)
    forever = PolicyConfig(lockout_duration=0)
    assert pp.lock_state(forever, {"pwdAccountLockedTime": [pp.format_time(T0)]}, T0 + 365 * DAY) == (True, None)
    assert pp.values_after_failure(PolicyConfig(lockout_failures=0), {}, T0) == ({}, False)


def test_grace_counts_uses_since_the_last_change():
    cfg = PolicyConfig(grace_logins=2)
    attrs = {"userPassword": ["x"], "pwdChangedTime": [pp.format_time(T0)],
             "pwdGraceUseTime": [pp.format_time(T0 - DAY, micro=True)]}     # from an older password
    assert pp.grace_remaining(cfg, attrs) == 2
    vals = pp.values_after_success(cfg, attrs, T0 + 100 * DAY, grace_used=True)
    assert len(vals["pwdGraceUseTime"] or []) == 1
    attrs["pwdGraceUseTime"] = vals["pwdGraceUseTime"] or []
    assert pp.grace_remaining(cfg, attrs) == 1


def test_describe_policy():
    assert describe_policy(CFG) == [
        "At least 8 characters",
        "At least 3 of: lowercase, uppercase, digits, symbols",
        "Letters, digits and symbols from the English keyboard only (no accents or emoji)",
        "Not your current password or one of your last 5 passwords",
        "Expires after 90 days",
        "After 5 wrong passwords in a row the account is locked for 15 minutes",
    ]
    text = describe_policy(PolicyConfig(complexity=False, history=0, max_age=0, lockout_failures=3, lockout_duration=0))
    assert text[-1] == "After 3 wrong passwords in a row the account is locked until an administrator unlocks it"
    assert not any("Expires" in x or "3 of" in x or "last" in x for x in text)


def test_time_format_round_trips():
    assert pp.parse_time(pp.format_time(T0)) == T0
    assert pp.parse_time(pp.format_time(T0 + 0.25, micro=True)) == T0 + 0.25
    assert pp.parse_time("garbage") is None


# -- the directory with a fixed clock ---------------------------------------------------------

PEOPLE = f"ou=people,{SUFFIX}"
ADMIN = f"cn=admin,{SUFFIX}"


@pytest.fixture(params=["sqlite", "postgresql"])
def d(request, tmp_path):
    pg = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'p.db'}"
    else:
        url, pg = create_pg_database()
    cfg = Config(
        directory=DirectoryConfig(suffix=SUFFIX, database=url),
        admin=AdminConfig(password_file=str(tmp_path / "pw")),
        passwords=PasswordsConfig(hash_time_cost=1, hash_memory_kib=8192),
        policy=PolicyConfig(history=2, max_age=30 * DAY, expire_warning=5 * DAY, grace_logins=1,
                            lockout_failures=3, lockout_duration=600, failure_window=600),
    )
    directory = Directory(cfg, Database(url))
    directory.clock = FixedClock(T0)
    directory.bootstrap_sync()
    directory.db.start()
    yield directory
    directory.stop()
    directory.db.stop()
    if pg:
        drop_pg_database(pg)


def attrs_of(d: Directory, dn: str) -> dict[str, list[str]]:
    return d.db.run_sync("e", store.get_entry_txn, d.dn(dn).norm, write=False).attrs


async def add_user(d: Directory, uid: str, password: str | None = None) -> str:
    dn = f"uid={uid},{PEOPLE}"
    raw = [("objectClass", [b"inetOrgPerson"]), ("uid", [uid.encode()]), ("cn", [b"C"]), ("sn", [b"S"])]
    if password:
        raw.append(("userPassword", [password.encode()]))
    await d.add(Actor(d.dn(ADMIN), True), dn, raw)
    return dn


@pytest_twisted.ensureDeferred
async def test_lockout_expiry_and_grace_through_authenticate(d):
    dn = await add_user(d, "ann", "First-Pass1")
    assert attrs_of(d, dn)["pwdChangedTime"] == [pp.format_time(T0)]
    ok = await d.authenticate(dn, b"First-Pass1")
    assert ok.authenticated and ok.actor is not None and ok.actor.dn_str == dn and ok.warning_seconds is None
    # three wrong passwords lock; then even the right one is refused
    for i in range(3):
        out = await d.authenticate(dn, b"wrong")
        assert not out.password_ok and out.locked == (i == 2)
    locked = await d.authenticate(dn, b"First-Pass1")
    assert locked.locked and not locked.password_ok and not locked.authenticated
    with pytest.raises(PolicyError) as e:
        await d.bind(dn, b"First-Pass1")
    assert e.value.code == ResultCode.invalidCredentials and e.value.message == "invalid credentials"
    assert e.value.ppolicy.error == PPError.accountLocked
    state = d.password_state(attrs_of(d, dn), dn)
    assert state.locked and state.locked_until == T0 + 600 and state.failures == 3
    d.clock.advance(600)                                    # type: ignore[attr-defined]
    assert (await d.authenticate(dn, b"First-Pass1")).authenticated
    assert "pwdAccountLockedTime" not in attrs_of(d, dn) and "pwdFailureTime" not in attrs_of(d, dn)
    # inside expire_warning: a warning; past max_age: one grace login, then refused
    d.clock.advance(26 * DAY)                               # type: ignore[attr-defined]
    warn = await d.authenticate(dn, b"First-Pass1")
    assert warn.authenticated and 0 < (warn.warning_seconds or 0) <= 5 * DAY
    _, info = await d.bind_with_policy(dn, b"First-Pass1")
    assert info.time_before_expiration == warn.warning_seconds
    d.clock.advance(5 * DAY)                                # type: ignore[attr-defined]
    grace = await d.authenticate(dn, b"First-Pass1")
    assert grace.authenticated and grace.expired and grace.grace_remaining == 0
    expired = await d.authenticate(dn, b"First-Pass1")
    assert expired.password_ok and expired.expired and not expired.authenticated and expired.actor is not None
    with pytest.raises(PolicyError) as e:
        await d.bind(dn, b"First-Pass1")
    assert e.value.ppolicy.error == PPError.passwordExpired
    # the user changes it (the page's path); the state is fresh again
    await d.set_password(expired.actor, dn, "Second-Pass2", old_password=b"First-Pass1")
    a = attrs_of(d, dn)
    assert "pwdGraceUseTime" not in a and len(a["pwdHistory"]) == 1
    assert (await d.authenticate(dn, b"Second-Pass2")).authenticated


@pytest_twisted.ensureDeferred
async def test_set_password_rules_history_and_in_txn(d):
    dn = await add_user(d, "bob", "Bob-Pass-01")
    me = Actor(d.dn(dn), False)
    with pytest.raises(PolicyError) as e:
        await d.set_password(me, dn, "short")
    assert e.value.message == "password must be at least 8 characters"
    with pytest.raises(PolicyError) as e:
        await d.set_password(me, dn, "Bob-Pass-01")
    assert e.value.message == "password was used recently (last 2 passwords)"
    assert e.value.ppolicy.error == PPError.passwordInHistory
    with pytest.raises(LDAPError) as e:
        await d.set_password(me, dn, "Bob-Pass-02", old_password=b"not-it")
    assert e.value.code == ResultCode.invalidCredentials
    await d.set_password(me, dn, "Bob-Pass-02")
    await d.set_password(me, dn, "Bob-Pass-03")
    for old in ("Bob-Pass-01", "Bob-Pass-02", "Bob-Pass-03"):
        with pytest.raises(PolicyError):
            await d.set_password(me, dn, old)
    await d.set_password(me, dn, "Bob-Pass-04")
    await d.set_password(me, dn, "Bob-Pass-01")              # three changes ago: allowed again (history = 2)
    # someone else may not; an admin may, also pre-hashed
    other = await add_user(d, "cy", "Cy-Pass-001")
    with pytest.raises(LDAPError) as e:
        await d.set_password(Actor(d.dn(other), False), dn, "Hijack-Pass1")
    assert e.value.code == ResultCode.insufficientAccessRights
    admin = Actor(d.dn(ADMIN), True)
    hashed = d.hasher.hash(b"x")
    await d.set_password(admin, dn, hashed)
    assert attrs_of(d, dn)["userPassword"] == [hashed]
    await d.set_password(admin, dn, "Bob-Pass-04")            # an admin reset is not held to the history
    with pytest.raises(PolicyError):
        await d.set_password(me, dn, d.hasher.hash(b"y"))    # users may not bypass the quality rule

    # in_txn runs in the same transaction and can abort it
    seen = []

    def consume(txn, entry):
        seen.append(entry.dn)
        raise LDAPError(ResultCode.unwillingToPerform, "token already used")

    before = attrs_of(d, dn)
    with pytest.raises(LDAPError) as e:
        await d.set_password(admin, dn, "Bob-Pass-05", in_txn=consume, operation="activate")
    assert e.value.message == "token already used" and seen == [dn]
    assert attrs_of(d, dn) == before                          # nothing written


@pytest_twisted.ensureDeferred
async def test_admin_is_exempt_and_can_unlock(d):
    for _ in range(5):
        assert not (await d.authenticate(ADMIN, b"wrong")).locked
    assert "pwdFailureTime" not in attrs_of(d, ADMIN)
    d.clock.advance(365 * DAY)                               # type: ignore[attr-defined]
    pw = (d.admin_password())[0].encode()
    assert (await d.authenticate(ADMIN, pw)).authenticated
    dn = await add_user(d, "dee", "Dee-Pass-01")
    for _ in range(3):
        await d.authenticate(dn, b"wrong")
    assert d.password_state(attrs_of(d, dn), dn).locked
    admin = Actor(d.dn(ADMIN), True)
    # a user cannot touch the policy state, an admin can delete the lock (and the failures go with it)
    with pytest.raises(LDAPError) as e:
        await d.modify(Actor(d.dn(dn), False), dn, [("delete", "pwdAccountLockedTime", [])])
    assert e.value.code == ResultCode.insufficientAccessRights
    with pytest.raises(LDAPError) as e:
        await d.modify(admin, dn, [("replace", "pwdChangedTime", [b"20200101000000Z"])])
    assert e.value.code == ResultCode.constraintViolation
    await d.modify(admin, dn, [("delete", "pwdAccountLockedTime", [])])
    a = attrs_of(d, dn)
    assert "pwdAccountLockedTime" not in a and "pwdFailureTime" not in a
    assert (await d.authenticate(dn, b"Dee-Pass-01")).authenticated


@pytest_twisted.ensureDeferred
async def test_modify_and_add_enforce_quality_and_stamp(d):
    admin = Actor(d.dn(ADMIN), True)
    with pytest.raises(PolicyError) as e:
        await add_user(d, "eve", "weak")
    assert e.value.message == "password must be at least 8 characters"
    dn = await add_user(d, "eve", "Eve-Pass-01")
    me = Actor(d.dn(dn), False)
    with pytest.raises(PolicyError) as e:
        await d.modify(me, dn, [("replace", "userPassword", [b"nocomplexity"])])
    assert "3 of" in e.value.message
    with pytest.raises(PolicyError):
        await d.modify(me, dn, [("delete", "userPassword", [b"Eve-Pass-01"]), ("add", "userPassword", [b"Eve-Pass-01"])])
    with pytest.raises(LDAPError) as e:                      # the old value is matched before the transaction
        await d.modify(me, dn, [("delete", "userPassword", [b"Not-Eve-01"]), ("add", "userPassword", [b"Eve-Pass-02"])])
    assert e.value.code == ResultCode.noSuchAttribute
    d.clock.advance(DAY)                                     # type: ignore[attr-defined]
    await d.modify(me, dn, [("delete", "userPassword", [b"Eve-Pass-01"]), ("add", "userPassword", [b"Eve-Pass-02"])])
    a = attrs_of(d, dn)
    assert a["pwdChangedTime"] == [pp.format_time(T0 + DAY)] and len(a["pwdHistory"]) == 1
    # an admin's pre-hashed value skips quality but is stamped too
    d.clock.advance(DAY)                                     # type: ignore[attr-defined]
    await d.modify(admin, dn, [("replace", "userPassword", [b"{SSHA}c2FsdGVkc2FsdGVkc2FsdGVkc2FsdA=="])])
    assert attrs_of(d, dn)["pwdChangedTime"] == [pp.format_time(T0 + 2 * DAY)]


@pytest_twisted.ensureDeferred
async def test_undated_password_is_dated_at_first_bind(d):
    def run(txn):
        w = Write(d, txn, ADMIN, "load", Origin.CLI)
        dn = d.dn(f"uid=old,{PEOPLE}")
        w.create(dn, {"objectClass": ["inetOrgPerson"], "uid": ["old"], "cn": ["O"], "sn": ["O"],
                      "structuralObjectClass": ["inetOrgPerson"], "userPassword": [d.hasher.hash(b"Old-Pass-01")]},
                 w.get(dn.parent), preserve=True)
        return w.finish()

    d.db.run_sync("load", run)
    dn = f"uid=old,{PEOPLE}"
    assert d.password_state(attrs_of(d, dn)).expires_at is None
    d.clock.advance(400 * DAY)                               # type: ignore[attr-defined]
    out = await d.authenticate(dn, b"Old-Pass-01")
    assert out.authenticated and not out.expired
    assert attrs_of(d, dn)["pwdChangedTime"] == [pp.format_time(T0 + 400 * DAY)]
