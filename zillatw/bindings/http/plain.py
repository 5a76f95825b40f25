"""The http server's plain (non-upgrade) requests: the request's body streamed to an
IHttpRequestExit (echo, an http client), its response written back, and the connection kept
for the next request (HTTP/1.1 persistent connections).

One exchange at a time per connection. Pipelined requests are served in order: bytes after
a request's body wait (at most PIPELINE_BOUND of them, then reading pauses) until its
response is written. The connection closes after the response when the client asked
(`Connection: close`, HTTP/1.0), when the request's body was not read to its end, or when
the response has no length and the client cannot take chunked (HTTP/1.0).
"""

from __future__ import annotations

import http
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from zillatw.bindings.http.splicing import CAN_SPLICE, SPLICE_MIN, splice_rest
from zillatw.stream import HttpHead, IHttpExchangeEnd, IHttpRequestExit, ISpliceSink, SpliceSink, StreamRefused
from zillatw.twistedcompat import Splice, idle_sink, write, write_sequence
from zillatw.wire.http1 import Request
from zillatw.wire.http1body import LAST_CHUNK, BodyDecoder, BodyError, Framing, chunk, end_to_end_headers

if TYPE_CHECKING:
    from zillatw.bindings.http.binding import HttpServerProtocol

PIPELINE_BOUND = 65536  # bytes of pipelined requests held while a response is written
BODY_TIMEOUT = 30.0     # seconds a request body may go without a byte (while we read it)
IDLE_TIMEOUT = 60.0     # seconds a kept-alive connection may wait for its next request
log = Logger()
PHRASES = {status.value: status.phrase for status in http.HTTPStatus}


def is_plain_exit(exit_: Any) -> bool:
    return IHttpRequestExit.providedBy(exit_)


def wants_close(request: Request) -> bool:
    """Whether the client's connection ends after this exchange (RFC 9112 §9.3)."""
    tokens = {t.strip().lower() for t in request.headers.get("connection", "").split(",")}
    if request.version >= (1, 1):
        return "close" in tokens
    return "keep-alive" not in tokens  # HTTP/1.0: only when asked


def request_head(headers: Mapping[str, str], length: int | None) -> HttpHead:
    """What the exit is given: the pseudo-headers and the end-to-end headers (not Expect:
    this server has answered it)."""
    forwarded = end_to_end_headers(headers)
    forwarded.pop("expect", None)
    return HttpHead(forwarded, length)


def preflight_answer(protocol: "HttpServerProtocol", request: Request, headers: dict[str, str]) -> None:
    """A CORS preflight (OPTIONS with Origin and Access-Control-Request-*): the http server
    answers it itself (as Zilla does), 204 with what may be sent, or 403."""
    status, cors = protocol.factory.access_control.preflight(headers)
    if status != 204:
        protocol._refuse(403, "the preflight request is not allowed by the access-control policy")
        return
    closing = wants_close(request)
    transport: Any = protocol.transport
    lines = ["HTTP/1.1 204 No Content"] + [f"{name}: {value}" for name, value in cors]
    if closing:
        lines.append("Connection: close")
    transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    protocol.request_done(closing, b"")


def start(protocol: "HttpServerProtocol", exit_: Any, request: Request, headers: dict[str, str],
          framing: tuple[Framing, int], rest: bytes) -> None:
    """Open the exchange with the exit and feed it what followed the head."""
    factory = protocol.factory
    kind, length = framing
    try:
        decoder = BodyDecoder(kind, length, factory.max_request_body)
    except BodyError as e:
        protocol._refuse(413, str(e))
        return
    exchange = ServerExchange(protocol, request, headers, kind)
    exchange.decoder = decoder
    head = request_head(headers, length if kind is not Framing.CHUNKED else None)
    protocol.exchange = exchange
    if request.version >= (1, 1) and kind is not Framing.NONE \
            and headers.get("expect", "").lower() == "100-continue":
        exchange.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # we stream: send it now
    exchange.opening = True  # a response that ends within open_request moves on after it
    try:
        exchange.exit_end = exit_.open_request(head, exchange, protocol.trace_id)
    except StreamRefused as e:
        exchange.close_quietly()
        protocol._refuse(e.status, e.reason, detail=e.detail)
        return
    except Exception:  # a bug must cost this request, never the client a traceback or a hang
        log.failure("zillatw: {binding} failed to open request {trace_id:016x}",
                    binding=factory.name, trace_id=protocol.trace_id)
        exchange.close_quietly()
        protocol._refuse(500, "internal error")
        return
    finally:
        exchange.opening = False
    if exchange.head_sent and not exchange.finished:
        exchange.register()  # answered within open_request (echo): its end paces it now
    exchange.body_received(rest)
    if exchange._timing_body and not (exchange.request_ended or exchange.finished):
        exchange.time_body()  # the body did not come whole with the head: from now it may stall
    if exchange.finished and not exchange.request_ended:
        exchange.closing = True
        exchange._next()


