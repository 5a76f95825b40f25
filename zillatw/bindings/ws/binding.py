"""ws server: validates the upgrade (RFC 6455), picks a route and subprotocol as Zilla does,
opens a stream to the route's exit, and answers the 101 itself once the exit has accepted.
ws client: opens an upstream WebSocket through its exit (http client -> tcp client, or tls
client) for each stream it is given, writing the upgrade request and checking the answer.
Both then relay the stream through zillatw.bindings.ws.relay on zillatw.wire, our own protocol core
(framing, UTF-8, closing handshake, permessage-deflate); nothing of Autobahn's.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from zillatw.bindings.ws.admission import OPTIONS as ADMISSION_OPTIONS
from zillatw.bindings.ws.admission import WsAdmission, from_options
from zillatw.bindings.ws.client import UPSTREAM_TIMEOUT, WsClient
from zillatw.bindings.ws.relay import (
    CLOSE_TIMEOUT,
    GATHER,
    GOING_AWAY,
    MAX_MESSAGE_SIZE,
    Deadlines,
    WsRelay,
    drop,
    no_delay,
)
from zillatw.bindings.ws.routes import FIELDS as _FIELDS
from zillatw.bindings.ws.routes import WsRoutes
from zillatw.catalogs.validation import MESSAGES, check_models, validating_routes
from zillatw.config import BindingConfig, Route
from zillatw.config.plugins import BindingType, IDrainsGracefully
from zillatw.config.schema import FORBIDDEN, refused, route_schema
from zillatw.guards import NO_AUTHORIZATION, Authorization
from zillatw.stream import (
    ABNORMAL,
    IHttpConnection,
    IHttpExit,
    IMirrorEnd,
    IStreamEnd,
    IWebSocketTunnel,
    StreamInfo,
    StreamRefused,
    SubprotocolOffer,
)
from zillatw.telemetry.sessions import relay_behind
from zillatw.wire import (
    CloseCode,
    Connection,
    Role,
    State,
    server_accept,
)
from zillatw.wire.deflate import can_mirror, can_relay
from zillatw.wire.handshake import (
    check_upgrade,
    offered_protocols,
    select_route,
    server_response,
)
from zillatw.wire.http1 import HttpError, Request, render_response

PING_INTERVAL = 20.0  # seconds between server pings (keepalive), as the `websockets` library; 0: none
PING_TIMEOUT = 20.0  # seconds a ping may go unanswered before the connection is dropped; 0: never
OPEN_TIMEOUT = 60.0  # seconds to the 101 for an exit that never answers (a ws client's own 504 comes first)
PENDING_LIMIT = 64 * 1024  # bytes held before the 101 (frames, for when it opens); then reading pauses
# The window asked of a client that offers client_max_window_bits (RFC 7692 §7.1.2.2), as the
# websockets server asks: 4 KiB instead of 32 spares its compressor memory (about 8x) and, at
# zlib level 6, about a quarter of its time on 64 KiB of JSON, for about 15 % more bytes.
# Ours stays 15 bits: an echo can then mirror (wire.deflate.can_mirror), and an upstream's
# messages of up to 32 KiB windows pass to the client as they are (can_relay).
CLIENT_WINDOW_BITS = 12
log = Logger()

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
        **ADMISSION_OPTIONS,  # per client and per connection (zillatw.bindings.ws.admission, docs/admission.md)
        "allowed-origins": refused("no longer supported: use the http server's options.access-control: "
                                   "policy cross-origin with allow.origins (see docs/access-control.md)"),
        "messages": MESSAGES,  # validation rules, see zillatw.catalogs.validation
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


@implementer(IHttpExit, IDrainsGracefully)
class WsServer:
    """The ws server binding: routes, limits and timers for its connections."""

    def __init__(self, name: str, routes: list[tuple[Route, Any]], *, namespace: str = "default",
                 max_message_size: int = MAX_MESSAGE_SIZE, max_frame_size: int = 0,
                 permessage_deflate: bool = True, close_timeout: float = CLOSE_TIMEOUT,
                 ping_interval: float = PING_INTERVAL, ping_timeout: float = PING_TIMEOUT,
                 max_connections: int = 0, reactor: Any, observer: Any = None,
                 admission: WsAdmission | None = None):
        self.reactor = reactor
        # zillatw.telemetry.instrument.WsServerObserver: told each upgrade's outcome (metrics, events), or None
        self.observer = observer
        self.name = name
        self.namespace = namespace
        self.connections: set[WsServerProtocol] = set()  # open ones, for shutdown and stats
        self.handshaking: set[WsServerProtocol] = set()  # accepted, waiting for the exit (no 101 yet)
        self.max_connections = max_connections  # open + handshaking; 0: no limit
        self.admission = admission  # per-client limits and the message rate, or None
        self.routes = WsRoutes(routes, namespace)
        self.resolve = self.routes.resolve
        self.max_message_size = max_message_size  # also bounds inflation (deflate bombs)
        self.max_frame_size = max_frame_size
        self.permessage_deflate = permessage_deflate
        self.close_timeout = close_timeout
        self.ping_interval = ping_interval  # keepalive: a missed pong drops the socket (the peer sees 1006)
        self.ping_timeout = ping_timeout
        # every connection's next ping, and the pongs awaited, on one reactor call each
        self.pings = Deadlines(reactor, ping_interval, WsRelay._ping) if ping_interval else None
        self.pongs = Deadlines(reactor, ping_timeout, WsRelay._pong_missed) if ping_interval and ping_timeout else None

    def accept_request(self, request: Request, headers: dict[str, str], transport: Any,
                       trace_id: int = 0, authorization: Authorization = NO_AUTHORIZATION,
                       client_address: str | None = None) -> "WsServerProtocol":
        """Check the upgrade and choose the route; the protocol returned takes the socket.
        The observer hears of a refusal, and of the exit chosen (whose outcome it reports)."""
        try:
            connection = self._accept(request, headers, trace_id, authorization, client_address,
                                      IWebSocketTunnel.providedBy(transport))
        except HttpError as e:
            if self.observer is not None:
                self.observer.rejected(trace_id, e.status, e.reason)
            raise
        if self.observer is not None:
            connection.stream_exit = self.observer.opening(trace_id, connection.info, connection.shown_path,
                                                           connection.stream_exit)
        return connection

    def _accept(self, request: Request, headers: dict[str, str], trace_id: int,
                authorization: Authorization, client_address: str | None,
                tunnelled: bool = False) -> "WsServerProtocol":
        if not tunnelled:  # a tunnel (HTTP/2's extended CONNECT) checked its request its own way
            check_upgrade(request)  # and that the handshake headers are ASCII tokens
        if self.max_connections and len(self.connections) + len(self.handshaking) >= self.max_connections:
            raise HttpError(503, f"too many WebSocket connections (limit {self.max_connections})")
        client = self.admission.admit(client_address) if self.admission is not None else None  # or 429, 503
        scheme, authority, path = headers[":scheme"], headers.get(":authority"), headers[":path"]
        session = authorization.session
        offered = offered_protocols(headers.get("sec-websocket-protocol"))

        def resolve(protocol: str | None) -> tuple[int, tuple[int, Any]] | None:
            found = self.resolve(protocol, scheme, authority, path, session, headers)
            return (found[0], found) if found is not None else None
        chosen = select_route(offered, resolve)
        if chosen is None:
            status, text = authorization.refusal  # 401/403 when unauthorized, as the http server
            if status != 404:
                raise HttpError(status, text, (("WWW-Authenticate", "Bearer"),) if status == 401 else ())
            raise HttpError(404, "no WebSocket route for this request"
                            + (" (offered subprotocols: " + headers["sec-websocket-protocol"] + ")"
                               if "sec-websocket-protocol" in headers else ""))
        (index, exit_), protocol = chosen
        offer = SubprotocolOffer(tuple(offered)) if offered and not self.routes.fixes_protocol[index] else None
        connection = WsServerProtocol(self)
        connection.stream_exit = exit_
        connection.trace_id = trace_id  # the request's, for this connection's later events (validation)
        connection.shown_path = request.shown_target or path  # for events: credentials redacted
        compressing = self.permessage_deflate and "permessage-deflate" in headers.get("sec-websocket-extensions", "")
        connection.info = StreamInfo(protocol, scheme, authority, path,
                                     session.identity if session is not None else None, offer, compressing)
        connection.client_address = client_address
        if client is not None and self.admission is not None:  # counted until connectionLost, however it ends
            connection.admitted = self.admission.opened(client)
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
        drop(list(self.handshaking) + list(self.connections))


@implementer(IHttpConnection)
class WsServerProtocol(WsRelay):
    """One client's WebSocket connection, and the stream end its exit writes to.

    Opening: the http server hands over the request it parsed (`take_over`). Until the exit
    has opened the stream and our 101 is out, what the client sends is held here (bounded,
    then reading pauses), so it can only ever be WebSocket frames of this one connection."""

    __slots__ = ("stream_exit", "info", "trace_id", "shown_path", "_key", "_extensions", "_opening",
                 "_open_timer", "_held", "_held_paused", "_answered", "client_address", "admitted")

    def __init__(self, binding: WsServer) -> None:
        super().__init__(binding)
        self.stream_exit: Any = None
        self.info: StreamInfo = StreamInfo()
        self.trace_id = 0
        self.shown_path = ""
        self._key = ""
        self._extensions: str | None = None
        self._opening: Deferred | None = None
        self._open_timer: Any = None
        self._held: bytearray | None = None
        self._held_paused = False
        self._answered = False  # a refusal was written
        self.client_address: str | None = None  # as the http server decided it (zillatw.bindings.http.clientaddress)
        self.admitted: str | None = None  # the key this connection is counted under by the admission

    # ---- opening: the 101 goes out once the exit has accepted the stream

    def take_over(self, request: Request, rest: bytes) -> None:
        no_delay(self.transport)
        headers = request.headers
        self._held = bytearray(rest)
        self._key = headers.get("sec-websocket-key", "")  # none in a tunnel's request
        self._extensions = headers.get("sec-websocket-extensions") if self.binding.permessage_deflate else None
        self._open_timer = self.binding.reactor.callLater(OPEN_TIMEOUT, self._open_timed_out)
        try:
            opened = self.stream_exit.open(self.info, self)
        except StreamRefused as e:
            self._refuse(e.status, e.reason)
            return
        except Exception:  # a bug must cost this connection, never the client a hang
            log.failure("zillatw: ws server {binding} failed to open a stream", binding=self.binding.name)
            self._refuse(500, "internal error")
            return
        if isinstance(opened, Deferred):
            self._opening = opened
            opened.addCallbacks(self._opened, self._open_failed)
        else:
            self._opened(opened)

    def before_open(self, data: bytes) -> None:
        held = self._held
        if held is None:
            return  # refused: the socket is closing
        held += data
        if len(held) > PENDING_LIMIT and not self._held_paused and self.connected:
            self._held_paused = True
            self.transport.pauseProducing()

    def _opened(self, peer: IStreamEnd) -> None:
        self._opening = None
        if not self.connected or self._answered:
            peer.stream_end(ABNORMAL, "client went away during the handshake")
            return
        self._cancel_open_timer()
        binding = self.binding
        info = self.info
        offer = info.offer
        protocol = offer.chosen if offer is not None and offer.answered else info.protocol
        agreed = server_accept(self._extensions, client_window_bits=CLIENT_WINDOW_BITS) if self._extensions else None
        params = agreed[0] if agreed is not None else None
        if IWebSocketTunnel.providedBy(self.transport):
            self.transport.accept_websocket(protocol, agreed[1] if agreed is not None else None)
        else:
            self.transport.write(server_response(self._key, protocol, agreed[1] if agreed is not None else None))
        inspect = True
        behind = relay_behind(peer) if params is not None else None
        # An echo with nothing between: compressed messages go back as they came, inflated
        # and checked but not compressed again (wire.deflate.can_mirror says when that is valid).
        mirror = params is not None and IMirrorEnd.providedBy(behind) and can_mirror(params, True)
        if params is not None and isinstance(relay := behind, WsRelay) and relay.conn is not None:
            # Ends that meet with nothing between (no validation, no metering; sessions' counts
            # are seen through) pass compressed messages as they are if the parameters allow it.
            upstream = relay.conn.deflate
            if upstream is not None:
                inspect = not can_relay(params, True, upstream, False)
                if can_relay(upstream, False, params, True):
                    relay.conn.inspect = False
        conn = Connection(Role.SERVER, deflate=params, max_message_size=binding.max_message_size,
                          max_frame_size=binding.max_frame_size, gather=GATHER, answer_close=False,
                          defer_failure=True, inspect=inspect, auto_pong=False, mirror=mirror)
        binding.handshaking.discard(self)
        binding.connections.add(self)
        self._key = ""
        self._extensions = None
        if binding.admission is not None:
            peer = binding.admission.limit_messages(self, peer)
        self.start(conn, peer)
        held, self._held = self._held, None
        if self._held_paused:
            self._held_paused = False
            self.transport.resumeProducing()
        if held:
            self.dataReceived(bytes(held))

    def _open_failed(self, failure: Failure) -> None:
        self._opening = None
        if failure.check(CancelledError):  # the client left first (or the open timed out): nothing to answer
            return
        if failure.check(StreamRefused):
            self._refuse(failure.value.status, failure.value.reason)
            return
        log.failure("zillatw: ws server {binding} failed to open a stream", failure, binding=self.binding.name)
        self._refuse(500, "internal error")

    def _open_timed_out(self) -> None:
        self._open_timer = None
        if self.conn is None:
            reason = f"the stream did not open within {OPEN_TIMEOUT:g} s"
            self._refuse(504, reason)
            observer = self.binding.observer
            if observer is not None:  # the exit never answered: the ws server refuses, and says so
                observer.rejected(self.trace_id, 504, reason, self.info.identity)
            opening, self._opening = self._opening, None
            if opening is not None:
                opening.cancel()  # the exit lets go of what it was opening

    def _refuse(self, status: int, reason: str) -> None:
        """Every refusal of an opening handshake is the gateway's own response, one per
        connection."""
        self._cancel_open_timer()
        self._held = None
        if not self.connected or self._answered:
            return
        self._answered = True
        if status >= 500 and status not in (502, 503, 504):
            reason = "internal error"  # unexpected: its text could carry internals
        if IWebSocketTunnel.providedBy(self.transport):
            self.transport.refuse_websocket(status, reason)
            return
        self.transport.write(render_response(status, reason))
        self.transport.loseConnection()

    def _cancel_open_timer(self) -> None:
        timer, self._open_timer = self._open_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._cancel_open_timer()
        self._held = None
        opening, self._opening = self._opening, None
        if opening is not None:
            opening.cancel()  # the client left before the exit opened: the upstream goes now
        binding = self.binding
        binding.handshaking.discard(self)
        binding.connections.discard(self)
        admitted, self.admitted = self.admitted, None
        if admitted is not None:
            binding.admission.closed(admitted)
        super().connectionLost(reason)

    def going_away(self, reason: str) -> None:
        conn = self.conn
        if conn is not None:
            if conn.state is State.OPEN:
                peer, self.stream_peer = self.stream_peer, None
                self.stream_end(CloseCode.GOING_AWAY, reason)
                if peer is not None:
                    peer.stream_end(GOING_AWAY, reason)
        elif self.connected:
            self._refuse(503, f"service unavailable: {reason}")

    def session_expired(self) -> None:
        """The session's token expired (the http server's timer): close with 1008 and tell
        the exit. Zilla aborts the TCP connection instead."""
        conn = self.conn
        if conn is not None and conn.state is State.OPEN:
            peer, self.stream_peer = self.stream_peer, None
            self.stream_end(CloseCode.POLICY_VIOLATION, "token expired")
            if peer is not None:
                peer.stream_end(1008, "token expired")
        elif self.connected:
            self.transport.abortConnection()


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
                    observer=(observer := graph.ws_server_observer(binding)),
                    admission=from_options(options, graph.reactor, observer))


PLUGIN = BindingType("ws", SCHEMA_PATCH, STREAMS, build, guarded_kinds=frozenset(GUARDED_KINDS),
                     unguarded_why=UNGUARDED_WHY,
                     check_in_namespace=lambda binding, namespace, registry: check_models(
                         binding, namespace, registry.catalogs))
