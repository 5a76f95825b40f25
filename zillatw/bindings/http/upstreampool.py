"""The http client's HTTP/1.1 connections to one upstream: a pool of kept-alive ones (most
recent first), opened up to `max-connections`, and the requests waiting for one in order
(at most MAX_WAITING, then 503)."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from twisted.internet import error
from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from zillatw.bindings.http.clientlimits import MAX_WAITING
from zillatw.bindings.http.upstreamconnection import UpstreamConnection
from zillatw.stream import StreamRefused

if TYPE_CHECKING:
    from zillatw.bindings.http.client import Forwarder, UpstreamExchange


class _OneConnection(Factory):
    """The factory of one upstream connection attempt (its protocol is kept for the pool)."""

    noisy = False

    def __init__(self, pool: "UpstreamPool"):
        self.pool = pool
        self.connection: UpstreamConnection | None = None

    def buildProtocol(self, addr: Any) -> "UpstreamConnection":
        self.connection = UpstreamConnection(self.pool)
        self.pool.connections.add(self.connection)
        return self.connection


class UpstreamPool:
    """The connections to one upstream: idle ones (most recent first), a count of all,
    and the requests waiting for one."""

    def __init__(self, forwarder: Forwarder, key: tuple[int, str], exit_: Any, authority: str):
        self.forwarder = forwarder
        self.key = key
        self.exit = exit_
        self.authority = authority
        self.limits = forwarder.limits
        self.idle: list[UpstreamConnection] = []
        self.connections: set[UpstreamConnection] = set()  # open ones (busy and idle)
        self.total = 0   # connecting, busy and idle
        self.waiting: deque[UpstreamExchange] = deque()
        self.opened = 0  # connections ever opened (tests count reuse by it)

    def acquire(self, exchange: "UpstreamExchange", fresh: bool = False) -> None:
        while self.idle and not fresh:
            connection = self.idle.pop()
            if connection.usable():
                connection.leave_idle()
                exchange.attach(connection, reused=True)
                return
        if self.total < self.limits.max_connections:
            self._open(exchange)
        elif len(self.waiting) >= MAX_WAITING:
            raise StreamRefused(503, "too many requests waiting for the upstream")
        else:
            self.waiting.append(exchange)

    def _open(self, exchange: "UpstreamExchange") -> None:
        self.total += 1
        self.opened += 1
        factory = _OneConnection(self)
        exchange.connecting = self.exit.connect(factory, self.authority, self.limits.connect_timeout)

        def connected(_: Any) -> None:
            exchange.connecting = None
            connection = factory.connection
            if connection is None or connection.lost:
                exchange.upstream_failed(502, "the upstream went away", "closed while connecting")
                return
            if getattr(connection.transport, "negotiatedProtocol", None) == b"h2":  # not what we speak
                self.forwarder.spoken.pop(self.key, None)  # with both versions: learnt anew next time
                connection.close()
                exchange.upstream_failed(502, "the upstream does not speak HTTP/1.1", "ALPN chose b'h2'")
                return
            exchange.attach(connection, reused=False)

        def failed(failure: Failure) -> None:
            exchange.connecting = None
            if factory.connection is None:  # else its connectionLost has (or will have) counted it
                self.total -= 1
            self._serve_waiting()
            if failure.check(CancelledError):
                return  # the exchange ended and cancelled its attempt
            timed_out = failure.check(TimeoutError, error.TimeoutError)
            exchange.upstream_failed(504 if timed_out else 502,
                                     "the upstream did not answer in time" if timed_out
                                     else "the upstream could not be reached", failure.getErrorMessage())
        exchange.connecting.addCallbacks(connected, failed)

    def release(self, connection: "UpstreamConnection", reusable: bool) -> None:
        """An exchange is done with `connection`: reuse it, or close it."""
        if not reusable or connection.lost or self.forwarder.closing:
            connection.close()
            return
        while self.waiting:
            exchange = self.waiting.popleft()
            if not exchange.finished:
                exchange.attach(connection, reused=True)
                return
        connection.enter_idle(self.forwarder.reactor, self.limits.idle_timeout)
        self.idle.append(connection)

    def lost(self, connection: "UpstreamConnection") -> None:
        """A connection closed (whoever closed it): it no longer counts."""
        if connection in self.idle:
            self.idle.remove(connection)
        self.connections.discard(connection)
        self.total -= 1
        self._serve_waiting()

    def _serve_waiting(self) -> None:
        while self.waiting and self.total < self.limits.max_connections:
            exchange = self.waiting.popleft()
            if not exchange.finished:
                self._open(exchange)

    def forget(self, exchange: "UpstreamExchange") -> None:
        if exchange in self.waiting:
            self.waiting.remove(exchange)

    def adopt(self, undecided: Any) -> None:
        """A connection made before its version was known (clientversions), now HTTP/1.1."""
        connection = UpstreamConnection(self)
        undecided.become(connection)
        self.total += 1
        self.opened += 1
        self.connections.add(connection)
        self.release(connection, reusable=True)
        undecided.replay()
