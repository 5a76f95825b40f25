"""Spreading the 1001 closes of a shutdown over a window (`twistd zillaws --close-spread S`).

Closing every WebSocket at once sends every client back at the same moment, onto the other
gateways behind the load balancer: a reconnect storm (HAProxy's close-spread-time, #1614).
With a window of S seconds, the N connections draining get their close at even intervals,
the i-th (from 0) at i * S / N seconds after the stop began; the last is sent before S, so
the closing handshakes have the rest of the drain timeout to finish.

A binding takes part by providing ISpreadsClosing (its connections' closes, one callable
each); the ws server does through the adapter registered here, which reads the connections
it keeps. A binding that only drains as a whole (IDrainsGracefully: an http server's 503s)
is told to at the start, as without a spread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.python.components import registerAdapter
from zope.interface import implementer

from zillatw.bindings.ws.binding import WsServer
from zillatw.config.plugins import IDrainsGracefully

MIN_TICK = 0.005  # seconds: closes due closer together than this go out in one reactor call


class ISpreadsClosing(IDrainsGracefully):
    """A binding whose connections can be told to close one at a time."""

    def closers() -> list[Callable[[], None]]:
        """One call per connection open now that closes it cleanly (WebSocket 1001, or 503
        for one still opening); a call for a connection that closed meanwhile does nothing."""


@implementer(ISpreadsClosing)
class WsServerClosing:
    """A ws server's connections, handshaking ones first (they get 503, as in going_away)."""

    def __init__(self, server: WsServer):
        self.server = server

    def closers(self) -> list[Callable[[], None]]:
        return [_closer(connection) for connection in [*self.server.handshaking, *self.server.connections]]

    # The rest of IDrainsGracefully is the server's own.
    def going_away(self) -> None:
        self.server.going_away()

    def open_count(self) -> int:
        return self.server.open_count()

    def drop_all(self) -> None:
        self.server.drop_all()


registerAdapter(WsServerClosing, WsServer, ISpreadsClosing)


def _closer(connection: Any) -> Callable[[], None]:
    return lambda: connection.going_away("going away")


class CloseSpread:
    """Calls `closers` evenly over `window` seconds of `reactor` time, from start() on."""

    def __init__(self, reactor: Any, window: float, closers: list[Callable[[], None]]):
        self.reactor = reactor
        self.window = window
        self.closers = closers
        self.sent = 0
        self._call: Any = None
        self._began = 0.0

    def start(self) -> None:
        self._began = self.reactor.seconds()
        self._run()

    def _due(self, index: int) -> float:
        return self._began + index * self.window / len(self.closers)

    def _run(self) -> None:
        self._call = None
        now = self.reactor.seconds()
        closers = self.closers
        # MIN_TICK / 2 of slack: a float sum of intervals must not push a close to the next tick
        while self.sent < len(closers) and self._due(self.sent) <= now + MIN_TICK / 2:
            closer = closers[self.sent]
            closers[self.sent] = _closed  # let go of the connection as soon as it is told
            self.sent += 1
            closer()
        if self.sent < len(closers):
            self._call = self.reactor.callLater(max(self._due(self.sent) - now, MIN_TICK), self._run)

    def done(self) -> bool:
        return self.sent == len(self.closers)

    def cancel(self) -> None:
        """The drain timeout passed (everything left is dropped) or nothing is left."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


def _closed() -> None:
    """A closer already called."""


def drain_spread(reactor: Any, bindings: list[Any], window: float) -> CloseSpread | None:
    """Tell `bindings` to close their connections: at once (window 0, or bindings that cannot
    spread), or spread over `window` seconds; the spread is returned, started."""
    closers: list[Callable[[], None]] = []
    for binding in bindings:
        spreading = ISpreadsClosing(binding, None) if window > 0 else None
        if spreading is not None:
            closers.extend(spreading.closers())
        elif IDrainsGracefully.providedBy(binding):  # a ws client's upstreams get 1001 from their ws server
            binding.going_away()
    if not closers:
        return None
    spread = CloseSpread(reactor, window, closers)
    spread.start()
    return spread
