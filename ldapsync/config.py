"""Configuration: one frozen dataclass per TOML section, validated at start.

Owns reading ``ldapsync.toml`` (or the embedded defaults when there is none)
and turning every mistake into a :class:`ConfigError` whose message names the
key and says what is expected.  A relative path written in a config file is
resolved against the file's own directory, so the server, its worker process
and every CLI command find the same files whatever directory they run in; the
built-in defaults (``var/ldapsync.db``, ``var/secret.key``, ``var/admin-password``)
stay relative to the working directory (the service unit's state directory).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """The configuration cannot be used; the message says which key and why."""


def parse_duration(value: str | int | float, key: str) -> float:
    """``"60s"``, ``"5m"``, ``"2h"``, ``"3d"`` or a number of seconds (never negative)."""
    if isinstance(value, bool) or (isinstance(value, (int, float)) and value < 0):
        raise ConfigError(f"{key}: expected a duration (seconds, or a number with a unit: ms, s, m, h or d, "
                          f"like \"60s\" or \"90d\"), got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", str(value))
    if not m:
        raise ConfigError(f"{key}: expected a duration (seconds, or a number with a unit: ms, s, m, h or d, "
                          f"like \"250ms\", \"60s\", \"5m\", \"2h\", \"90d\"), got {value!r}")
    n = float(m.group(1))
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}[m.group(2)]


def _cpus() -> int:
    """The CPUs this process may run on (its affinity), at least 1: ``[ldap] processes``' default."""
    try:
        return max(1, len(os.sched_getaffinity(0)))     # taskset, systemd CPUAffinity=, a container's cpuset
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class DirectoryConfig:
    suffix: str = "dc=example,dc=com"
    database: str = "sqlite:///var/ldapsync.db"
    # "full": a write is on disk before it is acknowledged (SQLite synchronous=FULL, PostgreSQL
    # synchronous_commit on); "normal": faster, but a power loss can undo acknowledged writes.
    durability: str = "full"
    nested_groups: bool = False
    size_limit: int = 500          # entries per search for non-admins (0 = unlimited)
    time_limit: float = 3600.0     # seconds per search for non-admins
    indexed: tuple[str, ...] = (
        "objectClass", "uid", "cn", "sn", "givenName", "displayName", "mail",
        "member", "memberOf", "uniqueMember", "memberUid", "entryUUID",
        "ldapsyncDirectory", "o365ObjectId", "uidNumber", "gidNumber", "ou",
    )


@dataclass(frozen=True)
class LDAPConfig:
    listen: tuple[str, ...] = ("tcp:10389:interface=127.0.0.1",)
    starttls_cert: str = ""
    starttls_key: str = ""
    allow_anonymous_read: bool = False
    max_pdu_size: int = 10 * 1024 * 1024          # largest request after a successful bind
    max_pdu_size_anonymous: int = 256 * 1024      # largest request before a bind (slapd's sockbuf_max_incoming)
    idle_timeout: float = 900.0    # close connections idle this long (0 = never)
    max_connections: int = 4096                   # open LDAP connections in all (0 = no cap)
    max_connections_per_address: int = 256       # open LDAP connections from one client address (0 = no cap)
    max_pending_anonymous: int = 100              # operations in progress per connection before a bind (conn_max_pending)
    max_pending: int = 1000                       # ... after a successful bind (conn_max_pending_auth)
    bind_failures_per_address: int = 100          # wrong passwords per minute from one address before its binds are refused (0 = no cap)
    # LDAP processes sharing the listening sockets and the database (ldapsync/ldap_processes.py);
    # default: the CPUs this process may use.  1 = one process, as before.
    processes: int = field(default_factory=lambda: _cpus())


@dataclass(frozen=True)
class AdminConfig:
    dn: str = ""                   # default: cn=admin,<suffix>
    password_file: str = "var/admin-password"


@dataclass(frozen=True)
class PasswordsConfig:
    hash_time_cost: int = 2
    hash_memory_kib: int = 19456
    hash_parallelism: int = 1


