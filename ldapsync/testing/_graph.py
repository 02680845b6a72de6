"""The fake tenant's Microsoft Graph v1.0 handlers: users, delta, domains, organization, $batch.

Owns: the routing of ``/v1.0/...`` paths, Graph's validation rules for users (required properties,
UPN syntax and verified domain, password complexity, conflicts, unknown and read-only properties),
``$select``/``$filter``/``$top`` and nextLink paging, delta queries and ``$batch``. Authentication,
faults, throttling and recording happen around these handlers in ``tenant.py``. Test double only.
"""

from __future__ import annotations

import json
import re
import secrets
import uuid
from typing import TYPE_CHECKING, Any, Callable, cast
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from ._http import GraphError, Req, Resp, parse_json_body
from ._identity import ADMIN_ROLES, TokenInfo

if TYPE_CHECKING:
    from .tenant import FakeTenant

# --- the user resource -------------------------------------------------------------------------

DEFAULT_PROPS = ("businessPhones", "displayName", "givenName", "jobTitle", "mail", "mobilePhone",
                 "officeLocation", "preferredLanguage", "surname", "userPrincipalName", "id")
BOOL_PROPS = {"accountEnabled", "showInAddressList"}
LIST_PROPS = {"businessPhones", "otherMails", "proxyAddresses", "imAddresses"}
STR_PROPS = {
    "id", "displayName", "givenName", "surname", "mail", "mailNickname", "userPrincipalName",
    "passwordPolicies", "usageLocation", "userType", "jobTitle", "department", "officeLocation",
    "mobilePhone", "preferredLanguage", "onPremisesImmutableId", "companyName", "employeeId",
    "employeeType", "city", "country", "state", "streetAddress", "postalCode", "faxNumber",
    "ageGroup", "createdDateTime", "lastPasswordChangeDateTime", "creationType",
    "externalUserState", "signInSessionsValidFromDateTime", "deletedDateTime",
}
USER_PROPS = STR_PROPS | BOOL_PROPS | LIST_PROPS | {"passwordProfile", "onPremisesSyncEnabled"}
READ_ONLY = {"id", "createdDateTime", "lastPasswordChangeDateTime", "proxyAddresses", "creationType",
             "externalUserState", "signInSessionsValidFromDateTime", "deletedDateTime",
             "onPremisesSyncEnabled", "imAddresses"}
NEVER_RETURNED = {"passwordProfile"}
REQUIRED_ON_CREATE = ("accountEnabled", "displayName", "mailNickname", "userPrincipalName",
                      "passwordProfile")
FILTERABLE = {"id", "userPrincipalName", "mail", "displayName", "givenName", "surname", "mailNickname",
              "userType", "accountEnabled", "usageLocation", "employeeId", "onPremisesImmutableId",
              "jobTitle", "department", "companyName", "proxyAddresses", "otherMails", "city",
              "country", "state", "createdDateTime", "employeeType", "preferredLanguage"}
_CANON = {p.lower(): p for p in USER_PROPS}

# --- permissions (application roles / delegated scopes) ----------------------------------------

P_READ = {"User.Read.All", "User.ReadWrite.All", "Directory.Read.All", "Directory.ReadWrite.All",
          "User.ReadBasic.All"}
P_CREATE = {"User.Create", "User.ReadWrite.All", "Directory.ReadWrite.All"}
P_UPDATE = {"User.ReadUpdate.All", "User.ReadWrite.All", "Directory.ReadWrite.All"}
P_ENABLE = P_UPDATE | {"User.EnableDisableAccount.All"}
P_PASSWORD = {"User-PasswordProfile.ReadWrite.All", "User.ReadWrite.All", "Directory.ReadWrite.All"}
P_DELETE = {"User.ReadWrite.All", "Directory.ReadWrite.All", "User.DeleteRestore.All"}
P_REVOKE = {"User.RevokeSessions.All", "User.ReadWrite.All", "Directory.ReadWrite.All"}
P_DOMAINS = {"Domain.Read.All", "Domain.ReadWrite.All", "Directory.Read.All", "Directory.ReadWrite.All"}
P_ORG = {"Organization.Read.All", "Organization.ReadWrite.All", "Directory.Read.All",
         "Directory.ReadWrite.All"}
