"""No password oracle through search filters or compare (issue 15, finding 1), on SQLite and PostgreSQL.

Bound as any user — or as the admin — a filter on userPassword must never
match: the prefix attack (``(&(uid=bob)(userPassword={ARGON2}*))`` one
character at a time recovers the hash), presence, ordering, approx, extensible
match with and without an attribute, equality with the exact stored hash, and
NOT of any of them (Undefined stays Undefined).  The password policy state is
Undefined in a non-admin's filters the same way.  Substring and ordering on a
type without that matching rule are Undefined (RFC 4511 §4.5.1.7).

OpenLDAP's slapd (the one ``test_bad_input.py`` starts, with the usual
``access to attrs=userPassword by self write by anonymous auth by * none``)
is the reference for what an ordinary user's filters and compares answer; the
admin differs on purpose: slapd's rootdn bypasses every ACL, ldapsync's admin
still cannot probe a password (README "Security").

All searches go through ``ldapsearch`` and compares through ``ldapcompare``
(ldap-utils), which send every filter form RFC 4515 has.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
from dataclasses import dataclass

import pytest
from e2e.test_bad_input import Target, slapd  # noqa: F401  (the slapd fixture: the reference server)
from helpers import ADMIN_DN, GROUPS, PEOPLE, unique

pytestmark = pytest.mark.e2e

BOB_PW = "Bob-Secret-7"
ALICE_PW = "Alice-Secret-7"


def ssha(password: str) -> str:
    salt = os.urandom(8)
    return "{SSHA}" + base64.b64encode(hashlib.sha1(password.encode() + salt).digest() + salt).decode()


@dataclass
class Who:
    """One LDAP server and how to talk to it as its admin or a user."""

    url: str
    admin_dn: str
    admin_pw: str

    def run(self, tool: str, *args: str, bind: str, password: str, input: str | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "LDAPCONF": "/dev/null", "LDAPRC": "/dev/null"}
        return subprocess.run([tool, "-x", "-H", self.url, "-D", bind, "-w", password, *args],
                              input=input, capture_output=True, text=True, env=env, timeout=60)

    def dns(self, flt: str, *, bind: str, password: str, base: str = PEOPLE) -> list[str]:
        p = self.run("ldapsearch", "-LLL", "-o", "ldif-wrap=no", "-b", base, flt, "1.1", bind=bind, password=password)
        assert p.returncode == 0, (flt, p.returncode, p.stdout, p.stderr)
        return [line[4:] for line in p.stdout.splitlines() if line.startswith("dn: ")]

    def compare(self, dn: str, assertion: str, *, bind: str, password: str) -> int:
        return self.run("ldapcompare", dn, assertion, bind=bind, password=password).returncode


@dataclass
class People:
    alice: str          # an ordinary user (the attacker)
    bob: str            # the victim: cleartext password, stored {ARGON2} (slapd: stored as given)
    bob_uid: str
    carl: str           # a victim whose stored value the test knows exactly ({SSHA})
    carl_uid: str
    carl_hash: str
    group: str


def make_people(who: Who) -> People:
    tag = unique("s")
    alice, bob, carl = (f"uid={x}{tag},{PEOPLE}" for x in ("alice", "bob", "carl"))
    carl_hash = ssha("Carl-Secret-7")
    group = f"cn=g{tag},{GROUPS}"
    ldif = ""
    for dn, uid, pw in ((alice, f"alice{tag}", ALICE_PW), (bob, f"bob{tag}", BOB_PW), (carl, f"carl{tag}", carl_hash)):
        ldif += (f"dn: {dn}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\nsn: Test\n"
                 f"description: {uid}\nuserPassword: {pw}\n\n")
    ldif += f"dn: {group}\nobjectClass: groupOfNames\ncn: g{tag}\nmember: {bob}\n\n"
    p = who.run("ldapadd", bind=who.admin_dn, password=who.admin_pw, input=ldif)
    assert p.returncode == 0, p.stderr
    return People(alice, bob, f"bob{tag}", carl, f"carl{tag}", carl_hash, group)


def oracle_filters(p: People, bob_prefix: str) -> list[str]:
    """Filters that leak something about a password where userPassword is matchable."""
    bob, carl, h = f"(uid={p.bob_uid})", f"(uid={p.carl_uid})", p.carl_hash
    return [
        f"(&{bob}(userPassword={bob_prefix}*))",               # the prefix oracle of the issue
        f"(&{bob}(userPassword=*))",                            # presence
        f"(&{bob}(userPassword>=!))",                           # ordering
        f"(&{bob}(userPassword<=~))",
        f"(&{bob}(userPassword~={BOB_PW}))",                    # approx
        f"(&{bob}(userPassword=*$*))",                          # any-substring
        f"(&{carl}(userPassword={h}))",                         # equality with the exact stored value
        f"(&{carl}(userPassword:={h}))",                        # extensible with an attribute
        f"(&{carl}(userPassword:2.5.13.17:={h}))",
        f"(&{carl}(userPassword:caseExactMatch:={h}))",
        f"(&{carl}(:2.5.13.17:={h}))",                          # extensible without an attribute
        f"(&{carl}(:caseExactMatch:={h}))",
        f"(&{carl}(:caseIgnoreMatch:={h}))",
        f"(&{carl}(:dn:caseExactMatch:={h}))",
        f"(&{bob}(!(userPassword=wrong)))",                     # NOT of Undefined is Undefined
        f"(&{bob}(!(userPassword=*)))",
        f"(&{carl}(!(userPassword={h})))",
        f"(&{bob}(!(!(userPassword=*))))",
        f"(&{bob}(|(userPassword=*)(userPassword=x)))",
        f"(|(&{bob}(userPassword=*))(&{carl}(userPassword={h})))",
    ]


@pytest.fixture(scope="module")
def ours(server) -> tuple[Who, People]:
    who = Who(server.url, ADMIN_DN, server.admin_password)
    return who, make_people(who)


@pytest.fixture(scope="module")
def reference(slapd: Target) -> tuple[Who, People]:  # noqa: F811
    who = Who(f"ldap://{slapd.host}:{slapd.port}", slapd.admin_dn, slapd.admin_pw)
    return who, make_people(who)


def test_the_filters_see_the_entries_they_name(ours):
    """The oracle filters would match if userPassword were matchable: their other half finds the entry."""
    who, p = ours
    assert who.dns(f"(uid={p.bob_uid})", bind=p.alice, password=ALICE_PW) == [p.bob]
    assert who.dns(f"(&(uid={p.carl_uid})(description={p.carl_uid}))", bind=ADMIN_DN, password=who.admin_pw) == [p.carl]


@pytest.mark.parametrize("as_admin", [False, True], ids=["user", "admin"])
def test_no_filter_on_userpassword_ever_matches(ours, as_admin):
    who, p = ours
    bind, pw = (ADMIN_DN, who.admin_pw) if as_admin else (p.alice, ALICE_PW)
    leaked = {f: got for f in oracle_filters(p, "{ARGON2}") if (got := who.dns(f, bind=bind, password=pw))}
    assert leaked == {}


def test_recovering_the_hash_prefix_gets_nowhere(ours):
    """The attack as the review ran it: extend a prefix one character at a time while a search answers."""
    who, p = ours
    alphabet = "{}ARGON2$argon2idv=19m,tp" + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/"
    prefix = ""
    for _ in range(3):          # bounded: three characters are proof enough either way
        step = next((c for c in dict.fromkeys(alphabet)
                     if who.dns(f"(&(uid={p.bob_uid})(userPassword={prefix}{c}*))", bind=p.alice, password=ALICE_PW)), None)
        if step is None:
            break
        prefix += step
    assert prefix == ""


def test_the_reference_agrees_for_a_user(reference):
    """slapd answers the same filters with nothing for an ordinary user (what ldapsync now does for all)."""
    who, p = reference
    assert who.dns(f"(uid={p.bob_uid})", bind=p.alice, password=ALICE_PW) == [p.bob]
    leaked = {f: got for f in oracle_filters(p, BOB_PW[:3]) if (got := who.dns(f, bind=p.alice, password=ALICE_PW))}
    assert leaked == {}


def _rule_cases(p: People) -> list[tuple[str, str]]:
    """(filter, base): substring/ordering on types without that rule; uid has no ORDERING, member no SUBSTR."""
    return [
        (f"(&(uid={p.bob_uid})(uid>=a))", PEOPLE),
        (f"(&(uid={p.bob_uid})(uid<=zzzz))", PEOPLE),
        (f"(&(uid={p.bob_uid})(!(uid>=a)))", PEOPLE),
        (f"(&(objectClass=groupOfNames)(member=*{p.bob_uid}*))", GROUPS),
        ("(&(objectClass=groupOfNames)(!(member=uid*)))", GROUPS),
    ]


def test_substring_and_ordering_need_their_matching_rule(ours):
    who, p = ours
    for flt, base in _rule_cases(p):
        assert who.dns(flt, bind=ADMIN_DN, password=who.admin_pw, base=base) == [], flt
    # ...and where the type has the rule they work: description has SUBSTR
    assert who.dns(f"(description=b*{p.bob_uid[3:]})", bind=p.alice, password=ALICE_PW) == [p.bob]


def test_the_reference_agrees_on_matching_rules(reference):
    who, p = reference
    for flt, base in _rule_cases(p):
        assert who.dns(flt, bind=who.admin_dn, password=who.admin_pw, base=base) == [], flt
    assert who.dns(f"(description=b*{p.bob_uid[3:]})", bind=p.alice, password=ALICE_PW) == [p.bob]


def test_policy_state_is_undefined_in_a_users_filter(ours):
    """A user cannot read pwdChangedTime: presence is Undefined, so its NOT matches nothing either."""
    who, p = ours
    for flt in (f"(&(uid={p.bob_uid})(pwdChangedTime=*))", f"(&(uid={p.bob_uid})(!(pwdChangedTime=*)))",
                f"(&(uid={p.bob_uid})(pwdChangedTime>=19700101000000Z))", f"(&(uid={p.bob_uid})(!(pwdFailureTime=*)))"):
        assert who.dns(flt, bind=p.alice, password=ALICE_PW) == [], flt
    # the admin may read it, so the admin's filter sees it
    assert who.dns(f"(&(uid={p.bob_uid})(pwdChangedTime=*))", bind=ADMIN_DN, password=who.admin_pw) == [p.bob]


def test_compare_on_userpassword_is_refused_to_everyone(ours):
    """compareTrue/compareFalse on a password is an oracle without lockout: 50 for a user, the owner, the admin."""
    who, p = ours
    for bind, pw in ((p.alice, ALICE_PW), (p.bob, BOB_PW), (ADMIN_DN, who.admin_pw)):
        for value in (BOB_PW, "wrong"):
            assert who.compare(p.bob, f"userPassword:{value}", bind=bind, password=pw) == 50, (bind, value)
        assert who.compare(p.carl, f"userPassword:{p.carl_hash}", bind=bind, password=pw) == 50, bind
    # compare of what one may read still answers (6 = compareTrue, 5 = compareFalse)
    assert who.compare(p.bob, f"uid:{p.bob_uid}", bind=p.alice, password=ALICE_PW) == 6
    assert who.compare(p.bob, "uid:nobody", bind=p.alice, password=ALICE_PW) == 5


def test_the_reference_refuses_a_users_compare_too(reference):
    who, p = reference
    for value in (BOB_PW, "wrong"):
        assert who.compare(p.bob, f"userPassword:{value}", bind=p.alice, password=ALICE_PW) == 50, value
