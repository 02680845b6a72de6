"""The fake tenant's Graph user queries: listing, ``$filter``, paging and delta.

Owns: ``GET /users`` (``$filter``, ``$search``, ``$orderby``, ``$count``, ``$top`` and nextLink
paging with ``$skiptoken``), ``/users/$count``, the OData ``$filter`` subset, and delta queries
(``/users/delta`` with skip and delta tokens, 410 once a token has expired). Test double only.
"""

from __future__ import annotations

import re
import secrets
from typing import TYPE_CHECKING, Any, Callable, cast
from urllib.parse import urlencode

from ._graph_users import _CANON, FILTERABLE, LIST_PROPS, P_READ, _context, parse_select, represent, require
from ._http import GraphError, Req, Resp
from ._identity import TokenInfo

if TYPE_CHECKING:
    from .tenant import FakeTenant

PAGE_DEFAULT = 100


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
