"""The password policy: pure rules over an entry's attributes and the time.

Like OpenLDAP's ppolicy overlay (draft-behera-ldap-password-policy), with one
policy for the whole directory, configured in ``[policy]``
(:class:`~ldapsync.config.PolicyConfig`).  The state lives on each entry as
operational attributes in OpenLDAP's formats, so an ``ldif dump`` loads into
slapd with ppolicy and back:

==========================  =====================================================
``pwdChangedTime``          when the password was last set (GeneralizedTime)
``pwdFailureTime``          one value per recent failed bind (with microseconds)
``pwdAccountLockedTime``    when the account was locked (``000001010000Z``: locked
                            by an admin until an admin unlocks it)
``pwdGraceUseTime``         one value per bind used with an expired password
``pwdHistory``              previous hashes: ``time#1.3.6.1.4.1.1466.115.121.1.40#len#hash``
==========================  =====================================================

A password with no ``pwdChangedTime`` (loaded by ``ldif load``, or set before
the policy existed) is not expired: its age starts at its next successful
bind, which records ``pwdChangedTime`` (so a migrated directory does not
expire all at once, and every password eventually has an age).

Everything here is a pure function of (config, attributes, now): no I/O, no
clock of its own, no hashing (hash comparisons for the history rule run in the
directory's hash thread pool).  No message ever contains a password or a hash.
The directory (``ldapsync.directory.facade``) applies the results in one
write transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum

from ldapsync.config import PolicyConfig
from ldapsync.directory.errors import LDAPError, ResultCode
from ldapsync.directory.passwords import check_complexity
from ldapsync.directory.passwords import MAX_LENGTH
from ldapsync.directory.schema import parse_generalized_time

#: The operational attributes the policy keeps on an entry (readable by admins only).
POLICY_ATTRS = frozenset({"pwdChangedTime", "pwdFailureTime", "pwdAccountLockedTime", "pwdGraceUseTime", "pwdHistory"})
#: Attributes an admin may change with an ordinary modify (to unlock, or to lock by hand).
ADMIN_RESETTABLE = frozenset({"pwdAccountLockedTime", "pwdFailureTime", "pwdGraceUseTime"})
#: pwdAccountLockedTime value that means "locked until an admin unlocks it" (OpenLDAP 2.5).
PERMANENT_LOCK = "000001010000Z"
OCTET_STRING_SYNTAX = "1.3.6.1.4.1.1466.115.121.1.40"


class PPError(IntEnum):
    """PasswordPolicyResponseValue error (draft-behera-ldap-password-policy §6.2)."""

    passwordExpired = 0
    accountLocked = 1
    changeAfterReset = 2
    passwordModNotAllowed = 3
    mustSupplyOldPassword = 4
    insufficientPasswordQuality = 5
    passwordTooShort = 6
    passwordTooYoung = 7
    passwordInHistory = 8


@dataclass(frozen=True)
class PPolicyResponse:
    """What the password policy response control says (any field may be absent)."""

    time_before_expiration: int | None = None
    grace_authns_remaining: int | None = None
    error: PPError | None = None


class PolicyError(LDAPError):
    """An LDAPError that carries what the password policy response control should say."""

    def __init__(self, code: ResultCode | int, message: str, ppolicy: PPolicyResponse) -> None:
        super().__init__(code, message)
        self.ppolicy = ppolicy


@dataclass(frozen=True)
class PasswordState:
    """An account's password policy state (for the account page and the expiry-warning mailer).

    Times are seconds since the epoch.  ``expires_at`` is None when the password
    never expires (``max_age = "0"``, the exempt admin, no password, or no
    ``pwdChangedTime`` yet).  ``locked_until`` is None when not locked or when
    locked until an admin unlocks (``locked`` tells which).
    """

    has_password: bool
    changed_at: float | None
    expires_at: float | None
    expired: bool
    locked: bool
    locked_until: float | None
    failures: int
    grace_remaining: int | None


# -- time values ------------------------------------------------------------------

def format_time(t: float, *, micro: bool = False) -> str:
    """Seconds since the epoch → GeneralizedTime (UTC); ``micro`` keeps microseconds (multi-valued attrs)."""
    dt = datetime.fromtimestamp(t, UTC)
    if micro:
        return dt.strftime("%Y%m%d%H%M%S.%fZ")
    return dt.strftime("%Y%m%d%H%M%SZ")


def parse_time(value: str) -> float | None:
    """GeneralizedTime → seconds since the epoch; None when unparseable (never raises)."""
    try:
        return parse_generalized_time(value).timestamp()
    except (ValueError, OverflowError):
        return None


def _times(attrs: dict[str, list[str]], name: str) -> list[float]:
    out = []
    for v in attrs.get(name, ()):
        t = parse_time(v)
        if t is not None:
            out.append(t)
    return out


def _first_time(attrs: dict[str, list[str]], name: str) -> float | None:
    ts = _times(attrs, name)
    return ts[0] if ts else None


# -- quality ---------------------------------------------------------------------------

def check_quality(cfg: PolicyConfig, password: str) -> PolicyError | None:
    """None when ``password`` meets the length and complexity rules, else the error to raise.

    The message names the rule that failed and never echoes the password.
    """
    if len(password) < cfg.min_length:
        return PolicyError(ResultCode.constraintViolation, f"password must be at least {cfg.min_length} characters",
                           PPolicyResponse(error=PPError.passwordTooShort))
    why = check_complexity(password, cfg.min_length) if cfg.complexity else _basic_check(password)
    if why is not None:
        return PolicyError(ResultCode.constraintViolation, f"password {why}",
                           PPolicyResponse(error=PPError.insufficientPasswordQuality))
    return None


def _basic_check(password: str) -> str | None:
    """Without the complexity rule, what Microsoft 365 still refuses (length, non-ASCII, control characters)."""
    if len(password) > MAX_LENGTH:
        return f"must be at most {MAX_LENGTH} characters"
    if not password.isascii():
        return "must not contain non-ASCII characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in password):
        return "must not contain control characters"
    return None


def history_error(cfg: PolicyConfig) -> PolicyError:
    n = cfg.history
    what = "the last password" if n == 1 else f"last {n} passwords"
    return PolicyError(ResultCode.constraintViolation, f"password was used recently ({what})",
                       PPolicyResponse(error=PPError.passwordInHistory))


# -- history ------------------------------------------------------------------------------

def history_value(t: float, stored_hash: str) -> str:
    """One pwdHistory value in OpenLDAP's format."""
    return f"{format_time(t)}#{OCTET_STRING_SYNTAX}#{len(stored_hash.encode('utf-8'))}#{stored_hash}"


