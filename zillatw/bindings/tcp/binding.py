"""tcp server: listens on host and ports (or any Twisted server endpoint string) and hands
each accepted connection to the exit its routes choose. tcp client: connects upstream, to
options.host:port, or without them to the authority it is given, which its routes must allow;
or, with options.upstreams, to one of a pool of them (zillatw.bindings.tcp.pool).

Routes match `port` (the listening port the client reached), `cidr` (the client's address;
Zilla's code tests the local address, but restricting clients is what a cidr route is for)
and `authority` (the listener's configured host). No matching route: the socket is closed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

from twisted.internet import defer, endpoints
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IListeningPort, IProtocolFactory
from twisted.internet.protocol import Factory
from zope.interface import implementer

from zillatw.bindings.tcp import pool as tcp_pool
from zillatw.bindings.tcp import proxyprotocol as tcp_proxyprotocol
from zillatw.bindings.tcp.proxyprotocol import ProxyProtocol
from zillatw.bindings.tcp.upstreams import MAX_FAILS, MAX_PASSES, MAX_UPSTREAMS, MAX_WEIGHT, Balance
from zillatw.bytestream import BytesConnection, server_info
from zillatw.config import BindingConfig, Route
from zillatw.config.plugins import BindingType, IRunsInBackground
from zillatw.config.schema import FORBIDDEN, PORT, PORT_SPEC, refused, route_schema
from zillatw.matching import matcher
from zillatw.stream import IBytesExit, IUpstreamConnector, StreamRefused

MAX_PORTS = 1024

SCHEMA_PATCH = {
    "properties": {
        "kind": {"enum": ["server", "client"]},
        "vault": FORBIDDEN, "catalog": FORBIDDEN,
        "options": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "host": {"type": "string"},
                "port": PORT_SPEC,
                # Zilla's parser reads it (its schema refuses it): the listen() queue, default 50
                "backlog": {"type": "integer", "minimum": 1},
                # zillatw: any Twisted server endpoint string, e.g. "unix:/run/zilla.sock" or
                # "systemd:domain=INET:index=0"
                "endpoint": {"type": "string"},
                # zillatw, a client's pool (docs/upstreams.md): instead of host and port
                "upstreams": {"type": "array", "minItems": 1, "maxItems": MAX_UPSTREAMS, "items": {
                    "type": "object", "additionalProperties": False, "required": ["host", "port"],
                    "properties": {"host": {"type": "string", "minLength": 1}, "port": {**PORT, "minimum": 1},
                                   "weight": {"type": "integer", "minimum": 1, "maximum": MAX_WEIGHT}}}},
                "balance": {"enum": [b.value for b in Balance]},
                "retries": {"type": "integer", "minimum": 0, "maximum": MAX_UPSTREAMS - 1},
                "health": {"type": "object", "additionalProperties": False, "properties": {
                    "interval": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
                    "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
                    "fails": {"type": "integer", "minimum": 1, "maximum": MAX_FAILS},
                    "passes": {"type": "integer", "minimum": 1, "maximum": MAX_PASSES}}},
                # zillatw: connections start with a PROXY protocol header (v1 or v2) stating the client
                "proxy-protocol": tcp_proxyprotocol.SCHEMA,
            },
        },
        "routes": {"type": "array", "items": route_schema(exit_required=False, condition={
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "authority": {"type": "string"},
                "cidr": {"type": "string", "pattern": r"^[0-9a-fA-F:.]+/(\d{1,3})$"},
                "port": PORT_SPEC,
            },
        })},
    },
    "if": {"properties": {"kind": {"const": "client"}}},
    "then": {"properties": {"exit": FORBIDDEN}},
    "else": {"properties": {"options": {"properties": {
        key: refused("a tcp server listens: upstreams are a tcp client's") for key in tcp_pool.POOL_KEYS}}}},
}
STREAMS = {"server": (None, "bytes"), "client": ("bytes", None)}
BACKLOG = 50  # Twisted's default, and what Java's bind() uses for Zilla's backlog 0
UNGUARDED_WHY = "a tcp connection carries no credentials; guard the routes of the http server behind it"


def parse_ports(spec: Any) -> list[int]:
    """7114, "7114", "7000-7010" or a list of those -> the ports, in order, without repeats."""
    items = spec if isinstance(spec, list) else [spec]
    ports: list[int] = []
    for item in items:
        low, _, high = str(item).partition("-")
        first, last = int(low), int(high or low)
        if first > last:
            raise ValueError(f"range '{item}' ends before it starts")
        if last > 65535:
            raise ValueError(f"port {last} is above 65535")
        ports.extend(p for p in range(first, last + 1) if p not in ports)
        if len(ports) > MAX_PORTS:
            raise ValueError(f"more than {MAX_PORTS} ports")
    return ports


def check(binding: BindingConfig) -> Iterator[tuple[str, str]]:
    yield from tcp_proxyprotocol.check(binding)
    if binding.kind == "client":
        yield from _check_client(binding)
        return
    yield from _check_listening(binding.options)
    if not binding.routes:
        yield "routes", "a tcp server needs 'exit' or routes with an exit"
    for route in binding.routes:
        if route.exit is None:
            yield f"routes[{route.index}]", "missing required key 'exit'"
        for index, condition in enumerate(route.when):
            yield from _check_condition(f"routes[{route.index}].when[{index}]", condition)


def _check_listening(options: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """A server's `endpoint`, or its `host` and `port`."""
    if "endpoint" in options:
        if "host" in options or "port" in options:
            yield "options.endpoint", "give either 'endpoint' or 'host' and 'port', not both"
        try:  # parsing only: an endpoint holds its reactor until it listens, which this one never does
            endpoints.serverFromString(None, options["endpoint"])
        except (ValueError, TypeError, KeyError) as e:
            yield "options.endpoint", f"not a Twisted server endpoint string ({e})"
        return
    for key in ("host", "port"):
        if key not in options:
            yield "options", f"missing required key '{key}' (or give 'endpoint')"
    if "port" in options:
        try:
            parse_ports(options["port"])
        except ValueError as e:
            yield "options.port", str(e)