P_APPS = {"Application.Read.All", "Application.ReadWrite.All", "Application.ReadWrite.OwnedBy",
          "Directory.Read.All", "Directory.ReadWrite.All"}
PRIVILEGED_ROLES = {"Global Administrator", "Privileged Authentication Administrator"}

DENIED = "Insufficient privileges to complete the operation."
PASSWORD_MESSAGE = ("The specified password does not comply with password complexity requirements. "
                    "Please provide a different password.")
_UPN_LOCAL = re.compile(r"^[A-Za-z0-9'.\-_!#^~]+$")
_NICKNAME = re.compile(r"^[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.]+$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_PASSWORD_SYMBOLS = set("@#$%^&*-_!+=[]{}|\\:',.?/`~\"();<> ")
PAGE_DEFAULT = 100
BATCH_LIMIT = 20


def require(token: TokenInfo, allowed: set[str]) -> None:
    if not token.permissions & allowed:
        raise GraphError(403, "Authorization_RequestDenied", DENIED)


def bad(message: str, target: str | None = None, code: str = "Request_BadRequest",
        detail: str = "InvalidValue") -> GraphError:
    return GraphError(400, code, message, [{"code": detail, "target": target}] if target else None)


def invalid_value(prop: str) -> GraphError:
    return bad(f"Invalid value specified for property '{prop}' of resource 'User'.", prop)


def not_found(key: str) -> GraphError:
    return GraphError(404, "Request_ResourceNotFound",
                      f"Resource '{key}' does not exist or one of its queried reference-property "
                      "objects are not present.")


def upn_problem(upn: str) -> str | None:
    """Why ``upn`` breaks Entra's syntax rules, or None."""
    local, at, domain = upn.rpartition("@")
    if not at or not local or not domain or "@" in local:
        return "must be alias@domain"
    if len(local) > 64 or len(domain) > 48 or len(upn) > 113:
        return "too long"
    if not _UPN_LOCAL.match(local) or local.endswith("."):
        return "invalid characters"
    return None


def password_problem(password: Any, *, strong: bool = True) -> bool:
    if not isinstance(password, str) or not 8 <= len(password) <= 256:
        return True
    if any(not 32 <= ord(c) < 127 for c in password):
        return True
    classes = (any(c.islower() for c in password), any(c.isupper() for c in password),
               any(c.isdigit() for c in password), any(c in _PASSWORD_SYMBOLS for c in password))
    return strong and sum(classes) < 3


def parse_select(value: str | None, always: tuple[str, ...] = ()) -> list[str] | None:
    if not value:
        return None
    out: list[str] = []
    for raw in value.split(","):
        name = raw.strip()
        canon = _CANON.get(name.lower())
        if canon is None:
            raise GraphError(400, "BadRequest",
                             f"Could not find a property named '{name}' on type 'microsoft.graph.user'.")
        if canon not in out:
            out.append(canon)
    return list(always) + [p for p in out if p not in always]


def represent(user: dict[str, Any], select: list[str] | None) -> dict[str, Any]:
    props = DEFAULT_PROPS if select is None else select
    out: dict[str, Any] = {}
    for p in props:
        value = None if p in NEVER_RETURNED else user.get(p)
        out[p] = list(value) if isinstance(value, list) else value
    return out


def _context(t: FakeTenant, what: str, select: list[str] | None, entity: bool = False) -> str:
    sel = f"({','.join(select)})" if select else ""
    return f"{t.graph_url}/$metadata#{what}{sel}{'/$entity' if entity else ''}"


# --- routing -----------------------------------------------------------------------------------

_USER_KEY = re.compile(r"^/users/(?P<key>[^/]+)$")
_USER_ACTION = re.compile(r"^/users/(?P<key>[^/]+)/(?P<action>[A-Za-z.]+)$")
_APP_BY_APPID = re.compile(r"^/applications\(appId='(?P<app>[^']+)'\)$")
_DOMAIN = re.compile(r"^/domains/(?P<name>[^/]+)$")


def handle_graph(t: FakeTenant, req: Req, rel: str, token: TokenInfo) -> Resp:
    """Dispatch one Graph operation. ``rel`` is the path after ``/v1.0``."""
    m = req.method
    routes: list[tuple[str, re.Pattern[str] | str, Callable[..., Resp]]] = [
        ("GET", "/users", list_users), ("POST", "/users", create_user),
        ("GET", "/users/delta", users_delta), ("GET", "/users/$count", count_users),
        ("GET", "/domains", list_domains), ("GET", "/organization", organization),
        ("GET", "/me", me),
        ("GET", _DOMAIN, get_domain), ("GET", _APP_BY_APPID, get_application),
        ("POST", _USER_ACTION, user_action),
        ("GET", _USER_KEY, get_user), ("PATCH", _USER_KEY, patch_user),
        ("DELETE", _USER_KEY, delete_user),
    ]
    path_matched = False
    for method, pattern, handler in routes:
        match: dict[str, str] | None
        if isinstance(pattern, str):
            match = {} if rel == pattern else None
        else:
            found = pattern.match(rel)
            match = {k: unquote(v) for k, v in found.groupdict().items()} if found else None
        if match is None:
            continue
        path_matched = True
        if method == m:
            return handler(t, req, token, **match)
    if path_matched:
        raise GraphError(405, "Request_BadRequest",
                         f"The request method '{m}' is not allowed on this resource.")
    segment = rel.strip("/").split("/")[0] or rel
    raise GraphError(400, "BadRequest", f"Resource not found for the segment '{segment}'.")


# --- users: read -------------------------------------------------------------------------------

def lookup(t: FakeTenant, key: str) -> str:
    user_id = t.find_user_id(key)
    if user_id is None or t.clock() < t.created_at.get(user_id, 0) + t.replication_delay:
        raise not_found(key)
    return user_id


def get_user(t: FakeTenant, req: Req, token: TokenInfo, key: str) -> Resp:
    require(token, P_READ)
    user_id = lookup(t, key)
    select = parse_select(req.query.get("$select"))
    body = {"@odata.context": _context(t, "users", select, entity=True)}
    body.update(represent(t.users[user_id], select))
    return Resp(200, body)


def me(t: FakeTenant, req: Req, token: TokenInfo) -> Resp:
    if token.user_id is None:
        raise GraphError(400, "BadRequest", "/me request is only valid with delegated authentication "
                         "flow.")
    return get_user(t, req, token, token.user_id)


def _needs_eventual(req: Req, message: str = "Unsupported Query.") -> None:
    if (req.header("consistencylevel") or "").lower() != "eventual":
        raise GraphError(400, "Request_UnsupportedQuery", message)


def _page_size(req: Req) -> int:
    raw = req.query.get("$top")
    if raw is None:
        return PAGE_DEFAULT
    try:
        top = int(raw)
    except ValueError:
        raise GraphError(400, "BadRequest", f"Invalid value '{raw}' for $top query option.") from None
    if not 1 <= top <= 999:
        raise GraphError(400, "Request_BadRequest",
                         f"Invalid page size specified: '{top}'. Must be between 1 and 999 inclusive.")
    return top


def _matching_users(t: FakeTenant, req: Req) -> list[str]:
    if "$skip" in req.query:
        raise GraphError(400, "Request_BadRequest", "'$skip' is not supported by the service.")
    count = req.query.get("$count", "").lower() == "true"
    if count:
        _needs_eventual(req)
    ids = list(t.users)
    text = req.query.get("$filter")
    if text:
        pred, advanced = parse_filter(text)
        if advanced:
            _needs_eventual(req)
            if not count:
                raise GraphError(400, "Request_UnsupportedQuery", "Unsupported Query.")
        ids = [i for i in ids if pred(t.users[i])]
    search = req.query.get("$search")
    if search:
        _needs_eventual(req, "Request with $search query parameter only works through MSGraph with "
                             "a special request header: 'ConsistencyLevel: eventual'")
        m = re.fullmatch(r'"(\w+):([^"]*)"', search.strip())
        if not m or _CANON.get(m.group(1).lower()) not in {"displayName", "mail", "userPrincipalName",
                                                            "givenName", "surname", "mailNickname"}:
            raise GraphError(400, "Request_UnsupportedQuery", "Unsupported Query.")
        prop, needle = _CANON[m.group(1).lower()], m.group(2).lower()
        ids = [i for i in ids if needle in (t.users[i].get(prop) or "").lower()]
    order = req.query.get("$orderby")
    if order:
        field, _, direction = order.strip().partition(" ")
        sort_by = _CANON.get(field.lower())
        if sort_by not in {"displayName", "userPrincipalName"}:
            raise GraphError(400, "Request_UnsupportedQuery", "Unsupported Query.")
        if text:
            _needs_eventual(req)
        ids.sort(key=lambda i: (t.users[i].get(sort_by or "") or "").lower(),
                 reverse=direction.strip().lower() == "desc")
    return ids


def list_users(t: FakeTenant, req: Req, token: TokenInfo) -> Resp:
    require(token, P_READ)
    skiptoken = req.query.get("$skiptoken")
    if skiptoken:
        state = t.pages.pop(skiptoken, None)
        if state is None:
            raise GraphError(400, "Directory_ExpiredPageToken",
                             "The specified page token value has expired and can no longer be "
                             "included in your request.")
    else:
        select = parse_select(req.query.get("$select"))
        ids = _matching_users(t, req)
        query = {k: v for k, v in req.query.items() if k != "$skiptoken"}
        state = {"ids": ids, "pos": 0, "select": select, "top": _page_size(req), "query": query,
                 "count": len(ids) if req.query.get("$count", "").lower() == "true" else None}
    ids, pos, top, select = state["ids"], state["pos"], state["top"], state["select"]
    chunk = [i for i in ids[pos:pos + top] if i in t.users]
    body: dict[str, Any] = {"@odata.context": _context(t, "users", select)}
    if state["count"] is not None:
        body["@odata.count"] = state["count"]
    if pos + top < len(ids):
        token_value = secrets.token_urlsafe(24)
        t.pages[token_value] = dict(state, pos=pos + top)
        body["@odata.nextLink"] = (f"{t.graph_url}/users?"
                                   + urlencode({**state["query"], "$skiptoken": token_value}))
    body["value"] = [represent(t.users[i], select) for i in chunk]
    return Resp(200, body)


def count_users(t: FakeTenant, req: Req, token: TokenInfo) -> Resp:
    require(token, P_READ)
    _needs_eventual(req, "Count is not currently supported.")
    return Resp(200, str(len(_matching_users(t, req))), {"Content-Type": "text/plain"})


# --- $filter -----------------------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<num>-?\d+(?![\w.]))|(?P<punct>[(),:])|"
                    r"(?P<word>[A-Za-z_$][\w$./-]*))")
