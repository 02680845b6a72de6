"""Outgoing mail: build a MIME message and hand it to the configured SMTP server.

Owns the ESMTP client side of ldapsync (activation links, password resets, connector
reminders to ``[mail] admin_address``): one short SMTP session per attempt over the
``[mail] smtp`` endpoint string, STARTTLS when ``[mail] starttls = true`` (refusing to send
if the server does not offer it), AUTH with ``[mail] username`` and the password read from
``[mail] password_file`` — only over STARTTLS or a ``tls:`` endpoint: a Mailer that would send
the password in clear is refused at construction (and the config at load) — and bounded retries with exponential backoff on transient failures.

It must never log a message body (it may hold an activation link) or the SMTP password;
log lines carry recipients, subject and outcome only.  It knows nothing of the directory
or of Microsoft 365.

::

    send(to, subject, text, html?)            send_later(...)  (fire and forget)
      └▶ build EmailMessage                      └▶ same, in the background; the final
         attempt 1 ─ connect ─ EHLO ─ STARTTLS ─ EHLO ─ AUTH ─ MAIL/RCPT/DATA ─ QUIT
           ├ delivered ─────────────────────────────▶ return
           ├ permanent (5xx, TLS/AUTH refused) ─────▶ MailError        (send_later: log)
           └ transient (refused/timeout/lost, 4xx)
               wait base_delay·2ⁿ (≤ max_delay, on the injected scheduler) ─▶ attempt n+1
               … after the last attempt ─────────────▶ MailError        (send_later: log)
"""

from __future__ import annotations

import email.policy
import email.utils
import re
from collections.abc import Sequence
from email.message import EmailMessage
from io import BytesIO
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet import error as ierror
from twisted.internet import ssl
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure

from ldapsync import metrics
from ldapsync.config import MailConfig, mail_auth_problem

__all__ = ["MailError", "Mailer"]

_log = Logger(namespace="ldapsync.mailer")

_POLICY = email.policy.default  # "\n" line ends: twisted.mail turns them into CRLF on the wire


class MailError(Exception):
    """A mail could not be delivered; the message says why (never with a password or body).

    ``code`` is the SMTP reply code when the server gave one, ``transient`` whether the
    last failure was of the kind that is retried.
    """

    def __init__(self, message: str, *, code: int | None = None, transient: bool = False):
        super().__init__(message)
        self.code = code
        self.transient = transient


class _Failed(Exception):
    """One attempt failed: ``reason`` is safe to show; ``transient`` drives the retry."""

    def __init__(self, reason: str, transient: bool, code: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
        self.code = code


# --------------------------------------------------------------------------- SMTP protocol


class _Sender(smtp.ESMTPSender):
    """twisted.mail's one-shot ESMTP sender, hardened for our use.

    - ``debug = False``: no session transcript is kept, so no ``AUTH`` line (base64 of the
      password) can end up in an exception or a log;
    - dot-stuffing that also works across FileSender's 16 KiB chunk boundaries;
    - a connection that drops before the result is known fails the attempt (endpoints do
      not call the factory's ``clientConnectionLost``).
    """

    debug = False
    _at_line_start = True

    def transformChunk(self, chunk: bytes) -> bytes:
        self.resetTimeout()
        out = chunk.replace(b"\n", b"\r\n").replace(b"\r\n.", b"\r\n..")
        if self._at_line_start and out.startswith(b"."):
            out = b"." + out
        if out:
            self._at_line_start = out.endswith(b"\n")
        return out

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        factory = self.factory
        if not factory.sendFinished:
            factory.sendFinished = True
            factory.result.errback(reason)


class _SenderFactory(smtp.ESMTPSenderFactory):
    protocol = _Sender
    noisy = False      # no "Starting factory <...>" line per mail


# --------------------------------------------------------------------------- helpers


def _endpoint_host(description: str) -> str:
    """The host of a ``tcp:``/``tls:``/``ssl:`` endpoint string (the TLS name to verify)."""
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", description)]
    positional = [p for p in parts[1:] if "=" not in p]
    for p in parts[1:]:
        if p.startswith("host="):
            return p[len("host="):]
    if positional:
        return positional[0]
    raise MailError(f"[mail] smtp: cannot find the host in the endpoint {description!r}")


def _trust_root(ca_bundle: str | None) -> Any:
    if not ca_bundle:
        return ssl.platformTrust()
    try:
        pem = Path(ca_bundle).read_bytes()
    except OSError as e:
        raise MailError(f"cannot read the CA bundle {ca_bundle}: {e.strerror}") from None
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.DOTALL)
    if not blocks:
        raise MailError(f"the CA bundle {ca_bundle} holds no PEM certificate")
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])