def _check_condition(where: str, condition: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    if "port" in condition:
        try:
            parse_ports(condition["port"])
        except ValueError as e:
            yield f"{where}.port", str(e)
    if "cidr" in condition:
        try:
            ipaddress.ip_network(condition["cidr"], strict=False)
        except ValueError as e:
            yield f"{where}.cidr", str(e)


def _check_client(binding: BindingConfig) -> Iterator[tuple[str, str]]:
    options = binding.options
    yield from tcp_pool.check_pool(options)
    if "upstreams" in options:
        return
    if "endpoint" in options:
        yield "options.endpoint", "a tcp client connects to host and port"
    if "port" in options:
        try:
            if len(parse_ports(options["port"])) != 1:
                yield "options.port", "a tcp client connects to one port"
        except ValueError as e:
            yield "options.port", str(e)
    if "host" in options and "port" not in options:
        yield "options", "missing required key 'port' (with 'host')"
    if "host" not in options and not any(route.when for route in binding.routes):
        yield "options", "missing 'host' and 'port' (or routes naming the destinations allowed)"


class _Condition:
    __slots__ = ("ports", "network", "authority")

    def __init__(self, when: dict[str, Any]):
        self.ports = frozenset(parse_ports(when["port"])) if "port" in when else None
        self.network = ipaddress.ip_network(when["cidr"], strict=False) if "cidr" in when else None
        self.authority = matcher(when.get("authority"))

    def matches(self, port: int | None, client_host: str | None, host: str | None) -> bool:
        if self.ports is not None and port not in self.ports:
            return False
        if self.network is not None:
            try:
                if client_host is None or ipaddress.ip_address(client_host) not in self.network:
                    return False
            except ValueError:
                return False
        return self.authority(host)


class TcpServer:
    """A tcp server binding: its routes, and the listeners it opens."""

    def __init__(self, name: str, routes: Iterable[tuple[Route, Any]], host: str | None = None,
                 ports: Iterable[int] = (), endpoint: str | None = None, backlog: int = BACKLOG,
                 proxy_protocol: ProxyProtocol | None = None):
        self.name = name
        self.proxy_protocol = proxy_protocol  # each connection's PROXY header states its client, or None
        self.host = host
        self.ports = list(ports)
        self.endpoint = endpoint
        self.backlog = backlog
        # (conditions, exit factory) in route order; an empty condition list matches all
        self._routes = [([_Condition(dict(w)) for w in route.when], exit_) for route, exit_ in routes]
        self.listeners: list[Listener] = []

    @property
    def listening(self) -> list[IListeningPort]:
        return [listener.port for listener in self.listeners]

    def addresses(self) -> list[Any]:
        """What each listener is bound to, as configured: (host, port), or the endpoint string."""
        if self.endpoint is not None:
            return [self.endpoint]
        return [(self.host or "", port) for port in self.ports]

    def route(self, port: int | None, client: IAddress | None) -> IProtocolFactory | None:
        client_host = getattr(client, "host", None)
        for conditions, exit_ in self._routes:
            if not conditions or any(c.matches(port, client_host, self.host) for c in conditions):
                return exit_
        return None

    def endpoints(self, reactor: Any,
                  inherited: Mapping[tuple[str, int], Any] | None = None) -> list[tuple[int | None, Any]]:
        """(port, endpoint) per address; `inherited`: sockets a supervisor opened for this
        worker (zillatw.runtime.workers), by (host, port) as configured, adopted instead of bound."""
        if self.endpoint is not None:
            return [(None, endpoints.serverFromString(reactor, self.endpoint))]
        interface = self.host or ""
        kind = endpoints.TCP6ServerEndpoint if ":" in interface else endpoints.TCP4ServerEndpoint
        inherited = inherited or {}
        return [(port, inherited.get((interface, port))
                 or kind(reactor, port, backlog=self.backlog, interface=interface)) for port in self.ports]

    @defer.inlineCallbacks
    def listen(self, reactor: Any, skip: Iterable[Any] = (),
               inherited: Mapping[tuple[str, int], Any] | None = None) -> Any:
        """Listen on every address but those in `skip` (kept from a previous configuration, see
        hand_over), adopting the `inherited` sockets; on a failure, close what was opened and fail."""
        skip = set(skip)
        try:
            for address, (port, endpoint) in zip(self.addresses(), self.endpoints(reactor, inherited), strict=True):
                if address in skip:
                    continue
                factory = ListenerFactory(self, port)
                listening = yield endpoint.listen(factory)
                factory.local_port = getattr(listening.getHost(), "port", port)
                self.listeners.append(Listener(address, listening, factory))
        except Exception:
            yield self.stop()
            raise
        return self.listening

    def hand_over(self, kept: Iterable[Listener]) -> None:
        """Take over listeners of the previous configuration's tcp server (a reload): the same
        sockets, whose new connections this binding's routes take from now on. Connections
        they accepted before keep the protocols they were built with."""
        for listener in kept:
            listener.factory.server = self
            self.listeners.append(listener)
        order = self.addresses()
        self.listeners.sort(key=lambda listener: order.index(listener.address))

    def stop(self) -> defer.Deferred:
        listeners, self.listeners = self.listeners, []
        return defer.gatherResults([defer.maybeDeferred(listener.port.stopListening) for listener in listeners])

    def bound_ports(self) -> list[int]:
        hosts = [p.getHost() for p in self.listening]
        return [host.port for host in hosts if isinstance(host, (IPv4Address, IPv6Address))]


class Listener(NamedTuple):
    address: Any                 # as TcpServer.addresses() gives it
    port: IListeningPort
    factory: "ListenerFactory"


class ListenerFactory(Factory):
    """The factory of one listening socket: knows its port, asks the binding for the exit."""

    noisy = False

    def __init__(self, server: TcpServer, local_port: int | None):
        self.server = server
        self.local_port = local_port

    def buildProtocol(self, addr: IAddress) -> Any:  # type: ignore[override]  # a listener's peer: never None
        if self.server.proxy_protocol is not None:  # routed once the header has said who the client is
            return self.server.proxy_protocol.accept(self, addr)
        exit_ = self.server.route(self.local_port, addr)
        if exit_ is None:
            return None
        if IBytesExit.providedBy(exit_):  # echo, fan: the connection as a byte stream
            return BytesConnection(exit_, server_info("tcp"))
        return exit_.buildProtocol(addr)


@implementer(IUpstreamConnector, IRunsInBackground)
class TcpClient:
    """A tcp client binding: connects a protocol factory to the upstream."""

    def __init__(self, name: str, host: str | None = None, port: int | None = None,
                 conditions: Iterable[Mapping[str, Any]] = (), *, reactor: Any, qname: str | None = None):
        self.name = name
        self.qname = qname or name
        self.host = host
        self.port = port
        self.reactor = reactor
        self._conditions = [_Condition(dict(c)) for c in conditions]

    def destination(self, authority: str | None) -> tuple[str, int]:
        """options.host:port, else the stream's authority if the routes allow it."""
        if self.host is not None:
            return self.host, self.port or 80
        if not authority:
            raise StreamRefused(502, f"tcp client {self.name} has no destination")
        has_port = authority.rfind(":") > authority.rfind("]")  # not the colons of an [IPv6] literal
        host, _, port = authority.rpartition(":") if has_port else (authority, "", "80")
        host = host.strip("[]")
        destination = (host, int(port))
        if not any(c.matches(destination[1], host, host) for c in self._conditions):
            raise StreamRefused(502, f"destination {authority} is not allowed by tcp client {self.name}'s routes")
        return destination

    def start_service(self) -> None:
        # A reload that replaced this binding's pool of upstreams with one host: the pool's
        # probes stop and its upstreams drain (zillatw.bindings.tcp.pool).
        tcp_pool.superseded(self.reactor, self.qname)

    def stop_service(self) -> None:
        pass

    def connect(self, factory: IProtocolFactory, authority: str | None, timeout: float) -> defer.Deferred:
        """Connect `factory`'s protocol; fails with the endpoint's error (refused, timeout, DNS)."""
        try:
            host, port = self.destination(authority)
        except StreamRefused:
            return defer.fail()
        endpoint = endpoints.HostnameEndpoint(self.reactor, host, port, timeout=timeout)
        return endpoint.connect(factory)


def build(binding: BindingConfig, graph: Any) -> TcpServer | TcpClient | tcp_pool.PooledTcpClient:
    options = binding.options
    if binding.kind == "client" and "upstreams" in options:
        return tcp_pool.build_client(binding, graph)
    if binding.kind == "client":
        return TcpClient(binding.name, options.get("host"),
                         parse_ports(options["port"])[0] if "port" in options else None,
                         [w for route in binding.routes for w in route.when], reactor=graph.reactor,
                         qname=binding.qname)
    routes = [(route, graph.exit(route.exit, binding)) for route in binding.routes]
    return TcpServer(
        binding.name, routes, host=options.get("host"),
        ports=parse_ports(options["port"]) if "port" in options else (),
        endpoint=options.get("endpoint"), backlog=options.get("backlog", BACKLOG),
        proxy_protocol=ProxyProtocol(graph.reactor) if options.get("proxy-protocol") else None)


PLUGIN = BindingType("tcp", SCHEMA_PATCH, STREAMS, build, check=check, unguarded_why=UNGUARDED_WHY)
