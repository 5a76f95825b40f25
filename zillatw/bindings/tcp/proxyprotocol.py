"""The tcp server's `options.proxy-protocol`: each connection starts with a PROXY protocol
header (v1 text or v2 binary, as HAProxy, AWS NLB and most load balancers send it), which
states the client's address; from then on that address is the connection's peer
(`transport.getPeer()`), for the tcp server's routes (`cidr`), the tls server's events and
the http server, which decides the client address from it (zillatw.bindings.http.clientaddress).

The header is read by Twisted's own parser, through its public API only
(`twisted.protocols.haproxy.proxyEndpoint`): its wrapping factory wraps each connection in
Twisted's PROXY protocol wrapper, whose getPeer() and getHost() answer what the header
stated (the real ones for a `LOCAL` or `UNKNOWN` header: a load balancer's health check).
A connection whose first bytes are not a valid header is closed by that wrapper. Its bounds
are Twisted's: a v1 line of at most 107 bytes, a v2 header of at most 16 + 65,535 bytes.

The wrapping is chosen per connection (not by wrapping the listening endpoint) so that a
reload that turns the option on or off applies to a socket kept across it, and to sockets a
`-w` supervisor hands its workers.

Until the header and the first bytes after it have arrived (the client speaks first in
HTTP and TLS), the connection belongs to no binding: it is routed with the stated address
when they arrive, and dropped if they do not within PROXY_HEADER_TIMEOUT seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import Protocol
from twisted.protocols.haproxy import proxyEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

from zillatw.config import BindingConfig

PROXY_HEADER_TIMEOUT = 5.0  # seconds from accept to the PROXY header and the first bytes after it
SCHEMA = {"type": "boolean"}


def check(binding: BindingConfig) -> Iterator[tuple[str, str]]:
    """A tcp client writes no PROXY header: the option is refused there by name."""
    if binding.kind == "client" and "proxy-protocol" in binding.options:
        yield "options.proxy-protocol", "a tcp server option: a tcp client does not send a PROXY header"


@implementer(IStreamServerEndpoint)
class _Capture:
    """An endpoint that only keeps the factory it is asked to listen with."""

    factory: Any = None

    def listen(self, factory: IProtocolFactory) -> defer.Deferred:
        self.factory = factory
        return defer.succeed(None)


def _wrapping_factory(factory: Any) -> Any:
    """Twisted's PROXY protocol wrapping factory around `factory`: what proxyEndpoint(e)
    listens on e with."""
    capture = _Capture()
    proxyEndpoint(capture).listen(factory)
    return capture.factory


class ProxyProtocol:
    """A tcp server's PROXY protocol reading: accept(listener, addr) gives the protocol a
    new connection of `listener` (a zillatw.bindings.tcp.binding.ListenerFactory) starts with."""

    def __init__(self, reactor: Any, timeout: float = PROXY_HEADER_TIMEOUT) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self._factories: dict[Any, Any] = {}  # listener -> its wrapping factory (one per listening socket)

    def accept(self, listener: Any, addr: IAddress) -> Any:
        factory = self._factories.get(listener)
        if factory is None:
            factory = self._factories[listener] = _wrapping_factory(_AwaitingFactory(self, listener))
        return factory.buildProtocol(addr)


class _AwaitingFactory:
    """The factory Twisted's wrapper wraps: its protocols wait for the header."""

    def __init__(self, proxy: ProxyProtocol, listener: Any) -> None:
        self.proxy = proxy
        self.listener = listener

    def buildProtocol(self, addr: IAddress) -> Protocol:
        return _AwaitingHeader(self.proxy, self.listener)

    def doStart(self) -> None:
        """Nothing to start: the listener's factory is started by its port."""

    def doStop(self) -> None:
        """Nothing to stop."""


class _AwaitingHeader(Protocol):
    """Inside Twisted's PROXY wrapper until the header and the first bytes after it have
    come; then the exit the tcp server's routes choose for the stated address takes its
    place, called by the wrapper directly."""

    def __init__(self, proxy: ProxyProtocol, listener: Any) -> None:
        self.proxy = proxy
        self.listener = listener
        self._timer: Any = None

    def connectionMade(self) -> None:
        self._timer = self.proxy.reactor.callLater(self.proxy.timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        self._cancel_timer()
        wrapper: Any = self.transport  # Twisted's wrapper: its getPeer() is the stated source now
        stated = wrapper.getPeer()
        listener = self.listener
        exit_ = listener.server.route(listener.local_port, stated)
        protocol = exit_.buildProtocol(stated) if exit_ is not None else None
        if protocol is None:
            wrapper.loseConnection()
            return
        wrapper.wrappedProtocol = protocol
        protocol.makeConnection(wrapper)
        protocol.dataReceived(data)

    def _timed_out(self) -> None:
        self._timer = None
        transport: Any = self.transport
        transport.abortConnection()

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._cancel_timer()
