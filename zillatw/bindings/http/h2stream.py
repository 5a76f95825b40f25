"""One HTTP/2 stream of the http server (zillatw.bindings.http.h2server): one plain
request (a WebSocket's is zillatw.bindings.http.h2websocket's), admitted by the rules an HTTP/1.1 request goes through
(zillatw.bindings.http.admission) and exchanged with the route's IHttpRequestExit, with
flow control both ways: the client's DATA is acknowledged only once the exit took it; the
response waits for the peer's window in a buffer of at most SEND_BOUND bytes, beyond which
the exit is paused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import h2.exceptions
from h2.errors import ErrorCodes
from twisted.logger import Logger
from zope.interface import implementer

from zillatw.bindings.http import admission
from zillatw.bindings.http import plain as http_plain
from zillatw.bindings.http.auth import redact_target, without_values
from zillatw.bindings.http.h2flow import send_allowed
from zillatw.guards import Authorization
from zillatw.stream import HttpHead, IHttpExchangeEnd, StreamRefused
from zillatw.telemetry.events import next_trace_id

if TYPE_CHECKING:
    from zillatw.bindings.http.h2server import H2ServerConnection

SEND_BOUND = 65536  # bytes of one response held while the window or socket is shut
# Fields that mean something only to an HTTP/1.1 connection (RFC 9113 §8.2.2): never sent
CONNECTION_SPECIFIC = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"})
NOT_AN_UPGRADE = "not a WebSocket request: over HTTP/2 a WebSocket opens with an extended CONNECT (RFC 8441)"
log = Logger()


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
        if method == "CONNECT":  # a WebSocket's extended CONNECT is an h2websocket.H2WebSocket
            protocol = headers.get(":protocol")
            self.refuse(501, f"CONNECT for :protocol {protocol} is not supported" if protocol is not None
                        else "CONNECT is not supported")
            return
        if not path.startswith("/"):
            self.refuse(400, "the :path must be an absolute path")
            return
        refusal = admission.h2_authority(headers, self.connection.secure)
        if refusal is not None:
            self.refuse(400, refusal)
            return
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
        admission.authorize_then(factory, headers, self.connection.transport, self.trace_id, self._route)

    def _route(self, authorization: Authorization) -> None:
        if self.finished:
            return  # reset or gone while the guard fetched keys
        factory, headers = self.factory, self.headers
        exit_ = admission.routed(factory, headers, authorization, headers[":method"], self.shown_target, self.refuse)
        if exit_ is None:
            return
        session = authorization.session
        if not http_plain.is_plain_exit(exit_):  # a ws server: as HTTP/1.1's GET without Upgrade
            self.refuse(400, NOT_AN_UPGRADE)
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
            send_allowed(self.h2, self.stream_id, self.outbound)
            if not self.outbound and self.end_pending:
                self.h2.end_stream(self.stream_id)
                if not self.ended:  # answered before the body came: the client may stop (RFC 9113 §8.1)
                    self.h2.reset_stream(self.stream_id, ErrorCodes.NO_ERROR)
                self._done()
        except h2.exceptions.ProtocolError:  # the stream, or the whole connection, is closed
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
                     binding=self.factory.name, trace_id=self.trace_id, why=without_values(str(e)))
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
            except h2.exceptions.ProtocolError:  # the stream, or the whole connection, is closed
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
