"""ws server: validates the upgrade (RFC 6455), picks a route and subprotocol as Zilla does,
opens a stream to the route's exit, and then relays message fragments both ways.
ws client: opens an upstream WebSocket through its exit (http client -> tcp client) for each
stream it is given, and relays fragments the same way.

Framing, UTF-8 validation, close handshake and permessage-deflate are Autobahn's, which
passes the Autobahn testsuite; this module adds routing and opening the stream to the exit,
and zillatw.wsstream relays the stream's fragments.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from autobahn.twisted.websocket import (WebSocketClientFactory, WebSocketClientProtocol, WebSocketServerFactory,
                                       WebSocketServerProtocol)
from autobahn.websocket.compress import (PerMessageDeflateOffer, PerMessageDeflateOfferAccept,
                                         PerMessageDeflateResponse, PerMessageDeflateResponseAccept)
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred
from zope.interface import implementer
from twisted.python.failure import Failure

from zillatw.config import BindingConfig, Route
from zillatw.guards import NO_AUTHORIZATION, Authorization, Session, permits
from zillatw.http1 import HttpError, Request, render_response
from zillatw.matching import matcher
from zillatw.plugins import BindingType, IDrainsGracefully, IHoldsConnections
from zillatw.schema import FORBIDDEN, refused, route_schema
from zillatw.stream import ABNORMAL, IHttpConnection, IHttpExit, IStreamEnd, IStreamExit, StreamInfo, StreamRefused
from zillatw.validation import MESSAGES, check_models, validating_routes
from zillatw.wsstream import ReactorTimer, StreamRelay
from zillatw.wshandshake import check_upgrade, handshake_head, offered_protocols, select_route

MAX_MESSAGE_SIZE = 1024 * 1024
CLOSE_TIMEOUT = 2.0  # seconds to wait for the peer's close frame before dropping
PING_INTERVAL = 20.0  # seconds between server pings (keepalive), as the `websockets` library; 0: none
PING_TIMEOUT = 20.0  # seconds a ping may go unanswered before the connection is dropped; 0: never
GOING_AWAY = 1001  # the close code of a shutting-down gateway (RFC 6455 §7.4.1)
UPSTREAM_TIMEOUT = 10.0  # seconds for an upstream to connect and answer its handshake
# Seconds from the upgrade request to the 101: the exit's own limit answers first (a ws
# client's timeout, 504); this one bounds any exit that never answers.
OPEN_TIMEOUT = 60.0
# Bytes a client may send before its 101 (they are WebSocket frames, held until the stream
# opens); beyond this the connection stops being read until then.
PENDING_LIMIT = 64 * 1024
_FIELDS = ("protocol", "scheme", "authority", "path")

SERVER_OPTIONS = {
    # zillatw's extension: Zilla's ws server takes no options.
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "max-message-size": {"type": "integer", "minimum": 1},
        "max-frame-size": {"type": "integer", "minimum": 1},
        "permessage-deflate": {"type": "boolean"},
        "close-timeout": {"type": "number", "exclusiveMinimum": 0},
        "ping-interval": {"type": "number", "minimum": 0},
        "ping-timeout": {"type": "number", "minimum": 0},
        "max-connections": {"type": "integer", "minimum": 1},
        "allowed-origins": refused("no longer supported: use the http server's options.access-control: "
                                   "policy cross-origin with allow.origins (see docs/access-control.md)"),
        "messages": MESSAGES,  # validation rules, see zillatw.validation
    },
}
SCHEMA_PATCH = {
    "properties": {
        "kind": {"enum": ["client", "server"]},
        "vault": FORBIDDEN, "catalog": FORBIDDEN, "entry": FORBIDDEN,
        "routes": {"type": "array", "items": route_schema(condition={
            "type": "object",
            "additionalProperties": False,
            "properties": {k: {"type": "string"} for k in ("protocol", "scheme", "authority", "path")},
        })},
    },
    "anyOf": [{"required": ["exit"]}, {"required": ["routes"]}],
    "x-expect": "'exit' or 'routes'",
    "if": {"properties": {"kind": {"const": "server"}}},
    "then": {"properties": {"options": SERVER_OPTIONS}},
    "else": {"properties": {"options": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "defaults": {
                "type": "object",
                "additionalProperties": False,
                "properties": {k: {"type": "string"} for k in _FIELDS},
            },
            # zillatw's extensions
            "timeout": {"type": "number", "exclusiveMinimum": 0},
            "max-message-size": {"type": "integer", "minimum": 1},
            "permessage-deflate": {"type": "boolean"},
        },
    }}},
}
STREAMS = {"server": ("http", "messages"), "client": ("messages", "http")}
GUARDED_KINDS = ("server",)  # the http server's session reaches the ws server only
UNGUARDED_WHY = "the session stays with the ws server in front of it: guard that server's routes"


class WsRoutes:
    """Zilla's ws route resolution, shared by server and client."""

    def __init__(self, routes: list[tuple[Route, Any]], namespace: str = "default"):
        self._routes = []
        self._namespace = namespace
        for route, exit_ in routes:
            alternatives = [tuple(matcher(w.get(k)) for k in _FIELDS) for w in route.when]
            self._routes.append((alternatives, exit_, route.guarded))

    def resolve(self, protocol: str | None, scheme: str | None, authority: str | None,
                path: str | None, session: Session | None = None,
                headers: Mapping[str, str] | None = None) -> tuple[int, Any] | None:
        """The first route (index, exit) whose conditions match and whose guards the session
        satisfies, as Zilla's resolve(); dynamic roles are resolved against the request's
        `headers` (Zilla's ws binding leaves them as written)."""
        for index, (alternatives, exit_, guarded) in enumerate(self._routes):
            if guarded and not permits(guarded, session, self._namespace, headers):
                continue
            if not alternatives or any(p(protocol) and s(scheme) and a(authority) and q(path)
                                       for p, s, a, q in alternatives):
                return index, exit_
        return None


