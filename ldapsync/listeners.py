"""The server's listening sockets: a port that fails to listen stops the server with one clear line,
and, with ``[ldap] processes`` > 1, the SO_REUSEPORT sockets the LDAP processes share.

Used by the wiring (``tap.py``, ``ldap_processes.py``) and by the self-service pages' service;
it knows nothing of what is served.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

log = Logger(namespace="ldapsync.listeners")


class Listener(StreamServerEndpointService):
    """A listening port whose failure to listen stops the server with one clear line, not a traceback."""

    def __init__(self, description: str, factory: Any, config_key: str, *, reuse_port: bool = False) -> None:
        from twisted.internet import reactor   # installed by twistd (or the worker child's main) first

        endpoint: Any = endpoints.serverFromString(reactor, description)
        self.reuse_port = False
        if reuse_port:
            # [ldap] processes > 1 on Linux: a socket the other LDAP processes' sockets join
            shared = ReusePortEndpoint.of(reactor, endpoint)
            if shared is not None:
                endpoint, self.reuse_port = shared, True
        super().__init__(endpoint, factory)
        self._raiseSynchronously = True
        self.description = description
        self.config_key = config_key
        self.port: Any = None            # the listening port, once bound (its socket: ldap_processes.py)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
            if self._waitingForPort is not None:
                self._waitingForPort.addCallback(self._bound)
        except CannotListenError as e:
            reason = getattr(e.socketError, "strerror", None) or str(e.socketError)
            sys.stderr.write(f"ldapsync: cannot listen on {self.description!r} ({self.config_key}): {reason}; "
                             "is another server using that port?\n")
            sys.stderr.flush()
            # The database's thread pools are already running (they are not daemon threads), so
            # SystemExit would leave a half-started process behind: end it here.  Nothing is lost:
            # every transaction so far has committed.
            os._exit(1)


    def _bound(self, port: Any) -> Any:
        self.port = port
        return port


# -- the sockets ----------------------------------------------------------------------------------
#
# Linux: every process gets a socket of its own on the same address, all with SO_REUSEPORT; the
# kernel spreads new connections evenly over them (by a hash of the client's address and port).
# One socket shared by all (what other systems get, and the fallback) hands a burst of
# connections to whichever process wakes first: 29 of 30 went to one of three processes.

def reuse_port() -> bool:
    """Whether this system spreads connections over SO_REUSEPORT sockets (Linux)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def _family(interface: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in interface else socket.AF_INET


def _bind(family: socket.AddressFamily, interface: str, port: int, backlog: int | None) -> socket.socket:
    """A SO_REUSEPORT socket bound to ``(interface, port)``, listening when ``backlog`` is given.
    A child's is bound only: the kernel hands connections to listening sockets alone, so none wait
    for a process still starting; the child listens once it can answer."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface, port))
        if backlog is not None:
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class ReusePortEndpoint:
    """The server's own socket of a ``tcp:``, ``tcp6:`` or ``ssl:`` listener when there are several
    LDAP processes (Linux): with SO_REUSEPORT, so that theirs join it.  ``None`` from :meth:`of`
    for other endpoints (``unix:``...), which the processes share as they are."""

    def __init__(self, reactor: Any, port: int, interface: str, backlog: int, tls: Any) -> None:
        self.reactor = reactor
        self.port = port
        self.interface = interface
        self.backlog = backlog
        self.tls = tls

    @classmethod
    def of(cls, reactor: Any, endpoint: Any) -> ReusePortEndpoint | None:
        if not isinstance(endpoint, (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint,
                                     endpoints.SSL4ServerEndpoint)):
            return None
        tls = getattr(endpoint, "_sslContextFactory", None)
        return cls(reactor, endpoint._port, endpoint._interface, endpoint._backlog, tls)

    def listen(self, factory: Any) -> defer.Deferred:
        family = _family(self.interface)
        try:
            sock = _bind(family, self.interface, self.port, self.backlog)
        except OSError as e:
            return defer.fail(CannotListenError(self.interface, self.port, e))
        if self.tls is not None:
            factory = TLSMemoryBIOFactory(self.tls, False, factory)
        try:
            port = self.reactor.adoptStreamPort(sock.fileno(), family, factory)
        finally:
            sock.close()           # the port holds a duplicate
        port.backlog = self.backlog
        return defer.succeed(port)


def socket_for_child(listener: Any) -> int:
    """A descriptor for a child to accept on, for the server's ``listener`` (bound): a new
    SO_REUSEPORT socket on its address, or, when that cannot be (not Linux, ``unix:``, a port the
    server may no longer bind once it dropped root), a duplicate of the server's own socket."""
    port = listener.port
    if getattr(listener, "reuse_port", False):
        host = port.getHost()
        try:
            return _bind(_family(host.host), host.host, host.port, None).detach()
        except OSError as e:
            log.warn("LDAP processes: cannot bind another socket on {host}:{port} ({e}); this process shares "
                     "the server's (connections are spread less evenly)", host=host.host, port=host.port, e=e)
    return os.dup(port.fileno())