@dataclass(frozen=True)
class Office365Config:
    enabled: bool = False
    tenant: str = ""
    client_id: str = ""
    client_secret_file: str = ""
    certificate_file: str = ""
    certificate_thumbprint: str = ""
    certificate_password_file: str = ""
    auth: str = "application"
    cloud: str = "global"
    authority: str = ""
    graph_url: str = ""
    ca_bundle: str = ""
    reconcile_interval: float = 60.0
    # How often every bound and ever-bound user is compared in full with its Microsoft 365 account
    # (sync/full_reconcile.py), besides the delta pass every reconcile_interval; 0 = never on a timer.
    full_reconcile_interval: float = 3600.0
    # How long a node's claim on a user's queued changes lasts without renewal (renewed every third
    # of it while the node works on them): a crashed node's work is taken over after this long.
    outbox_lease: float = 120.0
    # Several nodes (PostgreSQL): a node whose heartbeat (every 3 s) has not changed for this long is
    # presumed dead (kill -9, power loss, a frozen VM) and the others take over its claimed work.
    node_timeout: float = 15.0
    # Graph's directory write budget per app and tenant (writes per 150 s); the client paces
    # itself to ~95% of it.  0 turns client-side pacing off (a test tenant without limits).
    write_budget: int = 3000
    usage_location: str = ""
    soft_match: bool = True
    unbind_action: str = "block-and-revoke"
    # "block": a bound user whose directory password expired ([policy] max_age) is blocked in
    # Microsoft 365 until a new password is set (sync/expiry.py); "none": left as it is.
    expired_password_action: str = "block"
    disable_threshold: int = 500
    # A password set on an unbound ldapsyncUser entry is kept (encrypted) this long, so that
    # binding the user soon after pushes it to Microsoft 365; 0 keeps none.
    unbound_password_ttl: float = 24 * 3600.0
    client_secret_expires: str = ""   # ISO date of the client secret's end, when Graph may not tell us


@dataclass(frozen=True)
class MailConfig:
    smtp: str = "tcp:127.0.0.1:25"
    starttls: bool = False
    username: str = ""
    password_file: str = ""
    from_: str = "ldapsync@example.com"
    admin_address: str = ""


@dataclass(frozen=True)
class SelfServiceConfig:
    # The activation / password pages (twisted.web) in the same process; "" turns them off.
    listen: str = "tcp:8080:interface=127.0.0.1"
    # How users reach the pages (the links in e-mails); https:// makes the cookies Secure.
    public_url: str = ""                     # "" = the pages' own address, from listen
    activation_ttl: float = 72 * 3600.0      # an activation link works this long
    reset_ttl: float = 3600.0                # a forgotten-password link works this long
    # Where activation mail goes when the entry has it (the Microsoft 365 mailbox of a new
    # account cannot be read before the password is set); "" = always to `mail`.
    alternate_mail_attribute: str = "ldapsyncAltMail"
    session_timeout: float = 900.0           # a signed-in page session ends after this long idle
    rate_limit_window: float = 900.0
    rate_limit_user: int = 10                # attempts per user (sign-in, change, reset) per window
    rate_limit_address: int = 30             # attempts per client address per window
    expiry_check_interval: float = 3600.0    # how often password-expiry warnings are looked for
    # Reverse proxies (addresses or CIDR networks) whose X-Forwarded-For names the client; the
    # right-most address there that is not itself a trusted proxy is the client.  Empty: the TCP peer.
    trusted_proxies: tuple[str, ...] = ()
    request_timeout: float = 15.0            # a request (its line, headers and form) must arrive within this
    idle_timeout: float = 60.0               # a connection with nothing sent for this long is closed
    max_connections: int = 1000              # open connections to the pages, in total
    max_connections_per_address: int = 32    # ... and from one address (trusted proxies are not counted)

    def __post_init__(self) -> None:
        # public_url defaults to where the pages listen, so moving them to another port keeps their
        # forms working (a listen it cannot read is reported by _validate as a public_url to set).
        if not self.public_url and self.listen:
            object.__setattr__(self, "public_url", pages_url_from_listen(self.listen))


