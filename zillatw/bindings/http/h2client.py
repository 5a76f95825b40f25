"""The http client's plain requests over HTTP/2 (`options.versions: [h2]` on the http
client): each upstream (exit and authority) gets one HTTP/2 connection of its tcp or tls
client (h2 with prior knowledge; the tls client must negotiate h2 by ALPN), and each request
is one stream on it.

- Streams open up to the upstream's SETTINGS_MAX_CONCURRENT_STREAMS; more requests wait in
  order (at most clientlimits.MAX_WAITING, then 503). A connection the upstream ends (GOAWAY, close)
  is replaced by a new one for the requests that come after.
- Flow control both ways: the request body goes as the upstream's windows allow (at most
  SEND_BOUND bytes wait per stream, then the http server's side is paused); the response's
  DATA is acknowledged only once the http server's side has taken it (its pause holds it).
- 502 when the upstream cannot be reached, resets the stream or goes away before the
  response head; 504 when the head does not come within `response-timeout`.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from h2.errors import ErrorCodes
from twisted.internet import error
from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from zillatw.bindings.http.auth import without_values
from zillatw.bindings.http.clientlimits import MAX_POOLS, MAX_WAITING
from zillatw.bindings.http.h2flow import send_allowed
from zillatw.stream import HttpHead, IHttpExchangeEnd, StreamRefused
from zillatw.wire.http1body import end_to_end_headers

if TYPE_CHECKING:
    from zillatw.bindings.http.client import Forwarder

SEND_BOUND = 65536  # bytes of one request body held while the upstream's window is shut
CONNECTION_WINDOW = 1 << 20  # bytes of responses the upstream may send unacknowledged, all streams
CONNECTION_SPECIFIC = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade",
                                 "host", "te"})


def open_h2(forwarder: "Forwarder", key: tuple[int, str], exit_: Any, authority: str, head: HttpHead,
            peer: IHttpExchangeEnd) -> "H2UpstreamExchange":
    """A request forwarded as a stream of the upstream's connection (opened when there is none)."""
    h2_pool = pool_of(forwarder, key, exit_, authority)
    exchange = H2UpstreamExchange(h2_pool, head, peer)
    try:
        h2_pool.acquire(exchange)
    except StreamRefused:
        exchange.finished = True
        exchange._cancel_timer()
        raise
    return exchange


def pool_of(forwarder: "Forwarder", key: tuple[int, str], exit_: Any, authority: str) -> "H2UpstreamPool":
    """The upstream's pool, made when it has none (at most MAX_POOLS: unused ones go first)."""
    h2_pool = forwarder.h2_pools.get(key)
    if h2_pool is None:
        if len(forwarder.h2_pools) >= MAX_POOLS:
            for unused in [k for k, p in forwarder.h2_pools.items() if p.total == 0]:
                del forwarder.h2_pools[unused]
            if len(forwarder.h2_pools) >= MAX_POOLS:
                raise StreamRefused(503, "too many upstreams in use")
        h2_pool = forwarder.h2_pools[key] = H2UpstreamPool(forwarder, exit_, authority, MAX_WAITING)
    return h2_pool


