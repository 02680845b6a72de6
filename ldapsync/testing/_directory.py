"""The fake tenant's directory: domains and users, as stored (``DirectoryMixin`` of ``FakeTenant``).

Owns: seeding and inspecting domains and users (``add_domain``, ``add_user``, ``add_users``,
``get_user``, ``password_of``, ``portal_edit``...), the user store the Graph handlers write through
(``insert_user``, ``update_user``, ``remove_user``; UPN and proxy-address indexes, the change
sequence delta queries read) and the organization resource. The state itself is made in
``FakeTenant.__init__`` (``tenant.py``). Test double only.
"""

from __future__ import annotations

import copy
import secrets
import time
import uuid
from typing import Any, Iterable

from ._graph_users import LIST_PROPS, USER_PROPS
from ._http import redact_json


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class DirectoryMixin:
    """Domains and users of ``FakeTenant`` (see ``tenant.py`` for the state it works on)."""

    # --- seeding and inspection ----------------------------------------------------------------

    def add_domain(self, name: str, *, verified: bool = True, default: bool = False,
                   initial: bool = False, authentication_type: str = "Managed") -> dict[str, Any]:
        name = name.lower()
        if default:
            for d in self.domains.values():
                d["isDefault"] = False
        self.domains[name] = {
            "id": name, "authenticationType": authentication_type, "availabilityStatus": None,
            "isAdminManaged": True, "isDefault": default, "isInitial": initial, "isRoot": True,
            "isVerified": verified, "passwordNotificationWindowInDays": 14,
            "passwordValidityPeriodInDays": 2147483647,
            "supportedServices": ["Email", "OfficeCommunicationsOnline"] if verified else [],
            "state": None,
        }
        return dict(self.domains[name])

    def set_domain(self, name: str, *, verified: bool | None = None, default: bool | None = None,
                   authentication_type: str | None = None) -> dict[str, Any]:
        d = self.domains[name.lower()]
        if verified is not None:
            d["isVerified"] = verified
        if authentication_type is not None:
            d["authenticationType"] = authentication_type
        if default:
            for other in self.domains.values():
                other["isDefault"] = False
            d["isDefault"] = True
        return dict(d)

    def add_user(self, upn: str, password: str | None = None, *, display_name: str | None = None,
                 enabled: bool = True, roles: Iterable[str] = (), **props: Any) -> dict[str, Any]:
        """Seed a user directly (no Graph validation, not recorded). Returns ``get_user``."""
        local = upn.split("@")[0]
        body = {"userPrincipalName": upn, "displayName": display_name or local,
                "mailNickname": local, "accountEnabled": enabled, **props}
        user = self.insert_user(body, password=password or secrets.token_urlsafe(12) + "aA1!")
        if roles:
            self.user_roles[user["id"]] = set(roles)
        self.created_at[user["id"]] = 0.0          # seeded users are fully replicated
        return self.get_user(user["id"])  # type: ignore[return-value]

    def add_users(self, users: list[dict[str, Any]] | None = None, *, template: dict[str, Any] | None = None,
                  count: int = 0, start: int = 1, return_ids: bool = False) -> dict[str, Any]:
        """Seed many users in one call (benchmarks): each of ``users`` is ``add_user``'s keyword
        arguments; with ``template``, ``count`` users more are made from it, string values
        formatted with ``i`` = ``start``, ``start + 1``… (``{"upn": "u{i:06d}@contoso.com"}``).
        Same rules as ``add_user`` (no Graph validation, not recorded). Returns ``{"added": n}``
        (plus ``"ids"`` in order with ``return_ids``)."""
        if count < 0 or (count and template is None):
            raise ValueError("count needs a template (and must not be negative)")
        ids: list[str] = []

        def one(kwargs: dict[str, Any]) -> None:
            kwargs = dict(kwargs)
            roles = kwargs.pop("roles", ())
            upn = kwargs.pop("upn")
            local = upn.split("@")[0]
            body = {"userPrincipalName": upn, "displayName": kwargs.pop("display_name", None) or local,
                    "mailNickname": local, "accountEnabled": kwargs.pop("enabled", True), **kwargs}
            password = kwargs.get("password") or secrets.token_urlsafe(12) + "aA1!"
            body.pop("password", None)
            user = self.insert_user(body, password=password)
            if roles:
                self.user_roles[user["id"]] = set(roles)
            self.created_at[user["id"]] = 0.0
            if return_ids:
                ids.append(user["id"])

        for kwargs in users or ():
            one(kwargs)
        for i in range(start, start + count):
            assert template is not None
            one({k: v.format(i=i) if isinstance(v, str) else v for k, v in template.items()})
        out: dict[str, Any] = {"added": len(users or ()) + count}
        if return_ids:
            out["ids"] = ids
        return out

    def find_user_id(self, key: str) -> str | None:
        if key in self.users:
            return key
        return self.upn_index.get(key.casefold())

    def _index(self, user_id: str, add: bool) -> None:
        """Keep the UPN and proxy-address (``smtp:addr``, case-folded) indexes in step."""
        user = self.users[user_id]
        keys = [(self.upn_index, user["userPrincipalName"])]
        keys += [(self.proxy_index, p) for p in user["proxyAddresses"]]
        if user.get("mail"):
            keys.append((self.proxy_index, f"smtp:{user['mail']}"))
        for index, key in keys:
            if add:
                index.setdefault(key.casefold(), user_id)
            elif index.get(key.casefold()) == user_id:
                del index[key.casefold()]

    def get_user(self, key: str) -> dict[str, Any] | None:
        """Every stored property of a user (never the password), or None."""
        user_id = self.find_user_id(key)
        if user_id is None:
            return None
        out = copy.deepcopy(self.users[user_id])
        out["passwordProfile"] = {"forceChangePasswordNextSignIn": self.force_change.get(user_id, False)}
        out["roles"] = sorted(self.user_roles.get(user_id, ()))
        return out

    def all_users(self) -> list[dict[str, Any]]:
        return [self.get_user(i) for i in self.users]  # type: ignore[misc]

    def password_of(self, key: str) -> str | None:
        """The last password set for the user (never logged, never returned by Graph)."""
        user_id = self.find_user_id(key)
        return self.passwords.get(user_id) if user_id else None

    def delete_user(self, key: str) -> None:
        user_id = self.find_user_id(key)
        if user_id is None:
            raise KeyError(key)
        self.remove_user(user_id)

    def portal_edit(self, key: str, **changes: Any) -> dict[str, Any]:
        """An admin edits the user in the Microsoft 365 admin centre: applied and seen by delta."""
        user_id = self.find_user_id(key)
        if user_id is None:
            raise KeyError(key)
        unknown = [k for k in changes if k not in USER_PROPS or k in {"id", "proxyAddresses"}]
        if unknown:
            raise ValueError(f"not editable: {unknown}")
        self.update_user(user_id, changes)
        self.portal_edits.append({"id": user_id, "changes": redact_json(changes), "time": self.wall_time()})
        return self.get_user(user_id)  # type: ignore[return-value]

    # --- users: storage (used by the Graph handlers too) -----------------------------------------

    def _bump(self, user_id: str) -> None:
        self.seq += 1
        self.user_seq[user_id] = self.seq

    def insert_user(self, body: dict[str, Any], password: str) -> dict[str, Any]:
        user_id = str(uuid.uuid4())
        now = self.wall_time()
        user: dict[str, Any] = {p: None for p in USER_PROPS if p != "passwordProfile"}
        user.update({p: [] for p in LIST_PROPS})
        user.update({k: copy.deepcopy(v) for k, v in body.items() if k != "passwordProfile"})
        user.update(id=user_id, createdDateTime=_iso(now), lastPasswordChangeDateTime=_iso(now),
                    creationType=None, userType=body.get("userType") or "Member")
        if user.get("mail"):
            user["proxyAddresses"] = [f"SMTP:{user['mail']}"]
        self.users[user_id] = user
        self._index(user_id, add=True)
        self.passwords[user_id] = password
        self.force_change[user_id] = bool((body.get("passwordProfile") or {}).get(
            "forceChangePasswordNextSignIn", body.get("passwordProfile") is not None))
        self.created_at[user_id] = now
        self._bump(user_id)
        return user

    def update_user(self, user_id: str, changes: dict[str, Any]) -> None:
        user = self.users[user_id]
        self._index(user_id, add=False)
        for key, value in changes.items():
            if key == "passwordProfile":
                if value and value.get("password") is not None:
                    self.passwords[user_id] = value["password"]
                    user["lastPasswordChangeDateTime"] = _iso(self.wall_time())
                    self.force_change[user_id] = bool(value.get("forceChangePasswordNextSignIn", True))
                    self._revoke_refresh(user_id)
                elif value and "forceChangePasswordNextSignIn" in value:
                    self.force_change[user_id] = bool(value["forceChangePasswordNextSignIn"])
            elif key == "mail" and value and value != user.get("mail"):
                proxies = [("smtp:" + p[5:]) if p.startswith("SMTP:") else p
                           for p in user["proxyAddresses"] if p.casefold() != f"smtp:{value}".casefold()]
                user["proxyAddresses"] = [f"SMTP:{value}", *proxies]
                user["mail"] = value
            else:
                user[key] = copy.deepcopy(value)
        self._index(user_id, add=True)
        self._bump(user_id)

    def remove_user(self, user_id: str) -> None:
        self._index(user_id, add=False)
        del self.users[user_id]
        self.passwords.pop(user_id, None)
        self.user_seq.pop(user_id, None)
        self._revoke_refresh(user_id)
        self.seq += 1
        self.tombstones[user_id] = self.seq

    def revoke_sign_in_sessions(self, user_id: str) -> None:
        self.users[user_id]["signInSessionsValidFromDateTime"] = _iso(self.wall_time())
        self._revoke_refresh(user_id)

    def _revoke_refresh(self, user_id: str) -> None:
        for info in self.refresh_tokens.values():
            if info.user_id == user_id:
                info.revoked = True

    def default_admin_id(self) -> str:
        for user_id, roles in self.user_roles.items():
            if "Global Administrator" in roles and user_id in self.users:
                return user_id
        raise KeyError("no Global Administrator in the fake tenant; add_user(..., roles=[...])")

    def organization(self) -> dict[str, Any]:
        return {
            "id": self.tenant_id, "displayName": self.display_name, "tenantType": "AAD",
            "countryLetterCode": "US", "preferredLanguage": "en", "createdDateTime": _iso(0),
            "verifiedDomains": [{"capabilities": "Email, OfficeCommunicationsOnline",
                                 "isDefault": d["isDefault"], "isInitial": d["isInitial"],
                                 "name": d["id"], "type": d["authenticationType"]}
                                for d in self.domains.values() if d["isVerified"]],
        }
