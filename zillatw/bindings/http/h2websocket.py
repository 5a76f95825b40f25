"""WebSocket over HTTP/2 (RFC 8441) on the http server: one extended CONNECT stream
(`:method CONNECT`, `:protocol websocket`) of an zillatw.bindings.http.h2server connection.

The request is admitted as the HTTP/1.1 upgrade it stands for: its headers are seen by the
access control, the guard and the routes as `:method GET` with `upgrade: websocket` (so a
route written for HTTP/1.1 WebSockets takes it), and it is handed to the route's exit (a ws
server, IHttpExit) with this stream as the transport of the ws server's protocol. The stream
provides IWebSocketTunnel: the handshake's answer is HEADERS `:status 200` (RFC 8441 §5), a
refusal HEADERS with the HTTP/1.1 status and a short body.

As a transport, the stream keeps HTTP/2's flow control both ways. The client's DATA reaches
the ws protocol as it reads (it may pause us: then it waits here, unacknowledged, so what a
client may send unread is bounded by the stream window we advertise) and is acknowledged
(WINDOW_UPDATE) once read. What the ws protocol writes waits for the peer's windows in a
buffer of at most SEND_BOUND bytes, beyond which its producer (the ws relay's peer) is
paused. loseConnection is END_STREAM once the buffer is out, loseWriteConnection the same
while reading goes on, abortConnection RST_STREAM(CANCEL); the peer's END_STREAM or
RST_STREAM is the protocol's connectionLost. After our END_STREAM the peer has CLOSE_LINGER
seconds to end its side, then the stream is reset.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import h2.exceptions
from h2.errors import ErrorCodes
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from zillatw.bindings.http import admission, clientaddress
from zillatw.bindings.http.auth import redact_target, without_values
from zillatw.bindings.http.h2flow import send_allowed
from zillatw.guards import NO_AUTHORIZATION, Authorization
from zillatw.stream import IHttpConnection, IHttpExit, IWebSocketTunnel
from zillatw.telemetry.events import next_trace_id
from zillatw.wire.http1 import HttpError, Request

if TYPE_CHECKING:
    from zillatw.bindings.http.h2server import H2ServerConnection

SEND_BOUND = 65536    # bytes the ws protocol may have waiting for the peer's window
CLOSE_LINGER = 5.0    # seconds the peer has to end its side after our END_STREAM
PROTOCOL = "websocket"  # the :protocol served (RFC 8441 §4); others are answered 501
_VISIBLE_ASCII = re.compile(r"^[\x20-\x7e]*$")
_HANDSHAKE_FIELDS = ("sec-websocket-version", "sec-websocket-protocol", "sec-websocket-extensions")
log = Logger()


def is_websocket(headers: dict[str, str]) -> bool:
    """Whether a stream's request is an extended CONNECT for a WebSocket."""
    return headers.get(":method") == "CONNECT" and headers.get(":protocol", "").lower() == PROTOCOL


def request_problem(headers: dict[str, str], ended: bool) -> tuple[int, str] | None:
    """What is wrong with an extended CONNECT for a WebSocket (RFC 8441 §4-5), as the
    status and reason of its refusal; None if nothing. h2 has checked :scheme and :path are
    there (their absence is its connection error)."""
    if ended:
        return 400, "an extended CONNECT carries the WebSocket: its HEADERS cannot end the stream"
    if not headers.get(":path", "").startswith("/"):
        return 400, "the :path must be an absolute path"
    for name in _HANDSHAKE_FIELDS:
        if name in headers and not _VISIBLE_ASCII.match(headers[name]):
            return 400, f"the {name} header must be ASCII"
    version = headers.get("sec-websocket-version")
    if version != "13":
        # HTTP/1.1 answers 426 naming the protocol to upgrade to: HTTP/2 has no upgrade
        return 400, "Sec-WebSocket-Version 13 is required" + (f", got {version}" if version else "")
    if "content-length" in headers:
        return 400, "a WebSocket's CONNECT has no body"
    return None


