"""The self-service pages (twisted.web): activate an account, sign in, change or reset a password.

Served by the same twistd process on ``[selfservice] listen``.  Plain HTML forms
that work without JavaScript; every page is ``no-store`` (some show a
one-time link's form), framed by no one, and sends no Referer (the link's
token is in its URL).  Every form carries a CSRF token (see security.py);
attempts are rate-limited per user and per client address (the address behind
a trusted proxy, see http_limits.py, which also limits bodies, time and
connections).  A session is valid only while the user's password and sign-out
generation (``ldapsyncSessionGeneration``) are those it was signed with, so a
new password or a sign-out ends every other session of the user.  The rules
themselves live elsewhere: passwords and the policy in ``Directory``
(``authenticate``, ``set_password``), links in ``links.LinkService``.

::

    GET  /activate?token=…  ─▶ form (name, rules)   POST ─▶ LinkService.use ─▶ "your account is active"
    GET  /reset?token=…     ─▶ the same, for a forgotten password
    GET  /forgot            ─▶ form                 POST ─▶ LinkService.request_reset, not awaited (same answer,
                                                             same time, whatever the account)
    GET  /signin            ─▶ form                 POST ─▶ Directory.authenticate ─▶ session cookie ─▶ /account
    GET  /account           ─▶ expiry + change form POST ─▶ Directory.authenticate (counts towards lockout)
                                                             ─▶ Directory.set_password(old_password=…)
    POST /signout           ─▶ ldapsyncSessionGeneration + 1 (every session of the user ends)
"""

from __future__ import annotations

import html
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from ldapsync.clock import Clock
from ldapsync.directory.core import Actor
from ldapsync.directory.errors import LDAPError, ResultCode
from ldapsync.directory.hooks import Origin
from ldapsync.selfservice.http_limits import LimitedSite, ProxyTrust
from ldapsync.selfservice.links import (
    OPERATION,
    LinkInfo,
    LinkProblem,
    LinkService,
    human_time,
)
from ldapsync.selfservice.security import RateLimiter, Session, Signer
from ldapsync.store import entries as store
from ldapsync.store.entries import first
from ldapsync.store import links as links_q
from ldapsync.store.database import Txn
from ldapsync.sync.status import write_user_status_txn

if TYPE_CHECKING:
    from ldapsync.directory.facade import Directory

log = Logger()

SESSION_COOKIE = b"ls_session"
CSRF_COOKIE = b"ls_csrf"
SESSION_GENERATION = "ldapsyncSessionGeneration"

CSS = b"""
:root { color-scheme: light; }
body { font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; background: #f3f4f6; color: #111827; }
header { background: #1f2937; color: #fff; padding: .75rem 1.5rem; font-weight: 600; }
main { max-width: 30rem; margin: 2rem auto; background: #fff; padding: 1.5rem 2rem 2rem; border-radius: 8px;
       box-shadow: 0 1px 3px rgba(0,0,0,.15); }
h1 { font-size: 1.5rem; margin-top: 0; }
label { display: block; font-weight: 600; margin-top: 1rem; }
input[type=text], input[type=password], input[type=email] { width: 100%; box-sizing: border-box; font-size: 1rem;
       padding: .5rem; border: 1px solid #6b7280; border-radius: 4px; }
input:focus, button:focus, a:focus { outline: 3px solid #2563eb; outline-offset: 2px; }
button { margin-top: 1.5rem; font-size: 1rem; padding: .6rem 1.2rem; background: #1d4ed8; color: #fff; border: 0;
         border-radius: 4px; cursor: pointer; }
button.link { background: none; color: #1d4ed8; padding: 0; margin: 0; text-decoration: underline; }
.error { border-left: 4px solid #b91c1c; background: #fef2f2; padding: .5rem 1rem; }
.ok { border-left: 4px solid #15803d; background: #f0fdf4; padding: .5rem 1rem; }
.hint { color: #4b5563; font-size: .9rem; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .25rem 1rem; }
dt { font-weight: 600; } dd { margin: 0; }
nav { margin-top: 1.5rem; }
"""