def _parse_history(value: str) -> tuple[float, str] | None:
    parts = value.split("#", 3)
    if len(parts) != 4:
        return None
    t = parse_time(parts[0])
    return (t if t is not None else 0.0), parts[3]


def history_hashes(cfg: PolicyConfig, attrs: dict[str, list[str]]) -> list[str]:
    """The hashes a new password may not match: the current ones and the last ``history`` old ones."""
    if not cfg.history:
        return []
    old = [h for h in (_parse_history(v) for v in attrs.get("pwdHistory", ())) if h is not None]
    old.sort(key=lambda x: x[0], reverse=True)
    return list(attrs.get("userPassword", ())) + [h for _, h in old[: cfg.history]]


# -- expiry and lockout -----------------------------------------------------------------------

def changed_at(attrs: dict[str, list[str]]) -> float | None:
    return _first_time(attrs, "pwdChangedTime")


def expires_at(cfg: PolicyConfig, attrs: dict[str, list[str]], *, exempt: bool = False) -> float | None:
    if exempt or not cfg.max_age or not attrs.get("userPassword"):
        return None
    c = changed_at(attrs)
    return None if c is None else c + cfg.max_age


def grace_remaining(cfg: PolicyConfig, attrs: dict[str, list[str]]) -> int:
    """Grace binds left for an expired password (uses recorded since its last change count)."""
    c = changed_at(attrs) or 0.0
    used = sum(1 for t in _times(attrs, "pwdGraceUseTime") if t >= c)
    return max(cfg.grace_logins - used, 0)


def lock_state(cfg: PolicyConfig, attrs: dict[str, list[str]], now: float) -> tuple[bool, float | None]:
    """(locked?, until) — ``until`` None means until an admin unlocks (or not locked).

    A lock whose duration has passed is no longer in force; the stale value is
    removed at the next bind (:func:`values_after_success` / :func:`values_after_failure`).
    """
    vals = attrs.get("pwdAccountLockedTime")
    if not vals:
        return False, None
    if vals[0] == PERMANENT_LOCK:
        return True, None
    t = parse_time(vals[0])
    if t is None:
        return True, None               # unreadable lock value: stay safe, an admin can delete it
    if now < t:
        return False, None              # a lock set in the future is not yet in effect (OpenLDAP)
    if not cfg.lockout_duration:
        return True, None
    until = t + cfg.lockout_duration
    return (now < until), (until if now < until else None)


def _recent_failures(cfg: PolicyConfig, attrs: dict[str, list[str]], now: float) -> list[str]:
    """pwdFailureTime values that still count: inside failure_window and after an expired lock."""
    lock_t = _first_time(attrs, "pwdAccountLockedTime")
    keep = []
    for v in attrs.get("pwdFailureTime", ()):
        t = parse_time(v)
        if t is None:
            continue
        if cfg.failure_window and t <= now - cfg.failure_window:
            continue
        if lock_t is not None and t <= lock_t and not lock_state(cfg, attrs, now)[0]:
            continue                    # the lock these led to is over: they are spent
        keep.append(v)
    return keep


def failure_count(cfg: PolicyConfig, attrs: dict[str, list[str]], now: float) -> int:
    """Failed binds that still count towards the lock (what the next failure adds to)."""
    return len(_recent_failures(cfg, attrs, now))