Pred = Callable[[dict[str, Any]], bool]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.casefold() == b.casefold()
    return a == b


class _FilterParser:
    """A small OData ``$filter`` subset: eq/ne/in, startswith/endswith, any(), and/or/not."""

    def __init__(self, text: str):
        self.toks: list[tuple[str, Any]] = []
        pos, text = 0, text.strip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                raise self.error()
            pos = m.end()
            kind = m.lastgroup
            if kind is None:
                break
            value = m.group(kind)
            if kind == "str":
                value = value[1:-1].replace("''", "'")
            self.toks.append((kind, value))
        self.i = 0
        self.advanced = False

    @staticmethod
    def error() -> GraphError:
        return GraphError(400, "BadRequest", "Invalid filter clause")

    def peek(self) -> tuple[str, Any] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, kind: str | None = None, value: str | None = None) -> Any:
        tok = self.peek()
        if tok is None or (kind and tok[0] != kind) or (value and str(tok[1]).lower() != value):
            raise self.error()
        self.i += 1
        return tok[1]

    def at_word(self, word: str) -> bool:
        tok = self.peek()
        return tok is not None and tok[0] == "word" and tok[1].lower() == word

    def parse(self) -> Pred:
        pred = self.expr()
        if self.peek() is not None:
            raise self.error()
        return pred

    def expr(self) -> Pred:
        left = self.term()
        while self.at_word("or"):
            self.take()
            left = (lambda a, b: lambda u: a(u) or b(u))(left, self.term())
        return left

    def term(self) -> Pred:
        left = self.factor()
        while self.at_word("and"):
            self.take()
            left = (lambda a, b: lambda u: a(u) and b(u))(left, self.factor())
        return left

    def literal(self) -> Any:
        kind, value = self.peek() or (None, None)
        value = cast(Any, value)
        self.i += 1
        if kind == "str":
            return value
        if kind == "num":
            return int(value)
        if kind == "word" and value.lower() in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[value.lower()]
        raise self.error()

    def prop(self, word: str, collection: bool = False) -> str:
        canon = _CANON.get(word.lower())
        if canon not in FILTERABLE or (canon in LIST_PROPS) != collection:
            raise GraphError(400, "Request_UnsupportedQuery",
                             f"Unsupported or invalid query filter clause specified for property "
                             f"'{word}' of resource 'User'.")
        return canon

    def factor(self) -> Pred:
        if self.at_word("not"):
            self.take()
            self.advanced = True
            inner = self.factor()
            return lambda u: not inner(u)
        if self.peek() == ("punct", "("):
            self.take()
            inner = self.expr()
            self.take("punct", ")")
            return inner
        word = self.take("word")
        low = word.lower()
        if low in ("startswith", "endswith"):
            self.take("punct", "(")
            prop = self.prop(self.take("word"))
            self.take("punct", ",")
            needle = self.literal()
            self.take("punct", ")")
            if not isinstance(needle, str):
                raise self.error()
            if low == "endswith":
                self.advanced = True
                return lambda u: (u.get(prop) or "").casefold().endswith(needle.casefold())
            return lambda u: (u.get(prop) or "").casefold().startswith(needle.casefold())
        if low.endswith("/any"):
            prop = self.prop(word[:-4], collection=True)
            self.take("punct", "(")
            var = self.take("word")
            self.take("punct", ":")
            if self.take("word") != var:
                raise self.error()
            self.take("word", "eq")
            value = self.literal()
            self.take("punct", ")")
            return lambda u: any(_same(v, value) for v in u.get(prop) or [])
        prop = self.prop(word)
        op = self.take("word").lower()
        if op == "in":
            self.take("punct", "(")
            values = [self.literal()]
            while self.peek() == ("punct", ","):
                self.take()
                values.append(self.literal())
            self.take("punct", ")")
            return lambda u: any(_same(u.get(prop), v) for v in values)
        value = self.literal()
        if op == "eq":
            return lambda u: _same(u.get(prop), value)
        if op == "ne":
            self.advanced = True
            return lambda u: not _same(u.get(prop), value)
        if op in ("ge", "le", "gt", "lt"):
            raise GraphError(400, "Request_UnsupportedQuery",
                             f"Unsupported or invalid query filter clause specified for property "
                             f"'{prop}' of resource 'User'.")
        raise self.error()


