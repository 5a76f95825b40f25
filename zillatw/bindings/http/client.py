"""The http client's plain requests: each one forwarded upstream over a pooled HTTP/1.1
connection of its tcp or tls client, its body streamed both ways.

- A pool per (exit, authority) of at most `max-connections` connections; an idle one is
  reused only after its last response ended cleanly (whole body, no `Connection: close`,
  HTTP/1.1, nothing after it) and closed after `idle-timeout`. Requests beyond the pool
  wait in order (at most MAX_WAITING, then 503).
- The request goes up with `Host` from its :authority (after `options.overrides`, as Zilla
  writes it), the end-to-end headers only (RFC 9110 §7.6.1) and its body re-framed.
- Back-pressure end to end: the upstream connection's write buffer pauses the client's
  reads, and the client connection's write buffer pauses the upstream's reads.
- 502 when the upstream cannot be reached, goes away before its response head, or answers
  what is not HTTP/1.1; 504 when its response head does not come within
  `response-timeout` (from the request's arrival) or the connect times out. Each is the
  gateway's own short response, the cause in the http server's event.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.python.failure import Failure
from zope.interface import implementer

from zillatw.bindings.http import clientversions
from zillatw.bindings.http.clientlimits import MAX_EARLY_BODY, MAX_POOLS, ClientLimits
from zillatw.bindings.http.h2client import H2UpstreamPool, open_h2
from zillatw.bindings.http.splicing import CAN_SPLICE, SPLICE_MIN, splice_rest
from zillatw.bindings.http.upstreamconnection import UpstreamConnection
from zillatw.bindings.http.upstreampool import UpstreamPool
from zillatw.stream import HttpHead, IHttpExchangeEnd, ISpliceSink, SpliceSink, StreamRefused
from zillatw.telemetry.events import Events
from zillatw.twistedcompat import Splice, idle_sink, write, write_sequence
from zillatw.wire.http1 import ResponseError, ResponseHeadParser
from zillatw.wire.http1body import (
    LAST_CHUNK,
    BodyDecoder,
    BodyError,
    Framing,
    chunk,
    end_to_end_headers,
    response_framing,
)


class Forwarder:
    """One http client binding's plain requests and its pools."""

    def __init__(self, name: str, namespace: str, route: Callable[[dict[str, str]], Any],
                 overrides: Mapping[str, str], reactor: Any, events: Events, limits: ClientLimits,
                 versions: tuple[str, ...] = ("http/1.1", "h2")):  # Zilla's default
        self.name = name
        # the version spoken to every upstream when one is configured; with both, each
        # upstream's is learnt from its first connection (zillatw.bindings.http.clientversions)
        self.version = versions[0] if len(set(versions)) == 1 else None
        self.spoken: dict[tuple[int, str], str] = {}
        self.probes: dict[tuple[int, str], Any] = {}  # clientversions.VersionProbe, connecting
        self.h2_pools: dict[tuple[int, str], H2UpstreamPool] = {}  # h2 (h2client)
        self.namespace = namespace
        self.route = route
        self.overrides = dict(overrides)
        self.reactor = reactor
        self.events = events
        self.limits = limits
        self.pools: dict[tuple[int, str], UpstreamPool] = {}
        self.closing = False  # shutting down: no connection goes back to a pool
        self.responses: Any = None  # zillatw.bindings.http.validation.ResponseChecks, if typed

    def open_request(self, head: HttpHead, peer: IHttpExchangeEnd, trace_id: int) -> IHttpExchangeEnd:
        headers = {**head.headers, **self.overrides}
        authority = headers.get(":authority")
        if not authority:
            raise StreamRefused(400, "the request needs a Host header")
        exit_ = self.route(headers)
        if exit_ is None:
            raise StreamRefused(502, "no upstream for this request")
        key = (id(exit_), authority)
        version = self.version or self.spoken.get(key)
        if version is None:  # both versions, this upstream's not known yet: its first connection says
            return clientversions.negotiating(self, key, exit_, authority, head, peer, trace_id)
        return self.open_on(version, key, exit_, authority, head, peer, trace_id, headers)

    def open_on(self, version: str, key: tuple[int, str], exit_: Any, authority: str, head: HttpHead,
                peer: IHttpExchangeEnd, trace_id: int, headers: dict[str, str] | None = None) -> IHttpExchangeEnd:
        """The request (`head` as the http server gave it; `headers`, its headers with the
        overrides, when made already) forwarded in `version`."""
        checked = self.responses.checked(head, peer, trace_id) if self.responses is not None else None
        upstream_head = HttpHead(headers if headers is not None else {**head.headers, **self.overrides}, head.length)
        if version == "h2":
            exchange: Any = open_h2(self, key, exit_, authority, upstream_head, checked or peer)
        else:
            exchange = UpstreamExchange(self.pool(key, exit_, authority), upstream_head, checked or peer)
            exchange.pool.acquire(exchange)
            exchange.wait_for_upstream()
        if checked is not None:
            checked.upstream = exchange  # an invalid response ends the upstream exchange
            exchange.validated = True
        return exchange

    def pool(self, key: tuple[int, str], exit_: Any, authority: str) -> "UpstreamPool":
        pool = self.pools.get(key)
        if pool is None:
            if len(self.pools) >= MAX_POOLS:
                self._drop_unused_pools()
                if len(self.pools) >= MAX_POOLS:
                    raise StreamRefused(503, "too many upstreams in use")
            pool = self.pools[key] = UpstreamPool(self, key, exit_, authority)
        return pool

    def _drop_unused_pools(self) -> None:
        for key, pool in list(self.pools.items()):
            if pool.total == 0:
                del self.pools[key]

    def connection_count(self) -> int:
        return (sum(pool.total for pool in self.pools.values()) + sum(p.total for p in self.h2_pools.values())
                + len(self.probes))

    def going_away(self) -> None:
        """Shutdown: idle connections close now, busy ones once their response is done."""
        self.closing = True
        for probe in list(self.probes.values()):
            probe.cancel()
        for pool in self.pools.values():
            for connection in list(pool.idle):
                connection.close()
        for h2_pool in self.h2_pools.values():
            h2_pool.close()

    def drop_all(self) -> None:
        for probe in list(self.probes.values()):
            probe.cancel()
        for pool in self.pools.values():
            for connection in list(pool.connections):
                connection.transport.abortConnection()
        for h2_pool in self.h2_pools.values():
            if h2_pool.connection is not None and not h2_pool.connection.lost:
                h2_pool.connection.transport.abortConnection()