@dataclass(frozen=True)
class PolicyConfig:
    """[policy]: the password policy (like OpenLDAP's ppolicy overlay); see ldapsync.directory.policy."""

    min_length: int = 8                 # never below Microsoft 365's 8 (Graph would refuse the password)
    complexity: bool = True             # 3 of 4: lowercase, uppercase, digits, symbols (Microsoft 365's rule)
    history: int = 5                    # previous passwords that may not be reused (0 = off)
    max_age: float = 90 * 86400.0       # seconds a password lives (0 = never expires)
    expire_warning: float = 14 * 86400.0  # warn this long before expiry (bind control, mail)
    grace_logins: int = 0               # binds allowed with an expired password
    lockout_failures: int = 5           # failed binds within failure_window that lock (0 = off)
    lockout_duration: float = 15 * 60.0  # how long a lock lasts (0 = until an admin unlocks)
    failure_window: float = 15 * 60.0   # failures older than this are forgotten (0 = kept until a success)


@dataclass(frozen=True)
class SecretsConfig:
    key_file: str = "var/secret.key"


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = ""               # endpoint of /metrics, /healthz, /readyz, e.g. "tcp:9389:interface=127.0.0.1" ("" = off)


MAX_PROCESSES = 256     # [ldap] processes: a typo guard (each process holds its own database connections)
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")   # Twisted's LogLevel names
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class LogConfig:
    """[log]: the server's log (``ldapsync/logs.py``)."""

    level: str = "info"                 # debug, info, warn, error or critical
    format: str = "text"                # "text" (Twisted's lines) or "json" (one object per line)
    access: bool = False                # one line per LDAP operation and per connection open/close
    file: str = ""                      # "" = twistd's --logfile (stdout with -n); "-" = stdout