def _addr_spec(value: str, what: str) -> str:
    """The bare address of ``"Name <a@b>"`` or ``"a@b"``; ASCII only (no SMTPUTF8)."""
    _name, addr = email.utils.parseaddr(value)
    if not addr or "@" not in addr or any(c in addr for c in "\r\n <>"):
        raise ValueError(f"{what}: not a mail address: {value!r}")
    try:
        addr.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"{what}: non-ASCII address not supported: {value!r}") from None
    return addr


def _no_newlines(value: str, what: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError(f"{what} must not contain line breaks")
    return value


def _reply_text(resp: Any) -> str:
    if isinstance(resp, bytes):
        resp = resp.decode("utf-8", "replace")
    return " ".join(str(resp).split())[:300]


def _classify(f: Failure) -> _Failed:
    """Turn whatever one attempt failed with into a safe, classified ``_Failed``."""
    exc = f.value
    if isinstance(exc, _Failed):
        return exc
    if isinstance(exc, smtp.TLSRequiredError):
        return _Failed("the SMTP server does not offer STARTTLS, which [mail] starttls = true requires",
                       transient=False, code=exc.code)
    if isinstance(exc, smtp.AUTHRequiredError):
        return _Failed("the SMTP server offers no AUTH mechanism we support (PLAIN, LOGIN, CRAM-MD5)",
                       transient=False, code=exc.code)
    if isinstance(exc, smtp.EHLORequiredError):
        return _Failed("the SMTP server does not speak ESMTP, which STARTTLS/AUTH need",
                       transient=False, code=exc.code)
    if isinstance(exc, smtp.AUTHDeclinedError | smtp.AuthenticationError):
        code = exc.code
        return _Failed(f"SMTP authentication failed: {code} {_reply_text(exc.resp)}",
                       transient=400 <= code < 500, code=code)
    if isinstance(exc, smtp.TLSError):
        return _Failed("the STARTTLS handshake with the SMTP server failed", transient=True, code=exc.code)
    if isinstance(exc, smtp.SMTPTimeoutError):
        return _Failed("the SMTP server did not answer in time", transient=True)
    if isinstance(exc, smtp.SMTPClientError):
        code = exc.code
        if code is None or code < 0:
            return _Failed(f"SMTP session failed: {_reply_text(exc.resp)}", transient=True)
        return _Failed(f"the SMTP server replied {code} {_reply_text(exc.resp)}",
                       transient=400 <= code < 500, code=code)
    if isinstance(exc, SSL.Error):
        return _Failed("TLS with the SMTP server failed (is its certificate trusted and valid for the "
                       "host in [mail] smtp?)", transient=False)
    if isinstance(exc, ierror.ConnectionRefusedError):
        return _Failed("connection to the SMTP server refused", transient=True)
    if isinstance(exc, ierror.TimeoutError | defer.TimeoutError):
        return _Failed("connecting to the SMTP server timed out", transient=True)
    if isinstance(exc, ierror.DNSLookupError):
        return _Failed("the SMTP server's host name does not resolve", transient=True)
    if isinstance(exc, ierror.ConnectionDone | ierror.ConnectionLost):
        return _Failed("the SMTP server closed the connection", transient=True)
    if isinstance(exc, ierror.ConnectError | OSError):
        return _Failed(f"cannot connect to the SMTP server: {exc.__class__.__name__}", transient=True)
    return _Failed(f"unexpected error while sending: {exc.__class__.__name__}", transient=True)


# --------------------------------------------------------------------------- the mailer


class Mailer:
    """Sends mail as configured in ``[mail]`` (a bad ``smtp`` endpoint or ``from`` raises at
    construction: :class:`MailError` / ValueError).

    ``reactor`` makes the connections; ``scheduler`` (default: the reactor) times the backoff
    between attempts, so tests can drive retries with ``task.Clock``.  ``ca_bundle`` is the
    PEM file of CAs trusted for STARTTLS (default: the system store).  ``send`` makes at most
    ``attempts`` attempts, ``send_later`` at most ``background_attempts``; the n-th retry
    waits ``min(base_delay * 2**(n-1), max_delay)`` seconds.  ``timeout`` bounds the wait for
    each server reply.
    """

    def __init__(self, config: MailConfig, *, reactor: Any = None, ca_bundle: str | None = None,
                 scheduler: IReactorTime | None = None, attempts: int = 4, background_attempts: int = 8,
                 base_delay: float = 5.0, max_delay: float = 600.0, timeout: float = 60.0):
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        if attempts < 1 or background_attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.config = config
        self._reactor = reactor
        self._scheduler: IReactorTime = scheduler if scheduler is not None else reactor
        self._ca_bundle = ca_bundle or None
        self.attempts = attempts
        self.background_attempts = background_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.timeout = timeout
        problem = mail_auth_problem(config)
        if problem:
            raise MailError(problem)
        self._sender = _addr_spec(config.from_, "[mail] from")
        self._host = _endpoint_host(config.smtp) if config.starttls else ""  # the name TLS verifies
        try:
            self._endpoint: Any = clientFromString(reactor, config.smtp)  # an IStreamClientEndpoint
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise MailError(f"[mail] smtp: invalid endpoint {config.smtp!r}: {e}") from None
        self._pending: set[defer.Deferred[None]] = set()
        self._idle_waiters: list[defer.Deferred[None]] = []
        self._stopping = False

    # ------------------------------------------------------------------ public API

    def build_message(self, to: str | Sequence[str], subject: str, text: str, html: str | None = None,
                      headers: dict[str, str] | None = None) -> EmailMessage:
        """The MIME message ``send`` would send (validated; raises ValueError on bad input)."""
        recipients = [to] if isinstance(to, str) else list(to)
        if not recipients:
            raise ValueError("no recipient")
        for r in recipients:
            _addr_spec(r, "recipient")
        msg = EmailMessage(policy=_POLICY)
        msg["From"] = self.config.from_
        msg["To"] = ", ".join(recipients)
        msg["Subject"] = _no_newlines(subject, "subject")
        msg["Date"] = email.utils.formatdate(localtime=True)
        msg["Message-ID"] = email.utils.make_msgid(domain=self._sender.rpartition("@")[2])
        msg["Auto-Submitted"] = "auto-generated"
        for name, value in (headers or {}).items():
            _no_newlines(name, "header name")
            if not re.fullmatch(r"[!-9;-~]+", name):
                raise ValueError(f"invalid header name {name!r}")
            del msg[name]
            msg[name] = _no_newlines(str(value), f"header {name}")
        if text.isascii() and all(len(line) <= 900 for line in text.splitlines()):
            msg.set_content(text, cte="7bit")    # links stay whole in the raw message
        else:
            msg.set_content(text)
        if html is not None:
            msg.add_alternative(html, subtype="html")
            for part in msg.iter_parts():
                del part["MIME-Version"]  # the stdlib repeats it in each part; only the top needs it
        return msg

    async def send(self, to: str | list[str], subject: str, text: str, html: str | None = None,
                   headers: dict[str, str] | None = None) -> None:
        """Deliver now; returns once the server accepted it, else raises :class:`MailError`."""
        msg = self.build_message(to, subject, text, html, headers)
        await self._deliver(msg, _envelope(to), self.attempts)

    def send_later(self, to: str | list[str], subject: str, text: str, html: str | None = None,
                   headers: dict[str, str] | None = None) -> defer.Deferred[None]:
        """Queue the mail (in memory) and deliver it in the background, retrying; never raises
        for delivery problems (the final failure is logged).  Bad input raises ValueError now.

        The returned Deferred fires (with None) when delivery ended either way; callers may
        ignore it.
        """
        if self._stopping:
            raise MailError("the mailer is stopping; mail not queued")
        msg = self.build_message(to, subject, text, html, headers)
        d = defer.ensureDeferred(self._deliver(msg, _envelope(to), self.background_attempts))

        def logged(f: Failure) -> None:
            if f.check(defer.CancelledError):
                _log.warn("mail to {to} ({subject!r}) dropped: the mailer stopped",
                          to=msg["To"], subject=msg["Subject"])
            elif f.check(MailError):
                pass  # _deliver logged the final failure already
            else:
                _log.failure("mail to {to} ({subject!r}): unexpected error", f,
                             to=msg["To"], subject=msg["Subject"])

        d.addErrback(logged)
        self._pending.add(d)

        def done(_: object) -> None:
            self._pending.discard(d)
            if not self._pending:
                waiters, self._idle_waiters = self._idle_waiters, []
                for w in waiters:
                    w.callback(None)

        d.addBoth(done)
        return d

    @property
    def queued(self) -> int:
        """How many ``send_later`` mails are still being delivered."""
        return len(self._pending)

    def wait_idle(self) -> defer.Deferred[None]:
        """Fires when no ``send_later`` mail is pending any more."""
        if not self._pending:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    def stop(self) -> None:
        """Cancel the background deliveries (for service shutdown); each is logged as dropped."""
        self._stopping = True
        for d in list(self._pending):
            d.cancel()

    # ------------------------------------------------------------------ delivery

    def _read_password(self) -> bytes | None:
        if not self.config.username:
            return None
        if not self.config.password_file:
            raise _Failed("[mail] username is set but [mail] password_file is not", transient=False)
        try:
            raw = Path(self.config.password_file).read_bytes()
        except OSError as e:
            raise _Failed(f"cannot read [mail] password_file {self.config.password_file}: {e.strerror}",
                          transient=False) from None
        if raw.endswith(b"\r\n"):
            raw = raw[:-2]
        elif raw.endswith(b"\n"):
            raw = raw[:-1]
        return raw

    def _tls_options(self) -> Any:
        if not self.config.starttls:
            return None
        return ssl.optionsForClientTLS(self._host, trustRoot=_trust_root(self._ca_bundle))

    async def _deliver(self, msg: EmailMessage, recipients: list[str], attempts: int) -> None:
        data = msg.as_bytes(policy=_POLICY)
        pending = list(recipients)
        rejected: list[str] = []
        subject = str(msg["Subject"])
        shown_to = ", ".join(pending)
        last: _Failed | None = None
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                delay = min(self.base_delay * 2 ** (attempt - 2), self.max_delay)
                _log.info("mail to {to} ({subject!r}): attempt {attempt} failed: {reason}; retrying in {delay}s",
                          to=shown_to, subject=subject, attempt=attempt - 1, reason=last, delay=delay)
                await deferLater(self._scheduler, delay, lambda: None)
            try:
                addresses = await self._attempt(pending, data)
            except _Failed as f:
                last = f
                if not f.transient:
                    break
                continue
            # Some recipients may have been refused: 5xx is final, 4xx is retried for them only.
            retry: list[str] = []
            for addr, code, resp in addresses:
                a = addr.decode("ascii") if isinstance(addr, bytes) else str(addr)
                if code in smtp.SUCCESS:
                    continue
                if 400 <= code < 500:
                    retry.append(a)
                    last = _Failed(f"the SMTP server replied {code} {_reply_text(resp)} for {a}", True, code)
                else:
                    rejected.append(f"{a} ({code} {_reply_text(resp)})")
            pending = [a for a in pending if a in retry]
            if not pending:
                break
        if pending and last is not None:
            # Undelivered to someone (or to everyone).
            if not last.transient:
                why = f"mail to {', '.join(pending)} ({subject!r}) not sent: {last.reason}"
            else:
                why = (f"mail to {', '.join(pending)} ({subject!r}) not sent after {attempts} "
                       f"attempt{'s' if attempts != 1 else ''}: {last.reason}")
            _log.error("mail to {to} ({subject!r}) failed: {reason}", to=", ".join(pending),
                       subject=subject, reason=last.reason, code=last.code)
            if rejected:
                why += "; also refused: " + ", ".join(rejected)
            metrics.mail_sent("failed")
            raise MailError(why, code=last.code, transient=last.transient)
        if rejected:
            _log.error("mail ({subject!r}) refused for {rejected}", subject=subject, rejected=", ".join(rejected))
            metrics.mail_sent("failed")
            raise MailError(f"mail ({subject!r}) refused by the SMTP server for {', '.join(rejected)}",
                            code=None, transient=False)
        _log.info("mail to {to} ({subject!r}) sent", to=shown_to, subject=subject)
        metrics.mail_sent("sent")

    async def _attempt(self, recipients: list[str], data: bytes) -> list[tuple[Any, int, Any]]:
        """One SMTP session; returns the per-recipient (address, code, reply) list."""
        password = self._read_password()
        username = self.config.username.encode("utf-8") if self.config.username else None
        try:
            tls = self._tls_options()
        except MailError as e:
            raise _Failed(str(e), transient=False) from None
        factory: _SenderFactory

        def cancel(_: defer.Deferred[Any]) -> None:
            factory.sendFinished = True
            proto = factory.currentProtocol
            if proto is not None and proto.transport is not None:
                proto.transport.abortConnection()

        result: defer.Deferred[Any] = defer.Deferred(cancel)
        factory = _SenderFactory(
            username, password, self._sender, recipients, BytesIO(data), result,
            retries=0, timeout=self.timeout, contextFactory=tls,
            heloFallback=not (username or self.config.starttls),
            requireAuthentication=bool(username),
            requireTransportSecurity=self.config.starttls,
        )
        try:
            await self._endpoint.connect(factory)
        except defer.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - every connect failure becomes a classified, safe _Failed
            raise _classify(Failure()) from None
        try:
            _num_ok, addresses = await result
        except defer.CancelledError:
            raise
        except smtp.SMTPDeliveryError as exc:
            per_rcpt: list[tuple[Any, int, Any]] = list(exc.addresses or [])  # type: ignore[call-overload]
            if per_rcpt and not any(c in smtp.SUCCESS for _a, c, _r in per_rcpt):
                return per_rcpt  # no recipient accepted: the caller sorts 4xx from 5xx
            raise _classify(Failure()) from None
        except Exception:  # noqa: BLE001 - as above: never let a raw SMTP error (or its transcript) out
            raise _classify(Failure()) from None
        return list(addresses)


def _envelope(to: str | Sequence[str]) -> list[str]:
    return [_addr_spec(r, "recipient") for r in ([to] if isinstance(to, str) else to)]