@implementer(IHttpExit, IDrainsGracefully)
class WsServer(WebSocketServerFactory):
    """The ws server binding: routes, limits and Autobahn's settings for its connections."""

    noisy = False

    def __init__(self, name: str, routes: list[tuple[Route, Any]], *, namespace: str = "default",
                 max_message_size: int = MAX_MESSAGE_SIZE, max_frame_size: int = 0,
                 permessage_deflate: bool = True, close_timeout: float = CLOSE_TIMEOUT,
                 ping_interval: float = PING_INTERVAL, ping_timeout: float = PING_TIMEOUT,
                 max_connections: int = 0, reactor: Any = None, observer: Any = None):
        super().__init__()
        # zillatw.metrics.WsServerObserver: told each upgrade's outcome (metrics, events), or None
        self.observer = observer
        self._batched_timer = ReactorTimer(reactor)
        self.reactor = self._batched_timer.reactor
        self.server = None  # no Server header naming the library in the 101
        self.name = name
        self.namespace = namespace
        self.connections: set[WsServerProtocol] = set()  # open ones, for shutdown and stats
        self.handshaking: set[WsServerProtocol] = set()  # accepted, waiting for the exit (no 101 yet)
        self.max_connections = max_connections  # open + handshaking; 0: no limit
        self.resolve = WsRoutes(routes, namespace).resolve
        self.setProtocolOptions(
            echoCloseCodeReason=True,        # a client's close code comes back to it
            failByDrop=False,                # protocol errors get a close frame with the code
            maxMessagePayloadSize=max_message_size,  # also bounds inflation (deflate bombs)
            maxFramePayloadSize=max_frame_size,
            openHandshakeTimeout=0,          # the http binding already timed the request head
            closeHandshakeTimeout=close_timeout,
            autoPingInterval=ping_interval,  # Autobahn's keepalive, on our ReactorTimer: a
            autoPingTimeout=ping_timeout,    # missed pong drops the socket (the peer sees 1006)
            autoFragmentSize=0,
            requireMaskedClientFrames=True,
            allowNullOrigin=True,            # the http server's access-control decides about `null`
            perMessageCompressionAccept=_accept_deflate if permessage_deflate else (lambda offers: None),
        )

    def accept_request(self, request: Request, headers: dict[str, str], transport: Any,
                       trace_id: int = 0, authorization: Authorization = NO_AUTHORIZATION) -> "WsServerProtocol":
        """Check the upgrade and choose the route; the protocol returned takes the socket.
        The observer hears of a refusal, and of the exit chosen (whose outcome it reports)."""
        try:
            connection = self._accept(request, headers, trace_id, authorization)
        except HttpError as e:
            if self.observer is not None:
                self.observer.rejected(trace_id, e.status, e.reason)
            raise
        if self.observer is not None:
            connection.stream_exit = self.observer.opening(trace_id, connection.info, connection.shown_path,
                                                           connection.stream_exit)
        return connection

    def _accept(self, request: Request, headers: dict[str, str], trace_id: int,
                authorization: Authorization) -> "WsServerProtocol":
        check_upgrade(request)
        if self.max_connections and len(self.connections) + len(self.handshaking) >= self.max_connections:
            raise HttpError(503, f"too many WebSocket connections (limit {self.max_connections})")
        scheme, authority, path = headers[":scheme"], headers.get(":authority"), headers[":path"]
        session = authorization.session
        chosen = select_route(offered_protocols(headers.get("sec-websocket-protocol")),
                              lambda protocol: self.resolve(protocol, scheme, authority, path, session, headers))
        if chosen is None:
            status, text = authorization.refusal  # 401/403 when unauthorized, as the http server
            if status != 404:
                raise HttpError(status, text, (("WWW-Authenticate", "Bearer"),) if status == 401 else ())
            raise HttpError(404, "no WebSocket route for this request"
                            + (" (offered subprotocols: " + headers["sec-websocket-protocol"] + ")"
                               if "sec-websocket-protocol" in headers else ""))
        exit_, protocol = chosen
        connection = WsServerProtocol()
        connection.factory = self
        connection.stream_exit = exit_
        connection.trace_id = trace_id  # the request's, for this connection's later events (validation)
        connection.shown_path = request.shown_target or path  # for events: credentials redacted
        connection.info = StreamInfo(protocol, scheme, authority, path,
                                     session.identity if session is not None else None)
        self.handshaking.add(connection)
        return connection

    def going_away(self, reason: str = "going away") -> None:
        """Shutdown: close every WebSocket with 1001 (and tell its exit, so a proxied
        connection's upstream gets 1001 too); refuse the ones still opening with 503."""
        for connection in list(self.handshaking) + list(self.connections):
            connection.going_away(reason)

    def open_count(self) -> int:
        """WebSockets not yet closed: open or opening."""
        return len(self.connections) + len(self.handshaking)

    def drop_all(self) -> None:
        _drop(list(self.handshaking) + list(self.connections))