def parse_filter(text: str) -> tuple[Pred, bool]:
    """(predicate on a stored user, whether it is an 'advanced query')."""
    parser = _FilterParser(text)
    pred = parser.parse()
    return pred, parser.advanced


# --- users: write ------------------------------------------------------------------------------

def _check_shape(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise GraphError(400, "BadRequest", "Unable to read JSON request payload. Please ensure "
                         "Content-Type header is set and payload is of valid JSON format.")
    clean: dict[str, Any] = {}
    for key, value in body.items():
        if "@" in key:                      # @odata.type and friends
            continue
        canon = _CANON.get(key.lower())
        if canon is None:
            raise GraphError(400, "Request_BadRequest",
                             f"Property '{key}' does not exist as a declared property or extension "
                             "property.", [{"code": "InvalidProperty", "target": key}])
        if canon in READ_ONLY:
            raise bad(f"Property '{canon}' is read-only and cannot be set.", canon)
        kind = ("Edm.Boolean" if canon in BOOL_PROPS else "Collection(Edm.String)" if canon in LIST_PROPS
                else "microsoft.graph.passwordProfile" if canon == "passwordProfile" else "Edm.String")
        ok = (value is None or (canon in BOOL_PROPS and isinstance(value, bool))
              or (canon in LIST_PROPS and isinstance(value, list)
                  and all(isinstance(v, str) for v in value))
              or (canon == "passwordProfile" and isinstance(value, dict))
              or (canon in STR_PROPS and isinstance(value, str)))
        if not ok:
            raise GraphError(400, "BadRequest",
                             f"Cannot convert the literal '{value}' to the expected type '{kind}'.")
        clean[canon] = value
    return clean


def _check_values(t: FakeTenant, changes: dict[str, Any], user_id: str | None,
                  current: dict[str, Any]) -> None:
    """Graph's rules on the values in ``changes`` (merged over ``current`` for cross-checks)."""
    if "displayName" in changes and not (changes["displayName"] or "").strip():
        raise invalid_value("displayName")
    if "accountEnabled" in changes and changes["accountEnabled"] is None:
        raise invalid_value("accountEnabled")
    if "mailNickname" in changes:
        nick = changes["mailNickname"]
        if not nick or len(nick) > 64 or not _NICKNAME.match(nick):
            raise invalid_value("mailNickname")
    if "userPrincipalName" in changes:
        upn = changes["userPrincipalName"]
        if not upn or upn_problem(upn):
            raise invalid_value("userPrincipalName")
        domain = t.domains.get(upn.rpartition("@")[2].lower())
        if domain is None or not domain["isVerified"]:
            raise bad("The domain portion of the userPrincipalName property is invalid. You must use "
                      "one of the verified domain names in your organization.", "userPrincipalName")
        immutable = changes.get("onPremisesImmutableId", current.get("onPremisesImmutableId"))
        if domain["authenticationType"] == "Federated" and not immutable:
            raise bad("Property onPremisesImmutableId is required when the userPrincipalName uses a "
                      "federated domain.", "onPremisesImmutableId")
    if "mail" in changes:
        mail = changes["mail"]
        if mail is None or not _EMAIL.match(mail):
            raise invalid_value("mail")
    if changes.get("usageLocation") is not None and not re.fullmatch(r"[A-Z]{2}",
                                                                      changes["usageLocation"]):
        raise invalid_value("usageLocation")
    if "userType" in changes and changes["userType"] not in ("Member", "Guest"):
        raise invalid_value("userType")
    if changes.get("passwordPolicies") is not None:
        parts = {p.strip() for p in changes["passwordPolicies"].split(",")}
        if not parts <= {"DisablePasswordExpiration", "DisableStrongPassword", "None"}:
            raise invalid_value("passwordPolicies")
    profile = changes.get("passwordProfile")
    if profile is not None:
        unknown = set(profile) - {"password", "forceChangePasswordNextSignIn",
                                  "forceChangePasswordNextSignInWithMfa", "@odata.type"}
        if unknown:
            raise GraphError(400, "Request_BadRequest",
                             f"Property '{sorted(unknown)[0]}' does not exist as a declared property "
                             "or extension property.")
        if "password" in profile:
            policies = changes.get("passwordPolicies", current.get("passwordPolicies")) or ""
            strong = "DisableStrongPassword" not in policies
            if password_problem(profile["password"], strong=strong):
                raise GraphError(400, "Request_BadRequest", PASSWORD_MESSAGE)
            if (user_id is not None and t.password_history
                    and t.passwords.get(user_id) == profile["password"]):
                raise GraphError(400, "Request_BadRequest", PASSWORD_MESSAGE)
    _check_conflicts(t, changes.get("userPrincipalName"), changes.get("mail"), user_id)


def _check_conflicts(t: FakeTenant, upn: str | None, mail: str | None, user_id: str | None) -> None:
    def taken(index: dict[str, str], key: str) -> bool:
        return index.get(key.casefold(), user_id) != user_id

    target = None
    if upn and taken(t.upn_index, upn):
        target = "userPrincipalName"
    elif (upn and taken(t.proxy_index, f"smtp:{upn}")) or (mail and taken(t.proxy_index, f"smtp:{mail}")):
        target = "proxyAddresses"
    if target:
        raise GraphError(400, "Request_BadRequest",
                         f"Another object with the same value for property {target} already exists.",
                         [{"code": "ObjectConflict", "target": target}])


def create_user(t: FakeTenant, req: Req, token: TokenInfo) -> Resp:
    require(token, P_CREATE)
    body = _check_shape(parse_json_body(req))
    for prop in REQUIRED_ON_CREATE:
        value = body.get(prop)
        missing = value is None or value == "" or (prop == "passwordProfile" and not value.get("password"))
        if missing:
            raise GraphError(400, "Request_BadRequest",
                             f"Property '{prop}' is required when creating the entity."
                             if prop != "passwordProfile" else
                             "Property 'passwordProfile.password' is required when creating the "
                             "entity.",
                             [{"code": "MissingRequiredProperty", "target": prop}])
    _check_values(t, body, None, {})
    user = t.insert_user(body, password=body["passwordProfile"]["password"])
    out = {"@odata.context": _context(t, "users", None, entity=True)}
    out.update(represent(user, None))
    return Resp(201, out, {"Location": f"{t.graph_url}/users/{user['id']}"})


def patch_user(t: FakeTenant, req: Req, token: TokenInfo, key: str) -> Resp:
    body = _check_shape(parse_json_body(req))
    others = set(body) - {"accountEnabled", "passwordProfile"}
    if others:
        require(token, P_UPDATE)
    if "accountEnabled" in body and not (token.permissions & P_UPDATE):
        require(token, P_ENABLE)
        require(token, P_READ)
    user_id = lookup(t, key)
    if (body.get("passwordProfile") or {}).get("password") is not None:
        require(token, P_PASSWORD)
        needed = PRIVILEGED_ROLES if t.user_roles.get(user_id) else ADMIN_ROLES
        if token.kind == "app" and not token.roles & needed:
            raise GraphError(403, "Authorization_RequestDenied", DENIED)
    elif "passwordProfile" in body and not others and "accountEnabled" not in body:
        require(token, P_UPDATE | P_PASSWORD)
    _check_values(t, body, user_id, t.users[user_id])
    t.update_user(user_id, body)
    return Resp(204)


def delete_user(t: FakeTenant, req: Req, token: TokenInfo, key: str) -> Resp:
    require(token, P_DELETE)
    t.remove_user(lookup(t, key))
    return Resp(204)


def user_action(t: FakeTenant, req: Req, token: TokenInfo, key: str, action: str) -> Resp:
    if action != "revokeSignInSessions":
        raise GraphError(400, "BadRequest", f"Resource not found for the segment '{action}'.")
    require(token, P_REVOKE)
    t.revoke_sign_in_sessions(lookup(t, key))
    return Resp(200, {"@odata.context": f"{t.graph_url}/$metadata#Edm.Boolean", "value": True})


# --- delta -------------------------------------------------------------------------------------

def users_delta(t: FakeTenant, req: Req, token: TokenInfo) -> Resp:
    require(token, P_READ)
    prefer = re.search(r"odata\.maxpagesize=(\d+)", req.header("prefer") or "")
    size = int(prefer.group(1)) if prefer else t.delta_page_size
    if "$skiptoken" in req.query:
        state = t.pages.pop(req.query["$skiptoken"], None)
        if state is None or state.get("kind") != "delta":
            raise _sync_state_gone()
    else:
        deltatoken = req.query.get("$deltatoken")
        select = parse_select(req.query.get("$select"), always=("id",))
        if deltatoken == "latest":
            entries: list[tuple[str, str]] = []
        elif deltatoken:
            prior = t.delta_tokens.get(deltatoken)
            if prior is None or prior["expired"]:
                raise _sync_state_gone()
            select, since = prior["select"], prior["seq"]
            changed = sorted((s, i) for i, s in t.user_seq.items() if s > since and i in t.users)
            removed = sorted((s, i) for i, s in t.tombstones.items() if s > since)
            entries = [(kind, i) for _, kind, i in sorted(
                [(s, "user", i) for s, i in changed] + [(s, "removed", i) for s, i in removed])]
        else:
            entries = [("user", i) for i in t.users]
        state = {"kind": "delta", "entries": entries, "pos": 0, "select": select, "seq": t.seq}
    pos, entries = state["pos"], state["entries"]
    body: dict[str, Any] = {"@odata.context": _context(t, "users", state["select"] if
                                                       state["select"] != ["id"] else None)}
    if pos + size < len(entries):
        skip = secrets.token_urlsafe(24)
        t.pages[skip] = dict(state, pos=pos + size)
        body["@odata.nextLink"] = f"{t.graph_url}/users/delta?" + urlencode({"$skiptoken": skip})
    else:
        delta = secrets.token_urlsafe(24)
        t.delta_tokens[delta] = {"seq": state["seq"], "select": state["select"], "expired": False}
        body["@odata.deltaLink"] = f"{t.graph_url}/users/delta?" + urlencode({"$deltatoken": delta})
    value = []
    for kind, user_id in entries[pos:pos + size]:
        if kind == "removed":
            value.append({"id": user_id, "@removed": {"reason": "deleted"}})
        elif user_id in t.users:
            item = represent(t.users[user_id], state["select"])
            item["id"] = user_id
            value.append(item)
    body["value"] = value
    return Resp(200, body)


def _sync_state_gone() -> GraphError:
    return GraphError(410, "syncStateNotFound",
                      "The sync state generation is not found. Restart the sync with a new delta "
                      "query (no $deltatoken).")


# --- directory ---------------------------------------------------------------------------------

def list_domains(t: FakeTenant, req: Req, token: TokenInfo) -> Resp:
    require(token, P_DOMAINS)
    return Resp(200, {"@odata.context": f"{t.graph_url}/$metadata#domains",
                      "value": [dict(d) for d in t.domains.values()]})


def get_domain(t: FakeTenant, req: Req, token: TokenInfo, name: str) -> Resp:
    require(token, P_DOMAINS)
    domain = t.domains.get(name.lower())
    if domain is None:
        raise not_found(name)
    return Resp(200, {"@odata.context": f"{t.graph_url}/$metadata#domains/$entity", **domain})


def organization(t: FakeTenant, req: Req, token: TokenInfo) -> Resp:
    require(token, P_ORG)
    return Resp(200, {"@odata.context": f"{t.graph_url}/$metadata#organization",
                      "value": [t.organization()]})


def get_application(t: FakeTenant, req: Req, token: TokenInfo, app: str) -> Resp:
    require(token, P_APPS)
    registration = t.apps.get(app)
    if registration is None:
        raise not_found(app)
    return Resp(200, {"@odata.context": f"{t.graph_url}/$metadata#applications/$entity",
                      **t.application_resource(registration)})


# --- $batch ------------------------------------------------------------------------------------

def batch(t: FakeTenant, req: Req, run_item: Callable[[Req], Resp]) -> Resp:
    """JSON batching: each item is dispatched through ``run_item`` (auth, faults, throttling...)."""
    body = parse_json_body(req)
    items = body.get("requests") if isinstance(body, dict) else None
    if not isinstance(items, list) or not items:
        raise GraphError(400, "BadRequest", "Invalid batch payload format.")
    if len(items) > BATCH_LIMIT:
        raise GraphError(400, "BadRequest",
                         f"Number of batch request steps exceeds the maximum of {BATCH_LIMIT}.")
    raw_ids = [str(item.get("id")) if isinstance(item, dict) else None for item in items]
    if None in raw_ids or any(isinstance(item, dict) and "id" not in item for item in items):
        raise GraphError(400, "BadRequest", "Batch request step is missing the required 'id'.")
    ids = [str(i) for i in raw_ids]
    if len(set(ids)) != len(ids):
        raise GraphError(400, "BadRequest", "Batch request contains duplicate Ids.")
    for item in items:
        url = str(item.get("url", ""))
        if not url or urlsplit(url).scheme or not isinstance(item.get("method"), str):
            raise GraphError(400, "BadRequest", "Invalid request: each batch step needs a method and a "
                             "relative url.")
    statuses: dict[str, int] = {}
    responses = []
    for item, item_id in zip(items, ids, strict=True):
        headers = {str(k).lower(): str(v) for k, v in (item.get("headers") or {}).items()}
        item_req = Req(method=item["method"].upper(), path="", headers=headers, in_batch=req.request_id)
        depends = item.get("dependsOn") or []
        if any(statuses.get(str(d), 424) >= 400 for d in depends):
            resp = Resp(424, GraphError(424, "BadRequest", "Failed dependency").response(item_req).body)
        elif "body" in item and item["body"] is not None and "content-type" not in headers:
            resp = GraphError(400, "BadRequest", "Content-Type header must be specified for a request "
                              "with a body.").response(item_req)
        else:
            url = "/" + item["url"].lstrip("/")
            if url.startswith("/v1.0/"):
                url = url[5:]
            split = urlsplit(url)
            item_req.path = "/v1.0" + unquote(split.path)
            item_req.query = dict(parse_qsl(split.query, keep_blank_values=True))
            item_req.headers.setdefault("authorization", req.header("authorization") or "")
            item_req.body = (b"" if item.get("body") is None else
                             json.dumps(item["body"]).encode())
            resp = run_item(item_req)
        statuses[item_id] = resp.status
        entry: dict[str, Any] = {"id": item_id, "status": resp.status,
                                 "headers": {k: v for k, v in resp.json_headers().items()}}
        if resp.body is not None:
            entry["body"] = resp.body
        responses.append(entry)
    return Resp(200, {"responses": responses})


def new_user_id() -> str:
    return str(uuid.uuid4())