@dataclass(frozen=True)
class Config:
    directory: DirectoryConfig = field(default_factory=DirectoryConfig)
    ldap: LDAPConfig = field(default_factory=LDAPConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    passwords: PasswordsConfig = field(default_factory=PasswordsConfig)
    office365: Office365Config = field(default_factory=Office365Config)
    mail: MailConfig = field(default_factory=MailConfig)
    selfservice: SelfServiceConfig = field(default_factory=SelfServiceConfig)
    secrets: SecretsConfig = field(default_factory=SecretsConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str = "<embedded defaults>"

    @property
    def admin_dn(self) -> str:
        return self.admin.dn or f"cn=admin,{self.directory.suffix}"


_SECTIONS = {
    "directory": DirectoryConfig,
    "ldap": LDAPConfig,
    "admin": AdminConfig,
    "passwords": PasswordsConfig,
    "office365": Office365Config,
    "mail": MailConfig,
    "selfservice": SelfServiceConfig,
    "secrets": SecretsConfig,
    "policy": PolicyConfig,
    "metrics": MetricsConfig,
    "log": LogConfig,
}


def _coerce(section: str, name: str, default: Any, value: Any) -> Any:
    key = f"[{section}] {name}"
    if isinstance(default, float):          # every float key is a duration in seconds ("15m", "90d", 30)
        return parse_duration(value, key)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{key}: expected a non-negative whole number, got {value!r}")
        return value
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
        return tuple(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _build_section(section: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{section}] must be a table")
    known = {f.name.rstrip("_"): f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(
            f"[{section}]: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
        )
    values = {}
    for name, value in raw.items():
        f = known[name]
        default = f.default if not callable(f.default_factory) else f.default_factory()  # type: ignore[misc]
        values[f.name] = _coerce(section, name, default, value)
    return cls(**values)


def _validate(cfg: Config) -> None:
    o = cfg.office365
    if o.auth not in ("application", "delegated"):
        raise ConfigError(f'[office365] auth: expected "application" or "delegated", got {o.auth!r}')
    if o.cloud not in ("global", "usgov", "usgov-dod", "china"):
        raise ConfigError(f'[office365] cloud: expected global, usgov, usgov-dod or china, got {o.cloud!r}')
    if o.unbind_action not in ("block-and-revoke", "block"):
        raise ConfigError(f'[office365] unbind_action: expected "block-and-revoke" or "block", got {o.unbind_action!r}')
    if o.expired_password_action not in ("block", "none"):
        raise ConfigError(f'[office365] expired_password_action: expected "block" or "none", got {o.expired_password_action!r}')
    if o.outbox_lease < 3:
        raise ConfigError(f"[office365] outbox_lease: expected at least 3s, got {o.outbox_lease:g}s")
    if o.node_timeout < 6:
        raise ConfigError(f"[office365] node_timeout: expected at least 6s (two heartbeats of 3 s), "
                          f"got {o.node_timeout:g}s")
    if o.enabled and (not o.tenant or not o.client_id):
        raise ConfigError("[office365] enabled = true needs tenant and client_id")
    db = cfg.directory.database
    if not (db.startswith("sqlite:") or db.startswith("postgresql")):
        shown = re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", db)     # never echo a password
        raise ConfigError(
            f"[directory] database: expected sqlite:///path or postgresql+psycopg://user@host/db, got {shown!r}"
        )
    if cfg.directory.durability not in ("full", "normal"):
        raise ConfigError(f'[directory] durability: expected "full" (the default: nothing acknowledged is lost '
                          f'at a power loss) or "normal", got {cfg.directory.durability!r}')
    if bool(cfg.ldap.starttls_cert) != bool(cfg.ldap.starttls_key):
        raise ConfigError("[ldap] starttls_cert and starttls_key must be given together")
    if not cfg.ldap.listen:
        raise ConfigError("[ldap] listen: at least one listener is needed")
    _at_least_one("ldap", cfg.ldap, "max_pdu_size", "max_pdu_size_anonymous", "max_pending", "max_pending_anonymous",
                  "processes")
    if cfg.ldap.processes > MAX_PROCESSES:
        raise ConfigError(f"[ldap] processes: expected at most {MAX_PROCESSES}, got {cfg.ldap.processes}")
    url = cfg.selfservice.public_url
    if cfg.selfservice.listen and not url:
        raise ConfigError(f"[selfservice] public_url: cannot tell the pages' address from listen = "
                          f'{cfg.selfservice.listen!r}; set public_url, like "https://account.example.com"')
    if url and not re.fullmatch(r"https?://[^/\s?#]+(/[^\s?#]*)?", url):
        raise ConfigError(f'[selfservice] public_url: expected the address users open, like "https://account.example.com", '
                          f"got {url!r}")
    _validate_selfservice(cfg.selfservice)
    _validate_mail(cfg.mail)
    _validate_policy(cfg.policy)
    _validate_log(cfg.log)


def _validate_log(c: LogConfig) -> None:
    if c.level not in LOG_LEVELS:
        raise ConfigError(f'[log] level: expected "debug", "info", "warn", "error" or "critical", got {c.level!r}')
    if c.format not in LOG_FORMATS:
        raise ConfigError(f'[log] format: expected "text" or "json" (one JSON object per line), got {c.format!r}')


def _validate_selfservice(c: SelfServiceConfig) -> None:
    for entry in c.trusted_proxies:
        try:
            ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            raise ConfigError(f"[selfservice] trusted_proxies: {entry!r} is not an IP address or network "
                              '(like "127.0.0.1" or "10.0.0.0/8")') from None
    for key in ("request_timeout", "idle_timeout"):
        if getattr(c, key) <= 0:
            raise ConfigError(f'[selfservice] {key}: expected a duration like "15s", got {getattr(c, key):g}')
    _at_least_one("selfservice", c, "max_connections", "max_connections_per_address")


def _at_least_one(section: str, c: Any, *keys: str) -> None:
    """Whole-number keys for which 0 would mean nothing works (they have no "0 = no cap")."""
    for key in keys:
        if getattr(c, key) < 1:
            raise ConfigError(f"[{section}] {key}: expected at least 1, got {getattr(c, key)}")


def mail_auth_problem(m: MailConfig) -> str | None:
    """Why ``[mail]`` would send the SMTP password in clear (None when it would not): AUTH only
    over STARTTLS or an implicit-TLS ``tls:`` endpoint."""
    if m.username and not m.starttls and not m.smtp.strip().lower().startswith("tls:"):
        return ("[mail] username is set but the connection is not encrypted: SMTP AUTH would send the "
                'password in clear. Set starttls = true, or use a "tls:" smtp endpoint (implicit TLS, port 465)')
    return None


def _validate_mail(m: MailConfig) -> None:
    problem = mail_auth_problem(m)
    if problem:
        raise ConfigError(problem)


def _validate_policy(p: PolicyConfig) -> None:
    if p.min_length < 8:
        raise ConfigError(f"[policy] min_length: expected at least 8, got {p.min_length} "
                          "(Microsoft 365 refuses passwords shorter than 8 characters)")
    if p.min_length > 256:
        raise ConfigError(f"[policy] min_length: expected at most 256, got {p.min_length} "
                          "(Microsoft 365 refuses passwords longer than 256 characters)")
    if p.history > 100:
        raise ConfigError(f"[policy] history: expected at most 100 previous passwords, got {p.history}")
    if p.max_age and p.max_age < 3600:
        raise ConfigError(f"[policy] max_age: expected \"0\" (never expires) or at least 1h, got {p.max_age:g}s")
    if p.max_age and p.expire_warning >= p.max_age:
        raise ConfigError(f"[policy] expire_warning ({p.expire_warning:g}s) must be shorter than max_age ({p.max_age:g}s)")


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load the config file; ``None`` means $LDAPSYNC_CONFIG, else ./ldapsync.toml, else defaults."""
    if path is None:
        env = os.environ.get("LDAPSYNC_CONFIG")
        if env:
            path = env
        elif Path("ldapsync.toml").exists():
            path = "ldapsync.toml"
    if path is None:
        cfg = Config()
        _validate(cfg)
        return cfg
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{p}: unknown section(s) {', '.join(unknown)}; known: {', '.join(_SECTIONS)}")
    sections = {name: _build_section(name, cls, raw.get(name, {})) for name, cls in _SECTIONS.items()}
    cfg = _resolve_paths(Config(**sections, source=str(p)), raw, p.resolve().parent)
    _validate(cfg)
    return cfg


def to_json(cfg: Config) -> str:
    """``cfg`` as one line of JSON, for a child process that must run with exactly the server's
    configuration (``ldap_processes.py``), not the file as it may read later."""
    return json.dumps(asdict(cfg), separators=(",", ":"))


def from_json(text: str) -> Config:
    """The :class:`Config` :func:`to_json` wrote."""
    raw = json.loads(text)
    sections = {name: cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw[name].items()})
                for name, cls in _SECTIONS.items()}
    return Config(**sections, source=raw["source"])


# The keys that name a file, by section ("" in a key means "not set"; [log] file "-" is stdout).
PATH_KEYS: dict[str, tuple[str, ...]] = {
    "ldap": ("starttls_cert", "starttls_key"),
    "admin": ("password_file",),
    "office365": ("client_secret_file", "certificate_file", "certificate_password_file", "ca_bundle"),
    "mail": ("password_file",),
    "secrets": ("key_file",),
    "log": ("file",),
}
_SQLITE_PREFIX = "sqlite:///"


def _resolve_paths(cfg: Config, raw: dict[str, Any], base: Path) -> Config:
    """``cfg`` with every relative file path the file sets (``raw``; a SQLite database too) made
    absolute against ``base``, the config file's directory.  Defaults are left as they are."""
    changes: dict[str, Any] = {}
    for section, keys in PATH_KEYS.items():
        sec = getattr(cfg, section)
        given = raw.get(section, {})
        new = {k: str(base / v) for k in keys
               if k in given and (v := getattr(sec, k)) and v != "-" and not Path(v).is_absolute()}
        if new:
            changes[section] = replace(sec, **new)
    db = cfg.directory.database
    if "database" in raw.get("directory", {}) and db.startswith(_SQLITE_PREFIX):
        path = db[len(_SQLITE_PREFIX):].split("?", 1)[0]
        if path and path != ":memory:" and not Path(path).is_absolute():
            changes["directory"] = replace(cfg.directory, database=_SQLITE_PREFIX + str(base / path)
                                           + db[len(_SQLITE_PREFIX) + len(path):])
    return replace(cfg, **changes) if changes else cfg


def pages_url_from_listen(listen: str) -> str:
    """The address of pages served on ``listen`` (a Twisted endpoint), e.g. ``tcp:8080:interface=127.0.0.1``
    → ``http://127.0.0.1:8080``; ``ssl:…`` → ``https://…``; no interface or a wildcard → 127.0.0.1."""
    parts = listen.split(":")
    kind = parts[0].lower() if parts else ""
    if kind not in ("tcp", "tcp6", "ssl") or len(parts) < 2:
        return ""
    port = next((p for p in parts[1:] if p.isdigit()), "") or next(
        (p.split("=", 1)[1] for p in parts[1:] if p.startswith("port=")), "")
    host = next((p.split("=", 1)[1] for p in parts[1:] if p.startswith("interface=")), "") or "127.0.0.1"
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if kind == "ssl" else "http"
    return f"{scheme}://{host}:{port}" if port else ""

