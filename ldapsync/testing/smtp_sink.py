"""A real SMTP server that keeps what it receives: for tests and the demo (test double only).

Owns a twisted.mail ESMTP server on 127.0.0.1:<port> that accepts every message, optionally
offers STARTTLS (with a given certificate and key) and can require it, optionally requires
AUTH PLAIN/LOGIN with given credentials, and stores each message (envelope sender and
recipients plus the parsed :class:`email.message.EmailMessage`) in memory and, with a
``maildir``, as ``NNNNNN.eml`` + ``NNNNNN.json`` (envelope) files another process can read
with :func:`read_maildir`.  A fault switch answers the next N messages with an error
(451 by default) at DATA or RCPT time, to test retries.  Production code must not import it.

In-process use (pytest-twisted)::

    sink = SMTPSink(credentials={"mailer": "s3cret"}, tls_cert=cert, tls_key=key)
    sink.start()                     # sink.endpoint == "tcp:127.0.0.1:<port>"
    ... send ...
    msgs = await sink.wait_for(1)
    await sink.stop()

Standalone::

    python -m ldapsync.testing.smtp_sink --port 2525 --maildir DIR \\
        [--tls-cert C --tls-key K [--require-tls]] [--user U --password P] [--fail-next N --fail-code 451]
"""

from __future__ import annotations

import argparse
import email.policy
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

from twisted.cred import checkers, portal
from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.mail._cred import LOGINCredentials, PLAINCredentials
from zope.interface import implementer  # type: ignore[import-untyped]

__all__ = ["ReceivedMessage", "SMTPSink", "main", "read_maildir"]

_log = Logger(namespace="ldapsync.testing.smtp_sink")


@dataclass
class ReceivedMessage:
    mail_from: str
    rcpt_to: list[str]
    message: EmailMessage
    raw: bytes
    auth_user: str | None = None
    tls: bool = False
    received_at: float = field(default_factory=time.time)

    def body(self, subtype: str = "plain") -> str:
        """The text of the ``text/<subtype>`` part (decoded)."""
        part = self.message.get_body(preferencelist=(subtype,))
        if part is None:
            raise LookupError(f"no text/{subtype} part")
        return part.get_content()


def _parse(raw: bytes) -> EmailMessage:
    return BytesParser(policy=email.policy.default).parsebytes(raw)  # type: ignore[return-value]


def read_maildir(directory: str | os.PathLike[str]) -> list[ReceivedMessage]:
    """The messages a sink (maybe in another process) stored in ``directory``, oldest first."""
    out = []
    for eml in sorted(Path(directory).glob("*.eml")):
        meta = json.loads(eml.with_suffix(".json").read_text(encoding="utf-8"))
        raw = eml.read_bytes()
        out.append(ReceivedMessage(meta["mail_from"], meta["rcpt_to"], _parse(raw), raw,
                                   meta.get("auth_user"), meta.get("tls", False), meta.get("received_at", 0.0)))
    return out


@dataclass
class _Fault:
    remaining: int
    code: int
    text: str
    stage: str  # "data" or "rcpt"


class _Transaction:
    def __init__(self, mail_from: str, rcpt_to: list[str], proto: _SinkProtocol):
        self.mail_from, self.rcpt_to, self.proto = mail_from, rcpt_to, proto
        self.lines: list[bytes] = []
        self.writers = 0


@implementer(smtp.IMessage)
class _Message:
    """One per recipient (twisted.mail's model); only the first one records the lines."""

    def __init__(self, tx: _Transaction):
        self.tx = tx
        self.primary = tx.writers == 0
        tx.writers += 1

    def lineReceived(self, line: bytes) -> None:
        if self.primary:
            self.tx.lines.append(line)

    def eomReceived(self) -> defer.Deferred[None]:
        if not self.primary:
            return defer.succeed(None)
        sink = self.tx.proto.sink
        fault = sink._take_fault("data")
        if fault is not None:
            return defer.fail(smtp.SMTPServerError(fault.code, fault.text))
        sink._store(self.tx)
        return defer.succeed(None)

    def connectionLost(self) -> None:
        pass


