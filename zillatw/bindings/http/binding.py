"""http server: reads an HTTP/1.1 request head, routes it on its headers (with Zilla's
pseudo-headers :method :scheme :authority :path), and hands the connection to the exit
(a ws server) or answers with an error and closes. After an upgrade the exit's protocol
receives the socket's bytes directly: this binding adds no call per message. A plain
request to an exit that answers them (echo, an http client: IHttpRequestExit) is served
by zillatw.bindings.http.plain, and the connection kept for the next request.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IAddress, ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from zillatw.bindings.http import accesscontrol, admission, clientaddress, express, h2server
from zillatw.bindings.http import plain as http_plain
from zillatw.bindings.http import validation as http_validation
from zillatw.bindings.http.accesscontrol import AccessControl
from zillatw.bindings.http.auth import CONVENTIONAL_SECRETS, HttpAuthorization, redact_target
from zillatw.bindings.http.checks import check, guard_references
from zillatw.bindings.http.client import Forwarder
from zillatw.bindings.http.clientlimits import CLIENT_OPTIONS, ClientLimits
from zillatw.bindings.http.routes import HeaderRoutes, pseudo_headers
from zillatw.bindings.ws.relay import no_delay
from zillatw.config import BindingConfig, Route
from zillatw.config.plugins import BindingType, IDrainsGracefully
from zillatw.config.schema import FORBIDDEN, NAME, refused, route_schema
from zillatw.guards import NO_AUTHORIZATION, Authorization, Session
from zillatw.stream import (
    HttpHead,
    IHttpConnection,
    IHttpExchangeEnd,
    IHttpRequestExit,
    IHttpUpstream,
    StreamRefused,
)
from zillatw.telemetry.events import Events, next_trace_id
from zillatw.wire.http1 import HttpError, Request, RequestHeadParser, check_host, check_origin_form, render_response
from zillatw.wire.http1body import BodyError, request_framing

HEAD_TIMEOUT = 10.0  # seconds for a client to send its request head (slowloris)
log = Logger()

SCHEMA_PATCH = {
    "properties": {
        "kind": {"enum": ["server", "client"]},
        "vault": FORBIDDEN, "catalog": FORBIDDEN,
        "options": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "versions": {"type": "array", "minItems": 1, "items": {"enum": ["http/1.1", "h2"]}},
                "access-control": accesscontrol.SCHEMA,
                "authorization": {
                    "type": "object",
                    "propertyNames": NAME,
                    "additionalProperties": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["credentials"],
                        "properties": {"credentials": {
                            "type": "object",
                            "additionalProperties": False,
                            "minProperties": 1,
                            "properties": {where: {"type": "object", "additionalProperties": {"type": "string"}}
                                           for where in ("headers", "query", "cookies")},
                        }},
                    },
                },
                "overrides": {"type": "object", "minProperties": 1, "additionalProperties": {"type": "string"}},
                "requests": http_validation.REQUESTS,  # Zilla's typed requests (docs/validation.md)
                # zillatw's extension: seconds from accept to a complete request head (408)
                "head-timeout": {"type": "number", "exclusiveMinimum": 0},
                # zillatw's extension: peers whose Forwarded / X-Forwarded-For is believed (docs/admission.md)
                "trusted-proxies": {"type": "array", "items": {"type": "string"}},
                # zillatw's, for plain requests (docs/http.md): keep-alive wait, body stall, body size
                "idle-timeout": {"type": "number", "exclusiveMinimum": 0},
                "body-timeout": {"type": "number", "exclusiveMinimum": 0},
                "max-request-body": {"type": "integer", "minimum": 0},
                **CLIENT_OPTIONS,
            },
        },
        "routes": {"type": "array", "items": route_schema(condition={
            "type": "object",
            "additionalProperties": False,
            "properties": {"headers": {"type": "object", "additionalProperties": {"type": "string"}}},
        }, with_=refused("not supported by this zillatw yet (options.overrides applies after every route)"))},
    },
}
STREAMS = {"server": ("bytes", "http"), "client": ("http", "bytes")}
GUARDED_KINDS = ("server",)  # the client's routes see no session
UNGUARDED_WHY = "the session stays with the servers in front of it: guard the ws or http server's routes"
DEFAULT_VERSIONS = ("http/1.1", "h2")  # Zilla's: h2 by ALPN or prior knowledge, else HTTP/1.1


@implementer(IHttpRequestExit, IHttpUpstream, IDrainsGracefully)
class HttpClient:
    """The http client binding: picks the exit (tcp client) for an upstream request. The
    upgrade request itself is written by the ws client's protocol; plain requests are
    forwarded over pooled connections (zillatw.bindings.http.client)."""

    def __init__(self, name: str, routes: list[tuple[Route, Any]], overrides: Mapping[str, str] | None = None,
                 *, reactor: Any = None, events: Events | None = None, namespace: str = "default",
                 limits: ClientLimits | None = None, versions: tuple[str, ...] = DEFAULT_VERSIONS):
        self.name = name
        self.routes = HeaderRoutes(routes)
        self.overrides = dict(overrides or {})
        self.forwarder = Forwarder(name, namespace, self.routes.route, self.overrides, reactor,
                                   events or Events(), limits or ClientLimits(), versions)

    def open_request(self, head: HttpHead, peer: IHttpExchangeEnd, trace_id: int) -> IHttpExchangeEnd:
        return self.forwarder.open_request(head, peer, trace_id)

    # its pooled upstream connections: idle ones close on shutdown, busy ones after their response
    def going_away(self) -> None:
        self.forwarder.going_away()

    def open_count(self) -> int:
        return self.forwarder.connection_count()

    def drop_all(self) -> None:
        self.forwarder.drop_all()

    def request_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        """The upstream request's headers after `options.overrides` (Zilla applies them when
        it writes the request; the route and the connection follow the request as asked)."""
        return {**headers, **self.overrides}

    def connect(self, factory: Any, headers: dict[str, str], timeout: float) -> Any:
        exit_ = self.routes.route(headers)
        if exit_ is None:
            return fail(StreamRefused(502, f"http client {self.name} has no route for {headers.get(':authority')}"))
        return exit_.connect(factory, headers.get(":authority"), timeout)


@implementer(IDrainsGracefully)
class HttpServer(Factory):
    """The http server binding: routes and limits, and the factory of its connections."""

    noisy = False

    def __init__(self, name: str, routes: list[tuple[Route, Any]], namespace: str = "default",
                 events: Events | None = None, head_timeout: float = HEAD_TIMEOUT,
                 max_header_bytes: int = 8192, *, reactor: Any,
                 authorization: HttpAuthorization | None = None, overrides: Mapping[str, str] | None = None,
                 access_control: AccessControl | None = None,
                 trusted_proxies: clientaddress.TrustedProxies | None = None,
                 idle_timeout: float = http_plain.IDLE_TIMEOUT,
                 body_timeout: float = http_plain.BODY_TIMEOUT, max_request_body: int | None = None,
                 versions: tuple[str, ...] = DEFAULT_VERSIONS):
        self.name = name
        self.versions = versions  # what it speaks: http/1.1, h2 (by ALPN or prior knowledge)
        self.h2_connections: set[h2server.H2ServerConnection] = set()
        self.trusted_proxies = trusted_proxies  # whose forwarding headers name the client
        self.idle_timeout = idle_timeout
        self.body_timeout = body_timeout
        self.max_request_body = max_request_body
        self.shutting_down = False
        self.kept: set[HttpServerProtocol] = set()  # kept-alive connections: in an exchange or idle
        self.overrides = dict(overrides or {})  # set on a request once routed, as Zilla
        self.namespace = namespace
        self.events = events or Events()
        self.head_timeout = head_timeout
        self.max_header_bytes = max_header_bytes
        self.reactor = reactor  # the graph's: head timeouts and session expiry run on it
        self.routes = HeaderRoutes(routes, namespace)
        self.route = self.routes.route
        self.authorization = authorization
        # query parameters whose values are never logged nor answered
        self.secret_params = authorization.secret_params if authorization is not None else CONVENTIONAL_SECRETS
        self.access_control = access_control or AccessControl()  # absent: same-origin, as Zilla
        self.pending: set[HttpServerProtocol] = set()  # connections still reading their head
        # the common small proxied request's short way (zillatw.bindings.http.express)
        self.express = express.ExpressLane(self, HttpClient) if express.ExpressLane.possible(self) else None

    def going_away(self) -> None:
        """Shutdown: requests still being read get 503 and the connection closes; an idle
        kept-alive connection closes, one in an exchange closes after its response."""
        self.shutting_down = True
        for protocol in list(self.pending):
            protocol._gone = True  # a guard still fetching keys must not route it afterwards
            protocol._refuse(503, "the gateway is shutting down")
        for protocol in list(self.kept):
            if protocol.exchange is None:
                protocol.transport.loseConnection()
        for connection in list(self.h2_connections):
            connection.going_away()

    def open_count(self) -> int:
        return len(self.pending) + len(self.kept) + len(self.h2_connections)

    def drop_all(self) -> None:
        for protocol in list(self.pending) + list(self.kept):
            protocol.transport.abortConnection()
        for connection in list(self.h2_connections):
            connection.abort()

    def buildProtocol(self, addr: IAddress | None) -> Any:
        protocol = HttpServerProtocol()
        protocol.factory = self
        return protocol


class Reading(enum.Enum):
    """What an http server connection does with the bytes it reads (one place decides)."""
    HEADS = "request heads (and, before the first, maybe the HTTP/2 preface)"
    HELD = "held, unread, while a guard fetches its keys"
    DISCARDED = "ignored: the connection was answered and is closing"
    TAKEN = "handed to the protocol that took the connection (a WebSocket, HTTP/2)"


class HttpServerProtocol(Protocol):
    """One connection until its request head is read; then an error or a handover."""

    factory: HttpServer
    # a connected TCP or TLS transport (set by makeConnection before any call here)
    transport: Any
    _parser: Any  # the RequestHeadParser reading the next head (None once taken)
    reading = Reading.HEADS
    # the protocol that took the connection (Reading.TAKEN): Twisted's calls go to it
    taken: Any = None
    _expiry: Any = None  # the session's end, for a taken connection
    _gone = False
    # the plain request being served
    exchange: "http_plain.ServerExchange | express.ExpressExchange | None" = None
    _idle = False         # kept alive, waiting for the next request
    _idle_since = 0.0
    _idle_timer: Any = None
    _feeding = False      # serving pipelined bytes (request_done only queues them)
    _queued = b""
    relaying = False      # TCP_NODELAY set for plain exchanges
    _sniffed: bytes | None = None  # the first bytes, while they may be the HTTP/2 preface

    def connectionMade(self) -> None:
        factory = self.factory
        self.trace_id = next_trace_id()
        self.secure = ISSLTransport.providedBy(self.transport)
        self._parser = RequestHeadParser(max_header_bytes=factory.max_header_bytes)
        # One deadline from accept, never extended by bytes arriving (slowloris).
        self._timeout = factory.reactor.callLater(factory.head_timeout, self._head_timed_out)
        factory.pending.add(self)
        if "h2" in factory.versions:
            if h2server.is_h2_negotiated(self.transport):
                self._speak_h2(b"")
            elif getattr(self.transport, "negotiatedProtocol", None) is None:
                self._sniffed = b""  # no ALPN: h2 with prior knowledge, or HTTP/1.1

    def _speak_h2(self, received: bytes) -> None:
        """The connection is HTTP/2 from here: its protocol takes our socket's calls."""
        self._cancel_timeout()
        self.factory.pending.discard(self)
        h2server.take_over(self, received)

    def dataReceived(self, data: bytes) -> None:
        reading = self.reading
        if reading is not Reading.HEADS:  # an upgraded WebSocket's every read comes this way
            if reading is Reading.TAKEN:
                self.taken.dataReceived(data)
            elif reading is Reading.HELD:
                self._parser.rest += data
            return
        if self._sniffed is not None:
            self._sniffed, data = h2server.sniff(self, self._sniffed + data)
            if not data:
                return
        if self.exchange is not None:
            self.exchange.body_received(data)
            return
        lane = self.factory.express
        if lane is not None and self._parser.idle and lane.serve(self, data):
            return
        if self._idle:
            self._next_request_started()
        try:
            request = self._parser.feed(data)
        except HttpError as e:
            self._refuse(e.status, e.reason, e.headers)
            return
        if request is not None:
            self._cancel_timeout()
            self._dispatch(request)
        elif self._timeout is None:
            # A kept-alive connection's next head has begun but is not whole: it has
            # head_timeout from here (armed only now: most heads arrive in one read).
            self._timeout = self.factory.reactor.callLater(self.factory.head_timeout, self._head_timed_out)

    def _dispatch(self, request: Request) -> None:
        factory = self.factory
        try:
            check_origin_form(request.target)
            check_host(request.headers.get("host"))
            framing = request_framing(request.headers)
        except HttpError as e:
            self._refuse(e.status, e.reason, e.headers)
            return
        except BodyError as e:
            self._refuse(400, str(e))
            return
        request.shown_target = redact_target(request.target, factory.secret_params)
        headers = pseudo_headers(request, self.secure)
        # Before the guard: a page from a foreign origin must not get to use a visitor's
        # cookies (cross-site WebSocket hijacking), nor make the guard fetch keys.
        refusal = factory.access_control.refusal(headers)
        if refusal is not None:
            self._refuse(403, refusal)
            return
        request.framing = framing
        if factory.access_control.is_preflight(headers):  # answered here, before any guard (Zilla)
            http_plain.preflight_answer(self, request, headers)
            return
        authorization = admission.authorize(factory, headers, self.transport, self.trace_id)
        if isinstance(authorization, Deferred):
            # The guard is fetching keys: hold the connection (not the reactor) until then.
            self.reading = Reading.HELD
            self.transport.pauseProducing()
            authorization.addCallback(self._authorized, request, headers)
        else:
            self._route(request, headers, authorization)

    def _authorized(self, authorization: Authorization, request: Request, headers: dict[str, str]) -> None:
        if self._gone:
            return
        self.reading = Reading.HEADS
        self.transport.resumeProducing()
        self._route(request, headers, authorization)

    def _route(self, request: Request, headers: dict[str, str], authorization: Authorization) -> None:
        factory = self.factory
        session = authorization.session
        exit_ = admission.routed(factory, headers, authorization, request.method, request.shown_target, self._refuse)
        if exit_ is None:
            return
        if factory.overrides:
            headers.update(factory.overrides)  # after routing: the exit sees the overridden request
        if http_plain.is_plain_exit(exit_):
            self._accepted(request, headers, session)
            self.serving_plain()
            rest, self._parser.rest = self._parser.rest, b""
            http_plain.start(self, exit_, request, headers, request.framing, rest)
            return
        try:
            extra = {} if authorization is NO_AUTHORIZATION else {"authorization": authorization}
            # the one place the client's address is decided: the exit is told, never guesses
            client = clientaddress.client_address(self.transport.getPeer(), headers, factory.trusted_proxies)
            taken = exit_.accept_request(request, headers, self.transport, trace_id=self.trace_id,
                                         client_address=client, **extra)
        except HttpError as e:
            self._refuse(e.status, e.reason, e.headers)
            return
        except Exception:  # a bug must cost this request, never the client a traceback or a hang
            log.failure("zillatw: {binding} failed to route request {trace_id:016x}",
                        binding=factory.name, trace_id=self.trace_id)
            self._refuse(500, "internal error")
            return
        self._accepted(request, headers, session)
        # The exit's protocol takes the socket: our dataReceived and connectionLost pass
        # Twisted's calls on to it. It is given the request we parsed (never the client's
        # bytes to parse again) and what followed it.
        factory.pending.discard(self)
        self.taken_by(taken)
        if session is not None and session.expires_at != math.inf:
            self._expire_at(session.expires_at, taken)
        rest, self._parser = self._parser.rest, None
        taken.makeConnection(self.transport)
        taken.take_over(request, rest)

    def serving_plain(self) -> None:
        """A plain request is taken (by _route, or by the express lane): the connection is
        kept for the next, and sends what it is given at once."""
        self._cancel_timeout()
        self._idle = False
        factory = self.factory
        factory.pending.discard(self)
        factory.kept.add(self)
        if not self.relaying:
            self.relaying = True
            no_delay(self.transport)  # responses go out as they come: Nagle would hold them

    def taken_by(self, protocol: Any) -> None:
        """From now on `protocol` (a ws connection, an HTTP/2 connection) gets this
        connection's reads and its end."""
        self.taken, self.reading = protocol, Reading.TAKEN
        self._cancel_idle_timer()

    def _accepted(self, request: Request, headers: dict[str, str], session: Session | None) -> None:
        admission.emit_accepted(self.factory, self.trace_id, request.method, request.shown_target, headers, session)

    def request_done(self, closing: bool, pipelined: bytes) -> None:
        """A plain exchange is over: close, or wait for the next request (what followed the
        last one first). Pipelined requests are served in a loop here, not by recursion."""
        factory = self.factory
        if closing or factory.shutting_down or self._gone:
            factory.kept.discard(self)
            self.reading = Reading.DISCARDED
            self.transport.loseConnection()
            return
        self.trace_id = next_trace_id()
        if not self._parser.idle:
            self._parser = RequestHeadParser(max_header_bytes=factory.max_header_bytes)
        self._idle = True
        self._idle_since = factory.reactor.seconds()
        if self._idle_timer is None:
            # One idle timer per connection, re-armed only when it fires (not per request)
            self._idle_timer = factory.reactor.callLater(factory.idle_timeout, self._idle_check)
        if not pipelined and not self._queued:
            return  # nothing waits (the usual case): no loop to enter
        self._queued += pipelined
        if self._feeding:
            return
        self._feeding = True
        try:
            while self._queued and self.exchange is None and not self._gone and self.reading is Reading.HEADS:
                data, self._queued = self._queued, b""
                self.dataReceived(data)
        finally:
            self._feeding = False

    def _next_request_started(self) -> None:
        self._idle = False  # the idle timer, when it fires, finds so and lets go
        factory = self.factory
        factory.kept.discard(self)
        factory.pending.add(self)

    def _idle_check(self) -> None:
        """A kept-alive connection with no new request for idle_timeout: closed without a
        response."""
        self._idle_timer = None
        if not self._idle or self._gone:
            return
        factory = self.factory
        remaining = self._idle_since + factory.idle_timeout - factory.reactor.seconds()
        if remaining > 0:
            self._idle_timer = factory.reactor.callLater(remaining, self._idle_check)
            return
        factory.kept.discard(self)
        self.transport.loseConnection()

    def _cancel_idle_timer(self) -> None:
        timer, self._idle_timer = self._idle_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _expire_at(self, when: float, taken: Any) -> None:
        """End the connection when its session expires: IHttpConnection.session_expired() (the
        ws server closes with 1008), else abort as Zilla does. The one timer per connection
        is cancelled when the connection ends."""
        reactor = self.factory.reactor
        self._expiry = reactor.callLater(max(0.0, when - reactor.seconds()), self._session_expired, taken)

    def _session_expired(self, taken: Any) -> None:
        if IHttpConnection.providedBy(taken):
            taken.session_expired()
        else:
            self.transport.abortConnection()

    def _refuse(self, status: int, reason: str, headers: tuple[tuple[str, str], ...] = (),
                detail: str = "") -> None:
        """Answer with the gateway's own response and close; `detail` only in the event."""
        self._cancel_timeout()
        factory = self.factory
        factory.pending.discard(self)
        factory.kept.discard(self)
        self.exchange = None
        admission.emit_rejected(factory, self.trace_id, status, reason, detail)
        self.reading = Reading.DISCARDED
        self.transport.write(render_response(status, reason, headers))
        self.transport.loseConnection()

    def _head_timed_out(self) -> None:
        self._timeout = None
        self._refuse(408, f"request head not received within {self.factory.head_timeout:g} s")

    def _cancel_timeout(self) -> None:
        if self._timeout is not None:
            if self._timeout.active():
                self._timeout.cancel()
            self._timeout = None

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.reading is Reading.TAKEN:
            expiry, self._expiry = self._expiry, None
            if expiry is not None and expiry.active():
                expiry.cancel()
            self.taken.connectionLost(reason)
            return
        self._gone = True
        self._cancel_timeout()
        self._cancel_idle_timer()
        self.factory.pending.discard(self)
        self.factory.kept.discard(self)
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.connection_lost(reason)


