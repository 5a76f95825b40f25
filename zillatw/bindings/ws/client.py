"""The ws client: a stream from a ws server (or any messages stream) proxied to an upstream
WebSocket, through the http client's upgrade request and our own check of the upstream's
101 (RFC 6455 §4.1); once open, both sides are WsRelays on zillatw.wire."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from zope.interface import implementer

from zillatw.bindings.ws.relay import (
    CLOSE_TIMEOUT,
    GATHER,
    GOING_AWAY,
    MAX_MESSAGE_SIZE,
    WsRelay,
    drop,
    no_delay,
)
from zillatw.bindings.ws.routes import FIELDS as _FIELDS
from zillatw.bindings.ws.routes import WsRoutes
from zillatw.config import Route
from zillatw.config.plugins import IHoldsConnections
from zillatw.stream import (
    IHttpUpstream,
    IStreamEnd,
    IStreamExit,
    StreamInfo,
    StreamRefused,
    SubprotocolOffer,
)
from zillatw.wire import (
    Connection,
    NegotiationError,
    Role,
    client_accept,
    client_offer,
)
from zillatw.wire.handshake import (
    HandshakeRefused,
    check_response,
    client_request,
    new_key,
)
from zillatw.wire.http1 import HttpError, ResponseError, ResponseHeadParser

UPSTREAM_TIMEOUT = 10.0  # seconds for an upstream to connect and answer its handshake


@implementer(IStreamExit, IHoldsConnections)
class WsClient:
    """The ws client binding: opens an upstream WebSocket per stream. The stream opens (and
    the downstream gets its 101) when the upstream has answered 101 with an offered
    subprotocol; an upstream that refuses or cannot be reached is a 502, a slow one a 504."""

    close_timeout = CLOSE_TIMEOUT
    pings = pongs = None  # no keepalive: the downstream's ws server keeps its own connection alive

    def __init__(self, name: str, routes: list[tuple[Route, Any]], *, defaults: dict[str, str] | None = None,
                 timeout: float = UPSTREAM_TIMEOUT, max_message_size: int = MAX_MESSAGE_SIZE,
                 permessage_deflate: bool = True, reactor: Any):
        self.name = name
        self.resolve = WsRoutes(routes).resolve
        given = defaults or {}
        self.defaults = StreamInfo(given.get("protocol"), given.get("scheme"), given.get("authority"),
                                   given.get("path"))
        self.timeout = timeout
        self.max_message_size = max_message_size
        self.permessage_deflate = permessage_deflate
        self.reactor = reactor
        self.connections: set[WsClientProtocol] = set()  # upstream sockets not yet closed

    def open_count(self) -> int:
        return len(self.connections)

    def drop_all(self) -> None:
        drop(list(self.connections))

    def open(self, info: StreamInfo, peer: IStreamEnd) -> Deferred:
        # Zilla: what a ws server learned is used as it is; defaults only for other streams.
        if not any(getattr(info, k) is not None for k in _FIELDS):
            info = replace(self.defaults, identity=info.identity)
        found = self.resolve(info.protocol, info.scheme, info.authority, info.path)
        if found is None:
            raise StreamRefused(404, f"no route of ws client {self.name} for this stream")
        headers = {":scheme": info.scheme or "http", ":authority": info.authority or "localhost",
                   ":path": info.path or "/"}
        # The http client's overrides change the request written upstream, not where it goes.
        upstream: IHttpUpstream = found[1]
        request = upstream.request_headers(headers)
        offer = info.offer
        protocols = offer.offered if offer is not None else ((info.protocol,) if info.protocol else ())
        attempt = _Upstream(self, peer, request, protocols, offer, info.compressing)
        connecting = upstream.connect(attempt, headers, self.timeout)
        connecting.addErrback(_connect_failed, attempt.opened)
        timeout = self.reactor.callLater(self.timeout, attempt.timed_out)

        def settled(result: Any) -> Any:
            if timeout.active():
                timeout.cancel()
            connecting.cancel()
            return result

        return attempt.opened.addBoth(settled)


class _Upstream(Factory):
    """One upstream connection attempt: the factory its connection is made with."""

    noisy = False  # one per upstream connection: no start/stop log lines

    def __init__(self, client: WsClient, peer: IStreamEnd, request: Mapping[str, str], protocols: tuple[str, ...],
                 offer: SubprotocolOffer | None, compressing: bool | None):
        self.client, self.peer, self.request = client, peer, request
        self.protocols, self.offer, self.compressing = protocols, offer, compressing
        self.upstream: WsClientProtocol | None = None
        # cancelled when the downstream leaves (or gives up): the upstream goes at once
        self.opened: Deferred = Deferred(canceller=lambda _: self.abort())

    def buildProtocol(self, addr: Any) -> "WsClientProtocol":  # type: ignore[override]
        self.upstream = WsClientProtocol(self.client, self)
        return self.upstream

    def abort(self) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.connected:
            upstream.transport.abortConnection()

    def timed_out(self) -> None:
        if not self.opened.called:
            self.opened.errback(StreamRefused(504, "upstream timed out", f"no answer within {self.client.timeout:g} s"))
        self.abort()

    def refused(self, detail: str) -> None:
        if not self.opened.called:
            self.opened.errback(StreamRefused(502, "upstream refused the WebSocket handshake", detail))


def _connect_failed(failure: Failure, opened: Deferred) -> None:
    if opened.called:
        return
    if failure.check(StreamRefused):
        opened.errback(failure)
    elif failure.check(error.TimeoutError):
        opened.errback(StreamRefused(504, "upstream timed out", "the connection was not accepted in time"))
    elif not failure.check(CancelledError):
        opened.errback(StreamRefused(502, "upstream unreachable", failure.getErrorMessage()))


class WsClientProtocol(WsRelay):
    """One upstream WebSocket connection, and the stream end the ws server writes to."""

    __slots__ = ("attempt", "_parser", "_key", "_offered_deflate")
    is_server = False

    def __init__(self, client: WsClient, attempt: _Upstream) -> None:
        super().__init__(client)
        self.attempt: _Upstream | None = attempt
        self._parser: ResponseHeadParser | None = ResponseHeadParser()
        self._key = new_key()
        self._offered_deflate = client.permessage_deflate and attempt.compressing is not False

    def connectionMade(self) -> None:
        self.binding.connections.add(self)
        no_delay(self.transport)
        attempt = self.attempt
        assert attempt is not None  # set until the upstream's 101 is read
        request = attempt.request
        extra = {k: v for k, v in request.items() if not k.startswith(":")}
        try:
            head = client_request(request[":path"], request[":authority"], self._key, attempt.protocols,
                                  client_offer() if self._offered_deflate else None, extra)
        except HttpError as e:
            self._refuse(e.reason)
            return
        self.transport.write(head)

    def before_open(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            return  # refused: the socket is going
        try:
            response = parser.feed(data)
        except ResponseError as e:
            self._refuse(f"its response head is malformed: {e}")
            return
        if response is None:
            return
        rest, self._parser = parser.rest, None
        attempt = self.attempt
        assert attempt is not None  # set until the upstream's 101 is read
        try:
            protocol = check_response(response, self._key, attempt.protocols)
            if protocol is None and attempt.protocols:
                raise HandshakeRefused(f"it selected no subprotocol, offered {list(attempt.protocols)!r}")
            params = client_accept(response.headers.get("sec-websocket-extensions")) \
                if self._offered_deflate else None
            if not self._offered_deflate and "sec-websocket-extensions" in response.headers:
                raise HandshakeRefused("it accepted extensions we did not offer")
        except (HandshakeRefused, NegotiationError) as e:
            self._refuse(str(e))
            return
        self._key = ""
        conn = Connection(Role.CLIENT, deflate=params, max_message_size=self.binding.max_message_size,
                          gather=GATHER, answer_close=False, defer_failure=True, auto_pong=False)
        self.attempt = None
        if attempt.opened.called:  # too late: the downstream already got its 504
            self.start(conn, None)
            self.stream_end(GOING_AWAY, "downstream gave up")
            return
        if attempt.offer is not None:
            attempt.offer.answer(protocol)
        self.start(conn, attempt.peer)
        attempt.opened.callback(self)  # the downstream's 101 goes out, and may set conn.inspect
        if rest:
            self.dataReceived(rest)

    def _refuse(self, detail: str) -> None:
        self._parser = None
        attempt, self.attempt = self.attempt, None
        if attempt is not None:
            attempt.refused(detail)
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.binding.connections.discard(self)
        attempt, self.attempt = self.attempt, None
        if attempt is not None:
            attempt.refused("the upstream closed the connection during the handshake")
        super().connectionLost(reason)