class H2UpstreamPool:
    """One upstream's HTTP/2 connection and the requests waiting for a stream on it."""

    def __init__(self, forwarder: "Forwarder", exit_: Any, authority: str, max_waiting: int):
        self.forwarder = forwarder
        self.max_waiting = max_waiting
        self.exit = exit_
        self.authority = authority
        self.connection: H2UpstreamConnection | None = None
        self.connecting: Any = None
        self.waiting: deque[H2UpstreamExchange] = deque()
        self.opened = 0  # connections ever opened (tests count reuse by it)

    @property
    def total(self) -> int:
        return 1 if self.connection is not None or self.connecting is not None else 0

    def acquire(self, exchange: "H2UpstreamExchange") -> None:
        connection = self.connection
        if connection is not None and connection.can_open():
            connection.open_stream(exchange)
            return
        if len(self.waiting) >= self.max_waiting:
            raise StreamRefused(503, "too many requests waiting for the upstream")
        self.waiting.append(exchange)
        self.serve_waiting()  # connects when there is no usable connection

    def _connect(self) -> None:
        self.opened += 1
        factory = _H2Factory(self)
        limits = self.forwarder.limits
        self.connecting = self.exit.connect(factory, self.authority, limits.connect_timeout)

        def connected(_: Any) -> None:
            self.connecting = None
            connection = factory.connection
            if connection is None or connection.lost:
                self._fail_waiting(502, "the upstream could not be reached", "closed while connecting")
                return
            negotiated = getattr(connection.transport, "negotiatedProtocol", None)
            if negotiated not in (None, b"h2"):  # the tls client's ALPN chose another protocol
                self.forwarder.spoken.pop((id(self.exit), self.authority), None)  # both versions: learn anew
                connection.close(True)
                self._fail_waiting(502, "the upstream does not speak HTTP/2", f"ALPN chose {negotiated!r}")
                return
            self.connection = connection
            connection.start()
            self.serve_waiting()

        def failed(failure: Failure) -> None:
            self.connecting = None
            if failure.check(CancelledError):
                return
            timed_out = failure.check(TimeoutError, error.TimeoutError)
            self._fail_waiting(504 if timed_out else 502,
                               "the upstream did not answer in time" if timed_out
                               else "the upstream could not be reached", failure.getErrorMessage())
        self.connecting.addCallbacks(connected, failed)

    def _fail_waiting(self, status: int, reason: str, detail: str) -> None:
        waiting, self.waiting = self.waiting, deque()
        for exchange in waiting:
            exchange.upstream_failed(status, reason, detail)

    def serve_waiting(self) -> None:
        connection = self.connection
        while self.waiting and connection is not None and connection.can_open():
            exchange = self.waiting.popleft()
            if not exchange.finished:
                connection.open_stream(exchange)
        if self.waiting and (connection is None or connection.going or connection.lost) and self.connecting is None:
            self.connection = None
            self._connect()

    def lost(self, connection: "H2UpstreamConnection") -> None:
        if self.connection is connection:
            self.connection = None
        if self.waiting and self.connecting is None:
            self._connect()

    def adopt(self, undecided: Any) -> None:
        """A connection made before its version was known (clientversions), now HTTP/2."""
        connection = H2UpstreamConnection(self)
        undecided.become(connection)
        self.opened += 1
        self.connection = connection
        connection.start()
        undecided.replay()

    def adopt_upgraded(self, undecided: Any, prepared: h2.connection.H2Connection, head: HttpHead,
                       peer: IHttpExchangeEnd, rest: bytes) -> "H2UpstreamExchange":
        """A connection the upstream switched to HTTP/2 (h2c, clientversions): `prepared` made
        its upgrade request's HTTP2-Settings, and that request (sent whole) is stream 1."""
        connection = H2UpstreamConnection(self)
        connection.h2 = prepared
        undecided.become(connection)
        self.opened += 1
        self.connection = connection
        exchange = H2UpstreamExchange(self, head, peer)
        exchange.connection, exchange.stream_id = connection, 1
        exchange.request_done = exchange.end_sent = True
        connection.streams[1] = exchange
        connection._disarm_idle()
        connection.start(upgraded=True)
        peer.resumeProducing()
        if rest:
            connection.dataReceived(rest)
        return exchange

    def forget(self, exchange: "H2UpstreamExchange") -> None:
        if exchange in self.waiting:
            self.waiting.remove(exchange)

    def close(self, abort: bool = False) -> None:
        if self.connecting is not None:
            self.connecting.cancel()
        connection = self.connection
        if connection is not None:
            connection.close(abort or not connection.streams)


class _H2Factory(Factory):
    noisy = False

    def __init__(self, pool: H2UpstreamPool):
        self.pool = pool
        self.connection: H2UpstreamConnection | None = None

    def buildProtocol(self, addr: Any) -> "H2UpstreamConnection":
        self.connection = H2UpstreamConnection(self.pool)
        return self.connection