@implementer(IHttpExchangeEnd, ISpliceSink)
class ServerExchange:
    """The http server's end of one plain request: it takes the exit's response and
    writes it; `body_received` feeds it the client's bytes after the head."""

    exit_end: Any = None
    decoder: BodyDecoder
    opening = False
    request_ended = False  # the whole request body reached the exit
    _splice: Splice | None = None  # the rest of the request body, moving socket to socket

    def __init__(self, protocol: "HttpServerProtocol", request: Request, headers: dict[str, str],
                 request_framing: Framing):
        self.protocol = protocol
        self.transport: Any = protocol.transport  # a TCP or TLS transport: a push producer too
        self.request = request
        self.headers = headers
        self.closing = wants_close(request)
        self.head_sent = False
        self._held_head: bytes | None = None  # a response head, until its body's first piece
        self.finished = False     # the response is written (or the exchange failed)
        self.chunked = False
        self.no_body = request.method == "HEAD"
        self.pipelined = bytearray()
        self._paused_by_exit = False
        self._paused_by_pipeline = False
        self._registered = False
        self._moved_on = False
        reactor = protocol.factory.reactor
        self._reactor = reactor
        self._last_progress = reactor.seconds()
        self._timer: Any = None
        self._timing_body = request_framing is not Framing.NONE  # its timer starts in start()

    # ---- the client's bytes: the request body, then pipelined requests

    def body_received(self, data: bytes) -> None:
        if self.request_ended:
            if data:
                self._hold(data)
            return
        decoder = self.decoder
        if decoder.done:  # no body at all
            self._request_complete(data)
            return
        if not data:
            return
        try:
            pieces = decoder.feed(data)
        except BodyError as e:
            self._fail_request(400, str(e))
            return
        self._last_progress = self._reactor.seconds() if self._timer is not None else 0.0
        exit_end = self.exit_end
        for piece in pieces:
            exit_end.exchange_data(piece)
            if self.finished and self.protocol.exchange is not self:
                return  # the exit answered and the connection moved on (or closed)
        if decoder.done:
            self._request_complete(decoder.rest)
        elif CAN_SPLICE and self._splice is None and decoder.length_left() >= SPLICE_MIN:
            self._splice_body()

    def _splice_body(self) -> None:
        """The rest of a long Content-Length body goes socket to socket in the kernel when
        the exit would write it unchanged to a plain TCP socket (an http client's upstream)."""
        self._splice = splice_rest(self.transport, self.protocol, self.exit_end, self.decoder.length_left(), self)

    # ---- zillatw.twistedcompat.SpliceOwner: the request body's splice

    def splice_moved(self, size: int) -> None:
        if self._timer is not None:
            self._last_progress = self._reactor.seconds()

    def splice_blocked(self, blocked: bool) -> None:
        self._paused_by_exit = blocked  # the exit is the slow one: the body timer waits
        self._last_progress = self._reactor.seconds()

    def splice_done(self, size: int) -> None:
        self._splice = None
        self.decoder.skip(size)
        if self.decoder.done:
            self._request_complete(b"")

    def splice_lost(self) -> None:
        self._splice = None  # the connection that failed ends the exchange, as without it

    def _stop_splice(self) -> None:
        splice, self._splice = self._splice, None
        if splice is not None:
            splice.cancel()

    def _request_complete(self, rest: bytes) -> None:
        self.request_ended = True
        self._cancel_timer()
        if rest:
            self._hold(rest)  # before the exit hears the end: it may answer at once
        if self.exit_end is not None:
            self.exit_end.exchange_end()
        if self.finished:
            self._next()

    def _hold(self, data: bytes) -> None:
        self.pipelined += data
        if len(self.pipelined) > PIPELINE_BOUND and not self._paused_by_pipeline:
            self._paused_by_pipeline = True
            self._set_reading()

    def _fail_request(self, status: int, reason: str) -> None:
        self._cancel_timer()
        if self.exit_end is not None:
            self.exit_end.exchange_abort(status, reason, "")
        self.exchange_abort(status, reason, "")

    def time_body(self) -> None:
        self._last_progress = self._reactor.seconds()
        self._timer = self._reactor.callLater(self.protocol.factory.body_timeout, self._body_stalled)

    def _body_stalled(self) -> None:
        self._timer = None
        if self.decoder.done or self.finished:
            return
        timeout = self.protocol.factory.body_timeout
        remaining = self._last_progress + timeout - self._reactor.seconds()
        if self._paused_by_exit or remaining > 0:  # paused: the wait is ours, not the client's
            self._timer = self._reactor.callLater(max(remaining, 0.0) if not self._paused_by_exit else timeout,
                                                  self._body_stalled)
            return
        self._fail_request(408, f"request body stalled for {timeout:g} s")

    def close_quietly(self) -> None:
        """The exit refused the request: nothing more happens on this exchange."""
        self.finished = self._moved_on = True
        self._stop_splice()
        self._cancel_timer()
        if self.protocol.exchange is self:
            self.protocol.exchange = None

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    # ---- IPushProducer: the exit pauses the request body

    def pauseProducing(self) -> None:
        self._paused_by_exit = True
        self._set_reading()

    def resumeProducing(self) -> None:
        self._paused_by_exit = False
        self._last_progress = self._reactor.seconds()
        self._set_reading()

    def stopProducing(self) -> None:
        """Nothing to stop: the exit ends the exchange with exchange_abort."""

    def _set_reading(self) -> None:
        if self.finished and self.protocol.exchange is not self:
            return
        if self._paused_by_exit or self._paused_by_pipeline:
            self.transport.pauseProducing()
        else:
            self.transport.resumeProducing()

    # ---- IHttpExchangeEnd: the response

    def exchange_head(self, head: HttpHead) -> None:
        if self.finished or self.head_sent:
            return
        self.head_sent = True
        headers = head.headers
        status = int(headers.get(":status", "200"))
        lines = [f"HTTP/1.1 {status} {PHRASES.get(status, 'Unknown')}"]
        names = [name for name in headers if not name.startswith(":")]
        lines += [f"{name}: {headers[name]}" for name in names]
        lines += [f"{name}: {value}" for name, value in
                  self.protocol.factory.access_control.response_headers(self.headers, names)]
        bodiless = self.no_body or status in (204, 304) or status < 200
        if head.length is not None:
            if not (status in (204, 304) or status < 200):
                lines.append(f"Content-Length: {head.length}")
        elif not bodiless:
            if self.request.version >= (1, 1):
                self.chunked = True
                lines.append("Transfer-Encoding: chunked")
            else:
                self.closing = True  # HTTP/1.0 and no length: the close ends the body
        if self.closing:
            lines.append("Connection: close")
        elif self.request.version < (1, 1):
            lines.append("Connection: keep-alive")  # an HTTP/1.0 client keeps it only when told
        self.no_body = bodiless
        encoded = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if head.length and not bodiless:
            # A body of known length follows (most often in the same read of the upstream's
            # answer): the head goes out with its first piece, one send for both.
            self._held_head = encoded
        else:
            write(self.transport, encoded)
        if self.exit_end is not None:
            self.register()

    def register(self) -> None:
        """The exit's end produces the response: the client's connection pauses it."""
        if not self._registered:
            self._registered = True
            self.transport.registerProducer(self.exit_end, True)

    def splice_sink(self) -> SpliceSink | None:
        """The client's socket, for the rest of a Content-Length response (ISpliceSink)."""
        if self.finished or not self.head_sent or self._held_head is not None or self.chunked or self.no_body:
            return None
        return idle_sink(self.transport)

    def exchange_data(self, data: bytes) -> None:
        if self.finished or self.no_body or not data:
            return
        held = self._held_head
        if held is not None:
            self._held_head = None
            write_sequence(self.transport, [held, data])
            return
        if self.chunked:
            write_sequence(self.transport, chunk(data))
        else:
            write(self.transport, data)

    def exchange_end(self) -> None:
        if self.finished:
            return
        if not self.head_sent:
            self.exchange_head(HttpHead({":status": "200"}, 0))
        held, self._held_head = self._held_head, None
        if held is not None:  # a body that never came: the client sees the head and its cut-off
            write(self.transport, held)
        if self.chunked and not self.no_body:
            write(self.transport, LAST_CHUNK)
        self.finished = True
        self._unregister()
        if self.opening:
            return  # start() goes on once open_request has returned
        if not self.request_ended:
            # The response is whole but the request is not read to its end: the next
            # request's start cannot be found, so the connection ends (RFC 9112 §9.6).
            self.closing = True
            self._next()
        elif self.protocol.exchange is self:
            self._next()

    def exchange_abort(self, status: int, reason: str, detail: str) -> None:
        if self.finished:
            return
        self.finished = True
        self._moved_on = True  # the connection closes: no next request
        self._stop_splice()
        self._cancel_timer()
        self._unregister()
        protocol = self.protocol
        if protocol.exchange is self:
            protocol.exchange = None
        if not self.head_sent:
            protocol._refuse(status, reason, detail=detail)
        else:
            # The response has started: end the connection so the client sees it cut off,
            # after what was written (a validated response's head: curl's "transfer closed").
            held, self._held_head = self._held_head, None
            if held is not None:
                write(self.transport, held)
            self.transport.loseConnection()

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            self.transport.unregisterProducer()

    def _next(self) -> None:
        """The response is written and the request read: on to the next, or close (once)."""
        if self._moved_on:
            return
        self._moved_on = True
        self._stop_splice()
        self._cancel_timer()
        protocol = self.protocol
        if protocol.exchange is self:
            protocol.exchange = None
        if self._paused_by_exit or self._paused_by_pipeline:
            self._paused_by_exit = self._paused_by_pipeline = False
            self.transport.resumeProducing()
        protocol.request_done(self.closing, bytes(self.pipelined))

    def connection_lost(self, reason: Failure | None) -> None:
        """The client went away: the exit's side of the exchange ends too."""
        self._stop_splice()
        self._cancel_timer()
        if not self.finished:
            self.finished = True
            if self.exit_end is not None:
                self.exit_end.exchange_abort(502, "the client went away", "")
