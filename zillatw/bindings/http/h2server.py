"""The http server's HTTP/2 connections (RFC 9113), on the `h2` library (sans-IO).

A connection becomes HTTP/2 when the tls server in front negotiated `h2` by ALPN, or, on
a cleartext connection of an http server whose `versions` include h2, when the client's
first bytes are the HTTP/2 preface (h2c with prior knowledge; the HTTP/1.1 `Upgrade: h2c`
is not served: such a request is an ordinary HTTP/1.1 one). Each stream is one plain
request or one WebSocket: admitted by the same access control, guard and routes as an
HTTP/1.1 request (zillatw.bindings.http.admission) and handed to the route's exit.

A plain request's stream is a zillatw.bindings.http.h2stream.H2Stream, which keeps flow control: a
request's DATA is acknowledged (WINDOW_UPDATE) only once the exit has taken it, so what a
client may send unread is bounded by the windows we advertise; a response waits in its
stream's buffer (at most SEND_BOUND bytes, then the exit is paused) while the peer's window
or the socket is shut. A WebSocket comes as an extended CONNECT (RFC 8441; we advertise
SETTINGS_ENABLE_CONNECT_PROTOCOL): its stream is a zillatw.bindings.http.h2websocket.H2WebSocket,
admitted as an HTTP/1.1 upgrade and then the transport of the ws server's protocol. Any other
CONNECT is answered 501.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from zillatw.bindings.http import admission
from zillatw.bindings.http.auth import without_values
from zillatw.bindings.http.h2stream import H2Stream
from zillatw.bindings.http.h2websocket import H2WebSocket, is_websocket
from zillatw.telemetry.events import next_trace_id
from zillatw.twistedcompat import H2ServerConnectionCore

if TYPE_CHECKING:
    from zillatw.bindings.http.binding import HttpServer, HttpServerProtocol

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_CONCURRENT_STREAMS = 100  # SETTINGS_MAX_CONCURRENT_STREAMS we advertise
STREAM_WINDOW = 65535         # SETTINGS_INITIAL_WINDOW_SIZE: bytes a stream may send unread
CONNECTION_WINDOW = 1 << 20   # bytes all of a connection's streams may send unread


def is_h2_negotiated(transport: Any) -> bool:
    """Whether the TLS layer under `transport` negotiated h2 by ALPN."""
    negotiated = getattr(transport, "negotiatedProtocol", None)
    return negotiated == b"h2"


def sniff(protocol: "HttpServerProtocol", first: bytes) -> tuple[bytes | None, bytes]:
    """An http server connection's first bytes when it may be h2c: (still sniffing, b"") while
    they may be the preface, (None, b"") once handed to HTTP/2 or refused, else (None, the
    bytes to read as HTTP/1.1). At most the preface's 24 bytes are held."""
    if len(first) < len(PREFACE) and PREFACE.startswith(first):
        return first, b""
    if first.startswith(PREFACE):
        protocol._speak_h2(first)
        return None, b""
    if "http/1.1" not in protocol.factory.versions:
        protocol._refuse(505, "this server speaks HTTP/2 only")
        return None, b""
    return None, first


def take_over(protocol: "HttpServerProtocol", received: bytes) -> None:
    """Make `protocol`'s connection HTTP/2: its reads and its end go to the HTTP/2
    connection from now on (as a ws server takes an upgrade)."""
    transport = protocol.transport
    connection = H2ServerConnection(protocol.factory, transport, ISSLTransport.providedBy(transport))
    protocol.taken_by(connection)
    connection.start(received)


