"""ws server: validates the upgrade (RFC 6455), picks a route and subprotocol as Zilla does,
opens a stream to the route's exit, and then relays message fragments both ways.

Framing, UTF-8 validation, close handshake and permessage-deflate are Autobahn's, which
passes the Autobahn testsuite; this module adds routing and opening the stream to the exit,
and zillatw.wsstream relays the stream's fragments.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from zillatw.config import BindingConfig, Route
from zillatw.http1 import HttpError, Request
from zillatw.matching import matcher
from zillatw.schema import FORBIDDEN, route_schema
from zillatw.stream import ABNORMAL, IStreamEnd, StreamInfo, StreamRefused
from zillatw.wsstream import ReactorTimer, StreamRelay
from zillatw.wshandshake import check_upgrade, offered_protocols, select_route

MAX_MESSAGE_SIZE = 1024 * 1024
CLOSE_TIMEOUT = 2.0  # seconds to wait for the peer's close frame before dropping

SERVER_OPTIONS = {
    # zillatw's extension: Zilla's ws server takes no options.
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "max-message-size": {"type": "integer", "minimum": 1},
        "max-frame-size": {"type": "integer", "minimum": 1},
        "permessage-deflate": {"type": "boolean"},
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
        "properties": {"defaults": {
            "type": "object",
            "additionalProperties": False,
            "properties": {k: {"type": "string"} for k in ("protocol", "scheme", "authority", "path")},
        }},
    }}},
}
STREAMS = {"server": ("http", "messages")}


def check(binding: BindingConfig) -> Iterator[tuple[str, str]]:
    if binding.kind != "server":
        yield "kind", "ws client bindings are not supported by this zillatw yet (expected server)"


class WsServer(WebSocketServerFactory):
    """The ws server binding: routes, limits and Autobahn's settings for its connections."""

    noisy = False

    def __init__(self, name: str, routes: list[tuple[Route, Any]], *, namespace: str = "default",
                 max_message_size: int = MAX_MESSAGE_SIZE, max_frame_size: int = 0,
                 permessage_deflate: bool = True, reactor: Any = None):
        super().__init__()
        self._batched_timer = ReactorTimer(reactor)
        self.name = name
        self.namespace = namespace
        self.connections: set[WsServerProtocol] = set()  # open ones, for shutdown and stats
        self._routes = []
        for route, exit_ in routes:
            alternatives = [tuple(matcher(w.get(k)) for k in ("protocol", "scheme", "authority", "path"))
                            for w in route.when]
            self._routes.append((alternatives, exit_))
        self.setProtocolOptions(
            echoCloseCodeReason=True,        # a client's close code comes back to it
            failByDrop=False,                # protocol errors get a close frame with the code
            maxMessagePayloadSize=max_message_size,  # also bounds inflation (deflate bombs)
            maxFramePayloadSize=max_frame_size,
            openHandshakeTimeout=0,          # the http binding already timed the request head
            closeHandshakeTimeout=CLOSE_TIMEOUT,
            autoFragmentSize=0,
            requireMaskedClientFrames=True,
            perMessageCompressionAccept=_accept_deflate if permessage_deflate else (lambda offers: None),
        )

    def resolve(self, protocol: str | None, scheme: str | None, authority: str | None,
                path: str | None) -> tuple[int, Any] | None:
        """The first route (index, exit) whose conditions match, as Zilla's resolve()."""
        for index, (alternatives, exit_) in enumerate(self._routes):
            if not alternatives or any(p(protocol) and s(scheme) and a(authority) and q(path)
                                       for p, s, a, q in alternatives):
                return index, exit_
        return None

    def accept_request(self, request: Request, headers: dict[str, str], transport: Any,
                       trace_id: int = 0) -> "WsServerProtocol":
        """Check the upgrade and choose the route; the protocol returned takes the socket."""
        check_upgrade(request)
        scheme, authority, path = headers[":scheme"], headers.get(":authority"), headers[":path"]
        chosen = select_route(offered_protocols(headers.get("sec-websocket-protocol")),
                              lambda protocol: self.resolve(protocol, scheme, authority, path))
        if chosen is None:
            raise HttpError(404, "no WebSocket route for this request"
                            + (" (offered subprotocols: " + headers["sec-websocket-protocol"] + ")"
                               if "sec-websocket-protocol" in headers else ""))
        exit_, protocol = chosen
        connection = WsServerProtocol()
        connection.factory = self
        connection.stream_exit = exit_
        connection.info = StreamInfo(protocol, scheme, authority, path)
        return connection


def _accept_deflate(offers: list[Any]) -> Any:
    """Accept the first permessage-deflate offer (RFC 7692)."""
    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return PerMessageDeflateOfferAccept(offer)
    return None


class WsServerProtocol(StreamRelay, WebSocketServerProtocol):
    """One client's WebSocket connection, and the stream end its exit writes to."""

    factory: WsServer
    stream_exit: Any
    info: StreamInfo

    # ---- opening: the 101 goes out once the exit has accepted the stream

    def onConnect(self, request: Any) -> Any:
        try:
            opened = self.stream_exit.open(self.info, self)
        except StreamRefused as e:
            raise ConnectionDeny(e.status, e.reason) from None
        if isinstance(opened, Deferred):
            return opened.addCallbacks(self._opened, self._refused)
        return self._opened(opened)

    def _opened(self, peer: IStreamEnd) -> str | None:
        if self.transport is None or self.state == self.STATE_CLOSED:
            peer.stream_end(ABNORMAL, "client went away during the handshake")
            return None
        self.peer = peer
        self.transport.registerProducer(peer, True)
        return self.info.protocol

    def _refused(self, failure: Failure) -> None:
        failure.trap(StreamRefused)
        raise ConnectionDeny(failure.value.status, failure.value.reason)

    def onOpen(self) -> None:
        self.factory.connections.add(self)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.connections.discard(self)
        super().onClose(wasClean, code, reason)


def build(binding: BindingConfig, graph: Any) -> WsServer:
    options = binding.options
    routes = [(route, graph.binding(route.exit)) for route in binding.routes]
    return WsServer(binding.name, routes, namespace=binding.namespace,
                    max_message_size=options.get("max-message-size", MAX_MESSAGE_SIZE),
                    max_frame_size=options.get("max-frame-size", 0),
                    permessage_deflate=options.get("permessage-deflate", True))