def _accept_deflate(offers: list[Any]) -> Any:
    """Accept the first permessage-deflate offer (RFC 7692)."""
    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return PerMessageDeflateOfferAccept(offer)
    return None


@implementer(IHttpConnection)
class WsServerProtocol(StreamRelay, WebSocketServerProtocol):
    """One client's WebSocket connection, and the stream end its exit writes to.

    Opening: the http server hands over the request it parsed (`take_over`); the WebSocket
    layer is given that request rendered anew, never the client's bytes. Until the exit has
    opened the stream and the 101 is out, what the client sends is held here (bounded, then
    reading pauses), so it can only ever be WebSocket frames of this one connection."""

    factory: WsServer
    stream_exit: Any
    info: StreamInfo
    shown_path = ""
    masked_in, masked_out = True, False  # RFC 6455 §5.1
    _opening: Deferred | None = None
    _open_timer: Any = None
    _paused_pending = False
    _answered = False  # a refusal was written

    # ---- opening: the 101 goes out once the exit has accepted the stream

    def take_over(self, request: Request, rest: bytes) -> None:
        self._held = bytearray(rest)
        self._open_timer = self.factory.reactor.callLater(OPEN_TIMEOUT, self._open_timed_out)
        self._dataReceived(handshake_head(request))

    def hold(self, data: bytes) -> None:
        held = self._held
        held += data
        if len(held) > PENDING_LIMIT and not self._paused_pending and self.transport is not None:
            self._paused_pending = True
            self.transport.pauseProducing()

    def onConnect(self, request: Any) -> Any:
        try:
            opened = self.stream_exit.open(self.info, self)
        except StreamRefused as e:
            raise ConnectionDeny(e.status, e.reason) from None
        if isinstance(opened, Deferred):
            self._opening = opened
            return opened.addCallbacks(self._opened, self._refused)
        return self._opened(opened)

    def _opened(self, peer: IStreamEnd) -> str | None:
        self._opening = None
        if self.transport is None or self.state == self.STATE_CLOSED:
            peer.stream_end(ABNORMAL, "client went away during the handshake")
            raise ConnectionDeny(499, "client went away")  # nothing is written: see failHandshake
        self.stream_peer = peer
        self.transport.registerProducer(peer, True)
        return self.info.protocol

    def _refused(self, failure: Failure) -> None:
        self._opening = None
        if failure.check(CancelledError):  # the client left first; nothing to answer
            raise ConnectionDeny(499, "client went away")
        failure.trap(StreamRefused)
        raise ConnectionDeny(failure.value.status, failure.value.reason)

    def _open_timed_out(self) -> None:
        self._open_timer = None
        if self.state == self.STATE_CONNECTING:
            self.failHandshake(f"the stream did not open within {OPEN_TIMEOUT:g} s", 504)
            opening, self._opening = self._opening, None
            if opening is not None:
                opening.cancel()  # the exit lets go of what it was opening

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        """Every refusal of an opening handshake is the gateway's own response (Autobahn's
        has no body, names the library and puts internal error text in the status line),
        and there is one per connection."""
        self._cancel_open_timer()
        if self.transport is None or self.state == self.STATE_CLOSED or self._answered:
            return
        self._answered = True
        self.wasNotCleanReason = reason
        if code >= 500 and code not in (502, 503, 504):
            reason = "internal error"  # unexpected: Autobahn's text would carry the exception
        self.transport.write(render_response(code, reason, tuple(responseHeaders or ())))
        self.dropConnection(abort=False)

    def _cancel_open_timer(self) -> None:
        timer, self._open_timer = self._open_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def onOpen(self) -> None:
        self._cancel_open_timer()
        self.shed_handshake_state()
        self.factory.handshaking.discard(self)
        self.factory.connections.add(self)
        held, self._held = self._held, None
        if held:
            # Autobahn goes on with what it holds once onOpen returns: these are the first frames.
            self.data += bytes(held)
        if self._paused_pending:
            self._paused_pending = False
            self.transport.resumeProducing()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._cancel_open_timer()
        self._held = None
        opening, self._opening = self._opening, None
        if opening is not None:
            opening.cancel()  # the client left before the exit opened: the upstream goes now
        self.factory.handshaking.discard(self)
        self.factory.connections.discard(self)
        super().onClose(wasClean, code, reason)

    def going_away(self, reason: str) -> None:
        if self.state == self.STATE_OPEN:
            peer, self.stream_peer = self.stream_peer, None
            self.sendCloseFrame(GOING_AWAY, reason.encode("utf-8")[:123])
            if peer is not None:
                peer.stream_end(GOING_AWAY, reason)
        elif self.state == self.STATE_CONNECTING and self.transport is not None:
            self.failHandshake(f"service unavailable: {reason}", 503, [("Connection", "close")])

    def session_expired(self) -> None:
        """The session's token expired (the http server's timer): close with 1008 and tell
        the exit. Zilla aborts the TCP connection instead."""
        if self.state == self.STATE_OPEN:
            peer, self.stream_peer = self.stream_peer, None
            self.sendCloseFrame(1008, b"token expired")
            if peer is not None:
                peer.stream_end(1008, "token expired")
        elif self.state != self.STATE_CLOSED:
            self.dropConnection(abort=True)


