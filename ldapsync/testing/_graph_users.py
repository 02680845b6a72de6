"""The fake tenant's Graph ``user`` resource: its properties, permissions and single-user handlers.

Owns: the user's properties (default, read-only, required on create, filterable), the permissions
each operation needs, Graph's errors for them, validation rules for users (UPN syntax and verified
domain, password complexity, conflicts, unknown and read-only properties), ``$select`` and the JSON
shape of a user, and the handlers for one user: get, ``/me``, create, patch, delete,
``revokeSignInSessions``. Listing, ``$filter`` and delta are ``_graph_queries.py``; routing is
``_graph.py``. Test double only.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

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


# Microsoft Entra Password Protection: a global list of banned terms (Microsoft's is secret and
# much longer; these are its documented kind) plus the tenant's own (``FakeTenant.banned_terms``).
# A password is lower-cased, common substitutions are undone, each banned term found counts one
# point and every other character one point; under five points it is refused, with the same
# message as the complexity rule.  It applies whatever ``passwordPolicies`` says.
GLOBAL_BANNED_TERMS = ("password", "passw0rd", "welcome", "letmein", "qwerty", "azerty", "abc123",
                       "iloveyou", "monkey", "dragon", "sunshine", "football", "admin", "microsoft",
                       "office365")
_LEET = str.maketrans({"0": "o", "1": "l", "!": "i", "@": "a", "$": "s", "3": "e", "5": "s", "7": "t", "|": "l"})


def banned_score(password: str, terms: tuple[str, ...] | list[str] | set[str]) -> int:
    """Entra's password-protection score: banned terms found count 1 each, other characters 1 each."""
    text = password.lower().translate(_LEET)
    found = 0
    for term in sorted({t.lower().translate(_LEET) for t in terms if len(t) >= 4}, key=len, reverse=True):
        while term in text:
            text = text.replace(term, "\0", 1)
            found += 1
    return found + len(text.replace("\0", ""))


def password_banned(password: Any, tenant_terms: tuple[str, ...] | list[str] | set[str] = ()) -> bool:
    """Under five points (see :func:`banned_score`); a password without a banned term scores its length."""
    return isinstance(password, str) and banned_score(password, [*GLOBAL_BANNED_TERMS, *tenant_terms]) < 5


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


# --- users: read -------------------------------------------------------------------------------

def lookup(t: FakeTenant, key: str) -> str:
    user_id = t.find_user_id(key)
    if user_id is None or t.wall_time() < t.created_at.get(user_id, 0) + t.replication_delay:
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
            if (password_problem(profile["password"], strong=strong)
                    or password_banned(profile["password"], t.banned_terms)):
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