def request_bytes(head: HttpHead) -> bytes:
    """The request line and headers as the upstream gets them."""
    headers = head.headers
    lines = [f"{headers[':method']} {headers[':path']} HTTP/1.1", f"host: {headers[':authority']}"]
    lines += [f"{name}: {value}" for name, value in headers.items() if not name.startswith(":")]
    if head.length is None:
        lines.append("transfer-encoding: chunked")
    elif head.length or headers[":method"] in ("POST", "PUT", "PATCH"):
        lines.append(f"content-length: {head.length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@implementer(IHttpExchangeEnd, ISpliceSink)
class UpstreamExchange:
    """The http client's end of one plain request: it takes the request's body from the
    http server (its `peer`) and sends the upstream's response to it."""

    connecting: Any = None
    validated = False  # its peer checks the response (validation.CheckedResponse)
    h2c: Any = None  # the clientversions.VersionProbe whose h2c upgrade offer it carries
    _splice: Splice | None = None  # the rest of the response body, moving socket to socket

    def __init__(self, pool: UpstreamPool, head: HttpHead, peer: IHttpExchangeEnd):
        self.pool = pool
        self.head = head
        self.peer = peer
        self.method = head.headers[":method"]
        self.connection: UpstreamConnection | None = None
        self.reused = False
        self.early: list[bytes] = []   # body before the upstream is connected (peer paused)
        self.early_size = 0
        self.request_done = False
        self.body_sent = False
        self.response: Any = None
        self.decoder: BodyDecoder | None = None
        self.finished = False
        self._parser = ResponseHeadParser()
        self._client_paused = False  # the client's connection cannot take more response
        self._producing = False      # the peer is registered as the upstream's producer
        reactor = pool.forwarder.reactor
        self._reactor = reactor
        self._started = self._last = reactor.seconds()
        # its response timeout: watched by the connection it is attached to (one timer per
        # connection), or by a timer of its own while it has none (time_alone)
        self._timer: Any = None
        self._waiting = False  # the peer paused until there is an upstream to send the body to
        self._held_head: bytes | None = None  # the request head, until the body's first piece

    def time_alone(self) -> None:
        """No connection watches it (it waits for one): its own timer, until it ends."""
        if self._timer is None and not self.finished:
            elapsed = self._reactor.seconds() - self._started
            self._timer = self._reactor.callLater(max(0.0, self.pool.limits.response_timeout - elapsed),
                                                  self._timed_out)

    def deadline(self, now: float) -> float | None:
        """For the connection's timer: when to look again, or None (it timed out now: 504; or
        it has a timer of its own). The same rules as `_timed_out`."""
        if self.finished or self._timer is not None:
            return None
        timeout = self.pool.limits.response_timeout
        if self.response is None:
            if self._started + timeout > now:
                return self._started + timeout
        elif self._client_paused:
            return now + timeout
        elif self._last + timeout > now:
            return self._last + timeout
        self._expire(timeout)
        return None

    def wait_for_upstream(self) -> None:
        """No upstream connection at once (one is opening, or all are busy): the request's
        body waits in the client's socket, not here. An idle pooled connection is attached
        without this (no pause and resume, two epoll calls, per reused request)."""
        if self.connection is None and not self.finished:
            self.time_alone()
            if not self._waiting:
                self._waiting = True
                self.peer.pauseProducing()

    # ---- the upstream connection

    def attach(self, connection: UpstreamConnection, reused: bool) -> None:
        if self.finished:
            self.pool.release(connection, reusable=True)
            return
        self.connection, self.reused = connection, reused
        connection.exchange = self
        if self._timer is None:
            connection.watch(self._reactor, self._started + self.pool.limits.response_timeout)
        transport = connection.transport
        head = request_bytes(self.head)
        if self.head.length and not self.early and not self.request_done:
            # A body of known length follows (most often in the same read): the head goes
            # out with its first piece, one send for both.
            self._held_head = head
        else:
            write(transport, head)
        if self.early:
            for piece in self.early:
                self._send(piece)
            self.early, self.early_size = [], 0
        if self.request_done:
            self._send_end()
        else:
            self._producing = True
            transport.registerProducer(self.peer, True)
        if self._waiting:
            self._waiting = False
            self.peer.resumeProducing()

    def upstream_data(self, data: bytes) -> None:
        self._last = self._reactor.seconds()
        if self.response is None:
            try:
                response = self._parser.feed(data)
                while response is not None and 100 <= response.status < 200 and response.status != 101:
                    # an interim answer (100 Continue): the final one follows
                    rest, self._parser = self._parser.rest, ResponseHeadParser()
                    response = self._parser.feed(rest)
                if response is None:
                    return
                if self.h2c is not None and self.h2c.answered(self, response, self._parser.rest):
                    return  # the upstream switched to HTTP/2: this request is its stream 1 now
                if response.status == 101:
                    raise ResponseError("101 Switching Protocols to a request that asked for no upgrade")
                kind, length = response_framing(response.headers, response.status, self.method)
                self.decoder = BodyDecoder(kind, length)
            except (ResponseError, BodyError) as e:
                self.upstream_failed(502, "the upstream's response was not valid HTTP", str(e))
                return
            self.response = response
            headers = {":status": str(response.status), **end_to_end_headers(response.headers)}
            if kind is Framing.LENGTH:
                shown: int | None = length
            elif kind is Framing.NONE:
                shown = int(response.headers["content-length"]) if self.method == "HEAD" \
                    and response.headers.get("content-length", "").isdigit() else 0
            else:
                shown = None
            self.peer.exchange_head(HttpHead(headers, shown))
            data = self._parser.rest
            if self.finished:
                return
        decoder = self.decoder
        assert decoder is not None
        try:
            pieces = decoder.feed(data) if data else []
        except BodyError as e:
            self.upstream_failed(502, "the upstream's response was not valid HTTP", str(e))
            return
        peer = self.peer
        for piece in pieces:
            peer.exchange_data(piece)
        if decoder.done and not self.finished:
            self._response_complete(not decoder.rest)
        elif CAN_SPLICE and self._splice is None and not self.finished and decoder.length_left() >= SPLICE_MIN:
            self._splice_body()

    def _splice_body(self) -> None:
        """The rest of a long Content-Length response goes socket to socket in the kernel
        when the peer would write it unchanged to a plain TCP socket (the client's)."""
        connection, decoder = self.connection, self.decoder
        if connection is not None and decoder is not None:
            self._splice = splice_rest(connection.transport, connection, self.peer, decoder.length_left(), self)

    # ---- zillatw.twistedcompat.SpliceOwner: the response body's splice

    def splice_moved(self, size: int) -> None:
        self._last = self._reactor.seconds()

    def splice_blocked(self, blocked: bool) -> None:
        self._client_paused = blocked  # the client is the slow one: the response timeout waits
        self._last = self._reactor.seconds()

    def splice_done(self, size: int) -> None:
        self._splice = None
        decoder = self.decoder
        assert decoder is not None
        decoder.skip(size)
        if decoder.done and not self.finished:
            self._response_complete(True)

    def splice_lost(self) -> None:
        self._splice = None  # the connection that failed ends the exchange, as without it

    def upstream_lost(self, reason: Failure | None) -> None:
        if self.finished:
            return
        decoder = self.decoder
        if decoder is not None and decoder.framing is Framing.UNTIL_CLOSE:
            self._response_complete(False)
            return
        if self.response is None and self.reused and self.head.length == 0 and not self._parser_started():
            # A kept-alive connection the upstream closed as we reused it: once more, fresh.
            self.connection, self.reused = None, False
            self.wait_for_upstream()
            try:
                self.pool.acquire(self, fresh=True)
            except StreamRefused as e:
                self.upstream_failed(e.status, e.reason, "while retrying on a new connection")
            return
        detail = reason.getErrorMessage() if reason is not None else "closed"
        self.upstream_failed(502, "the upstream closed the connection before its response was complete", detail)

    def _parser_started(self) -> bool:
        return bool(self._parser._buffer)

    def upstream_failed(self, status: int, reason: str, detail: str) -> None:
        """The upstream cannot serve this request: the client is told (or cut off)."""
        if self.finished:
            return
        self._finish(reusable=False)
        self.peer.exchange_abort(status, reason, detail)

    def _response_complete(self, clean: bool) -> None:
        response = self.response
        keep = (clean and self.request_done and response.version >= (1, 1)
                and "close" not in response.headers.get("connection", "").lower()
                and self.decoder is not None and self.decoder.framing is not Framing.UNTIL_CLOSE)
        if self.validated:  # the check's verdict comes with the end: an invalid one's connection is not kept
            self.peer.exchange_end()  # (it aborts this exchange)
            if not self.finished:
                self._finish(reusable=keep)
            return
        self._finish(reusable=keep)
        self.peer.exchange_end()

    def _finish(self, reusable: bool) -> None:
        if self.h2c is not None:  # ended before an answer to its h2c offer: HTTP/1.1, for now
            self.h2c.answered(self, None, b"")
        self.finished = True
        splice, self._splice = self._splice, None
        if splice is not None:
            splice.cancel()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.connecting is not None:
            self.connecting.cancel()
        self.pool.forget(self)
        connection, self.connection = self.connection, None
        if connection is not None:
            if self._producing:
                self._producing = False
                connection.transport.unregisterProducer()
            if self._client_paused:
                connection.transport.resumeProducing()
            connection.exchange = None
            if reusable:
                self.pool.release(connection, reusable=True)
            else:
                connection.leave_idle()
                if not connection.lost:
                    connection.transport.abortConnection()

    def _timed_out(self) -> None:
        self._timer = None
        if self.finished:
            return
        timeout = self.pool.limits.response_timeout
        remaining = self._last + timeout - self._reactor.seconds()
        if self.response is not None and (self._client_paused or remaining > 0):
            # the body is flowing (or the client is the slow one): wait on
            self._timer = self._reactor.callLater(timeout if self._client_paused else remaining, self._timed_out)
            return
        self._expire(timeout)

    def _expire(self, timeout: float) -> None:
        self.upstream_failed(504, "the upstream did not answer in time",
                             f"no response within {timeout:g} s" if self.response is None
                             else f"response body stalled for {timeout:g} s")

    # ---- IHttpExchangeEnd: the request's body from the http server

    def exchange_head(self, head: HttpHead) -> None:
        """Only a server's end takes a response head."""

    def splice_sink(self) -> SpliceSink | None:
        """The upstream's socket, for the rest of a Content-Length request (ISpliceSink)."""
        connection = self.connection
        if self.finished or connection is None or self._held_head is not None or self.head.length is None \
                or self.request_done:
            return None
        sink = idle_sink(connection.transport)
        if sink is not None:
            self.body_sent = True
        return sink

    def exchange_data(self, data: bytes) -> None:
        if self.finished:
            return
        if self.connection is None:
            self.early.append(data)
            self.early_size += len(data)
            if self.early_size > MAX_EARLY_BODY:  # the peer ignored its pause: not ours to hold
                self.upstream_failed(502, "the request body could not be held", "over the early-body bound")
            return
        self._send(data)

    def _send(self, data: bytes) -> None:
        assert self.connection is not None
        self.body_sent = True
        held, self._held_head = self._held_head, None
        if self.head.length is None:
            write_sequence(self.connection.transport, chunk(data))
        elif held is not None:
            write_sequence(self.connection.transport, [held, data])
        else:
            write(self.connection.transport, data)

    def exchange_end(self) -> None:
        if self.finished:
            return
        self.request_done = True
        if self.connection is not None:
            self._send_end()

    def _send_end(self) -> None:
        connection = self.connection
        assert connection is not None
        held, self._held_head = self._held_head, None
        if held is not None:  # a body that never came (the client ended it short)
            write(connection.transport, held)
        if self.head.length is None:
            write(connection.transport, LAST_CHUNK)
        if self._producing:
            self._producing = False
            connection.transport.unregisterProducer()

    def exchange_abort(self, status: int, reason: str, detail: str) -> None:
        """The client went away (or its request broke): the upstream connection goes too."""
        if not self.finished:
            self._finish(reusable=False)

    # ---- IPushProducer: the client's connection paces the upstream's response

    def pauseProducing(self) -> None:
        self._client_paused = True
        if self.connection is not None:
            self.connection.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._client_paused = False
        self._last = self._reactor.seconds()
        if self.connection is not None:
            self.connection.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.exchange_abort(502, "the client went away", "")