@implementer(IStreamExit, IHoldsConnections)
class WsClient:
    """The ws client binding: opens an upstream WebSocket per stream. The stream opens (and
    the downstream gets its 101) when the upstream has answered 101 with the same
    subprotocol; an upstream that refuses or cannot be reached is a 502, a slow one a 504."""

    def __init__(self, name: str, routes: list[tuple[Route, Any]], *, defaults: dict[str, str] | None = None,
                 timeout: float = UPSTREAM_TIMEOUT, max_message_size: int = MAX_MESSAGE_SIZE,
                 permessage_deflate: bool = True, reactor: Any = None):
        if reactor is None:
            from twisted.internet import reactor
        self.name = name
        self.resolve = WsRoutes(routes).resolve
        self.defaults = StreamInfo(**{k: (defaults or {}).get(k) for k in _FIELDS})
        self.timeout = timeout
        self.max_message_size = max_message_size
        self.permessage_deflate = permessage_deflate
        self.reactor = reactor
        self.timer = ReactorTimer(reactor)
        self.connections: set[WsClientProtocol] = set()  # upstream sockets not yet closed

    def open_count(self) -> int:
        return len(self.connections)

    def drop_all(self) -> None:
        _drop(list(self.connections))

    def open(self, info: StreamInfo, peer: IStreamEnd) -> Deferred:
        # Zilla: what a ws server learned is used as it is; defaults only for other streams.
        if not any(getattr(info, k) is not None for k in _FIELDS):
            info = StreamInfo(*(getattr(self.defaults, k) for k in _FIELDS), identity=info.identity)
        found = self.resolve(info.protocol, info.scheme, info.authority, info.path)
        if found is None:
            raise StreamRefused(404, f"no route of ws client {self.name} for this stream")
        authority = info.authority or "localhost"
        headers = {":scheme": info.scheme or "http", ":authority": authority, ":path": info.path or "/"}
        # The http client's overrides change the request written upstream, not where it goes.
        request = getattr(found[1], "request_headers", dict)(headers)
        factory = WebSocketClientFactory(f"ws://{request[':authority']}{request[':path']}",
                                         protocols=[info.protocol] if info.protocol else [],
                                         headers={k: v for k, v in request.items() if not k.startswith(":")})
        factory.protocol = WsClientProtocol
        factory.noisy = False  # one factory per upstream connection: no start/stop log lines
        factory.useragent = None  # no User-Agent naming the library upstream
        factory.upstream = None  # the WsClientProtocol, once connected
        factory._batched_timer = self.timer
        factory.setProtocolOptions(
            echoCloseCodeReason=True, failByDrop=False, autoFragmentSize=0,
            maxMessagePayloadSize=self.max_message_size,
            openHandshakeTimeout=self.timeout, closeHandshakeTimeout=CLOSE_TIMEOUT,
            perMessageCompressionOffers=[PerMessageDeflateOffer()] if self.permessage_deflate else [],
            perMessageCompressionAccept=_accept_deflate_response)
        def cancel(_: Deferred) -> None:
            # The downstream left (or gave up): the upstream goes at once, connected or not.
            upstream = factory.upstream
            if upstream is not None and upstream.transport is not None:
                upstream.transport.abortConnection()

        opened: Deferred = Deferred(canceller=cancel)
        factory.stream = (peer, info.protocol, opened)
        factory.tracked = self.connections
        timeout = self.reactor.callLater(self.timeout, _upstream_timed_out, opened, self.timeout)
        connecting = found[1].connect(factory, headers, self.timeout)
        connecting.addErrback(_connect_failed, opened)

        def settled(result: Any) -> Any:
            if timeout.active():
                timeout.cancel()
            connecting.cancel()
            return result

        return opened.addBoth(settled)


