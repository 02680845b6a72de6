"""What the self-service HTTP server allows a client: body size, time, connections, its address.

Owns the twisted.web plumbing under the pages (``web.py`` owns the pages):

- a request body is counted while it streams, chunked or not: past ``MAX_BODY`` the client gets
  ``413`` at once and the connection ends (nothing is buffered beyond the limit; a declared
  ``Content-Length`` over it is refused before a body byte is read);
- ``[selfservice] request_timeout``: from a request's first byte to its last (request line,
  headers, form) — a slowloris trickle gets ``408`` and is closed; ``idle_timeout``: a connection
  that sends nothing for this long is closed (twisted.web's own timeout);
- ``max_connections`` in total and ``max_connections_per_address`` from one address (trusted
  proxies are not counted per address: every user behind them shares their address);
- :class:`ProxyTrust`: the client's address is the TCP peer, or — only when the peer is one of
  ``[selfservice] trusted_proxies`` — the right-most ``X-Forwarded-For`` entry that is not itself
  a trusted proxy (entries to its left were written by the client and prove nothing).

::

    accept ─▶ LimitedSite.buildProtocol ── over a cap ─▶ closed at once
                 └▶ LimitedChannel   first byte ─▶ request timer (request_timeout) ─▶ 408, close
                       headers: Content-Length > MAX_BODY ─────────────────────────▶ 413, close
                       body chunks ─▶ LimitedRequest counts ── > MAX_BODY ─────────▶ 413, close
                       complete ─▶ timer off ─▶ the pages (web.py)

A refusal is written, the write side shut (the client reads the answer and EOF), reading stops,
and the connection is aborted ``LINGER`` seconds later whatever the client does.
"""

from __future__ import annotations

import io
import ipaddress
from collections.abc import Sequence
from typing import Any

from twisted.logger import Logger
from twisted.web import http, server

log = Logger()

MAX_BODY = 16 * 1024        # bytes of a form: far more than any page's fields need
LINGER = 2.0                # seconds a refused connection may take to read its answer

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip(text: str) -> _Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:          # [v6]:port
        text = text[1:text.index("]")]
    elif text.count(":") == 1:                        # v4:port
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class ProxyTrust:
    """The ``trusted_proxies`` setting: which peers' ``X-Forwarded-For`` is believed."""

    def __init__(self, entries: Sequence[str]) -> None:
        self.networks = [ipaddress.ip_network(e.strip(), strict=False) for e in entries]

    def trusted(self, host: str | _Address | None) -> bool:
        ip = _ip(host) if isinstance(host, str) else host
        return ip is not None and any(ip.version == n.version and ip in n for n in self.networks)

    def client(self, peer: str, forwarded: Sequence[bytes] | None) -> str:
        """The client's address for rate limits and logs."""
        if not self.networks or not forwarded or not self.trusted(peer):
            return peer
        chain = [p.strip() for value in forwarded for p in value.decode("latin-1").split(",") if p.strip()]
        for entry in reversed(chain):
            ip = _ip(entry)
            if ip is None:
                return peer              # a proxy of ours wrote garbage: do not invent a client
            if not self.trusted(ip):
                return str(ip)
        first = _ip(chain[0]) if chain else None
        return str(first) if first is not None else peer     # every hop is ours: the left-most one


class LimitedRequest(server.Request):
    """A request whose body is counted while it arrives (see the module docstring)."""

    _body_bytes = 0

    def gotLength(self, length: int | None) -> None:
        self.content = io.BytesIO()          # never more than MAX_BODY: memory, not a temporary file

    def handleContentChunk(self, data: bytes) -> None:
        channel = self.channel
        if channel is None or getattr(channel, "refused", False):
            return
        self._body_bytes += len(data)
        if self._body_bytes > channel.max_body:
            channel.refuse(413, "Content Too Large", "The form sent too much data.")
            return
        self.content.write(data)


