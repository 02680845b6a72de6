"""The model behind tests/sync/test_convergence_model.py: what the directory holds, and what
Microsoft 365 must end up holding for it (README: "Binding users, and what reaches Microsoft 365", the contract of issue 14).

Owns: ``Person`` (one directory user as the model sees it, stable across renames), ``Op`` (one
generated step, with the LDAP result the contract expects and a one-line description for the
trace), ``Model`` (the seeded generator: ``next_op`` picks a step that is valid for the model's
state; ``apply`` records a step the server accepted) and ``expected`` (the Microsoft 365 account a
person must have once the queue is empty and a reconcile has run), and ``REGRESSIONS`` /
``scripted`` (the divergences found so far as minimal fixed traces).  No processes, no network.

The contract encoded here (the NEW one, issue 14):
- a bound user ends with one account: UPN = mail, mail, mailNickname = uid, displayName
  (= displayName, else cn), givenName, surname as in the directory; enabled, and the tenant's last
  password set = the directory's current password, when ldapsync has (or had) that password in
  cleartext: set by ldapadd/ldapmodify/ldappasswd on the entry (bound or not: a password set
  while unbound is kept for ``unbound_password_ttl``, 24 h, far longer than a run), or captured
  at a successful bind of the user while bound.  Otherwise (no password, or only a hash loaded)
  it ends blocked, with ``o365PasswordPending: TRUE`` on the entry;
- a user that was ever bound and is not bound now (unbound, or its entry deleted) has at most one
  account, blocked (accountEnabled false), never deleted; a never-bound user has none;
- portal edits of bound and ever-bound users are put back (the model ignores them: the final
  state is the directory's);
- a successful bind of a bound user hands its password over (capture), even when the bind comes
  before the worker has delivered the binding;
- ``mail`` is unique (case-insensitively) among ldapsyncUser entries: a write that would
  duplicate one is refused with constraintViolation (19); a bound user's mail on an unverified
  domain is refused the same way (and so is binding a user whose mail is on one).

Every uid and mail value is used by one person only over a whole run (re-adding creates a new
person with fresh names), so a Microsoft 365 account is attributed to a person unambiguously by
its UPN or mailNickname.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

VERIFIED = ("contoso.com", "contoso.onmicrosoft.com")
UNVERIFIED = "fabrikam.com"
CONSTRAINT = 19

# Operation weights per profile.  "names" is the harness's own check (converges on today's
# engine); "ldap" is every LDAP operation without faults, restarts or portal edits; "full" is
# everything; "cluster" is "full" for two nodes (the test adds the kill -9 of one node).
_LDAP = {
    "add": 6, "bind_direct": 5, "unbind_direct": 4, "tag_add": 5, "tag_remove": 4, "names": 10,
    "mail_local": 4, "mail_domain": 3, "mail_unverified": 1, "mail_duplicate": 1, "pw_modify": 5,
    "pw_passwd": 5, "rename": 3, "delete": 2, "user_bind": 3,
}
PROFILES: dict[str, dict[str, int]] = {
    "names": {"add_bound": 3, "names": 12},
    "ldap": dict(_LDAP),
    "full": {**_LDAP, "portal": 6, "fault": 3, "restart": 2},
    "cluster": {**_LDAP, "portal": 4, "fault": 2, "restart": 1},
}


@dataclass
class Person:
    key: str                       # p001… stable over renames: names the person in the trace
    uid: str
    mail: str
    given: str
    sn: str
    cn: str
    display: str | None = None
    password: str | None = None    # the cleartext the directory's password was made from (None: none)
    pw_known: bool = False         # ldapsync has (had) that cleartext: it can reach Microsoft 365
    direct: bool = False           # ldapsyncDirectory: office365
    tag: bool = False              # member of the provisioning tag
    exists: bool = True
    ever_bound: bool = False
    uids: set[str] = field(default_factory=set)
    mails: set[str] = field(default_factory=set)

    @property
    def bound(self) -> bool:
        return self.exists and (self.direct or self.tag)

    @property
    def graph_display(self) -> str:
        return self.display or self.cn

    def state(self) -> str:
        """A short summary for the trace."""
        bits = ["bound" if self.bound else ("deleted" if not self.exists else "unbound")]
        bits.append("pw:" + ("known" if self.pw_known else ("hash" if self.password else "none")))
        return ",".join(bits)


@dataclass
class Op:
    kind: str
    person: str | None               # Person.key (None: faults, restarts)
    args: dict[str, Any]
    expect_rc: int = 0               # set by the runner from Model.expect just before the step
    text: str = ""
    outcome: str = ""                # filled in by the runner: "ok", "refused 19", "DIVERGED …"
    state: str = ""                  # the person's state just before the step (Person.state)
    who: str = ""                    # "p003=uid" just before the step

    def line(self, n: int) -> str:
        out = f"#{n:03d} " + (f"{self.who}: " if self.who else "") + self.text + (f" ({self.state})" if self.state else "")
        return out + (f"  [{self.outcome}]" if self.outcome and self.outcome != "ok" else "")


class Model:
    """The directory as the contract sees it, and a seeded generator of valid next steps."""

    def __init__(self, seed: int, profile: str, *, prefix: str, nodes: int = 1):
        self.rng = random.Random(seed)
        self.seed = seed
        self.profile = profile
        self.weights = PROFILES[profile]
        self.prefix = prefix             # keeps this run's names apart from other runs on one tenant
        self.people: dict[str, Person] = {}
        self.nodes = nodes
        self._n = 0
        self._pw = 0
        self.passwords: list[str] = []   # every password generated (none may appear in a log)

    # -- names ----------------------------------------------------------------------------
    def _fresh(self, what: str) -> str:
        self._n += 1
        return f"{self.prefix}{what}{self._n}"

    def fresh_password(self) -> str:
        self._pw += 1
        # policy: 8+ characters, 3 of 4 classes; never one used before (history)
        pw = f"Pw{self.seed}x{self._pw}-{self.rng.randrange(10**6):06d}aZ!"
        self.passwords.append(pw)
        return pw

    def by_uid(self, uid: str) -> Person | None:
        return next((p for p in self.people.values() if p.uid == uid and p.exists), None)

    def owner(self, value: str) -> Person | None:
        """The person who ever had ``value`` as uid or mail (case-insensitive)."""
        v = value.lower()
        return next((p for p in self.people.values() if v in p.uids or v in p.mails), None)

    # -- generation ----------------------------------------------------------------------------
    def living(self) -> list[Person]:
        return [p for p in self.people.values() if p.exists]

    def next_op(self) -> Op:
        """A step valid for the current state (weights of impossible kinds are skipped)."""
        while True:
            kinds = list(self.weights)
            kind = self.rng.choices(kinds, [self.weights[k] for k in kinds])[0]
            op = getattr(self, f"_gen_{kind}")()
            if op is not None:
                return op

    def _pick(self, pred: Any = lambda p: True) -> Person | None:
        pool = [p for p in self.living() if pred(p)]
        return self.rng.choice(pool) if pool else None

    def _gen_add(self, *, bound: bool | None = None, pw: str | None = None) -> Op | None:
        if len(self.living()) >= 14:
            return None
        uid = self._fresh("u")
        domain = self.rng.choice(VERIFIED)
        if bound is None:
            bound = self.rng.random() < 0.4
        if pw is None:
            pw = self.rng.choices(["clear", "hash", "none"], [6, 1, 2])[0]
        args = {"uid": uid, "mail": f"{uid}@{domain}", "given": f"G{uid}", "sn": "Sn0", "cn": f"Cn0 {uid}",
                "bound": bound, "pw": pw, "password": self.fresh_password() if pw != "none" else None}
        what = {"clear": "with a password", "hash": "with only a {SSHA} hash", "none": "without a password"}[pw]
        text = f"ldapadd {uid} ({'bound directly' if bound else 'unbound'}, {what}, mail {args['mail']})"
        return Op("add", None, args, 0, text)

    def _gen_add_bound(self) -> Op | None:
        return self._gen_add(bound=True, pw="clear")

    def _gen_bind_direct(self) -> Op | None:
        p = self._pick(lambda p: not p.direct)
        if p is None:
            return None
        return Op("bind_direct", p.key, {}, 0, "add ldapsyncDirectory: office365")

    def _gen_unbind_direct(self) -> Op | None:
        p = self._pick(lambda p: p.direct)
        return None if p is None else Op("unbind_direct", p.key, {}, 0, "delete ldapsyncDirectory")

    def _gen_tag_add(self) -> Op | None:
        p = self._pick(lambda p: not p.tag)
        if p is None:
            return None
        return Op("tag_add", p.key, {}, 0, "add member to the provisioning tag")

    def _gen_tag_remove(self) -> Op | None:
        p = self._pick(lambda p: p.tag)
        return None if p is None else Op("tag_remove", p.key, {}, 0, "remove member from the provisioning tag")

    def _gen_names(self) -> Op | None:
        p = self._pick()
        if p is None:
            return None
        n = self.rng.randrange(1000)
        changes: dict[str, str | None] = {}
        for attr in self.rng.sample(["givenName", "sn", "cn", "displayName"], self.rng.randint(1, 3)):
            if attr == "displayName" and p.display and self.rng.random() < 0.3:
                changes[attr] = None                          # delete: Graph shows cn again
            else:
                changes[attr] = {"givenName": f"Given{n}", "sn": f"Sn{n}", "cn": f"Cn{n} {p.uid}",
                                 "displayName": f"Display {n}"}[attr]
        text = ", ".join(f"{a} {'deleted' if v is None else '= ' + repr(v)}" for a, v in changes.items())
        return Op("names", p.key, {"changes": changes}, 0, text)

    def _gen_mail_local(self) -> Op | None:
        p = self._pick(lambda p: not p.mail.endswith("@" + UNVERIFIED))
        if p is None:
            return None
        new = f"{self._fresh('m')}@{p.mail.rsplit('@', 1)[1]}"
        return Op("mail", p.key, {"mail": new}, 0, f"mail -> {new}")

    def _gen_mail_domain(self) -> Op | None:
        p = self._pick()
        if p is None:
            return None
        domain = self.rng.choice([d for d in VERIFIED if not p.mail.endswith("@" + d)])
        new = f"{p.mail.rsplit('@', 1)[0]}@{domain}"
        return Op("mail", p.key, {"mail": new}, 0, f"mail -> {new} (other verified domain)")

    def _gen_mail_unverified(self) -> Op | None:
        p = self._pick()
        if p is None:
            return None
        new = f"{self._fresh('m')}@{UNVERIFIED}"
        return Op("mail", p.key, {"mail": new}, 0, f"mail -> {new} (unverified domain)")

    def _gen_mail_duplicate(self) -> Op | None:
        p = self._pick()
        others = [o for o in self.living() if p is not None and o is not p]
        if p is None or not others:
            return None
        o = self.rng.choice(others)
        new = o.mail.upper() if self.rng.random() < 0.5 else o.mail
        return Op("mail", p.key, {"mail": new, "duplicate_of": o.key}, 0,
                  f"mail -> {new} (= {o.key}'s mail: must be refused)")

    def _gen_pw_modify(self) -> Op | None:
        p = self._pick()
        return None if p is None else Op("pw_modify", p.key, {"password": self.fresh_password()}, 0,
                        "ldapmodify replace userPassword")

    def _gen_pw_passwd(self) -> Op | None:
        p = self._pick()
        return None if p is None else Op("pw_passwd", p.key, {"password": self.fresh_password()}, 0,
                        "ldappasswd (Password Modify)")

    def _gen_rename(self) -> Op | None:
        p = self._pick()
        if p is None:
            return None
        new = self._fresh("r")
        return Op("rename", p.key, {"uid": new}, 0, f"modrdn uid={new}")

    def _gen_delete(self) -> Op | None:
        p = self._pick()
        return None if p is None else Op("delete", p.key, {}, 0, "ldapdelete")

    def _gen_user_bind(self) -> Op | None:
        p = self._pick(lambda p: p.bound and p.password is not None)
        return None if p is None else Op("user_bind", p.key, {}, 0, "the user binds (ldapwhoami) with its password")

    def _gen_portal(self) -> Op | None:
        pool = [p for p in self.people.values() if p.ever_bound]
        if not pool:
            return None
        p = self.rng.choice(pool)
        n = self.rng.randrange(1000)
        change = self.rng.choice([{"accountEnabled": True}, {"accountEnabled": False}, {"displayName": f"Portal {n}"},
                                  {"givenName": f"PortalG{n}"}, {"surname": f"PortalS{n}"},
                                  {"accountEnabled": True, "displayName": f"Portal {n}"}])
        return Op("portal", p.key, {"changes": change}, 0, f"portal edit {change}")

    def _gen_fault(self) -> Op | None:
        kind = self.rng.choice(["429", "503", "latency", "outage"])
        if kind in ("429", "503"):
            args = {"fault": kind, "count": self.rng.randint(1, 6), "retry_after": self.rng.choice([1, 2])}
            text = f"tenant: next {args['count']} Graph operations answer {kind} (Retry-After {args['retry_after']})"
        elif kind == "latency":
            args = {"fault": kind, "seconds": self.rng.choice([0.3, 0.8, 1.5]), "ops": self.rng.randint(3, 10)}
            text = f"tenant: latency {args['seconds']} s for the next {args['ops']} steps"
        else:
            args = {"fault": kind, "seconds": self.rng.randint(2, 6), "mode": self.rng.choice(["503", "drop"])}
            text = f"tenant: outage {args['seconds']} s (mode {args['mode']})"
        return Op("fault", None, args, 0, text)

    def _gen_restart(self) -> Op | None:
        how = self.rng.choice(["sigterm", "kill9-server", "kill9-all", "kill9-worker"])
        node = self.rng.randrange(self.nodes)
        text = {"sigterm": "SIGTERM the server, start it again", "kill9-server": "kill -9 the server process, start it again",
                "kill9-all": "kill -9 the server and its worker process, start again",
                "kill9-worker": "kill -9 the worker process only (the server starts a new one)"}[how]
        return Op("restart", None, {"how": how, "node": node}, 0, f"node {node}: {text}" if self.nodes > 1 else text)

    def expect(self, op: Op) -> int:
        """The LDAP result the contract gives ``op`` in the current state (0 or constraintViolation)."""
        if op.person is None or op.person not in self.people:
            return 0
        p = self.people[op.person]
        if op.kind in ("bind_direct", "tag_add"):
            return CONSTRAINT if p.mail.lower().endswith("@" + UNVERIFIED) and not p.bound else 0
        if op.kind == "mail":
            mail = op.args["mail"].lower()
            if any(o is not p and o.mail.lower() == mail for o in self.living()):
                return CONSTRAINT
            return CONSTRAINT if p.bound and mail.endswith("@" + UNVERIFIED) else 0
        return 0

    # -- the directory after an accepted step ----------------------------------------------------
    def apply(self, op: Op) -> None:
        a = op.args
        if op.kind == "add":
            key = a.setdefault("key", f"p{len(self.people) + 1:03d}")     # kept when a trace is replayed
            p = Person(key, a["uid"], a["mail"], a["given"], a["sn"], a["cn"], password=a["password"],
                       pw_known=a["pw"] == "clear", direct=a["bound"], uids={a["uid"].lower()}, mails={a["mail"].lower()})
            op.person = key
            op.who = key
            self.people[key] = p
        elif op.person is not None:
            p = self.people[op.person]
            if op.kind == "bind_direct":
                p.direct = True
            elif op.kind == "unbind_direct":
                p.direct = False
            elif op.kind == "tag_add":
                p.tag = True
            elif op.kind == "tag_remove":
                p.tag = False
            elif op.kind == "names":
                for attr, v in a["changes"].items():
                    if attr == "givenName":
                        p.given = v
                    elif attr == "sn":
                        p.sn = v
                    elif attr == "cn":
                        p.cn = v
                    else:
                        p.display = v
            elif op.kind == "mail":
                p.mail = a["mail"]
                p.mails.add(a["mail"].lower())
            elif op.kind in ("pw_modify", "pw_passwd"):
                p.password, p.pw_known = a["password"], True
            elif op.kind == "rename":
                p.uid = a["uid"]
                p.uids.add(a["uid"].lower())
            elif op.kind == "delete":
                p.exists = False
            elif op.kind == "user_bind":
                if p.bound:
                    p.pw_known = True            # captured at the bind of a bound user
        for p in self.people.values():
            if p.bound:
                p.ever_bound = True


def expected(p: Person) -> dict[str, Any] | None:
    """What the person's Microsoft 365 account must say at the end; None: it may not exist.

    ``{"blocked_only": True}``: at most one account, accountEnabled false (unbound/deleted)."""
    if p.bound:
        want: dict[str, Any] = {
            "userPrincipalName": p.mail.lower(), "mail": p.mail.lower(), "mailNickname": p.uid,
            "displayName": p.graph_display, "givenName": p.given, "surname": p.sn,
            "accountEnabled": p.pw_known,
        }
        return want
    if p.ever_bound:
        return {"blocked_only": True}
    return None


# -- fixed traces: the divergences the randomized runs found, as minimal scripts ----------------------
# Each step: (kind, person name, args).  "wait" lets the queue drain first (so the order in which
# Microsoft 365 sees things is fixed).  Person "a" becomes uid <prefix>a, mail <prefix>a@contoso.com.
Step = tuple[Any, ...]
REGRESSIONS: dict[str, list[Step]] = {
    # the usual admin order: create with a password, then add to the group (issue 14, kind 4; the TTL)
    "password_set_while_unbound_is_pushed_at_tag_bind": [
        ("add", "a", {"bound": False, "pw": "clear"}), ("tag_add", "a")],
    "password_set_after_add_while_unbound_is_pushed_at_bind": [
        ("add", "a", {"bound": False, "pw": "none"}), ("pw_modify", "a"), ("bind_direct", "a")],
    # a password changed while unbound: the re-bind must not enable the old one (kind 2)
    "password_changed_while_unbound_is_pushed_at_rebind": [
        ("add", "a", {"bound": True, "pw": "clear"}), ("wait",), ("unbind_direct", "a"), ("wait",),
        ("pw_passwd", "a"), ("bind_direct", "a")],
    # bound and unbound again before the binding was delivered (Graph unreachable meanwhile): the
    # queued password never reached Microsoft 365 and must be kept for the next binding (seed 47)
    "password_of_a_binding_undone_before_delivery_is_kept": [
        ("add", "a", {"bound": False, "pw": "clear"}), ("fault", None, {"fault": "outage", "seconds": 4, "mode": "503"}),
        ("tag_add", "a"), ("tag_remove", "a"), ("wait",), ("tag_add", "a")],
    # created blocked (only a hash), unbound, bound again: must stay blocked, not be enabled
    "account_created_blocked_is_not_enabled_by_a_rebind": [
        ("add", "a", {"bound": False, "pw": "hash"}), ("tag_add", "a"), ("wait",), ("tag_remove", "a"), ("wait",),
        ("tag_add", "a")],
    # disabled in the portal, unbound, changed, bound again (kind 1)
    "portal_disable_then_unbind_and_rebind_ends_enabled": [
        ("add", "a", {"bound": True, "pw": "clear"}), ("wait",), ("portal", "a", {"accountEnabled": False}),
        ("unbind_direct", "a"), ("wait",), ("mail", "a", {"mail": "{prefix}a2@contoso.com"}),
        ("names", "a", {"changes": {"sn": "Changed"}}), ("bind_direct", "a")],
    # portal edits of a deleted user's account are put back (kind 3)
    "deleted_user_reenabled_in_the_portal_is_blocked_again": [
        ("add", "a", {"bound": True, "pw": "clear"}), ("wait",), ("delete", "a"), ("wait",),
        ("portal", "a", {"accountEnabled": True})],
    "unbound_user_reenabled_in_the_portal_is_blocked_again": [
        ("add", "a", {"bound": True, "pw": "clear"}), ("wait",), ("unbind_direct", "a"), ("wait",),
        ("portal", "a", {"accountEnabled": True})],
    # a bound user Microsoft 365 has no password for stays blocked, whatever the portal does
    "password_pending_user_enabled_in_the_portal_is_blocked_again": [
        ("add", "a", {"bound": True, "pw": "hash"}), ("wait",), ("portal", "a", {"accountEnabled": True})],
    "bound_user_without_a_password_is_flagged_pending": [
        ("add", "a", {"bound": True, "pw": "none"})],
    # the user's own bind right after it was bound hands the password over
    "bind_right_after_binding_captures_the_password": [
        ("add", "a", {"bound": False, "pw": "hash"}), ("bind_direct", "a"), ("user_bind", "a")],
    # mail is unique, case-insensitively
    "duplicate_mail_is_refused": [
        ("add", "a", {"bound": True, "pw": "clear"}), ("add", "b", {"bound": False, "pw": "clear"}),
        ("mail", "b", {"mail": "{PREFIX}A@CONTOSO.COM"})],
    # portal renames of bound users are put back (passes today: kept as a check of the check)
    "portal_rename_of_a_bound_user_is_put_back": [
        ("add", "a", {"bound": True, "pw": "clear"}), ("wait",), ("portal", "a", {"displayName": "Portal", "surname": "P"})],
}


def scripted(model: Model, steps: list[Step]) -> list[Op]:
    """The Ops of a fixed trace (see REGRESSIONS), with passwords from ``model``."""
    out: list[Op] = []
    for step in steps:
        kind, name, args = (list(step) + [None, None])[:3]
        args = dict(args or {})
        for k, v in list(args.items()):
            if isinstance(v, str):
                args[k] = v.replace("{prefix}", model.prefix).replace("{PREFIX}", model.prefix.upper())
        key = f"p_{name}" if name else None
        if kind == "wait":
            out.append(Op("wait", None, {}, 0, "wait until the queue is empty"))
        elif kind == "add":
            uid = f"{model.prefix}{name}"
            pw = args.get("pw", "clear")
            a = {"uid": uid, "mail": f"{uid}@contoso.com", "given": f"G{uid}", "sn": "Sn0", "cn": f"Cn0 {uid}",
                 "bound": args.get("bound", False), "pw": pw, "key": key,
                 "password": model.fresh_password() if pw != "none" else None}
            what = {"clear": "with a password", "hash": "with only a {SSHA} hash", "none": "without a password"}[pw]
            out.append(Op("add", None, a, 0, f"ldapadd {uid} ({'bound directly' if a['bound'] else 'unbound'}, {what})"))
        elif kind in ("pw_modify", "pw_passwd"):
            out.append(Op(kind, key, {"password": model.fresh_password()}, 0, kind.replace("pw_modify", "ldapmodify replace userPassword").replace("pw_passwd", "ldappasswd")))
        elif kind == "names":
            out.append(Op(kind, key, args, 0, ", ".join(f"{k} = {v!r}" for k, v in args["changes"].items())))
        elif kind == "portal":
            out.append(Op(kind, key, {"changes": args}, 0, f"portal edit {args}"))
        elif kind == "mail":
            out.append(Op(kind, key, args, 0, f"mail -> {args['mail']}"))
        else:
            out.append(Op(kind, key, args, 0, kind.replace("_", " ")))
    return out