class H2UpstreamConnection(Protocol):
    """One HTTP/2 connection upstream; closed when idle for the client's `idle-timeout`."""

    transport: Any
    lost = False
    going = False  # the upstream sent GOAWAY, or we are shutting down: no new streams

    def __init__(self, pool: H2UpstreamPool):
        self.pool = pool
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.streams: dict[int, H2UpstreamExchange] = {}
        self._idle_timer: Any = None

    def connectionMade(self) -> None:
        self._arm_idle()

    def start(self, upgraded: bool = False) -> None:
        """Connected (TLS included): the preface goes now. Written from connectionMade, under
        a tls client it could land behind the first request (a tls client's connection is
        made before its handshake, and the handshake's end is when requests start). An
        upgraded connection's preface was prepared with its upgrade request's settings."""
        if not upgraded:
            self.h2.initiate_connection()
        # Response DATA is acknowledged only as each client takes it: with the default 64 KiB
        # connection window one slow client would stall every stream; with this one it holds
        # at most its own stream's window (64 KiB) of the connection's.
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - self.h2.inbound_flow_control_window)
        self.write()

    def can_open(self) -> bool:
        return (not self.lost and not self.going
                and len(self.streams) < self.h2.remote_settings.max_concurrent_streams)

    def open_stream(self, exchange: "H2UpstreamExchange") -> None:
        self._disarm_idle()
        stream_id = self.h2.get_next_available_stream_id()
        self.streams[stream_id] = exchange
        exchange.attach(self, stream_id)

    def write(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.lost:
            self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            self.write()
            self._fail_all(502, "the upstream's response was not valid HTTP/2", without_values(str(e)))
            self.transport.abortConnection()
            return
        for event in events:
            exchange = self.streams.get(getattr(event, "stream_id", 0) or 0)
            if isinstance(event, h2.events.ResponseReceived) and exchange is not None:
                exchange.response_head(event.headers or [], event.stream_ended is not None)
            elif isinstance(event, h2.events.DataReceived):
                if exchange is None:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                else:
                    exchange.response_data(event.data or b"", event.flow_controlled_length)
            elif isinstance(event, h2.events.StreamEnded) and exchange is not None:
                exchange.response_end()
            elif isinstance(event, h2.events.StreamReset) and exchange is not None:
                exchange.upstream_failed(502, "the upstream reset the request", f"RST_STREAM {event.error_code!s}")
            elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                for waiting in list(self.streams.values()):
                    waiting.flush()
                self.pool.serve_waiting()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.going = True
                last = event.last_stream_id if event.last_stream_id is not None else 0
                for stream_id, later in list(self.streams.items()):
                    if stream_id > last:  # never processed: the upstream says so (RFC 9113 §6.8)
                        later.upstream_failed(502, "the upstream went away", "GOAWAY")
                if not self.streams:
                    self.close(True)
                self.pool.serve_waiting()
        self.write()

    def stream_done(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        if not self.streams:
            if self.going or self.pool.forwarder.closing:
                self.close(True)
            else:
                self._arm_idle()
        self.pool.serve_waiting()

    def _arm_idle(self) -> None:
        self._disarm_idle()
        forwarder = self.pool.forwarder
        self._idle_timer = forwarder.reactor.callLater(forwarder.limits.idle_timeout, self.close, True)

    def _disarm_idle(self) -> None:
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None

    def close(self, now: bool) -> None:
        """Close when `now`, else after the open streams (shutdown)."""
        self.going = True
        if now and not self.lost:
            self._disarm_idle()
            self.h2.close_connection()
            self.write()
            self.transport.loseConnection()

    def _fail_all(self, status: int, reason: str, detail: str) -> None:
        for exchange in list(self.streams.values()):
            exchange.upstream_failed(status, reason, detail)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = True
        self._disarm_idle()
        self._fail_all(502, "the upstream closed the connection before its response was complete",
                       reason.getErrorMessage() if reason is not None else "closed")
        self.pool.lost(self)


@implementer(IHttpExchangeEnd)
class H2UpstreamExchange:
    """The http client's end of one request over HTTP/2: it takes the request's body from
    the http server (its `peer`) and sends the upstream's response to it."""

    validated = False  # its peer checks the response (validation.CheckedResponse)

    def __init__(self, pool: H2UpstreamPool, head: HttpHead, peer: IHttpExchangeEnd):
        self.pool = pool
        self.head = head
        self.peer = peer
        self.connection: H2UpstreamConnection | None = None
        self.stream_id = 0
        self.outbound = bytearray()
        self.request_done = False
        self.end_sent = False
        self.response_started = False
        self.finished = False
        self.peer_paused = False  # we paused the http server's side: its body waits for the window
        self.client_paused = False  # the http server's side cannot take more response
        self.unacked: list[int] = []
        reactor = pool.forwarder.reactor
        self._reactor = reactor
        self._timer: Any = reactor.callLater(pool.forwarder.limits.response_timeout, self._timed_out)
        peer.pauseProducing()  # until there is a stream to send the body on

    def attach(self, connection: H2UpstreamConnection, stream_id: int) -> None:
        self.connection, self.stream_id = connection, stream_id
        headers = self.head.headers
        fields = [(":method", headers[":method"]), (":scheme", headers.get(":scheme", "https")),
                  (":authority", headers[":authority"]), (":path", headers[":path"])]
        fields += [(name, value) for name, value in end_to_end_headers(headers).items()
                   if not name.startswith(":") and name not in CONNECTION_SPECIFIC]
        if self.head.length is not None and (self.head.length or headers[":method"] in ("POST", "PUT", "PATCH")):
            fields.append(("content-length", str(self.head.length)))
        try:
            connection.h2.send_headers(stream_id, fields, end_stream=self.request_done and not self.outbound)
        except h2.exceptions.ProtocolError as e:
            self.upstream_failed(502, "the request cannot be sent over HTTP/2", without_values(str(e)))
            return
        self.end_sent = self.request_done and not self.outbound
        self.flush()
        connection.write()
        if not self.peer_paused:
            self.peer.resumeProducing()

    # ---- the request body, from the http server's side

    def exchange_head(self, head: HttpHead) -> None:
        """Only a server's end takes a response head."""

    def exchange_data(self, data: bytes) -> None:
        if self.finished or not data:
            return
        self.outbound += data
        if self.connection is not None:
            self.flush()
            self.connection.write()
        if len(self.outbound) > SEND_BOUND and not self.peer_paused:
            self.peer_paused = True
            self.peer.pauseProducing()

    def exchange_end(self) -> None:
        if self.finished:
            return
        self.request_done = True
        if self.connection is not None:
            self.flush()
            self.connection.write()

    def flush(self) -> None:
        connection = self.connection
        if connection is None or self.finished or self.end_sent:
            return
        h2conn = connection.h2
        try:
            send_allowed(h2conn, self.stream_id, self.outbound)
            if self.request_done and not self.outbound:
                h2conn.end_stream(self.stream_id)
                self.end_sent = True
        except h2.exceptions.ProtocolError:  # the stream, or the whole connection, is closed
            return
        if self.peer_paused and len(self.outbound) <= SEND_BOUND // 2:
            self.peer_paused = False
            self.peer.resumeProducing()

    def exchange_abort(self, status: int, reason: str, detail: str) -> None:
        """The client went away (or its request broke): the stream is reset."""
        if not self.finished:
            self._finish(reset=True)

    # ---- the response, from the upstream

    def response_head(self, fields: list[tuple[bytes, bytes]], ended: bool) -> None:
        headers: dict[str, str] = {}
        for raw_name, raw_value in fields:
            name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        status = headers.get(":status", "")
        if status.startswith("1"):
            return  # an interim answer: the final one follows
        self.response_started = True
        self._cancel_timer()
        length_field = headers.pop("content-length", None)
        if ended:
            length: int | None = 0
        elif length_field is not None and length_field.isdigit() and self.head.headers[":method"] != "HEAD":
            length = int(length_field)
        else:
            length = None
        response = {":status": status, **{n: v for n, v in headers.items() if not n.startswith(":")}}
        self.peer.exchange_head(HttpHead(response, length if self.head.headers[":method"] != "HEAD" else 0))

    def response_data(self, data: bytes, flow_length: int) -> None:
        if self.finished:
            return
        if data:
            self.peer.exchange_data(data)
        if self.client_paused:
            self.unacked.append(flow_length)
        elif self.connection is not None:
            self.connection.h2.acknowledge_received_data(flow_length, self.stream_id)

    def response_end(self) -> None:
        if self.finished:
            return
        if self.validated:  # the check's verdict comes with the end: an invalid one resets the stream
            self.peer.exchange_end()
            if not self.finished:
                self._finish(reset=False)
            return
        self._finish(reset=False)
        self.peer.exchange_end()

    def upstream_failed(self, status: int, reason: str, detail: str) -> None:
        if self.finished:
            return
        self._finish(reset=True)
        self.peer.exchange_abort(status, reason, detail)

    def _timed_out(self) -> None:
        self._timer = None
        timeout = self.pool.forwarder.limits.response_timeout
        self.upstream_failed(504, "the upstream did not answer in time", f"no response within {timeout:g} s")

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _finish(self, reset: bool) -> None:
        self.finished = True
        self._cancel_timer()
        self.pool.forget(self)
        connection = self.connection
        if connection is None:
            return
        if not connection.lost:
            for flow_length in self.unacked:  # what the client never took still fills the window
                connection.h2.acknowledge_received_data(flow_length, self.stream_id)
            self.unacked = []
            if reset:
                try:
                    connection.h2.reset_stream(self.stream_id, ErrorCodes.CANCEL)
                except h2.exceptions.ProtocolError:
                    pass  # the stream (or the whole connection) is closed already
            connection.write()
        connection.stream_done(self.stream_id)

    # ---- IPushProducer: the http server's side paces the response

    def pauseProducing(self) -> None:
        self.client_paused = True

    def resumeProducing(self) -> None:
        self.client_paused = False
        connection = self.connection
        if connection is not None and not self.finished:
            for flow_length in self.unacked:
                connection.h2.acknowledge_received_data(flow_length, self.stream_id)
            self.unacked = []
            connection.write()

    def stopProducing(self) -> None:
        self.exchange_abort(502, "the client went away", "")