class LimitedChannel(http.HTTPChannel):
    """HTTP/1.1 with a time limit per request, a body limit while streaming, and lingering refusals."""

    max_body = MAX_BODY
    request_timeout = 15.0
    refused = False
    peer_host = ""
    counted_host: str | None = None       # the address this connection counts against (None: a trusted proxy)
    uncounted = False                     # already taken off the site's counts
    _request_timer: Any = None
    _linger: Any = None

    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            return
        if self._request_timer is None and not self._handlingRequest and self.request_timeout:
            self._request_timer = self.callLater(self.request_timeout, self._too_slow)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        if self.length is not None and self.length > self.max_body:
            self.refuse(413, "Content Too Large", "The form sent too much data.")
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if self.refused:
            return
        self._cancel_request_timer()
        super().allContentReceived()

    def _too_slow(self) -> None:
        self._request_timer = None
        log.info("self-service connection from {addr} closed: the request took longer than {t}s "
                 "([selfservice] request_timeout)", addr=self.peer_host, t=self.request_timeout)
        self.refuse(408, "Request Timeout", "The request took too long to arrive.")

    def _cancel_request_timer(self) -> None:
        if self._request_timer is not None:
            if self._request_timer.active():
                self._request_timer.cancel()
            self._request_timer = None

    def refuse(self, code: int, phrase: str, text: str) -> None:
        """Answer ``code`` now, read nothing more, and end the connection (see the module docstring)."""
        if self.refused or self.transport is None:
            return
        self.refused = True
        self._handlingRequest = True          # HTTPChannel must not resume reading
        self._cancel_request_timer()
        self.setTimeout(None)
        body = text.encode("utf-8") + b"\n"
        self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
                             b"Content-Length: %d\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
                             % (code, phrase.encode("ascii"), len(body)) + body)
        self._networkProducer.unregisterProducer()
        self.transport.pauseProducing()
        if hasattr(self.transport, "loseWriteConnection"):
            self.transport.loseWriteConnection()
        else:
            self.transport.loseConnection()
        self._linger = self.callLater(LINGER, self.transport.abortConnection)

    def connectionLost(self, reason: Any) -> None:
        self._cancel_request_timer()
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        site = getattr(self, "site", None)
        if isinstance(site, LimitedSite):
            site.connection_closed(self)
        super().connectionLost(reason)


class LimitedSite(server.Site):
    """A Site whose channels are :class:`LimitedChannel` and whose connections are capped."""

    protocol = LimitedChannel
    requestFactory = LimitedRequest

    def __init__(self, resource: Any, *, trust: ProxyTrust, request_timeout: float, idle_timeout: float,
                 max_connections: int, max_per_address: int, max_body: int = MAX_BODY) -> None:
        super().__init__(resource, requestFactory=LimitedRequest, timeout=idle_timeout or None)
        self.trust = trust
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.max_body = max_body
        self.open_total = 0
        self.open_by_address: dict[str, int] = {}
        self._refused_logged: set[str] = set()

    def buildProtocol(self, addr: Any) -> Any:
        host = str(getattr(addr, "host", "") or "")
        counted = not self.trust.trusted(host)
        if self.max_connections and self.open_total >= self.max_connections:
            self._refused("", f"{self.open_total} connections are open ([selfservice] max_connections)")
            return None
        if counted and self.max_per_address and self.open_by_address.get(host, 0) >= self.max_per_address:
            self._refused(host, f"{self.max_per_address} connections from {host} are open "
                                "([selfservice] max_connections_per_address)")
            return None
        channel = super().buildProtocol(addr)
        channel.max_body = self.max_body
        channel.request_timeout = self.request_timeout
        channel.peer_host = host
        channel.counted_host = host if counted else None
        self.open_total += 1
        if counted:
            self.open_by_address[host] = self.open_by_address.get(host, 0) + 1
        return channel

    def connection_closed(self, channel: LimitedChannel) -> None:
        if channel.uncounted:
            return
        channel.uncounted = True
        self.open_total = max(0, self.open_total - 1)
        host = channel.counted_host
        if host is not None:
            left = self.open_by_address.get(host, 1) - 1
            if left > 0:
                self.open_by_address[host] = left
            else:
                self.open_by_address.pop(host, None)
            self._refused_logged.discard(host)
        if self.open_total < self.max_connections:
            self._refused_logged.discard("")

    def _refused(self, key: str, why: str) -> None:
        if key not in self._refused_logged:          # once per episode, not once per connection
            self._refused_logged.add(key)
            log.warn("self-service connection refused: {why}", why=why)