def build(binding: BindingConfig, graph: Any) -> HttpServer | HttpClient:
    routes = [(route, graph.exit(route.exit, binding)) for route in binding.routes]
    overrides = {name.lower(): value for name, value in (binding.options.get("overrides") or {}).items()}
    types = http_validation.request_types(binding, graph)
    if binding.kind == "client":
        client = HttpClient(binding.name, routes, overrides, reactor=graph.reactor, namespace=binding.namespace,
                            events=graph.events(binding.namespace), limits=ClientLimits.of(binding.options),
                            versions=tuple(binding.options.get("versions") or DEFAULT_VERSIONS))
        client.forwarder.responses = http_validation.ResponseChecks(types) if types is not None else None
        return client
    routes = http_validation.validating_routes(types, routes)
    authorization = None
    for guard, config in (binding.options.get("authorization") or {}).items():
        authorization = HttpAuthorization(graph.guard(f"{binding.namespace}:{guard}"), config["credentials"])
    trusted = binding.options.get("trusted-proxies")
    return HttpServer(binding.name, routes, namespace=binding.namespace, events=graph.events(binding.namespace),
                      head_timeout=binding.options.get("head-timeout", HEAD_TIMEOUT), authorization=authorization,
                      overrides=overrides, access_control=AccessControl(binding.options.get("access-control")),
                      reactor=graph.reactor,
                      trusted_proxies=clientaddress.TrustedProxies(trusted) if trusted is not None else None,
                      idle_timeout=binding.options.get("idle-timeout", http_plain.IDLE_TIMEOUT),
                      body_timeout=binding.options.get("body-timeout", http_plain.BODY_TIMEOUT),
                      max_request_body=binding.options.get("max-request-body"),
                      versions=tuple(binding.options.get("versions") or DEFAULT_VERSIONS))


PLUGIN = BindingType("http", SCHEMA_PATCH, STREAMS, build, check=check, guard_references=guard_references,
                     guarded_kinds=frozenset(GUARDED_KINDS), unguarded_why=UNGUARDED_WHY,
                     check_in_namespace=lambda binding, namespace, registry: http_validation.check(
                         binding, namespace, registry.catalogs))