def _drop(protocols: list[Any]) -> None:
    for protocol in protocols:
        if protocol.transport is not None:
            protocol.transport.abortConnection()


def _accept_deflate_response(response: Any) -> Any:
    return PerMessageDeflateResponseAccept(response) if isinstance(response, PerMessageDeflateResponse) else None


def _upstream_timed_out(opened: Deferred, seconds: float) -> None:
    if not opened.called:
        opened.errback(StreamRefused(504, "upstream timed out", f"no answer within {seconds:g} s"))


def _connect_failed(failure: Failure, opened: Deferred) -> None:
    if opened.called:
        return
    if failure.check(StreamRefused):
        opened.errback(failure)
    elif failure.check(error.TimeoutError):
        opened.errback(StreamRefused(504, "upstream timed out", "the connection was not accepted in time"))
    elif not failure.check(CancelledError):
        opened.errback(StreamRefused(502, "upstream unreachable", failure.getErrorMessage()))


class WsClientProtocol(StreamRelay, WebSocketClientProtocol):
    """One upstream WebSocket connection, and the stream end the ws server writes to."""

    masked_in, masked_out = False, True  # RFC 6455 §5.1
    refusal_detail = ""  # why we refused the upstream's 101, for the event log

    def connectionMade(self) -> None:
        self.peer_waiting, self.protocol_wanted, self.opened = self.factory.stream
        self.factory.tracked.add(self)
        self.factory.upstream = self
        super().connectionMade()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.factory.tracked.discard(self)
        super().connectionLost(reason)

    def onConnect(self, response: Any) -> None:
        if response.protocol != self.protocol_wanted:  # both absent is fine
            self.refusal_detail = f"it selected subprotocol {response.protocol!r}, expected {self.protocol_wanted!r}"
            raise ConnectionDeny(502, self.refusal_detail)

    def onOpen(self) -> None:
        self.shed_handshake_state()
        peer, self.peer_waiting = self.peer_waiting, None
        if self.opened.called:  # too late: the downstream already got its 504
            self.sendCloseFrame(1001, b"downstream gave up")
            return
        self.stream_peer = peer
        self.transport.registerProducer(peer, True)
        self.opened.callback(self)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            if self.wasOpenHandshakeTimeout:
                refusal = StreamRefused(504, "upstream timed out", "no answer to the WebSocket handshake in time")
            else:
                refusal = StreamRefused(502, "upstream refused the WebSocket handshake",
                                        self.refusal_detail or reason or "")
            self.opened.errback(refusal)
        super().onClose(wasClean, code, reason)