@implementer(IWebSocketTunnel, IConsumer, IPushProducer)
class H2WebSocket:
    """One extended CONNECT stream: admitted as an HTTP/1.1 upgrade, then the transport of
    the ws server's protocol."""

    protocol: Any = None     # the ws server's protocol, once it took the stream
    producer: Any = None     # what writes to us (registerProducer), paused when the buffer is full

    def __init__(self, connection: H2ServerConnection, stream_id: int, headers: dict[str, str], ended: bool):
        self.connection = connection
        self.h2 = connection.h2
        self.factory = connection.factory
        self.stream_id = stream_id
        self.headers = headers
        self.trace_id = next_trace_id()
        self.remote_ended = ended       # the client's END_STREAM has come
        self.inbound: list[tuple[bytes, int]] = []  # DATA the protocol has not read yet
        self.reading_paused = False     # the protocol asked us to stop (its exit is slow)
        self.reading_closed = False     # loseConnection: what comes is discarded
        self.producer_paused = False
        self.head_sent = False
        self.outbound = bytearray()
        self.end_pending = False        # END_STREAM once the buffer is out
        self.local_ended = False
        self.finished = False
        self.refused = False            # answered with a refusal: nothing more is read
        self.shown_target = ""
        self._linger: Any = None
        self._expiry: Any = None

    # ---- admission: the rules an HTTP/1.1 upgrade goes through

    def admit(self) -> None:
        headers, factory = self.headers, self.factory
        problem = request_problem(headers, self.remote_ended)
        if problem is not None:
            self.refuse(*problem)
            return
        refusal = admission.h2_authority(headers, self.connection.secure)
        if refusal is not None:
            self.refuse(400, refusal)
            return
        # the HTTP/1.1 request it stands for: its routes, guards and events take it alike
        headers[":method"], headers["upgrade"], headers["connection"] = "GET", PROTOCOL, "upgrade"
        self.shown_target = redact_target(headers[":path"], factory.secret_params)
        refusal = factory.access_control.refusal(headers)
        if refusal is not None:  # before the guard: cross-site WebSocket hijacking
            self.refuse(403, refusal)
            return
        admission.authorize_then(factory, headers, self.connection.transport, self.trace_id, self._route)

    def _route(self, authorization: Authorization) -> None:
        if self.finished:
            return  # reset or gone while the guard fetched keys
        factory, headers = self.factory, self.headers
        exit_ = admission.routed(factory, headers, authorization, "GET", self.shown_target, self.refuse)
        if exit_ is None:
            return
        session = authorization.session
        if not IHttpExit.providedBy(exit_):
            self.refuse(501, "the route's exit does not take WebSockets")
            return
        if factory.overrides:
            headers.update(factory.overrides)  # after routing: the exit sees the overridden request
        fields = {name: value for name, value in headers.items() if not name.startswith(":")}
        request = Request("CONNECT", headers[":path"], (2, 0), fields, shown_target=self.shown_target)
        try:
            extra = {} if authorization is NO_AUTHORIZATION else {"authorization": authorization}
            client = clientaddress.client_address(self.connection.transport.getPeer(), headers,
                                                  factory.trusted_proxies)
            taken = exit_.accept_request(request, headers, self, trace_id=self.trace_id,
                                         client_address=client, **extra)
        except HttpError as e:
            self.refuse(e.status, e.reason, e.headers)
            return
        except Exception:  # a bug must cost this stream, never the connection
            log.failure("zillatw: {binding} failed to route request {trace_id:016x}",
                        binding=factory.name, trace_id=self.trace_id)
            self.refuse(500, "internal error")
            return
        admission.emit_accepted(factory, self.trace_id, "GET", self.shown_target, headers, session)
        self.protocol = taken
        if session is not None and session.expires_at != math.inf:
            reactor = factory.reactor
            self._expiry = reactor.callLater(max(0.0, session.expires_at - reactor.seconds()), self._expired)
        taken.makeConnection(self)
        taken.take_over(request, b"")
        self._deliver()

    def _expired(self) -> None:
        self._expiry = None
        if IHttpConnection.providedBy(self.protocol):
            self.protocol.session_expired()  # the ws server closes with 1008
        else:
            self.abortConnection()

    def refuse(self, status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        """The gateway's own answer to the request (HTTP/1.1's refusal, on HEADERS)."""
        admission.emit_rejected(self.factory, self.trace_id, status, reason)
        self._answer(status, reason, headers)

    def _answer(self, status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        if self.finished or self.connection.closed or self.head_sent:
            return
        body = (reason + "\n").encode()
        self._send_head([(":status", str(status)), *((name.lower(), value) for name, value in headers),
                         ("content-type", "text/plain; charset=utf-8"), ("content-length", str(len(body)))])
        self.refused = True
        self.outbound += body
        self.loseConnection()

    # ---- IWebSocketTunnel: the ws server's answer

    def accept_websocket(self, protocol: str | None, extensions: str | None) -> None:
        fields = [(":status", "200")]
        if protocol is not None:
            fields.append(("sec-websocket-protocol", protocol))
        if extensions:
            fields.append(("sec-websocket-extensions", extensions))
        self._send_head(fields)
        self.flush()
        self.connection._write()

    def refuse_websocket(self, status: int, reason: str) -> None:
        self._answer(status, reason)

    def _send_head(self, fields: list[tuple[str, str]]) -> None:
        if self.finished or self.head_sent:
            return
        self.head_sent = True
        try:
            self.h2.send_headers(self.stream_id, fields)
        except h2.exceptions.ProtocolError as e:  # a value HTTP/2 cannot carry
            log.warn("zillatw: {binding} could not answer {trace_id:016x} over HTTP/2: {why}",
                     binding=self.factory.name, trace_id=self.trace_id, why=without_values(str(e)))
            self._reset(ErrorCodes.INTERNAL_ERROR)

    # ---- from the client (the connection calls these)

    def data_received(self, data: bytes, flow_length: int) -> None:
        if self.finished or self.reading_closed:
            self.h2.acknowledge_received_data(flow_length, self.stream_id)
            return
        self.inbound.append((data, flow_length))
        self._deliver()

    def request_ended(self) -> None:
        self.remote_ended = True
        self._deliver()

    def _deliver(self) -> None:
        """Hand the protocol what it may read; acknowledge it, so the client may send more."""
        protocol = self.protocol
        if protocol is None:
            return
        while self.inbound and not self.reading_paused and not self.finished and self.protocol is protocol:
            data, flow_length = self.inbound.pop(0)
            if flow_length and not self.connection.closed:
                self.h2.acknowledge_received_data(flow_length, self.stream_id)
            if data and not self.reading_closed:
                protocol.dataReceived(data)
        if self.remote_ended and not self.inbound and not self.finished:
            if self.local_ended:
                self._finish(clean=True)
            else:  # as a TCP peer's FIN: the protocol is done; our side ends once its buffer is out
                self._lost(clean=True)
                self.loseConnection()
        self.connection._write()

    def reset_by_peer(self) -> None:
        self._finish(clean=False)

    def connection_lost(self, why: str) -> None:
        self._finish(clean=False)

    # ---- the transport of the ws server's protocol

    def write(self, data: bytes) -> None:
        if self.finished or self.end_pending or not data:
            return
        self.outbound += data
        self.flush()
        self.connection._write()
        if len(self.outbound) > SEND_BOUND and self.producer is not None and not self.producer_paused:
            self.producer_paused = True
            self.producer.pauseProducing()

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def flush(self) -> None:
        """Send what the stream's and the connection's windows allow (the connection calls
        this when they open, or the socket drains)."""
        if self.finished or not self.head_sent or self.connection.socket_paused:
            return
        try:
            send_allowed(self.h2, self.stream_id, self.outbound)
            if not self.outbound and self.end_pending and not self.local_ended:
                self.h2.end_stream(self.stream_id)
                self.local_ended = True
                if self.remote_ended and not self.inbound:
                    self._finish(clean=True)
                    return
                if self.refused:  # answered: the client may stop (RFC 9113 §8.1), no need to wait
                    self._reset(ErrorCodes.NO_ERROR)
                    return
        except h2.exceptions.ProtocolError:  # the stream, or the whole connection, is closed
            self._finish(clean=False)
            return
        if self.producer_paused and len(self.outbound) <= SEND_BOUND // 2 and self.producer is not None:
            self.producer_paused = False
            self.producer.resumeProducing()

    def loseConnection(self) -> None:
        self.reading_closed = True
        self.loseWriteConnection()

    def loseWriteConnection(self) -> None:
        if self.finished or self.end_pending:
            return
        self.end_pending = True
        self._linger = self.factory.reactor.callLater(CLOSE_LINGER, self._linger_expired)
        self.flush()
        self.connection._write()

    def _linger_expired(self) -> None:
        self._linger = None
        self._reset(ErrorCodes.NO_ERROR if self.local_ended else ErrorCodes.CANCEL)

    def abortConnection(self) -> None:
        self._reset(ErrorCodes.CANCEL)

    def getPeer(self) -> Any:
        return self.connection.transport.getPeer()

    def getHost(self) -> Any:
        return self.connection.transport.getHost()

    # IConsumer: the ws relay's peer writes to us
    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        if self.producer_paused:
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self.producer = None

    # IPushProducer: the ws protocol pauses its reading
    def pauseProducing(self) -> None:
        self.reading_paused = True

    def resumeProducing(self) -> None:
        if self.reading_paused:
            self.reading_paused = False
            self._deliver()

    def stopProducing(self) -> None:
        self.abortConnection()

    # ---- the end

    def _reset(self, code: ErrorCodes) -> None:
        if self.finished:
            return
        try:
            self.h2.reset_stream(self.stream_id, code)
        except h2.exceptions.ProtocolError:  # the stream, or the whole connection, is closed
            pass
        self._finish(clean=False)
        self.connection._write()

    def _finish(self, clean: bool) -> None:
        if self.finished:
            return
        self.finished = True
        for call in (self._linger, self._expiry):
            if call is not None and call.active():
                call.cancel()
        self._linger = self._expiry = None
        if not self.connection.closed:
            for _, flow_length in self.inbound:  # unread data still fills the connection's window
                if flow_length:
                    self.h2.acknowledge_received_data(flow_length, self.stream_id)
        self.inbound.clear()
        self.outbound.clear()
        if not self.connection.closed:
            self.connection.stream_done(self)
        self._lost(clean)

    def _lost(self, clean: bool) -> None:
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            protocol.connectionLost(Failure(ConnectionDone() if clean else ConnectionLost()))
