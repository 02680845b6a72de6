"""The LDAP protocol edge: bytes in, directory calls, result codes out.

One :class:`LDAPConnection` per client.  It frames PDUs (refusing any over
``[ldap] max_pdu_size``, or ``max_pdu_size_anonymous`` before a bind), decodes
them (``ldapsync.ldap.ber``), checks controls, calls the directory and encodes
the answer.  It holds no rules of its own: access control, schema and storage
live in ``ldapsync.directory``.  What each connection and operation leaves behind
(cn=Monitor counters, metrics, the access log) goes through one
``ldapsync.ldap.observer.Observer`` per connection.

Limits, like slapd's (all in ``[ldap]``):

- A bind is processed alone (RFC 4511 §4.2.1): it waits for the operations
  before it, and nothing after it is even decoded until it has been answered,
  so pipelined binds are taken one at a time and a request after a bind is
  framed under the PDU limit of the identity the bind established.
- At most ``max_pending_anonymous`` / ``max_pending`` operations run at once per
  connection (slapd's ``conn_max_pending`` / ``conn_max_pending_auth``); beyond
  that the connection stops reading (``pauseProducing``) until some finish, and
  likewise while the client does not read its answers (the connection is the
  transport's producer, as slapd stops on a blocked writer).  Unread requests
  stay in the kernel's socket buffers, not in our memory.
- ``max_connections`` in all and ``max_connections_per_address`` per client
  address: a connection beyond them is closed at once (one log line per address
  a minute); ``idle_timeout`` closes idle connections.

A malformed PDU, a PDU over the size limit or a garbage stream ends that one
connection with a Notice of Disconnection (RFC 4511 §4.4.1) and one log line;
nobody else notices.  No Python traceback ever reaches a client: unexpected
errors become ``other`` with a short message and are logged here.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer, protocol
from twisted.protocols.policies import TimeoutMixin
from twisted.internet.interfaces import ITLSTransport
from twisted.logger import Logger

from ldapsync.clock import Timer
from ldapsync.config import LDAPConfig
from ldapsync.directory.errors import LDAPError, ResultCode
from ldapsync.directory.policy import PPolicyResponse
from ldapsync.directory.facade import ANONYMOUS, Actor, Directory, SearchRequest
from ldapsync.ldap import ber
from ldapsync.ldap.ber import BERError, enc_message, enc_result, enc_str, tlv
from ldapsync.ldap.observer import Observer, Operation

log = Logger()

OID_PAGED = "1.2.840.113556.1.4.319"
OID_MANAGE_DSA_IT = "2.16.840.1.113730.3.4.2"
OID_STARTTLS = "1.3.6.1.4.1.1466.20037"
OID_PASSWD = "1.3.6.1.4.1.4203.1.11.1"
OID_WHOAMI = "1.3.6.1.4.1.4203.1.11.3"
OID_NOTICE_OF_DISCONNECTION = "1.3.6.1.4.1.1466.20036"
OID_PPOLICY = "1.3.6.1.4.1.42.2.27.8.5.1"   # password policy request and response (draft-behera)
KNOWN_CONTROLS = {OID_PAGED, OID_MANAGE_DSA_IT, OID_PPOLICY}
SCOPES = {0: "base", 1: "one", 2: "sub", 3: "children"}
REFUSAL_LOG_INTERVAL = 60.0   # seconds between two "refusing connections" lines for one address
MAX_INT = 2**31 - 1  # RFC 4511 maxInt: the bound of message ids, size/time limits and page sizes

RESPONSE_TAG = {
    ber.BindRequest: ber.BIND_RESPONSE,
    ber.SearchRequest: ber.SEARCH_DONE,
    ber.ModifyRequest: ber.MODIFY_RESPONSE,
    ber.AddRequest: ber.ADD_RESPONSE,
    ber.DelRequest: ber.DEL_RESPONSE,
    ber.ModifyDNRequest: ber.MODDN_RESPONSE,
    ber.CompareRequest: ber.COMPARE_RESPONSE,
    ber.ExtendedRequest: ber.EXTENDED_RESPONSE,
}


class LDAPConnection(protocol.Protocol, TimeoutMixin):
    def __init__(self, factory: "LDAPServerFactory", address: str) -> None:
        self.factory = factory
        self.directory = factory.directory
        self.address = address                    # the client's host: connection caps, bind rate limits
        self.buffer = bytearray()
        self.actor: Actor = ANONYMOUS
        self.ops: dict[int, Operation] = {}
        self.tls = factory.is_tls_listener
        self.closing = False
        self.held: ber.Message | None = None      # a bind waiting for the operations before it
        self.bind_msgid: int | None = None        # the bind in progress (nothing else is started meanwhile)
        self.write_blocked = False                # the client does not read: the transport paused us
        self.read_paused = False                  # we paused the transport (backpressure)
        self._pumping = False
        self.observer = Observer(factory.access, self._peer)   # monitor counters, metrics, access log

    # -- framing -----------------------------------------------------------------
    def connectionMade(self) -> None:
        self.factory.limits.opened(self.address)
        self.observer.opened()
        self.transport.registerProducer(self, True)
        if self.factory.idle_timeout:
            self.setTimeout(self.factory.idle_timeout)

    def timeoutConnection(self) -> None:
        # [ldap] idle_timeout: like slapd's idletimeout, an idle client is disconnected.
        if self.closing or self.write_blocked:
            # It has not read what we wrote (not even the notice) for that long: drop it,
            # or its unread answers would stay in memory for good.
            log.warn("dropping LDAP connection from {peer}: the client has not read its answers for {s:g}s",
                     peer=self._peer(), s=self.factory.idle_timeout)
            self.transport.abortConnection()
            return
        if self.ops:
            self.resetTimeout()
            return
        self._disconnect(ResultCode.unavailable, "connection idle for too long; closed by the server")

    def connectionLost(self, reason: Any = protocol.connectionDone) -> None:
        self.factory.limits.closed(self.address)
        self.observer.closed()
        self.closing = True
        self.setTimeout(None)
        self.buffer.clear()
        self.held = None
        for op in self.ops.values():
            op.abandoned = True

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        if self.factory.idle_timeout:
            self.resetTimeout()
        self.buffer += data
        self._pump()

    # IPushProducer: the transport pauses us while the client does not read what we write.
    def pauseProducing(self) -> None:
        self.write_blocked = True
        self._pump()

    def resumeProducing(self) -> None:
        self.write_blocked = False
        self._pump()

    def stopProducing(self) -> None:
        self.closing = True

    def _max_pending(self) -> int:
        return self.factory.max_pending if self.actor.dn is not None else self.factory.max_pending_anonymous

    def _blocked(self) -> bool:
        """Nothing more may start now (the bytes after stay unread)."""
        return (self.held is not None or self.bind_msgid is not None or self.write_blocked
                or len(self.ops) >= self._max_pending())

    def _pump(self) -> None:
        """Start what may start now, in order; stop reading the socket while nothing may."""
        if self._pumping or self.closing:
            return
        self._pumping = True
        try:
            while not self.closing:
                if self.held is not None:
                    if self.ops:
                        break                       # the bind waits for the operations before it
                    msg, self.held = self.held, None
                    self._dispatch(msg)
                    continue
                if self._blocked() or not self.buffer:
                    break
                msg = self._next_message()
                if msg is None:
                    break
                if isinstance(msg.op, ber.BindRequest) and self.ops:
                    self.held = msg
                    continue
                self._dispatch(msg)
        finally:
            self._pumping = False
        if self.closing:
            return
        pause = self._blocked() and bool(self.buffer)
        if pause != self.read_paused:
            self.read_paused = pause
            if pause:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def _next_message(self) -> ber.Message | None:
        anonymous = self.actor.dn is None
        max_size = self.factory.max_pdu_size
        if anonymous:
            max_size = min(max_size, self.factory.max_pdu_size_anonymous)
        try:
            n = ber.pdu_length(self.buffer, max_size)
            if n is None or len(self.buffer) < n:
                return None
            pdu = bytes(self.buffer[:n])
            del self.buffer[:n]
            return ber.decode_message(pdu)
        except BERError as e:
            hint = ""
            if anonymous and isinstance(e, ber.PDUTooLarge):
                hint = "; before a bind the limit is [ldap] max_pdu_size_anonymous: bind first"
            self._disconnect(ResultCode.protocolError, f"malformed request: {e}{hint}")
            return None

    def _peer(self) -> str:
        try:
            p = self.transport.getPeer()
            return f"{p.host}:{p.port}"
        except Exception:
            return "?"

    def _disconnect(self, code: ResultCode, message: str) -> None:
        log.warn("closing LDAP connection from {peer}: {reason}", peer=self._peer(), reason=message)
        self.closing = True
        notice = enc_message(0, tlv(ber.EXTENDED_RESPONSE, ber.enc_int(int(code), 0x0A) + enc_str("") + enc_str(message) + enc_str(OID_NOTICE_OF_DISCONNECTION, 0x8A)))
        try:
            self.transport.write(notice)
        finally:
            self.buffer.clear()
            self._close()

    def _close(self) -> None:
        # A registered producer keeps the transport open: unregister first.
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    # -- dispatch ------------------------------------------------------------------
    def _dispatch(self, msg: ber.Message) -> None:
        req = msg.op
        started = self.observer.dispatched(req)
        if isinstance(req, ber.UnbindRequest):
            self.closing = True
            self._close()
            return
        if isinstance(req, ber.AbandonRequest):
            op = self.ops.get(req.msgid)
            if op is not None:
                op.abandoned = True
            return  # RFC 4511 §4.11: no response, ever
        if isinstance(req, ber.UnknownRequest) or msg.msgid == 0:
            self._disconnect(ResultCode.protocolError, f"unknown or unsolicited operation (tag 0x{getattr(req, 'tag', 0):02x})")
            return
        op = Operation(msg.msgid, req, RESPONSE_TAG[type(req)], started=started)
        self.ops[msg.msgid] = op
        for c in msg.controls:
            if c.critical and c.oid not in KNOWN_CONTROLS:
                self._result(op, ResultCode.unavailableCriticalExtension,
                             message=f"critical control {c.oid} is not supported")
                self._done(None, op)
                return
        handler: Callable[[ber.Message, Operation], Awaitable[None]] = getattr(self, "handle_" + type(req).__name__)
        if isinstance(req, ber.BindRequest):
            self.bind_msgid = msg.msgid
        d = defer.ensureDeferred(handler(msg, op))
        d.addErrback(self._failed, msg, op)
        d.addBoth(self._done, op)

    def _done(self, _: Any, op: Operation) -> None:
        self.observer.finished(op)
        self.ops.pop(op.msgid, None)
        if op.msgid == self.bind_msgid:
            self.bind_msgid = None
        self._pump()

    def _failed(self, failure: Any, msg: ber.Message, op: Operation) -> None:
        if op.abandoned or self.closing:
            return
        err = failure.value
        if isinstance(err, LDAPError):
            info = getattr(err, "ppolicy", None)
            controls = _ppolicy_controls(info) if info is not None and _wants_ppolicy(msg) else None
            self._result(op, err.code, err.matched_dn, err.message, controls=controls)
        else:
            log.failure("LDAP {op} failed", failure, op=type(msg.op).__name__)
            self._result(op, ResultCode.other, message="internal server error; see the server log")

    def _result(self, op: Operation, code: int, matched: str = "", message: str = "", extra: bytes = b"",
                controls: list[tuple[str, bool, bytes | None]] | None = None, entries: list[bytes] | None = None) -> None:
        """Every operation's result goes out here (a search's entries just before it)."""
        if self.closing:
            return
        self.observer.answered(op, code)
        done = enc_message(op.msgid, enc_result(op.tag, int(code), matched, message, extra), controls)
        if entries:
            entries.append(done)
            self.transport.writeSequence(entries)   # one write, no copy of the whole result here
        else:
            self.transport.write(done)

    # -- operations ----------------------------------------------------------------
    async def handle_BindRequest(self, msg: ber.Message, op: Operation) -> None:
        req: ber.BindRequest = msg.op
        if req.version != 3:
            raise LDAPError(ResultCode.protocolError, f"LDAP version {req.version} is not supported; use version 3")
        if req.password is None:
            raise LDAPError(ResultCode.authMethodNotSupported, f"SASL mechanism {req.sasl_mechanism} is not supported; use a simple bind")
        self.actor = ANONYMOUS  # a failed bind leaves the connection anonymous
        actor, info = await self.directory.bind_with_policy(req.dn, req.password, source=self.address)
        self.actor = actor
        controls = _ppolicy_controls(info) if _wants_ppolicy(msg) and actor.dn is not None else None
        self._result(op, ResultCode.success, controls=controls)

    async def handle_SearchRequest(self, msg: ber.Message, op: Operation) -> None:
        req: ber.SearchRequest = msg.op
        scope = SCOPES.get(req.scope)
        if scope is None:
            raise LDAPError(ResultCode.protocolError, f"unknown search scope {req.scope}")
        if not (0 <= req.size_limit <= MAX_INT and 0 <= req.time_limit <= MAX_INT):
            raise LDAPError(ResultCode.protocolError, f"size and time limits must be between 0 and {MAX_INT}")
        page_size = None
        page_after = 0
        for c in msg.controls:
            if c.oid == OID_PAGED:
                try:
                    parts = ber.decode_sequence_values(c.value or b"")
                    if len(parts) != 2 or parts[0][0] != 0x02 or parts[1][0] != 0x04:
                        raise BERError("bad paged results control")
                    page_size = ber.decode_int(parts[0][1])
                    cookie = parts[1][1]
                except BERError:
                    raise LDAPError(ResultCode.protocolError, "paged results control value is malformed") from None
                if cookie:
                    if not cookie.isdigit() or len(cookie) > 18:
                        raise LDAPError(ResultCode.protocolError, "paged results cookie is invalid")
                    page_after = int(cookie)
                if page_size == 0:
                    # RFC 2696: size 0 abandons the paged search.
                    self._result(op, ResultCode.success,
                                 controls=[(OID_PAGED, False, _paged_value(0, b""))])
                    return
                if not 0 <= page_size <= MAX_INT:
                    raise LDAPError(ResultCode.protocolError, f"page size must be between 0 and {MAX_INT}")
        sreq = SearchRequest(
            base=req.base, scope=scope, filter=req.filter, attributes=req.attributes,
            types_only=req.types_only, size_limit=req.size_limit, time_limit=req.time_limit,
            page_size=page_size, page_after=page_after,
        )
        result = await self.directory.search(self.actor, sreq, lambda: op.abandoned or self.closing)
        if op.abandoned or self.closing:
            return
        out = [enc_message(msg.msgid, ber.enc_search_entry(dn, attrs)) for dn, attrs in result.entries]
        controls = None
        if page_size is not None:
            cookie = str(result.next_after).encode() if result.next_after is not None else b""
            controls = [(OID_PAGED, False, _paged_value(0, cookie))]
        self._result(op, result.code, "", result.message, controls=controls, entries=out)

    async def handle_AddRequest(self, msg: ber.Message, op: Operation) -> None:
        req: ber.AddRequest = msg.op
        await self.directory.add(self.actor, req.dn, req.attributes)
        self._result(op, ResultCode.success)

    async def handle_DelRequest(self, msg: ber.Message, op: Operation) -> None:
        await self.directory.delete(self.actor, msg.op.dn)
        self._result(op, ResultCode.success)

    async def handle_ModifyRequest(self, msg: ber.Message, op: Operation) -> None:
        req: ber.ModifyRequest = msg.op
        await self.directory.modify(self.actor, req.dn, req.changes)
        self._result(op, ResultCode.success)

    async def handle_ModifyDNRequest(self, msg: ber.Message, op: Operation) -> None:
        req: ber.ModifyDNRequest = msg.op
        await self.directory.modify_dn(self.actor, req.dn, req.new_rdn, req.delete_old, req.new_superior)
        self._result(op, ResultCode.success)

    async def handle_CompareRequest(self, msg: ber.Message, op: Operation) -> None:
        req: ber.CompareRequest = msg.op
        same = await self.directory.compare(self.actor, req.dn, req.attr, req.value)
        self._result(op, ResultCode.compareTrue if same else ResultCode.compareFalse)

    async def handle_ExtendedRequest(self, msg: ber.Message, op: Operation) -> None:
        req: ber.ExtendedRequest = msg.op
        if req.name == OID_WHOAMI:
            authz = f"dn:{self.actor.dn}" if self.actor.dn is not None else ""
            self._result(op, ResultCode.success, extra=enc_str(authz, 0x8B))
            return
        if req.name == OID_PASSWD:
            user = old = new = None
            if req.value:
                try:
                    for t, v in ber.decode_sequence_values(req.value):
                        if t == 0x80:
                            user = v.decode("utf-8")
                        elif t == 0x81:
                            old = v
                        elif t == 0x82:
                            new = v
                        else:
                            raise BERError("unknown element")
                except (BERError, UnicodeDecodeError):
                    raise LDAPError(ResultCode.protocolError, "password modify request value is malformed") from None
            generated = await self.directory.password_modify(self.actor, user, old, new)
            extra = b""
            if generated is not None:
                extra = enc_str(tlv(0x30, enc_str(generated, 0x80)), 0x8B)
            self._result(op, ResultCode.success, extra=extra)
            return
        if req.name == OID_STARTTLS:
            ctx = self.factory.starttls_context
            if ctx is None:
                raise LDAPError(ResultCode.unavailable, "StartTLS is not configured on this server ([ldap] starttls_cert/starttls_key)")
            if self.tls:
                raise LDAPError(ResultCode.operationsError, "TLS is already active on this connection")
            if len(self.ops) > 1:
                raise LDAPError(ResultCode.operationsError, "StartTLS needs all other operations to be finished")
            if not ITLSTransport.providedBy(self.transport):
                raise LDAPError(ResultCode.unavailable, "this transport cannot start TLS")
            self._result(op, ResultCode.success, extra=enc_str(OID_STARTTLS, 0x8A))
            self.transport.unregisterProducer()      # re-registered through the TLS layer
            self.transport.startTLS(ctx)
            self.transport.registerProducer(self, True)
            self.tls = True
            return
        raise LDAPError(ResultCode.protocolError, f"unsupported extended operation {req.name}")


def _wants_ppolicy(msg: ber.Message) -> bool:
    return any(c.oid == OID_PPOLICY for c in msg.controls)


def _ppolicy_controls(info: PPolicyResponse) -> list[tuple[str, bool, bytes | None]]:
    value = ber.enc_ppolicy_response(info.time_before_expiration, info.grace_authns_remaining,
                                     None if info.error is None else int(info.error))
    return [(OID_PPOLICY, False, value)]


def _paged_value(size: int, cookie: bytes) -> bytes:
    return tlv(0x30, ber.enc_int(size) + enc_str(cookie))


class _Refused(protocol.Protocol):
    """A connection over ``max_connections`` / ``max_connections_per_address``: closed at once."""

    def connectionMade(self) -> None:
        self.transport.abortConnection()


class ConnectionLimits:
    """Open connections in all and per client address, shared by every LDAP listener of a process."""

    def __init__(self, max_connections: int = 0, max_per_address: int = 0,
                 monotonic: Timer = time.monotonic) -> None:
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.monotonic = monotonic
        self.connections = 0
        self.per_address: dict[str, int] = {}
        self._refusal_logged: dict[str, float] = {}

    def admit(self, address: str) -> bool:
        if self.max_connections and self.connections >= self.max_connections:
            self._refused(address, f"{self.connections} connections are open ([ldap] max_connections)")
            return False
        if self.max_per_address and self.per_address.get(address, 0) >= self.max_per_address:
            self._refused(address, f"{self.per_address[address]} connections from it are open "
                                   "([ldap] max_connections_per_address)")
            return False
        return True

    def opened(self, address: str) -> None:
        self.connections += 1
        self.per_address[address] = self.per_address.get(address, 0) + 1

    def closed(self, address: str) -> None:
        self.connections -= 1
        left = self.per_address.get(address, 0) - 1
        if left > 0:
            self.per_address[address] = left
        else:
            self.per_address.pop(address, None)

    def _refused(self, address: str, why: str) -> None:
        """One log line per address a minute, however many connections are refused."""
        now = self.monotonic()
        if now - self._refusal_logged.get(address, -REFUSAL_LOG_INTERVAL) < REFUSAL_LOG_INTERVAL:
            return
        if len(self._refusal_logged) > 10_000:
            self._refusal_logged = {a: t for a, t in self._refusal_logged.items() if now - t < REFUSAL_LOG_INTERVAL}
        self._refusal_logged[address] = now
        log.warn("refusing LDAP connections from {address}: {why} (logged once a minute per address)",
                 address=address, why=why)


class LDAPServerFactory(protocol.ServerFactory):
    """One per ``[ldap] listen`` endpoint; ``config`` gives the per-connection limits (the
    connection caps live in ``limits``, shared by every listener of the process)."""

    noisy = False      # no "Starting factory <...>" lines: the port's "starting on N" says it

    def __init__(self, directory: Directory, config: LDAPConfig = LDAPConfig(), *, starttls_context: Any = None,
                 is_tls_listener: bool = False, limits: ConnectionLimits | None = None, access: bool = False) -> None:
        self.directory = directory
        self.access = access                      # [log] access: one line per operation
        self.idle_timeout = config.idle_timeout
        self.max_pdu_size = config.max_pdu_size
        self.max_pdu_size_anonymous = config.max_pdu_size_anonymous
        self.max_pending = config.max_pending
        self.max_pending_anonymous = config.max_pending_anonymous
        self.starttls_context = starttls_context
        self.is_tls_listener = is_tls_listener
        self.limits = limits or ConnectionLimits()

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        address = str(getattr(addr, "host", None) or getattr(addr, "name", None) or "local")
        if not self.limits.admit(address):
            return _Refused()
        return LDAPConnection(self, address)
