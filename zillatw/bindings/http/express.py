"""The express lane: the common plain request proxied without the general exchange's objects.

A kept-alive HTTP/1.1 proxy's usual request is a small one that arrives whole in one read,
goes to an idle pooled upstream connection and is answered whole in one read. The general
path (zillatw.bindings.http.plain's ServerExchange, zillatw.bindings.http.client's
UpstreamExchange) builds a parser, two body decoders, three heads and two exchanges for it
and passes each piece through a dozen calls: ~100 µs of CPU a request. This lane serves
that request in one object and two writes.

It takes a request only when it can prove the general path would do exactly the same, and
otherwise returns False before it has changed anything, so the general path reads the same
bytes:
- the request: one whole read holding exactly one request (its head and its Content-Length
  body, nothing after), a strictly well-formed head (CRLF lines, a known method other than
  HEAD, CONNECT and TRACE, an origin-form target, HTTP/1.1, fields of token names and field
  characters, within the parser's limits), a valid Host, no Transfer-Encoding, Expect,
  Connection, Upgrade or Origin (each of those changes what the general path does);
- the server: no guard of its own, no `overrides`; its routes (as they take the request,
  with no session: none comes on plain TCP) pick a bare http client (a measured or
  validating exit must see each request) with no `overrides` nor response checks, which
  has one route every request takes (no `when`, no guard) to its tcp client and speaks
  HTTP/1.1 to this upstream;
- the sockets: both plain TCP with nothing buffered (so two writes cannot outrun
  back-pressure; a plain TCP connection carries no x509 session), and an idle pooled
  upstream connection to take.

The response takes the lane back only when it too is simple: one read holding a 2xx
(not 204) HTTP/1.1 head, strictly well formed, with a Content-Length body whole and nothing
after, and no Transfer-Encoding or Connection. Anything else (a partial or interim response,
an upstream that closes, a response timeout, bytes from the client, the client going away)
first turns the exchange into the general path's two exchanges in the very state they would
be in (`_promote`), then lets them handle it: what the client and the upstream see is the
same whichever path a request took (test_http_express compares the bytes).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from twisted.python.failure import Failure

from zillatw.bindings.http import admission
from zillatw.bindings.http.auth import redact_target
from zillatw.bindings.http.client import UpstreamExchange
from zillatw.bindings.http.plain import PHRASES, ServerExchange, request_head
from zillatw.bindings.http.upstreamconnection import UpstreamConnection
from zillatw.bindings.http.upstreampool import UpstreamPool
from zillatw.twistedcompat import nothing_buffered, write, write_sequence
from zillatw.wire.http1 import Request, valid_host, well_formed_fields
from zillatw.wire.http1body import HOP_BY_HOP, BodyDecoder, Framing, one_decimal_length

if TYPE_CHECKING:
    from zillatw.bindings.http.binding import HttpServer, HttpServerProtocol

_FIELDS = rb"((?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\x09\x20-\x7e\x80-\xff]*\r\n)*)\r\n"
# origin-form without '#' (check_origin_form refuses a fragment)
_REQUEST = re.compile(rb"(GET|POST|PUT|DELETE|PATCH|OPTIONS) (/[\x21\x22\x24-\x7e]*) HTTP/1\.1\r\n" + _FIELDS)
_RESPONSE = re.compile(rb"HTTP/1\.1 (2(?!04)\d\d)(?: [\x09\x20-\x7e\x80-\xff]*)?\r\n" + _FIELDS)
# request headers whose presence changes what the general path does with the request
_REQUEST_DETOURS = frozenset({"transfer-encoding", "expect", "connection", "upgrade", "origin"})
_RESPONSE_DETOURS = frozenset({"transfer-encoding", "connection"})
MAX_REQUEST_LINE = 8192  # the request parser's (zillatw.wire.http1.RequestHeadParser)
MAX_HEADERS = 100
MAX_HOSTS = 256  # Host values whose check is remembered (a lane's cache, emptied when full)
_BODY_METHODS = ("POST", "PUT", "PATCH")  # a Content-Length even when 0 (client.request_bytes)
# as ServerExchange.exchange_head writes a status line
_STATUS_LINES = {b"%d" % status: f"HTTP/1.1 {status} {PHRASES.get(status, 'Unknown')}" for status in range(200, 300)}
_UNPLANNED = object()
_ROUTED = object()  # the server's routes decide per request


def _fields(block: bytes) -> dict[str, str] | None:
    """A strictly well-formed field block (CRLF lines, the last CRLF included) as the
    parsers split one: names lower-cased, values trimmed, duplicates joined with ", "."""
    return well_formed_fields(block[:-2].decode("latin-1"), MAX_HEADERS) if block else {}


class ExpressLane:
    """One http server's express lane (present only when its options allow one)."""

    def __init__(self, server: "HttpServer", client_type: Any):
        self.server = server
        self.client_type = client_type  # HttpClient: only the bare client (no wrapper) takes the lane
        self.served = 0    # requests it took (tests, and docs/http.md's figures, count them)
        self.promoted = 0  # of those, the ones handed to the general path
        self._plan: Any = _UNPLANNED
        self._client_plans: dict[Any, tuple[Any, Any] | None] = {}  # an exit of the server's -> its plan
        self._authorities: dict[str, str] = {}  # a valid Host -> its :authority

    @staticmethod
    def possible(server: "HttpServer") -> bool:
        return server.authorization is None and not server.overrides

    def plan(self) -> Any:
        """The server's plan: `client_plan` of the exit every request goes to, or _ROUTED
        when its routes decide per request. Decided at the first request, once the graph
        is whole."""
        if self._plan is _UNPLANNED:
            exit_ = self.server.routes.unconditional()
            self._plan = self.client_plan(exit_) if exit_ is not None else _ROUTED
        return self._plan

    def client_plan(self, exit_: Any) -> tuple[Any, Any] | None:
        """(its forwarder, its tcp client) when `exit_` is a bare http client with no
        `overrides` nor response checks that sends every request to one tcp client; else
        None (its requests take the general path)."""
        plan = self._client_plans.get(exit_, _UNPLANNED)
        if plan is _UNPLANNED:
            plan = None
            if type(exit_) is self.client_type and not exit_.overrides and exit_.forwarder.responses is None:
                upstream_exit = exit_.routes.unconditional()
                if upstream_exit is not None:
                    plan = (exit_.forwarder, upstream_exit)
            self._client_plans[exit_] = plan
        return plan  # type: ignore[return-value]

    def serve(self, protocol: "HttpServerProtocol", data: bytes) -> bool:  # noqa: C901 - one pass of checks
        """Serve `data`, the whole of a read on an idle kept-alive connection, if it is one
        express request; False (nothing changed) leaves it to the general path."""
        plan = self._plan if self._plan is not _UNPLANNED else self.plan()
        if plan is None:
            return False
        transport = protocol.transport
        if not nothing_buffered(transport):
            return False
        match = _REQUEST.match(data)
        if match is None:
            return False
        fields_start, head_end = match.start(3), match.end()
        server = self.server
        # as the parser measures them: the request line to its LF, the fields to the blank line
        line_end = fields_start - 1
        if line_end > MAX_REQUEST_LINE or head_end - 4 - line_end > server.max_header_bytes:
            return False
        fields = _fields(match.group(3))
        if fields is None or not _REQUEST_DETOURS.isdisjoint(fields):
            return False
        host = fields.get("host")
        length = one_decimal_length(fields.get("content-length", "0"))
        if host is None or length is None or len(data) != head_end + length:
            return False
        if server.max_request_body is not None and length > server.max_request_body:
            return False
        authority = self._authorities.get(host)
        if authority is None:
            if not valid_host(host):
                return False
            if len(self._authorities) >= MAX_HOSTS:
                self._authorities.clear()
            authority = self._authorities[host] = admission.authority_with_port(host, False)
        method = match.group(1).decode("ascii")
        target = match.group(2).decode("ascii")
        headers: dict[str, str] | None = None
        if plan is _ROUTED:  # routes.pseudo_headers' view of it, for the routes (no session on plain TCP)
            headers = {**fields, ":authority": authority, ":method": method, ":scheme": "http", ":path": target}
            plan = self.client_plan(server.route(headers, None))
            if plan is None:
                return False
        forwarder, upstream_exit = plan
        key = (id(upstream_exit), authority)
        if (forwarder.version or forwarder.spoken.get(key)) != "http/1.1":
            return False
        pool = forwarder.pools.get(key)
        if pool is None or not pool.idle:
            return False
        connection = pool.idle[-1]
        if not connection.usable() or not nothing_buffered(connection.transport):
            return False
        # Taken: from here on, this request is the lane's.
        self.served += 1
        pool.idle.pop()
        connection.leave_idle()
        protocol.serving_plain()
        shown = redact_target(target, server.secret_params) if "?" in target else target
        if server.events.enabled:
            admission.emit_accepted(server, protocol.trace_id, method, shown,
                                    headers or {":scheme": "http", ":authority": authority}, None)
        exchange = ExpressExchange(self, protocol, pool, connection, method, target, authority, fields, length,
                                   match.group(0), data[head_end:], shown)
        protocol.exchange = exchange
        connection.exchange = exchange
        connection.watch(forwarder.reactor, exchange.started + pool.limits.response_timeout)
        # as client.request_bytes writes plain.request_head's (no Connection nor Expect here)
        lines = [f"{method} {target} HTTP/1.1", f"host: {authority}"]
        lines += [f"{name}: {value}" for name, value in fields.items() if name not in HOP_BY_HOP]
        if length or method in _BODY_METHODS:
            lines.append(f"content-length: {length}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if length:
            write_sequence(connection.transport, [head, exchange.body])
        else:
            write(connection.transport, head)
        return True


class ExpressExchange:
    """One express request, sent upstream whole, waiting for its response: the http server
    connection's exchange and the upstream connection's at once."""

    __slots__ = ("lane", "protocol", "pool", "connection", "method", "target", "authority", "fields", "length",
                 "raw_head", "body", "shown", "started", "promoted", "server_end")

    def __init__(self, lane: ExpressLane, protocol: "HttpServerProtocol", pool: UpstreamPool,
                 connection: UpstreamConnection, method: str, target: str, authority: str,
                 fields: dict[str, str], length: int, raw_head: bytes, body: bytes, shown: str):
        self.lane = lane
        self.protocol = protocol
        self.pool = pool
        self.connection = connection
        self.method, self.target, self.authority = method, target, authority
        self.fields, self.length = fields, length
        self.raw_head = raw_head
        self.body = body
        self.shown = shown
        self.started = pool.forwarder.reactor.seconds()
        self.promoted: UpstreamExchange | None = None
        self.server_end: ServerExchange | None = None

    # ---- the upstream connection's calls

    def upstream_data(self, data: bytes) -> None:
        """A simple whole response is written to the client and the exchange ends; any
        other goes to the general path."""
        if self.promoted is None:
            match = _RESPONSE.match(data)
            fields = _fields(match.group(2)) if match is not None else None
            # without a length the body runs until the upstream closes
            if fields is not None and _RESPONSE_DETOURS.isdisjoint(fields) and "content-length" in fields:
                length = one_decimal_length(fields["content-length"])
                head_end = match.end()  # type: ignore[union-attr]  # fields come from a match
                if length is not None and len(data) == head_end + length:
                    # as ServerExchange.exchange_head writes it: the end-to-end headers, then
                    # the length (no Connection header here to name more)
                    lines = [_STATUS_LINES[match.group(1)]]  # type: ignore[union-attr]
                    lines += [f"{name}: {value}" for name, value in fields.items() if name not in HOP_BY_HOP]
                    lines.append(f"Content-Length: {length}")
                    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
                    protocol, connection = self.protocol, self.connection
                    if length:
                        write_sequence(protocol.transport, [head, data[head_end:]])
                    else:
                        write(protocol.transport, head)
                    connection.exchange = None
                    self.pool.release(connection, reusable=True)
                    protocol.exchange = None
                    protocol.request_done(False, b"")
                    return
            self._promote()
        assert self.promoted is not None
        self.promoted.upstream_data(data)

    def upstream_lost(self, reason: Failure | None) -> None:
        self._promote().upstream_lost(reason)

    def deadline(self, now: float) -> float | None:
        expiry = self.started + self.pool.limits.response_timeout
        if self.promoted is None and expiry > now:
            return expiry
        return self._promote().deadline(now)

    # ---- the http server connection's calls

    def body_received(self, data: bytes) -> None:
        """Bytes after the request (pipelined): the general path holds them."""
        self._promote()
        assert self.server_end is not None
        self.server_end.body_received(data)

    def connection_lost(self, reason: Failure | None) -> None:
        """The client went away (the http server connection has let go of the exchange)."""
        self._promote()
        assert self.server_end is not None
        self.protocol.exchange = None
        self.server_end.connection_lost(reason)

    # ---- the general path, from here on

    def _promote(self) -> UpstreamExchange:
        """The general path's two exchanges, in the state its request would have left them
        in: the request read whole and sent, its response awaited."""
        if self.promoted is not None:
            return self.promoted
        self.lane.promoted += 1
        protocol, length = self.protocol, self.length
        headers = {**self.fields, ":authority": self.authority, ":method": self.method, ":scheme": "http",
                   ":path": self.target}  # routes.pseudo_headers' view of it
        request = Request(self.method, self.target, (1, 1), self.fields, self.raw_head)
        request.shown_target = self.shown
        kind = Framing.LENGTH if length else Framing.NONE
        request.framing = (kind, length)
        server_end = ServerExchange(protocol, request, headers, kind)
        server_end.decoder = decoder = BodyDecoder(kind, length, protocol.factory.max_request_body)
        if length:
            decoder.feed(self.body)
        server_end.request_ended = True
        upstream = UpstreamExchange(self.pool, request_head(headers, length), server_end)
        upstream._started = upstream._last = self.started
        upstream.connection, upstream.reused = self.connection, True
        upstream.request_done = upstream.body_sent = True
        server_end.exit_end = upstream
        self.connection.exchange = upstream
        protocol.exchange = self.server_end = server_end
        self.promoted = upstream
        return upstream