@implementer(smtp.IMessageDelivery)
class _Delivery:
    def __init__(self, proto: _SinkProtocol):
        self.proto = proto

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        return None  # keep the stored message exactly as sent

    def validateFrom(self, helo: Any, origin: smtp.Address) -> smtp.Address:
        return origin

    def validateTo(self, user: smtp.User) -> Callable[[], _Message]:
        fault = self.proto.sink._take_fault("rcpt")
        if fault is not None:
            raise smtp.SMTPServerError(fault.code, fault.text)
        return lambda: _Message(self.proto._tx())


@implementer(portal.IRealm)
class _Realm:
    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
        if smtp.IMessageDelivery in interfaces:
            # The protocol keeps its own delivery; this avatar only marks the login.
            return smtp.IMessageDelivery, _AuthMarker(avatar_id), lambda: None
        raise NotImplementedError()


class _AuthMarker:
    def __init__(self, avatar_id: Any):
        self.avatar_id = avatar_id.decode() if isinstance(avatar_id, bytes) else str(avatar_id)


class _SinkProtocol(smtp.ESMTP):
    sink: SMTPSink
    noisy = False

    def __init__(self, sink: SMTPSink):
        chal: dict[bytes, Any] = {}
        if sink.credentials:
            mechs = {b"PLAIN": PLAINCredentials, b"LOGIN": LOGINCredentials}
            chal = {m.encode(): mechs[m.encode()] for m in sink.auth_mechanisms}
        super().__init__(chal=chal, contextFactory=sink._tls_context)
        self.sink = sink
        self.auth_user: str | None = None
        self._pending_tx: _Transaction | None = None
        self.host = b"smtp-sink.test"

    def connectionMade(self) -> None:
        self.sink.sessions += 1
        super().connectionMade()

    # --- capabilities and policy -----------------------------------------------------

    def extensions(self) -> dict[bytes, Any]:
        ext = super().extensions()
        if self.authenticated or (self.sink.require_tls and not self.startedTLS):
            ext.pop(b"AUTH", None)  # AUTH only once TLS is up when TLS is required
        return ext

    def ext_AUTH(self, rest: bytes) -> None:
        if not self.sink.credentials:
            self.sendCode(502, b"AUTH not available")
        elif self.sink.require_tls and not self.startedTLS:
            self.sendCode(530, b"Must issue a STARTTLS command first")
        else:
            super().ext_AUTH(rest)

    def _cbAuthenticated(self, loginInfo: Any) -> None:
        _iface, avatar, _logout = loginInfo
        self.auth_user = avatar.avatar_id
        self.authenticated = True
        self.challenger = None

    def validateFrom(self, helo: Any, origin: smtp.Address) -> Any:
        if self.sink.require_tls and not self.startedTLS:
            raise smtp.SMTPServerError(530, "Must issue a STARTTLS command first")
        if self.sink.credentials and not self.authenticated:
            raise smtp.SMTPServerError(530, "Authentication required")
        self.delivery = _Delivery(self)  # type: ignore[assignment]
        return origin

    def validateTo(self, user: smtp.User) -> Any:
        return _Delivery(self).validateTo(user)

    # --- one transaction = one stored message ------------------------------------------

    def do_DATA(self, rest: bytes) -> None:
        if self._from is not None and self._to:
            self._pending_tx = _Transaction(str(self._from), [str(u.dest) for u, _f in self._to], self)
        super().do_DATA(rest)

    def _tx(self) -> _Transaction:
        assert self._pending_tx is not None
        return self._pending_tx

    def _messageHandled(self, resultList: list[tuple[bool, Any]]) -> None:
        for ok, result in resultList:
            if not ok and result.check(smtp.SMTPServerError):
                err = result.value
                self.sendCode(err.code, err.resp.encode() if isinstance(err.resp, str) else err.resp)
                return
        super()._messageHandled(resultList)