def password_state(cfg: PolicyConfig, attrs: dict[str, list[str]], now: float, *, exempt: bool = False) -> PasswordState:
    exp = expires_at(cfg, attrs, exempt=exempt)
    locked, until = lock_state(cfg, attrs, now) if not exempt else (False, None)
    expired = exp is not None and now >= exp
    return PasswordState(
        has_password=bool(attrs.get("userPassword")),
        changed_at=changed_at(attrs),
        expires_at=exp,
        expired=expired,
        locked=locked,
        locked_until=until,
        failures=len(_recent_failures(cfg, attrs, now)) if not exempt else 0,
        grace_remaining=grace_remaining(cfg, attrs) if expired else None,
    )


# -- new operational values --------------------------------------------------------------------
# Each returns {attribute: values} to store, with None meaning "remove"; {} means nothing changes.

def values_after_change(cfg: PolicyConfig, attrs: dict[str, list[str]], now: float,
                        *, new_hashes: Sequence[str] = ()) -> dict[str, list[str] | None]:
    """After userPassword was set: stamp pwdChangedTime, push the old hashes to pwdHistory, clear lock state."""
    out: dict[str, list[str] | None] = {
        "pwdChangedTime": [format_time(now)],
        "pwdFailureTime": None,
        "pwdAccountLockedTime": None,
        "pwdGraceUseTime": None,
    }
    if cfg.history:
        # Like OpenLDAP: a history value is stamped with the time it was replaced; newest first.
        hist = [(now, history_value(now, h)) for h in attrs.get("userPassword", ()) if h not in new_hashes]
        for v in attrs.get("pwdHistory", ()):
            parsed = _parse_history(v)
            if parsed is not None:
                hist.append((parsed[0], v))
        hist.sort(key=lambda x: x[0], reverse=True)
        values = []
        for _, v in hist:
            if v not in values:
                values.append(v)
        out["pwdHistory"] = values[: cfg.history] or None
    else:
        out["pwdHistory"] = None
    return out


def values_after_failure(cfg: PolicyConfig, attrs: dict[str, list[str]], now: float) -> tuple[dict[str, list[str] | None], bool]:
    """After a failed bind: (values, locked by this failure?).  Failures outside the window are dropped."""
    if not cfg.lockout_failures:
        return {}, False
    if lock_state(cfg, attrs, now)[0]:
        return {}, True
    failures = _recent_failures(cfg, attrs, now)
    stamp = format_time(now, micro=True)
    while stamp in failures:            # several failures within the same microsecond (a fixed test clock)
        now += 0.000001
        stamp = format_time(now, micro=True)
    failures.append(stamp)
    out: dict[str, list[str] | None] = {"pwdFailureTime": failures}
    locked = len(failures) >= cfg.lockout_failures
    if locked:
        out["pwdAccountLockedTime"] = [format_time(now)]
    elif attrs.get("pwdAccountLockedTime"):
        out["pwdAccountLockedTime"] = None      # an expired lock
    return out, locked


def values_after_success(cfg: PolicyConfig, attrs: dict[str, list[str]], now: float, *,
                         grace_used: bool = False, exempt: bool = False) -> dict[str, list[str] | None]:
    """After a successful bind: failures and an expired lock go; a first bind dates an undated password."""
    out: dict[str, list[str] | None] = {}
    if attrs.get("pwdFailureTime"):
        out["pwdFailureTime"] = None
    if attrs.get("pwdAccountLockedTime") and not lock_state(cfg, attrs, now)[0]:
        out["pwdAccountLockedTime"] = None
    if exempt:
        return out
    if not attrs.get("pwdChangedTime") and attrs.get("userPassword"):
        out["pwdChangedTime"] = [format_time(now)]
    if grace_used:
        c = changed_at(attrs) or 0.0
        uses = [v for v in attrs.get("pwdGraceUseTime", ()) if (parse_time(v) or 0.0) >= c]
        stamp = format_time(now, micro=True)
        while stamp in uses:
            now += 0.000001
            stamp = format_time(now, micro=True)
        out["pwdGraceUseTime"] = uses + [stamp]
    return out


# -- for people ---------------------------------------------------------------------------------

def _duration(seconds: float) -> str:
    for unit, n in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= n and seconds % n == 0:
            k = int(seconds // n)
            return f"{k} {unit}{'s' if k != 1 else ''}"
    k = int(seconds)
    return f"{k} second{'s' if k != 1 else ''}"


def describe_policy(cfg: PolicyConfig) -> list[str]:
    """The rules as sentences for the self-service pages."""
    out = [f"At least {cfg.min_length} characters"]
    if cfg.complexity:
        out.append("At least 3 of: lowercase, uppercase, digits, symbols")
    out.append("Letters, digits and symbols from the English keyboard only (no accents or emoji)")
    if cfg.history == 1:
        out.append("Not your current or previous password")
    elif cfg.history:
        out.append(f"Not your current password or one of your last {cfg.history} passwords")
    if cfg.max_age:
        out.append(f"Expires after {_duration(cfg.max_age)}")
    if cfg.lockout_failures:
        lock = f"for {_duration(cfg.lockout_duration)}" if cfg.lockout_duration else "until an administrator unlocks it"
        out.append(f"After {cfg.lockout_failures} wrong passwords in a row the account is locked {lock}")
    return out