def build(binding: BindingConfig, graph: Any) -> WsServer | WsClient:
    options = binding.options
    routes = [(route, graph.exit(route.exit, binding)) for route in binding.routes]
    if binding.kind == "client":
        return WsClient(binding.name, routes, defaults=dict(options.get("defaults") or {}),
                        timeout=options.get("timeout", UPSTREAM_TIMEOUT),
                        max_message_size=options.get("max-message-size", MAX_MESSAGE_SIZE),
                        permessage_deflate=options.get("permessage-deflate", True), reactor=graph.reactor)
    routes = validating_routes(binding, graph, routes, options.get("max-message-size", MAX_MESSAGE_SIZE))
    return WsServer(binding.name, routes, namespace=binding.namespace,
                    max_message_size=options.get("max-message-size", MAX_MESSAGE_SIZE),
                    max_frame_size=options.get("max-frame-size", 0),
                    permessage_deflate=options.get("permessage-deflate", True),
                    close_timeout=options.get("close-timeout", CLOSE_TIMEOUT),
                    ping_interval=options.get("ping-interval", PING_INTERVAL),
                    ping_timeout=options.get("ping-timeout", PING_TIMEOUT),
                    max_connections=options.get("max-connections", 0), reactor=graph.reactor,
                    observer=graph.ws_server_observer(binding))


PLUGIN = BindingType("ws", SCHEMA_PATCH, STREAMS, build, guarded_kinds=frozenset(GUARDED_KINDS),
                     unguarded_why=UNGUARDED_WHY,
                     check_in_namespace=lambda binding, namespace, registry: check_models(binding, namespace, registry.catalogs))
