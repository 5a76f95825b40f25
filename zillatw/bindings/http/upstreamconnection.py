"""One pooled HTTP/1.1 connection of an http client to its upstream (zillatw.bindings.http.client)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from typing import Protocol as TypingProtocol

from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from zillatw.bindings.ws.relay import no_delay

if TYPE_CHECKING:
    from zillatw.bindings.http.upstreampool import UpstreamPool


class UpstreamUser(TypingProtocol):
    """What serves the exchange a connection carries: client.UpstreamExchange, or
    express.ExpressExchange (which becomes one when its response is not simple)."""

    def upstream_data(self, data: bytes) -> None: ...
    def upstream_lost(self, reason: Failure | None) -> None: ...
    def deadline(self, now: float) -> float | None: ...


class UpstreamConnection(Protocol):
    """One upstream connection: the bytes of the exchange it serves go to that exchange;
    bytes while idle mean the upstream broke the protocol, and it is closed."""

    exchange: UpstreamUser | None = None
    transport: Any  # a TCP or TLS transport: a push producer too
    lost = False
    _idle_timer: Any = None
    _idle_since: float | None = None

    def __init__(self, pool: UpstreamPool):
        self.pool = pool
        self.transport = None

    def connectionMade(self) -> None:
        no_delay(self.transport)  # requests go out as they come: Nagle would hold them

    def usable(self) -> bool:
        return not self.lost and self.transport is not None

    def enter_idle(self, reactor: Any, timeout: float) -> None:
        """Back in the pool: closed once it has been idle for `timeout`."""
        self.exchange = None
        self._reactor, self._idle_timeout = reactor, timeout
        since = self._idle_since = reactor.seconds()
        self.watch(reactor, since + timeout)

    def leave_idle(self) -> None:
        self._idle_since = None  # busy: a pending timer finds so and lets go

    def watch(self, reactor: Any, deadline: float) -> None:
        """Make the connection's one timer fire by `deadline` (the idle timeout's, or the
        response timeout of the exchange it carries). It is re-armed only when it fires, or
        moved sooner when a deadline comes before it: not made and cancelled per request."""
        self._reactor = reactor
        timer = self._idle_timer
        if timer is None:
            self._idle_timer = reactor.callLater(max(0.0, deadline - reactor.seconds()), self._check)
        elif timer.getTime() > deadline:
            timer.reset(max(0.0, deadline - reactor.seconds()))

    def _check(self) -> None:
        self._idle_timer = None
        if self.lost:
            return
        now = self._reactor.seconds()
        exchange = self.exchange
        if exchange is not None:
            deadline = exchange.deadline(now)  # None: it has timed out, or times itself
            if deadline is not None:
                self.watch(self._reactor, deadline)
            return
        if self._idle_since is None:
            return
        deadline = self._idle_since + self._idle_timeout
        if deadline > now:
            self.watch(self._reactor, deadline)
        else:
            self.close()

    def _cancel_idle_timer(self) -> None:
        self._idle_since = None
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None

    def close(self) -> None:
        self._cancel_idle_timer()
        if not self.lost and self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.exchange is not None:
            self.exchange.upstream_data(data)
        else:
            self.transport.abortConnection()  # an answer to nothing: not an upstream to reuse

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = True
        self._cancel_idle_timer()
        self.pool.lost(self)
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.upstream_lost(reason)
