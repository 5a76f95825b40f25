"""The http server's HTTP/2 connections (RFC 9113), on the `h2` library (sans-IO).

A connection becomes HTTP/2 when the tls server in front negotiated `h2` by ALPN, or, on
a cleartext connection of an http server whose `versions` include h2, when the client's
first bytes are the HTTP/2 preface (h2c with prior knowledge; the HTTP/1.1 `Upgrade: h2c`
is not served: such a request is an ordinary HTTP/1.1 one). Each stream is one plain
request: admitted by the same access control, guard and routes as an HTTP/1.1 request
(zillatw.bindings.http.admission) and handed to the route's IHttpRequestExit.

Flow control: a request's DATA is acknowledged (WINDOW_UPDATE) only once the exit has
taken it, so what a client may send unread is bounded by the windows we advertise; a
response waits in its stream's buffer (at most SEND_BOUND bytes, then the exit is paused)
while the peer's window or the socket is shut. CONNECT (and so WebSocket over HTTP/2,
RFC 8441) is answered 501; a route whose exit takes upgrades (a ws server) likewise.
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
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from zillatw.bindings.http import admission
from zillatw.bindings.http import plain as http_plain
from zillatw.bindings.http.auth import redact_target
from zillatw.guards import Authorization
from zillatw.stream import HttpHead, IHttpExchangeEnd, StreamRefused
from zillatw.telemetry.events import next_trace_id
from zillatw.wire.http1 import HttpError, check_host

if TYPE_CHECKING:
    from zillatw.bindings.http.binding import HttpServer

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_CONCURRENT_STREAMS = 100  # SETTINGS_MAX_CONCURRENT_STREAMS we advertise
STREAM_WINDOW = 65535         # SETTINGS_INITIAL_WINDOW_SIZE: bytes a stream may send unread
SEND_BOUND = 65536            # bytes of one response held while the window or socket is shut
# Fields that mean something only to an HTTP/1.1 connection (RFC 9113 §8.2.2): never sent
CONNECTION_SPECIFIC = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"})
NO_WEBSOCKET = "WebSocket over HTTP/2 (extended CONNECT, RFC 8441) is not supported: use HTTP/1.1"
log = Logger()


def is_h2_negotiated(transport: Any) -> bool:
    """Whether the TLS layer under `transport` negotiated h2 by ALPN."""
    negotiated = getattr(transport, "negotiatedProtocol", None)
    return negotiated == b"h2"


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
        self.streams: dict[int, H2Stream] = {}
        self.draining = False
        self.closed = False
        self.socket_paused = False
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config)
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: factory.max_header_bytes,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        # Settings given at construction are current at once, so h2 never sees them "acked"
        # and leaves its HPACK decoder at its own default: give it ours.
        self.h2.decoder.max_header_list_size = factory.max_header_bytes
        self._idle_timer: Any = None

    def start(self, received: bytes) -> None:
        self.factory.h2_connections.add(self)
        self.transport.registerProducer(self, True)
        self.h2.initiate_connection()
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
            self._close(f"HTTP/2 protocol error: {e}")
            return
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
        stream = H2Stream(self, stream_id, _header_dict(event.headers or []),
                          ended=event.stream_ended is not None)
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

    def stream_done(self, stream: "H2Stream") -> None:
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


@implementer(IHttpExchangeEnd)
class H2Stream:
    """One request on an HTTP/2 connection: the http server's end of its exchange with the
    exit (it takes the exit's response; the exit's end takes the request body)."""

    exit_end: Any = None
    end_delivered = False  # the exit has been told the request body is complete

    def __init__(self, connection: H2ServerConnection, stream_id: int, headers: dict[str, str], ended: bool):
        self.connection = connection
        self.h2 = connection.h2
        self.factory = connection.factory
        self.stream_id = stream_id
        self.headers = headers
        self.trace_id = next_trace_id()
        self.ended = ended              # the client's END_STREAM has come
        self.inbound: list[tuple[bytes, int]] = []  # body pieces the exit has not taken yet
        self.received = 0
        self.paused_by_exit = False
        self.exit_paused = False        # we paused the exit: its response waits for the window
        self.head_sent = False
        self.no_body = headers.get(":method") == "HEAD"
        self.outbound = bytearray()
        self.end_pending = False
        self.finished = False           # nothing more is written on this stream
        reactor = self.factory.reactor
        self._last_progress = reactor.seconds()
        self._stall_timer: Any = None
        if not ended:  # as HTTP/1.1's body-timeout: a body that stops coming costs its stream
            self._stall_timer = reactor.callLater(self.factory.body_timeout, self._body_stalled)

    # ---- admission: the same rules as an HTTP/1.1 request

    def admit(self) -> None:
        headers, factory = self.headers, self.factory
        method, path = headers.get(":method", ""), headers.get(":path", "")
        if method == "CONNECT":
            self.refuse(501, NO_WEBSOCKET if ":protocol" in headers else "CONNECT is not supported")
            return
        if not path.startswith("/"):
            self.refuse(400, "the :path must be an absolute path")
            return
        authority = headers.get(":authority") or headers.get("host")
        try:
            check_host(authority)
        except HttpError as e:
            self.refuse(e.status, e.reason.replace("the Host header", "the :authority"))
            return
        headers.pop("host", None)
        if authority:
            headers[":authority"] = admission.authority_with_port(authority, self.connection.secure)
        headers[":scheme"] = "https" if self.connection.secure else "http"  # what carried it, as HTTP/1.1's
        self.shown_target = redact_target(path, factory.secret_params)
        refusal = factory.access_control.refusal(headers)
        if refusal is not None:
            self.refuse(403, refusal)
            return
        if factory.access_control.is_preflight(headers):
            status, cors = factory.access_control.preflight(headers)
            if status != 204:
                self.refuse(403, "the preflight request is not allowed by the access-control policy")
                return
            self._send_head([(":status", "204"), *((name.lower(), value) for name, value in cors)], end=True)
            return
        authorization = admission.authorize(factory, headers, self.connection.transport, self.trace_id)
        if isinstance(authorization, Deferred):
            authorization.addCallback(self._route)  # the body waits unacknowledged meanwhile
        else:
            self._route(authorization)

    def _route(self, authorization: Authorization) -> None:
        if self.finished:
            return  # reset or gone while the guard fetched keys
        factory, headers = self.factory, self.headers
        session = authorization.session
        exit_ = factory.route(headers, session)
        if exit_ is None:
            self.refuse(*admission.no_route(authorization, headers[":method"], self.shown_target))
            return
        if not http_plain.is_plain_exit(exit_):
            self.refuse(501, NO_WEBSOCKET)
            return
        if factory.overrides:
            headers.update(factory.overrides)
        length_field = headers.get("content-length")
        if self.ended:
            length: int | None = 0
        elif length_field is not None and length_field.isdigit():
            length = int(length_field)
        else:
            length = None
        limit = factory.max_request_body
        if limit is not None and length is not None and length > limit:
            self.refuse(413, f"the request body exceeds {limit} bytes")
            return
        admission.emit_accepted(factory, self.trace_id, headers[":method"], self.shown_target, headers, session)
        try:
            self.exit_end = exit_.open_request(http_plain.request_head(headers, length), self, self.trace_id)
        except StreamRefused as e:
            self.refuse(e.status, e.reason, detail=e.detail)
            return
        except Exception:  # a bug must cost this request, never the connection
            log.failure("zillatw: {binding} failed to open request {trace_id:016x}",
                        binding=factory.name, trace_id=self.trace_id)
            self.refuse(500, "internal error")
            return
        self._deliver()

    # ---- the request body

    def data_received(self, data: bytes, flow_length: int) -> None:
        if self.finished:
            self.h2.acknowledge_received_data(flow_length, self.stream_id)
            return
        self.received += len(data)
        self._last_progress = self.factory.reactor.seconds()
        limit = self.factory.max_request_body
        if limit is not None and self.received > limit:
            if self.exit_end is not None:
                self.exit_end.exchange_abort(413, "request body too large", "")
            self.h2.acknowledge_received_data(flow_length, self.stream_id)
            self.refuse(413, f"the request body exceeds {limit} bytes")
            return
        self.inbound.append((data, flow_length))
        self._deliver()

    def request_ended(self) -> None:
        self.ended = True
        self._cancel_stall_timer()
        self._deliver()

    def _body_stalled(self) -> None:
        self._stall_timer = None
        if self.ended or self.finished:
            return
        reactor, timeout = self.factory.reactor, self.factory.body_timeout
        remaining = self._last_progress + timeout - reactor.seconds()
        if self.paused_by_exit or self.inbound or remaining > 0:  # the wait is ours, not the client's
            self._stall_timer = reactor.callLater(timeout if remaining <= 0 else remaining, self._body_stalled)
            return
        if self.exit_end is not None and not self.end_delivered:
            self.exit_end.exchange_abort(408, "the request body stalled", "")
            self.exit_end = None
        self.refuse(408, f"request body stalled for {timeout:g} s")

    def _cancel_stall_timer(self) -> None:
        if self._stall_timer is not None:
            if self._stall_timer.active():
                self._stall_timer.cancel()
            self._stall_timer = None

    def _deliver(self) -> None:
        """Hand the exit what it may take; acknowledge it, so the client may send more."""
        exit_end = self.exit_end
        if exit_end is None:
            return
        while self.inbound and not self.paused_by_exit and not self.finished and self.exit_end is exit_end:
            data, flow_length = self.inbound.pop(0)
            if data:
                exit_end.exchange_data(data)
            if flow_length and not self.connection.closed:
                self.h2.acknowledge_received_data(flow_length, self.stream_id)
        if self.ended and not self.inbound and not self.paused_by_exit and not self.end_delivered \
                and self.exit_end is exit_end:
            self.end_delivered = True
            exit_end.exchange_end()
        self.connection._write()

    # IPushProducer: the exit pauses the request body
    def pauseProducing(self) -> None:
        self.paused_by_exit = True

    def resumeProducing(self) -> None:
        self.paused_by_exit = False
        self._deliver()

    def stopProducing(self) -> None:
        """Nothing to stop: the exit ends the exchange with exchange_abort."""

    # ---- IHttpExchangeEnd: the response

    def exchange_head(self, head: HttpHead) -> None:
        if self.finished or self.head_sent:
            return
        fields = head.headers
        status = int(fields.get(":status", "200"))
        names = [name for name in fields if not name.startswith(":") and name not in CONNECTION_SPECIFIC]
        response = [(":status", str(status)), *((name, fields[name]) for name in names if name != "content-length")]
        response += [(name.lower(), value) for name, value in
                     self.factory.access_control.response_headers(self.headers, names)]
        bodiless = status in (204, 304) or status < 200
        if head.length is not None and not bodiless:
            response.append(("content-length", str(head.length)))
        self.no_body = self.no_body or bodiless
        self._send_head(response, end=False)

    def exchange_data(self, data: bytes) -> None:
        if self.finished or self.no_body or not data:
            return
        self.outbound += data
        self.connection.flush()
        if len(self.outbound) > SEND_BOUND and not self.exit_paused and self._producer() is not None:
            self.exit_paused = True
            self._producer().pauseProducing()

    def exchange_end(self) -> None:
        if self.finished:
            return
        if not self.head_sent:
            self.exchange_head(HttpHead({":status": "200"}, 0))
        self.end_pending = True
        self.connection.flush()

    def exchange_abort(self, status: int, reason: str, detail: str) -> None:
        if self.finished:
            return
        self.exit_end = None  # it told us: it needs no word back
        if not self.head_sent:
            self.refuse(status, reason, detail=detail)
        else:
            self._reset(ErrorCodes.INTERNAL_ERROR)  # the response has started: the client sees it cut off

    def _producer(self) -> Any:
        return self.exit_end

    def flush(self) -> None:
        """Send what the stream's and connection's windows allow (called by the connection)."""
        if self.finished or not self.head_sent:
            return
        try:
            while self.outbound:
                size = min(len(self.outbound), self.h2.local_flow_control_window(self.stream_id),
                           self.h2.max_outbound_frame_size)
                if size <= 0:
                    break
                self.h2.send_data(self.stream_id, bytes(self.outbound[:size]))
                del self.outbound[:size]
            if not self.outbound and self.end_pending:
                self.h2.end_stream(self.stream_id)
                if not self.ended:  # answered before the body came: the client may stop (RFC 9113 §8.1)
                    self.h2.reset_stream(self.stream_id, ErrorCodes.NO_ERROR)
                self._done()
        except h2.exceptions.StreamClosedError:
            self._done()
            return
        if self.exit_paused and len(self.outbound) <= SEND_BOUND // 2 and not self.connection.socket_paused:
            self.exit_paused = False
            producer = self._producer()
            if producer is not None:
                producer.resumeProducing()

    def _send_head(self, fields: list[tuple[str, str]], end: bool) -> None:
        self.head_sent = True
        try:
            self.h2.send_headers(self.stream_id, fields, end_stream=end)
        except h2.exceptions.ProtocolError as e:  # a field HTTP/2 cannot carry (from upstream)
            log.warn("zillatw: {binding} could not send response {trace_id:016x} over HTTP/2: {why}",
                     binding=self.factory.name, trace_id=self.trace_id, why=str(e))
            self._reset(ErrorCodes.INTERNAL_ERROR)
            return
        if end:
            self._done()
        self.connection._write()

    def refuse(self, status: int, reason: str, headers: tuple[tuple[str, str], ...] = (), detail: str = "") -> None:
        """The gateway's own short answer on this stream; `detail` only in the event."""
        admission.emit_rejected(self.factory, self.trace_id, status, reason, detail)
        if self.finished or self.connection.closed:
            return
        if self.head_sent:
            self._reset(ErrorCodes.INTERNAL_ERROR)
            return
        body = (reason + "\n").encode()
        self.outbound = bytearray(body)
        self.end_pending = True
        self.no_body = False
        self._send_head([(":status", str(status)), *((name.lower(), value) for name, value in headers),
                         ("content-type", "text/plain; charset=utf-8"), ("content-length", str(len(body)))],
                        end=False)
        self.connection.flush()

    def _reset(self, code: ErrorCodes) -> None:
        if not self.finished:
            try:
                self.h2.reset_stream(self.stream_id, code)
            except h2.exceptions.StreamClosedError:
                pass
            self._release_inbound()
            self._done()
            self.connection._write()

    def _release_inbound(self) -> None:
        """Body pieces never delivered still count against the connection's window."""
        for _, flow_length in self.inbound:
            if flow_length:
                self.h2.acknowledge_received_data(flow_length, self.stream_id)
        self.inbound.clear()

    def _done(self) -> None:
        self._cancel_stall_timer()
        if not self.finished:
            self.finished = True
            self.outbound.clear()
            self._release_inbound()
            self.connection.stream_done(self)

    def reset_by_peer(self) -> None:
        self.connection_lost("the client reset the stream")

    def connection_lost(self, why: str) -> None:
        self._cancel_stall_timer()
        producer = self._producer()
        was_finished = self.finished
        self.finished = True
        if not self.connection.closed:
            self._release_inbound()  # a reset stream's unread data still fills the connection's window
        self.inbound.clear()
        self.outbound.clear()
        self.connection.streams.pop(self.stream_id, None)
        if not was_finished and producer is not None and not self.end_delivered:
            producer.exchange_abort(502, why, "")
        if not self.connection.streams and not self.connection.closed:
            self.connection.stream_done(self)
