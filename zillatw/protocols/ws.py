"""ws server: validates the upgrade (RFC 6455), picks a route and subprotocol as Zilla does,
opens a stream to the route's exit, and then relays message fragments both ways.

Framing, UTF-8 validation, close handshake and permessage-deflate are Autobahn's, which
passes the Autobahn testsuite; this module adds routing and the stream to the exit.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from zillatw.config import BindingConfig, Route
from zillatw.http1 import HttpError, Request
from zillatw.matching import matcher
from zillatw.schema import FORBIDDEN, route_schema
from zillatw.stream import ABNORMAL, BINARY, CONTINUATION, NO_STATUS, TEXT, IStreamEnd, StreamInfo, StreamRefused
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

# Codes a close frame may carry (RFC 6455 §7.4); others are mapped before sending.
_SENDABLE = frozenset([1000, 1001, 1002, 1003, *range(1007, 1015)]) | frozenset(range(3000, 5000))


class ReactorTimer:
    """Autobahn's timer interface on plain reactor calls. Autobahn batches its timers into
    shared buckets whose reactor calls outlive cancelled timers; ours end with them."""

    def __init__(self, reactor: Any = None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor

    def call_later(self, delay: float, func: Any, *args: Any, **kwargs: Any) -> Any:
        return self.reactor.callLater(delay, func, *args, **kwargs)


def check(binding: BindingConfig) -> Iterator[tuple[str, str]]:
    if binding.kind != "server":
        yield "kind", "ws client bindings are not supported by this zillatw yet (expected server)"


class WsServer(WebSocketServerFactory):
    """The ws server binding: routes, limits and Autobahn's settings for its connections."""

    noisy = False

    def __init__(self, name: str, routes: list[tuple[Route, Any]], *, namespace: str = "default",
                 max_message_size: int = MAX_MESSAGE_SIZE, max_frame_size: int = 0,
                 permessage_deflate: bool = True):
        super().__init__()
        self._batched_timer = ReactorTimer()
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


_TIMERS = ("openHandshakeTimeoutCall", "closeHandshakeTimeoutCall", "serverConnectionDropTimeoutCall",
           "autoPingPendingCall", "autoPingTimeoutCall")


def _accept_deflate(offers: list[Any]) -> Any:
    """Accept the first permessage-deflate offer (RFC 7692)."""
    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return PerMessageDeflateOfferAccept(offer)
    return None


@implementer(IStreamEnd)
class WsServerProtocol(WebSocketServerProtocol):
    """One WebSocket connection, and the stream end its exit writes to."""

    factory: WsServer
    stream_exit: Any
    info: StreamInfo
    peer: IStreamEnd | None = None
    _opcode = TEXT
    _last = b""
    _peer_closing = False

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

    # ---- client -> exit: fragments as they complete. The last one waits for onMessageEnd,
    # which Autobahn calls only after its end-of-message UTF-8 and inflate checks.

    def onOpen(self) -> None:
        self.factory.connections.add(self)

    def onMessageBegin(self, isBinary: bool) -> None:
        self._opcode = BINARY if isBinary else TEXT
        self.message_data_total_length = 0  # Autobahn counts it against maxMessagePayloadSize

    def onMessageFrameEnd(self) -> None:
        if self.failedByMe:
            return
        parts = self.frame_data
        payload = parts[0] if len(parts) == 1 else b"".join(parts)
        self.frame_data = None
        if self.current_frame.fin:
            self._last = payload
        elif self.peer is not None:
            self.peer.stream_data(self._opcode, payload, False)
            self._opcode = CONTINUATION

    def onMessageEnd(self) -> None:
        if not self.failedByMe and self.peer is not None:
            payload, self._last = self._last, b""
            self.peer.stream_data(self._opcode, payload, True)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.connections.discard(self)
        peer, self.peer = self.peer, None
        if peer is not None:
            if wasClean:
                peer.stream_end(NO_STATUS if code is None else code, reason or "")
            else:
                peer.stream_end(ABNORMAL, reason or "")

    # ---- closing. When the client's close frame arrives, Autobahn aborts the socket, which
    # would discard a close frame of ours still in the write buffer (say, our 1002 for its
    # invalid close code). The client is reading, so a graceful close is right then.

    def onCloseFrame(self, code: int | None, reasonRaw: bytes | None) -> bool | None:
        self._peer_closing = True
        try:
            return super().onCloseFrame(code, reasonRaw)
        finally:
            self._peer_closing = False

    def dropConnection(self, abort: bool = False) -> None:
        super().dropConnection(abort=abort and not self._peer_closing)

    def unregisterProducer(self) -> None:
        # Autobahn unregisters on every drop, registered or not; not every transport allows that.
        if getattr(self.transport, "producer", None) is not None:
            self.transport.unregisterProducer()

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(reason)
        # Autobahn leaves some of its timers running after the socket is gone.
        for name in _TIMERS:
            call = getattr(self, name, None)
            if call is not None:
                setattr(self, name, None)
                if call.active():
                    call.cancel()

    # ---- exit -> client (IStreamEnd)

    def stream_data(self, opcode: int, payload: bytes, fin: bool) -> None:
        if self.state != self.STATE_OPEN:
            return
        if self._perMessageCompress is None:
            self.sendFrame(opcode, payload, fin)  # one frame per fragment, exactly
        elif opcode != CONTINUATION and fin:
            self.sendMessage(payload, opcode == BINARY)
        else:
            # Compressed fragments: the message keeps its boundaries; deflate's trailing
            # flush adds one frame at the end.
            if opcode != CONTINUATION:
                self.beginMessage(isBinary=opcode == BINARY)
                self.sendMessageFrame(payload)
            elif payload:
                self.sendMessageFrame(payload)
            if fin:
                self.endMessage()

    def stream_end(self, code: int, reason: str) -> None:
        if self.state != self.STATE_OPEN:
            return
        if code == NO_STATUS:
            self.sendCloseFrame()
            return
        if code not in _SENDABLE:
            code, reason = 1011, reason or "the stream's other side failed"
        self.sendCloseFrame(code, reason.encode("utf-8")[:123])

    def pauseProducing(self) -> None:
        if self.transport is not None:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.transport is not None:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """The exit is gone; its stream_end carries the close."""


def build(binding: BindingConfig, graph: Any) -> WsServer:
    options = binding.options
    routes = [(route, graph.binding(route.exit)) for route in binding.routes]
    return WsServer(binding.name, routes, namespace=binding.namespace,
                    max_message_size=options.get("max-message-size", MAX_MESSAGE_SIZE),
                    max_frame_size=options.get("max-frame-size", 0),
                    permessage_deflate=options.get("permessage-deflate", True))