_HEADERS = {
    b"Cache-Control": b"no-store",
    b"Pragma": b"no-cache",
    b"X-Frame-Options": b"DENY",
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"same-origin",      # no Referer (with its token) leaves the site
    b"Content-Security-Policy": (b"default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                                 b"frame-ancestors 'none'; base-uri 'none'"),
}

PROBLEMS = {
    "unknown": (404, "This link is not valid",
                ("Check that you opened the whole link from the e-mail; some mail programs break long links. "
                 "If it still does not work, ask for a new link.")),
    "used": (410, "This link has already been used",
             ("Each link works once. If you already chose your password, sign in with it. "
              "If you forgot it, ask for a new link.")),
    "expired": (410, "This link has expired",
                "Links work for a limited time. Ask for a new link below, or ask your IT team."),
    "revoked": (410, "This link has been replaced",
                ("A newer e-mail was sent to you, or your password was set another way. "
                 "Use the link in the latest e-mail, or sign in.")),
}


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


class Response:
    def __init__(self, status: int, body: str | bytes, *, content_type: bytes = b"text/html; charset=utf-8",
                 location: str | None = None, headers: dict[bytes, bytes] | None = None) -> None:
        self.status = status
        self.body = body.encode("utf-8") if isinstance(body, str) else body
        self.content_type = content_type
        self.location = location
        self.headers = headers or {}


class SelfServicePages(resource.Resource):
    """The whole site: one leaf resource that routes on path and method."""

    isLeaf = True

    def __init__(self, directory: Directory, links: LinkService, signer: Signer, *, clock: Clock | None = None) -> None:
        super().__init__()
        self.directory = directory
        self.links = links
        self.signer = signer
        self.cfg = directory.config.selfservice
        self.clock: Clock = clock or links.clock
        self.secure = self.cfg.public_url.lower().startswith("https://")
        parts = urlsplit(self.cfg.public_url)
        self.origin = f"{parts.scheme}://{parts.netloc}".lower()
        self.by_user = RateLimiter(self.cfg.rate_limit_user, self.cfg.rate_limit_window)
        self.by_address = RateLimiter(self.cfg.rate_limit_address, self.cfg.rate_limit_window)
        self.trust = ProxyTrust(self.cfg.trusted_proxies)
        self.routes: dict[tuple[bytes, str], Callable[[Any], Coroutine[Any, Any, Response]]] = {
            (b"GET", "/"): self.get_root,
            (b"GET", "/style.css"): self.get_css,
            (b"GET", "/favicon.ico"): self.get_favicon,
            (b"GET", "/signin"): self.get_signin,
            (b"POST", "/signin"): self.post_signin,
            (b"GET", "/account"): self.get_account,
            (b"POST", "/account"): self.post_account,
            (b"POST", "/signout"): self.post_signout,
            (b"GET", "/forgot"): self.get_forgot,
            (b"POST", "/forgot"): self.post_forgot,
            (b"GET", "/activate"): lambda r: self.get_link(r, links_q.ACTIVATE),
            (b"POST", "/activate"): lambda r: self.post_link(r, links_q.ACTIVATE),
            (b"GET", "/reset"): lambda r: self.get_link(r, links_q.RESET),
            (b"POST", "/reset"): lambda r: self.post_link(r, links_q.RESET),
        }

    def now(self) -> float:
        return float(self.clock.now())

    # -- plumbing -------------------------------------------------------------------
    def render(self, request: Any) -> Any:
        path = request.path.decode("utf-8", "replace").rstrip("/") or "/"
        handler = self.routes.get((request.method, path))
        if handler is None:
            known = {p for _, p in self.routes}
            resp = (Response(405, self.page("Not allowed", "<p>This page cannot be used that way.</p>"),
                             headers={b"Allow": b"GET, POST"})
                    if path in known else Response(404, self.page("Page not found",
                                                                  '<p>There is no such page. <a href="/signin">Sign in</a>.</p>')))
            self.finish(request, resp)
            return server.NOT_DONE_YET
        if request.method == b"POST":
            problem = self.post_problem(request)
            if problem is not None:
                self.finish(request, problem)
                return server.NOT_DONE_YET
        d: defer.Deferred[Response] = defer.ensureDeferred(handler(request))
        d.addErrback(self.crashed, request)
        d.addCallback(lambda resp: self.finish(request, resp))
        return server.NOT_DONE_YET

    def crashed(self, failure: Any, request: Any) -> Response:
        log.failure("self-service page {path} failed", failure, path=request.path.decode("utf-8", "replace"))
        return Response(500, self.page("Something went wrong",
                                       "<p>The page could not be shown. Please try again in a minute; "
                                       "if it keeps happening, tell your IT team.</p>"))

    def finish(self, request: Any, resp: Response | None) -> None:
        if resp is None or request.finished or getattr(request, "_disconnected", False):
            return
        request.setResponseCode(resp.status)
        for k, v in _HEADERS.items():
            request.setHeader(k, v)
        if self.secure:
            request.setHeader(b"Strict-Transport-Security", b"max-age=31536000")
        request.setHeader(b"Content-Type", resp.content_type)
        for k, v in resp.headers.items():
            request.setHeader(k, v)
        if resp.location:
            request.setHeader(b"Location", resp.location.encode("utf-8"))
        request.write(resp.body)
        request.finish()

    def post_problem(self, request: Any) -> Response | None:
        """A form sent from another site or without its CSRF token.  (Its size is not checked here:
        http_limits.LimitedChannel refuses a body over the limit before the pages see the request,
        and twisted.web a Content-Length that is not a number.)"""
        origin = request.getHeader(b"origin")
        csrf_cookie = request.getCookie(CSRF_COOKIE)
        field = self.arg(request, "csrf")
        cross_site = origin is not None and origin.decode("latin-1").lower() != self.origin
        if cross_site or not self.signer.csrf_ok(csrf_cookie.decode("ascii", "replace") if csrf_cookie else None, field):
            log.info("self-service form refused from {addr}: {why}", addr=self.address(request),
                     why=f"Origin {origin!r} is not {self.origin} ([selfservice] public_url)" if cross_site
                     else "missing or wrong CSRF token")
            if cross_site:
                # Most often a setup problem (the pages reached at an address other than public_url):
                # say so where the person who can fix it will see it, not only in the log.
                return Response(403, self.page("This page was opened at another address",
                                               '<p class="error" role="alert">This form was sent from '
                                               f"{html.escape(origin.decode('latin-1'))}, but these pages are set up "
                                               f"as {html.escape(self.origin)}. Open "
                                               f'<a href="{html.escape(self.cfg.public_url)}/signin">'
                                               f"{html.escape(self.cfg.public_url)}</a> instead. (Administrators: "
                                               "<code>[selfservice] public_url</code> must be the address users "
                                               "open.)</p>"))
            return Response(403, self.page("Please try again",
                                           "<p class=\"error\" role=\"alert\">This form had expired or was not sent "
                                           "from this site. Go back, reload the page and try again.</p>"
                                           '<nav><a href="/signin">Sign in</a></nav>'))
        return None

    @staticmethod
    def arg(request: Any, name: str, limit: int = 1024) -> str:
        vals = (request.args or {}).get(name.encode())
        if not vals:
            return ""
        return vals[0][:limit * 4].decode("utf-8", "replace")[:limit]

    def address(self, request: Any) -> str:
        """The client's address: the TCP peer, or behind a trusted proxy the client it names."""
        addr = request.getClientAddress()
        peer = getattr(addr, "host", None) or "unknown"
        return self.trust.client(peer, request.requestHeaders.getRawHeaders(b"x-forwarded-for"))

    def csrf(self, request: Any) -> str:
        """The hidden form field (sets the CSRF cookie when the browser has none yet)."""
        cookie = request.getCookie(CSRF_COOKIE)
        value = cookie.decode("ascii", "replace") if cookie else ""
        if not value or len(value) > 200:
            value = self.signer.new_csrf_cookie()
            request.addCookie(CSRF_COOKIE, value.encode(), path=b"/", httpOnly=True, secure=self.secure,
                              sameSite=b"strict")
        return f'<input type="hidden" name="csrf" value="{esc(self.signer.csrf_field(value))}">'

    def limited(self, request: Any, user_key: str | None) -> Response | None:
        now = self.now()
        wait = self.by_address.retry_after("addr:" + self.address(request), now)
        if not wait and user_key:
            wait = self.by_user.retry_after("user:" + user_key.lower(), now)
        if not wait:
            return None
        minutes = max(1, round(wait / 60))
        log.info("self-service attempts rate-limited for {addr}", addr=self.address(request))
        return Response(429, self.page("Too many attempts",
                                       f'<p class="error" role="alert">Too many attempts. Please wait {minutes} '
                                       f'minute{"s" if minutes != 1 else ""} and try again.</p>'),
                        headers={b"Retry-After": str(int(wait)).encode()})

    async def signed_in(self, request: Any) -> tuple[Session, store.StoredEntry] | None:
        """The signed-in session and its user's entry (read once per request), if the cookie is
        genuine, unexpired and still current: signed with the user's present password and sign-out
        generation."""
        cookie = request.getCookie(SESSION_COOKIE)
        s = self.signer.read_session(cookie.decode("ascii", "replace") if cookie else None, self.now())
        if s is None:
            return None
        e = await self._entry(s.dn)
        if e is None or not self.signer.stamp_ok(s, self.session_facts(e.attrs)):
            return None
        return s, e

    async def session(self, request: Any) -> Session | None:
        got = await self.signed_in(request)
        return got[0] if got else None

    @staticmethod
    def session_facts(attrs: dict[str, list[str]]) -> list[str]:
        """What a session is bound to: the password (hash) values and the sign-out generation."""
        return [*sorted(attrs.get("userPassword", ())), first(attrs, SESSION_GENERATION) or "0"]

    async def start_session(self, request: Any, dn: str, must_change: bool = False) -> None:
        e = await self._entry(dn)
        facts = self.session_facts(e.attrs if e else {})
        s = Session(dn, self.now() + self.cfg.session_timeout, must_change, self.signer.stamp(dn, facts))
        request.addCookie(SESSION_COOKIE, self.signer.session_cookie(s).encode(), path=b"/", httpOnly=True,
                          secure=self.secure, sameSite=b"strict")

    async def end_all_sessions(self, dn: str) -> None:
        """Raise the user's sign-out generation: every session signed before stops working."""
        d = self.directory
        norm = d.dn(dn).norm

        def run(txn: Txn) -> None:
            e = store.get_entry_txn(txn, norm, for_update=True)
            uuid = first(e.attrs, "entryUUID") if e else None
            if e is None or not uuid:
                return
            try:
                n = int(first(e.attrs, SESSION_GENERATION) or 0) + 1
            except ValueError:
                n = 1
            write_user_status_txn(d, txn, uuid, {SESSION_GENERATION: [str(n)]}, OPERATION, Origin.LINKS)

        await d.db.run_interaction("sign out", run)

    def end_session(self, request: Any) -> None:
        request.addCookie(SESSION_COOKIE, b"", path=b"/", httpOnly=True, secure=self.secure, sameSite=b"strict",
                          max_age=b"0", expires=b"Thu, 01 Jan 1970 00:00:00 GMT")

    def page(self, title: str, body: str) -> str:
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
                f"<title>{esc(title)} – Account</title><link rel=\"stylesheet\" href=\"/style.css\"></head>"
                f"<body><header>Your account</header><main><h1>{esc(title)}</h1>{body}</main></body></html>\n")

    def rules(self) -> str:
        items = "".join(f"<li>{esc(r)}</li>" for r in self.directory.describe_policy())
        return f'<div id="rules"><p>Your new password needs:</p><ul>{items}</ul></div>'

    @staticmethod
    def alert(message: str | None) -> str:
        return f'<p class="error" role="alert" id="form-error">{esc(message)}</p>' if message else ""

    @staticmethod
    def field(name: str, label: str, *, kind: str = "password", autocomplete: str, value: str = "",
              describedby: str | None = None, autofocus: bool = False) -> str:
        extra = f' aria-describedby="{describedby}"' if describedby else ""
        extra += " autofocus" if autofocus else ""
        val = f' value="{esc(value)}"' if value else ""
        return (f'<label for="{name}">{esc(label)}</label>'
                f'<input type="{kind}" id="{name}" name="{name}" autocomplete="{autocomplete}" required '
                f'maxlength="256"{val}{extra}>')

    # -- pages --------------------------------------------------------------------------
    async def get_root(self, request: Any) -> Response:
        return Response(303, b"", location="/account" if await self.session(request) else "/signin")

    async def get_favicon(self, request: Any) -> Response:
        return Response(204, b"", content_type=b"image/x-icon")

    async def get_css(self, request: Any) -> Response:
        return Response(200, CSS, content_type=b"text/css; charset=utf-8")

    def signin_form(self, request: Any, *, error: str | None = None, login: str = "", notice: str = "") -> str:
        return (f"{notice}{self.alert(error)}"
                f'<form method="post" action="/signin">{self.csrf(request)}'
                + self.field("username", "User name or e-mail address", kind="text", autocomplete="username",
                             value=login, autofocus=not login)
                + self.field("password", "Password", autocomplete="current-password", autofocus=bool(login))
                + '<button type="submit">Sign in</button></form>'
                '<nav><p><a href="/forgot">Forgot your password?</a></p>'
                '<p class="hint">New here? Open the link in your activation e-mail to choose your first password.</p></nav>')

    async def get_signin(self, request: Any) -> Response:
        if await self.session(request):
            return Response(303, b"", location="/account")
        return Response(200, self.page("Sign in", self.signin_form(request)))

    async def post_signin(self, request: Any) -> Response:
        login = self.arg(request, "username", 256).strip()
        password = self.arg(request, "password", 256)
        limited = self.limited(request, login or None)
        if limited:
            return limited
        if not login or not password:
            return Response(400, self.page("Sign in", self.signin_form(request, error="Enter your user name and password.",
                                                                      login=login)))
        entry = await self.directory.db.run_interaction("sign-in lookup", self.links.find_login_txn, login, write=False)
        wrong = "The user name or password is not correct."
        if entry is None:
            return Response(401, self.page("Sign in", self.signin_form(request, error=wrong, login=login)))
        outcome = await self.directory.authenticate(entry.dn, password.encode("utf-8"))
        if outcome.locked:
            return Response(401, self.page("Sign in", self.signin_form(
                request, login=login, error="Your account is locked after too many failed sign-in attempts. "
                                            "Wait a while and try again, or reset your password with “Forgot your password?”.")))
        if not outcome.password_ok:
            return Response(401, self.page("Sign in", self.signin_form(request, error=wrong, login=login)))
        await self.start_session(request, entry.dn, must_change=outcome.expired)
        log.info("self-service sign-in by {dn}", dn=entry.dn)
        return Response(303, b"", location="/account")

    async def post_signout(self, request: Any) -> Response:
        s = await self.session(request)
        if s is not None:
            await self.end_all_sessions(s.dn)
            log.info("self-service sign-out by {dn}: all of its sessions ended", dn=s.dn)
        self.end_session(request)
        return Response(303, b"", location="/signin")

    async def _entry(self, dn: str) -> Any:
        norm = self.directory.dn(dn).norm
        return await self.directory.db.run_interaction("account", store.get_entry_txn, norm, write=False)

    def account_page(self, request: Any, s: Session, attrs: dict[str, list[str]], *, error: str | None = None,
                     done: bool = False) -> str:
        name = first(attrs, "displayName") or first(attrs, "cn") or s.dn
        state = self.directory.password_state(attrs, s.dn)
        rows = [("Name", name), ("User name", first(attrs, "uid") or ""), ("E-mail", first(attrs, "mail") or "—")]
        if state.changed_at:
            rows.append(("Password changed", human_time(state.changed_at)))
        if state.expires_at:
            days = (state.expires_at - self.now()) / 86400
            when = human_time(state.expires_at)
            rows.append(("Password expires", f"{when} (in {max(0, int(days))} days)" if days > 0 else f"{when} (expired)"))
        info = "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in rows) + "</dl>"
        notice = ""
        if done:
            notice = ('<p class="ok" role="status">Your password has been changed. Use the new password from now on '
                      '(Microsoft 365 gets it within a minute).</p>')
        elif s.must_change:
            notice = '<p class="error" role="alert">Your password has expired. Choose a new one to continue.</p>'
        form = (f'<h2>Change your password</h2>{self.alert(error)}{self.rules()}'
                f'<form method="post" action="/account">{self.csrf(request)}'
                + self.field("current", "Current password", autocomplete="current-password",
                             autofocus=bool(error) or s.must_change)
                + self.field("new", "New password", autocomplete="new-password", describedby="rules")
                + self.field("confirm", "New password again", autocomplete="new-password")
                + '<button type="submit">Change password</button></form>')
        signout = (f'<form method="post" action="/signout">{self.csrf(request)}'
                   '<nav><button type="submit" class="link">Sign out</button></nav></form>')
        return self.page("Your account", notice + info + form + signout)

    async def get_account(self, request: Any) -> Response:
        got = await self.signed_in(request)
        if got is None:
            return Response(303, b"", location="/signin")
        s, entry = got
        return Response(200, self.account_page(request, s, entry.attrs, done=self.arg(request, "changed") == "1"))

    async def post_account(self, request: Any) -> Response:
        got = await self.signed_in(request)
        if got is None:
            return Response(303, b"", location="/signin")
        s, entry = got
        limited = self.limited(request, s.dn)
        if limited:
            return limited
        current = self.arg(request, "current", 256)
        new = self.arg(request, "new", 256)
        confirm = self.arg(request, "confirm", 256)
        error = None
        if not current or not new:
            error = "Enter your current password and a new one."
        elif new != confirm:
            error = "The two new passwords are not the same."
        else:
            # The current password is checked as a bind checks it: a wrong one counts towards the
            # lockout, and a locked account cannot change its password here.
            outcome = await self.directory.authenticate(s.dn, current.encode("utf-8"))
            if outcome.locked:
                error = ("Your account is locked after too many failed attempts. Wait a while and try again, "
                         "or reset your password with “Forgot your password?”.")
            elif not outcome.password_ok:
                error = "Your current password is not correct."
            else:
                try:
                    await self.directory.set_password(Actor(self.directory.dn(s.dn), False), s.dn, new,
                                                      old_password=current.encode("utf-8"),
                                                      operation="selfservice-change", origin=Origin.PAGES)
                except LDAPError as e:
                    error = self.password_error(e, current_check=True)
        if error:
            return Response(422, self.account_page(request, s, entry.attrs, error=error))  # nothing it shows was written
        await self.start_session(request, s.dn)      # the new password voided every session, this one too
        log.info("self-service password change by {dn}", dn=s.dn)
        return Response(303, b"", location="/account?changed=1")

    @staticmethod
    def password_error(e: LDAPError, current_check: bool = False) -> str:
        if e.code == ResultCode.invalidCredentials and current_check:
            return "Your current password is not correct."
        if e.code == ResultCode.constraintViolation:
            msg = e.message
            return msg[0].upper() + msg[1:] + ("" if msg.endswith(".") else ".")
        if e.code == ResultCode.insufficientAccessRights:
            return "Your password cannot be changed here; ask your IT team."
        return "The password could not be changed; please try again."

    def forgot_form(self, request: Any, *, error: str | None = None, login: str = "") -> str:
        return (f"<p>Enter your user name or e-mail address. We will e-mail you a link to choose a new password.</p>"
                f'{self.alert(error)}<form method="post" action="/forgot">{self.csrf(request)}'
                + self.field("username", "User name or e-mail address", kind="text", autocomplete="username",
                             value=login, autofocus=True)
                + '<button type="submit">Send me a link</button></form><nav><a href="/signin">Back to sign in</a></nav>')

    async def get_forgot(self, request: Any) -> Response:
        return Response(200, self.page("Forgot your password?", self.forgot_form(request)))

    async def post_forgot(self, request: Any) -> Response:
        login = self.arg(request, "username", 256).strip()
        limited = self.limited(request, login or None)
        if limited:
            return limited
        if not login:
            return Response(400, self.page("Forgot your password?", self.forgot_form(request, error="Enter your user name or e-mail address.")))
        # Not awaited: the answer must not take longer when the account exists (a link is queued)
        # than when it does not, or its timing would tell what the page does not say.
        pending = defer.ensureDeferred(self.links.request_reset(login, f"forgotten-password page from "
                                                                       f"{self.address(request)}"))
        pending.addErrback(lambda f: log.failure("forgotten-password request failed", f))
        minutes = round(self.cfg.reset_ttl / 60)
        return Response(200, self.page("Check your e-mail", (
            '<p class="ok" role="status">If an account matches what you entered, we have sent a link to its e-mail '
            f"address. The link works once, for {minutes} minutes.</p>"
            "<p>No e-mail after a few minutes? Check your spam folder, or ask your IT team.</p>"
            '<nav><a href="/signin">Back to sign in</a></nav>')))

    def link_form(self, request: Any, info: LinkInfo, token: str, purpose: str, error: str | None = None) -> str:
        who = esc(info.display_name or info.uid)
        intro = (f"<p>Welcome, {who}. Choose the password for your account <strong>{esc(info.uid)}</strong>"
                 + (f" (you sign in to Microsoft 365 as <strong>{esc(info.mail)}</strong>)"
                    if info.mail and info.microsoft365 else "")
                 + ".</p>") if purpose == links_q.ACTIVATE else (
                 f"<p>Choose a new password for <strong>{esc(info.uid)}</strong>.</p>")
        action = "/activate" if purpose == links_q.ACTIVATE else "/reset"
        return (intro + self.alert(error) + self.rules()
                + f'<form method="post" action="{action}">{self.csrf(request)}'
                f'<input type="hidden" name="token" value="{esc(token)}">'
                + f'<input type="text" name="username" value="{esc(info.uid)}" autocomplete="username" hidden>'
                + self.field("new", "New password", autocomplete="new-password", describedby="rules", autofocus=True)
                + self.field("confirm", "New password again", autocomplete="new-password")
                + f'<button type="submit">{"Activate my account" if purpose == links_q.ACTIVATE else "Set new password"}</button>'
                + f'</form><p class="hint">This link works until {esc(human_time(info.expires_at))}.</p>')

    def problem(self, kind: str) -> Response:
        status, title, text = PROBLEMS.get(kind, PROBLEMS["unknown"])
        return Response(status, self.page(title, f"<p>{esc(text)}</p>"
                                          '<nav><p><a href="/forgot">Get a new link</a></p>'
                                          '<p><a href="/signin">Sign in</a></p></nav>'))

    async def get_link(self, request: Any, purpose: str) -> Response:
        token = self.arg(request, "token", 200)
        try:
            info = await self.links.lookup(token, purpose)
        except LinkProblem as p:
            return self.problem(p.kind)
        title = "Activate your account" if purpose == links_q.ACTIVATE else "Choose a new password"
        return Response(200, self.page(title, self.link_form(request, info, token, purpose)))

    async def post_link(self, request: Any, purpose: str) -> Response:
        token = self.arg(request, "token", 200)
        limited = self.limited(request, "link:" + token[:16] if token else None)
        if limited:
            return limited
        new = self.arg(request, "new", 256)
        confirm = self.arg(request, "confirm", 256)
        title = "Activate your account" if purpose == links_q.ACTIVATE else "Choose a new password"
        try:
            info = await self.links.lookup(token, purpose)
        except LinkProblem as p:
            return self.problem(p.kind)
        if not new:
            return Response(422, self.page(title, self.link_form(request, info, token, purpose, "Enter a new password.")))
        if new != confirm:
            return Response(422, self.page(title, self.link_form(request, info, token, purpose,
                                                                 "The two passwords are not the same.")))
        try:
            await self.links.use(token, purpose, new)
        except LinkProblem as p:
            return self.problem(p.kind)
        except LDAPError as e:
            return Response(422, self.page(title, self.link_form(request, info, token, purpose, self.password_error(e))))
        log.info("{purpose} link used by {dn}", purpose=purpose, dn=info.dn)
        done_title = "Your account is active" if purpose == links_q.ACTIVATE else "Your password has been changed"
        m365 = (f" and to Microsoft 365 as <strong>{esc(info.mail)}</strong> (it takes up to a minute to get there)"
                if info.mail and info.microsoft365 else "")
        return Response(200, self.page(done_title, (
            f'<p class="ok" role="status">Your password is set. Sign in with the user name '
            f"<strong>{esc(info.uid)}</strong>{m365}.</p>"
            '<nav><a href="/signin">Go to your account page</a></nav>')))


class _Site(LimitedSite):
    """The pages behind the limits; the access log never shows a query string (links carry their
    token there) and names the client behind a trusted proxy."""

    pages: SelfServicePages
    noisy = False      # no "Starting factory <...>" lines (the port's "starting on N" says it)

    def log(self, request: Any) -> None:
        path = request.path.decode("utf-8", "replace")
        log.info("{addr} {method} {path} {code}", addr=self.pages.address(request),
                 method=request.method.decode("ascii", "replace"), path=path, code=request.code)


def make_site(directory: Directory, links: LinkService, master_key: bytes) -> server.Site:
    pages = SelfServicePages(directory, links, Signer(master_key))
    cfg = directory.config.selfservice
    site = _Site(pages, trust=pages.trust, request_timeout=cfg.request_timeout, idle_timeout=cfg.idle_timeout,
                 max_connections=cfg.max_connections, max_per_address=cfg.max_connections_per_address)
    site.pages = pages
    site.displayTracebacks = False
    return site