class _SinkFactory(smtp.SMTPFactory):
    def __init__(self, sink: SMTPSink):
        super().__init__(portal=sink._portal)
        self.sink = sink
        self.domain = b"smtp-sink.test"

    def buildProtocol(self, addr: Any) -> _SinkProtocol:
        p = _SinkProtocol(self.sink)
        p.factory = self
        p.portal = self.portal
        return p


class SMTPSink:
    """An SMTP server on ``host``:``port`` (0 = a free port) that stores what it receives.

    ``tls_cert``/``tls_key`` (PEM files) make it offer STARTTLS; ``require_tls`` refuses
    AUTH and MAIL before STARTTLS.  ``credentials`` (user → password) make AUTH mandatory,
    with ``auth_mechanisms`` offered (PLAIN and/or LOGIN).  ``maildir`` also writes each
    message to disk.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, tls_cert: str | os.PathLike[str] | None = None,
                 tls_key: str | os.PathLike[str] | None = None, require_tls: bool = False,
                 credentials: Mapping[str, str] | None = None, auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN"),
                 maildir: str | os.PathLike[str] | None = None, reactor: Any = None):
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if require_tls and not tls_cert:
            raise ValueError("require_tls needs tls_cert and tls_key")
        for m in auth_mechanisms:
            if m not in ("PLAIN", "LOGIN"):
                raise ValueError(f"unsupported AUTH mechanism {m!r}")
        self.host, self._requested_port, self._reactor = host, port, reactor
        self.require_tls = require_tls
        self.credentials = dict(credentials or {})
        self.auth_mechanisms = auth_mechanisms
        self.maildir = Path(maildir) if maildir else None
        self.messages: list[ReceivedMessage] = []
        self.sessions = 0
        self._faults: list[_Fault] = []
        self._waiters: list[tuple[int, defer.Deferred[list[ReceivedMessage]]]] = []
        self._seq = itertools.count(1)
        self._listening: Any = None
        self._tls_context = None
        if tls_cert:
            from twisted.internet import ssl

            pem = Path(tls_cert).read_bytes() + b"\n" + Path(tls_key).read_bytes()  # type: ignore[arg-type]
            self._tls_context = ssl.PrivateCertificate.loadPEM(pem).options()
        self._portal = None
        if self.credentials:
            checker = checkers.InMemoryUsernamePasswordDatabaseDontUse(
                **{u: p.encode() for u, p in self.credentials.items()})
            self._portal = portal.Portal(_Realm(), [checker])  # type: ignore[arg-type, list-item]
        if self.maildir:
            self.maildir.mkdir(parents=True, exist_ok=True)
            existing = sorted(self.maildir.glob("*.eml"))
            if existing:
                self._seq = itertools.count(int(existing[-1].stem) + 1)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> SMTPSink:
        """Listen now (synchronous); returns self."""
        self._listening = self._reactor.listenTCP(self._requested_port, _SinkFactory(self), interface=self.host)
        return self

    def stop(self) -> defer.Deferred[None]:
        port, self._listening = self._listening, None
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)

    @property
    def port(self) -> int:
        if self._listening is None:
            raise RuntimeError("the sink is not started")
        return int(self._listening.getHost().port)

    @property
    def endpoint(self) -> str:
        """A Twisted client endpoint string for ``[mail] smtp``."""
        return f"tcp:{self.host}:{self.port}"

    # ------------------------------------------------------------------ test controls

    def fail_next(self, count: int = 1, code: int = 451, text: str = "Try again later (sink fault)",
                  stage: str = "data") -> None:
        """Answer the next ``count`` messages with ``code`` at end of DATA (or at each RCPT)."""
        if stage not in ("data", "rcpt"):
            raise ValueError("stage is 'data' or 'rcpt'")
        self._faults.append(_Fault(count, code, text, stage))

    def clear(self) -> None:
        self.messages.clear()
        self._faults.clear()

    def wait_for(self, count: int = 1, timeout: float = 10.0) -> defer.Deferred[list[ReceivedMessage]]:
        """Fires with the message list once at least ``count`` messages arrived."""
        if len(self.messages) >= count:
            return defer.succeed(list(self.messages))
        d: defer.Deferred[list[ReceivedMessage]] = defer.Deferred()
        self._waiters.append((count, d))
        d.addTimeout(timeout, self._reactor)
        return d

    # ------------------------------------------------------------------ internals

    def _take_fault(self, stage: str) -> _Fault | None:
        for f in self._faults:
            if f.stage == stage and f.remaining > 0:
                f.remaining -= 1
                if f.remaining == 0:
                    self._faults.remove(f)
                return f
        return None

    def _store(self, tx: _Transaction) -> None:
        raw = b"\n".join(tx.lines) + b"\n"
        msg = ReceivedMessage(tx.mail_from, tx.rcpt_to, _parse(raw), raw, tx.proto.auth_user,
                              bool(tx.proto.startedTLS))
        if self.maildir is not None:
            seq = next(self._seq)
            base = self.maildir / f"{seq:06d}"
            meta = {"mail_from": msg.mail_from, "rcpt_to": msg.rcpt_to, "auth_user": msg.auth_user,
                    "tls": msg.tls, "received_at": msg.received_at}
            tmp = base.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(meta), encoding="utf-8")
            os.replace(tmp, base.with_suffix(".json"))
            tmp = base.with_suffix(".eml.tmp")
            tmp.write_bytes(raw)
            os.replace(tmp, base.with_suffix(".eml"))  # last: a reader seeing .eml finds .json
        self.messages.append(msg)
        _log.info("sink: message from {mail_from} to {rcpt_to}: {subject!r}", mail_from=msg.mail_from,
                  rcpt_to=msg.rcpt_to, subject=str(msg.message["Subject"]))
        ready = [(n, d) for n, d in self._waiters if len(self.messages) >= n]
        self._waiters = [(n, d) for n, d in self._waiters if len(self.messages) < n]
        for _n, d in ready:
            if not d.called:
                d.callback(list(self.messages))


# ---------------------------------------------------------------------------- standalone


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ldapsync.testing.smtp_sink",
                                 description="An SMTP sink that stores received mail (test double).")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=2525, help="0 picks a free port (printed)")
    ap.add_argument("--maildir", help="write NNNNNN.eml + NNNNNN.json here")
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--require-tls", action="store_true")
    ap.add_argument("--user", help="require AUTH as this user")
    ap.add_argument("--password", help="the user's password (or --password-file)")
    ap.add_argument("--password-file")
    ap.add_argument("--fail-next", type=int, default=0, help="answer the next N messages with --fail-code")
    ap.add_argument("--fail-code", type=int, default=451)
    args = ap.parse_args(argv)

    credentials = None
    if args.user:
        if args.password_file:
            password = Path(args.password_file).read_text(encoding="utf-8").removesuffix("\n")
        elif args.password is not None:
            password = args.password
        else:
            ap.error("--user needs --password or --password-file")
        credentials = {args.user: password}

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)],  # type: ignore[list-item]
                                     redirectStandardIO=False)
    sink = SMTPSink(host=args.host, port=args.port, tls_cert=args.tls_cert, tls_key=args.tls_key,
                    require_tls=args.require_tls, credentials=credentials, maildir=args.maildir,
                    reactor=reactor)
    if args.fail_next:
        sink.fail_next(args.fail_next, args.fail_code)
    sink.start()
    print(f"smtp sink listening on {args.host}:{sink.port}", flush=True)
    reactor.run()  # type: ignore[attr-defined, misc]
    return 0


if __name__ == "__main__":
    sys.exit(main())