def _header_dict(fields: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """Lower-cased names (h2 already refuses upper case); repeated fields joined as HTTP/1.1
    would (cookie crumbs with '; ', RFC 9113 §8.2.3)."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in fields:
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        if name in headers:
            headers[name] += ("; " if name == "cookie" else ", ") + value
        else:
            headers[name] = value
    return headers


@implementer(IPushProducer)
class H2ServerConnection:
    """One HTTP/2 connection: the protocol whose dataReceived / connectionLost the http
    server's connection takes once it knows the client speaks h2. It is the transport's
    producer: when the socket's buffer is full, no stream's response is written on."""

    def __init__(self, factory: "HttpServer", transport: Any, secure: bool):
        self.factory = factory
        self.transport = transport
        self.secure = secure
        self.streams: dict[int, H2Stream | H2WebSocket] = {}
        self.draining = False
        self.closed = False
        self.socket_paused = False
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = H2ServerConnectionCore(config)
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: factory.max_header_bytes,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            # always: without a ws route an extended CONNECT gets what an HTTP/1.1 upgrade gets
            h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1,
        })
        # Settings given at construction are current at once, so h2 never sees them "acked"
        # and leaves its HPACK decoder at its own default: give it ours.
        self.h2.decoder.max_header_list_size = factory.max_header_bytes
        self._idle_timer: Any = None

    def start(self, received: bytes) -> None:
        self.factory.h2_connections.add(self)
        self.transport.registerProducer(self, True)
        self.h2.initiate_connection()
        # A stream's DATA is acknowledged only as its exit takes it: with the default 64 KiB
        # connection window one stalled exit would stop every stream of the connection (a
        # proxy in front multiplexes many users on one); this way it holds its own stream's.
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - self.h2.inbound_flow_control_window)
        self._write()
        self._arm_idle()
        if self.factory.shutting_down:
            self.going_away()
        if received:
            self.dataReceived(received)

    # ---- the socket

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            # h2 has queued the GOAWAY naming the error: send it, then close
            self._close(f"HTTP/2 protocol error: {without_values(str(e))}")
            return
        for stream_id, why in self.h2.malformed:
            admission.emit_rejected(self.factory, next_trace_id(), 400,
                                    f"malformed request on stream {stream_id}: {without_values(why)}")
        self.h2.malformed.clear()
        for event in events:
            if self.closed:
                return
            self._handle(event)
        self._write()

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._open(event)
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:  # a stream we reset: its data still counts against the window
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            else:
                stream.data_received(event.data or b"", event.flow_controlled_length)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.request_ended()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.reset_by_peer()
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self.flush()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._close("the client sent GOAWAY")

    def _open(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        if self.draining:
            self.h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        headers, ended = _header_dict(event.headers or []), event.stream_ended is not None
        kind = H2WebSocket if is_websocket(headers) else H2Stream
        stream = kind(self, stream_id, headers, ended=ended)
        self.streams[stream_id] = stream
        self._disarm_idle()
        stream.admit()

    def _write(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.transport.write(data)

    def flush(self) -> None:
        """Write what the windows now allow, stream by stream."""
        if self.socket_paused or self.closed:
            return
        for stream in list(self.streams.values()):
            stream.flush()
        self._write()

    def stream_done(self, stream: "H2Stream | H2WebSocket") -> None:
        self.streams.pop(stream.stream_id, None)
        if not self.streams:
            if self.draining:
                self._close("")
            else:
                self._arm_idle()

    # ---- IPushProducer: the socket's buffer

    def pauseProducing(self) -> None:
        self.socket_paused = True

    def resumeProducing(self) -> None:
        self.socket_paused = False
        self.flush()

    def stopProducing(self) -> None:
        """The transport is going: connectionLost follows."""

    # ---- timeouts and shutdown

    def _arm_idle(self) -> None:
        self._disarm_idle()
        self._idle_timer = self.factory.reactor.callLater(self.factory.idle_timeout, self._idle_timed_out)

    def _disarm_idle(self) -> None:
        if self._idle_timer is not None:
            if self._idle_timer.active():
                self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_timed_out(self) -> None:
        self._idle_timer = None
        self.h2.close_connection(ErrorCodes.NO_ERROR)
        self._close("")

    def going_away(self) -> None:
        """Shutdown: GOAWAY naming the last stream we take; those open are served, then the
        connection closes."""
        if self.draining or self.closed:
            return
        self.draining = True
        # Written by hand: h2's close_connection would close its state machine, and the
        # streams GOAWAY lets finish (RFC 9113 §6.8) could then neither send nor receive.
        self._write()
        self.transport.write(GoAwayFrame(0, last_stream_id=self.h2.highest_inbound_stream_id,
                                         error_code=ErrorCodes.NO_ERROR).serialize())
        if not self.streams:
            self._close("")

    def _close(self, why: str) -> None:
        if self.closed:
            return
        self._write()
        self.closed = True
        self._disarm_idle()
        self.factory.h2_connections.discard(self)
        self.transport.loseConnection()
        self._abort_streams(why or "the connection closed")

    def abort(self) -> None:
        self.closed = True
        self.transport.abortConnection()

    def _abort_streams(self, why: str) -> None:
        streams, self.streams = list(self.streams.values()), {}
        for stream in streams:
            stream.connection_lost(why)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed = True
        self._disarm_idle()
        self.factory.h2_connections.discard(self)
        self._abort_streams("the client went away")
