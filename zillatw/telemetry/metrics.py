"""Zilla's metrics (`telemetry.metrics`) and its `prometheus` exporter.

The namespace's `telemetry.metrics` declares which metrics exist; a binding records those
its own `telemetry.metrics` globs (e.g. `stream.*`) select. A binding without them records
nothing and is not touched: no wrapper, no counter, no cost.

A recording binding is metered by decoration, when the graph hands it to the bindings that
exit to it (`Metrics.metered_exit`): a stream exit is wrapped (MeteredExit), a factory of
connections too (MeteredFactory, whose protocols are wrapped); a ws server reports through
the observer it is built with (WsServerObserver). Each wrapper holds its binding's counters
(plain integers), so the data path adds one call and one addition per read, write or
message fragment, never a lookup. The prometheus exporter reads the counters
when it is scraped, through a prometheus-client collector.

What a "stream" is, per binding:
- tcp, tls and http servers: a connection (an http server reads one request per
  connection: the upgraded WebSocket's bytes are that request's body, as in Zilla);
  data is bytes as read from and written to the connection.
- ws server and client, echo, fan: a WebSocket stream; data is message payload bytes.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from twisted.internet import defer, endpoints, error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from zillatw.config import BindingConfig, Config
from zillatw.errors import did_you_mean
from zillatw.telemetry.events import BindingEvents, Events
from zillatw.matching import matcher
from zillatw.stream import ABNORMAL, IHttpRequestExit, IStreamEnd, IStreamExit, StreamRefused

# Zilla's metric names: kind, unit (the Prometheus suffix), and what zillatw records.
STREAM_METRICS = {
    "stream.active.received": ("gauge", ""),
    "stream.active.sent": ("gauge", ""),
    "stream.opens.received": ("counter", ""),
    "stream.opens.sent": ("counter", ""),
    "stream.data.received": ("counter", "bytes"),
    "stream.data.sent": ("counter", "bytes"),
    "stream.errors.received": ("counter", ""),
    "stream.errors.sent": ("counter", ""),
    "stream.closes.received": ("counter", ""),
    "stream.closes.sent": ("counter", ""),
}
HTTP_METRICS = {"http.active.requests": ("gauge", ""), "http.duration": ("histogram", "milliseconds")}
METRICS = {**STREAM_METRICS, **HTTP_METRICS}
# The exporters zillatw serves: stdout (events, zillatw.telemetry.events) and prometheus (metrics);
# Zilla's others pass the schema and are refused by name.
SUPPORTED_EXPORTERS = ("stdout", "prometheus")
# Zilla's, not recorded by zillatw yet: refused by name when declared.
UNRECORDED_METRICS = ("http.request.size", "http.response.size",
           "grpc.active.requests", "grpc.duration", "grpc.request.size", "grpc.response.size",
           "grpc.requests.per.rpc", "grpc.responses.per.rpc")

_HELP = {
    "active": "streams open", "opens": "streams opened", "data": "bytes",
    "errors": "streams ended by an error", "closes": "streams closed", "requests": "requests in progress",
    "duration": "from a request's first byte until its response ends (an upgraded one's WebSocket closes)",
}
# http.duration's buckets, in milliseconds (upper bounds; +Inf follows)
DURATION_BUCKETS = (1, 5, 10, 50, 100, 500, 1_000, 5_000, 10_000, 60_000, 300_000, 3_600_000, 86_400_000)


def prometheus_name(metric: str) -> str:
    """Zilla's Prometheus name, without the `_total` prometheus-client adds to counters:
    dots become underscores, byte units end in `_bytes`."""
    unit = METRICS[metric][1]
    return metric.replace(".", "_") + (f"_{unit}" if unit else "")


def applies(binding: BindingConfig, metric: str) -> bool:
    """Whether zillatw records `metric` on this kind of binding."""
    if metric in HTTP_METRICS:
        return binding.type == "http" and binding.kind == "server"
    if binding.kind == "client" and binding.type in ("tcp", "http", "tls"):
        return False  # their connections are the ws client's; not instrumented yet
    return metric in STREAM_METRICS


def selected(binding: BindingConfig, declared: Iterable[str]) -> tuple[str, ...]:
    """The declared metrics the binding's `telemetry.metrics` globs select (Zilla's rule)."""
    globs = [matcher(g) for g in binding.telemetry.get("metrics") or ()]
    return tuple(m for m in declared if any(g(m) for g in globs) and applies(binding, m))


# ---------------------------------------------------------------------------- config checks

def check(namespace: Any, where: str) -> Iterator[str]:
    """Problems in a namespace's telemetry (metrics names, prometheus options, binding globs)."""
    telemetry = namespace.telemetry
    declared = list(telemetry.get("metrics") or ())
    for name, exporter in (telemetry.get("exporters") or {}).items():
        if exporter["type"] not in SUPPORTED_EXPORTERS:
            yield (f"{where}telemetry.exporters.{name}.type: exporter type '{exporter['type']}' is not "
                   f"supported by this zillatw yet (supported: {', '.join(SUPPORTED_EXPORTERS)})")
    if "attributes" in telemetry:
        yield f"{where}telemetry.attributes: not supported by this zillatw yet"
    for index, name in enumerate(declared):
        if name in UNRECORDED_METRICS:
            yield (f"{where}telemetry.metrics[{index}]: metric '{name}' is not recorded by this zillatw yet "
                   f"(supported: {', '.join(METRICS)})")
        elif name not in METRICS:
            yield f"{where}telemetry.metrics[{index}]: unknown metric '{name}'{did_you_mean(name, METRICS)}"
    for name, exporter in (telemetry.get("exporters") or {}).items():
        if exporter["type"] == "prometheus":
            yield from _check_prometheus(f"{where}telemetry.exporters.{name}.options", exporter.get("options"))
    for binding in namespace.bindings.values():
        base = f"{where}bindings.{binding.name}.telemetry"
        if "attributes" in binding.telemetry:
            yield f"{base}.attributes: not supported by this zillatw yet"
        globs = binding.telemetry.get("metrics") or ()
        for index, glob in enumerate(globs):
            match = matcher(glob)
            if not any(match(m) for m in declared):
                yield (f"{base}.metrics[{index}]: '{glob}' selects none of the namespace's telemetry.metrics"
                       + (f" ({', '.join(declared)})" if declared else " (there are none)"))
        chosen = [m for m in declared if any(matcher(g)(m) for g in globs)]
        if chosen and not selected(binding, declared):
            yield (f"{base}.metrics: {'an' if binding.type[:1] in 'aeiou' else 'a'} {binding.type} {binding.kind} "
                   f"records none of {', '.join(chosen)} in this zillatw yet")


def _check_prometheus(path: str, options: Any) -> Iterator[str]:
    if not isinstance(options, Mapping) or "endpoints" not in options:
        yield f"{path}: missing required key 'endpoints' (a list of {{scheme: http, port, path}})"
        return
    for key in options:
        if key != "endpoints":
            yield f"{path}.{key}: not allowed here (expected: endpoints)"
    endpoints_ = options["endpoints"]
    if not isinstance(endpoints_, list) or not endpoints_:
        yield f"{path}.endpoints: expected a non-empty list of {{scheme: http, port, path}}"
        return
    for index, endpoint in enumerate(endpoints_):
        at = f"{path}.endpoints[{index}]"
        if not isinstance(endpoint, Mapping):
            yield f"{at}: expected a mapping with scheme, port and path"
            continue
        for key in endpoint:
            if key not in ("scheme", "port", "path"):
                yield f"{at}.{key}: unknown key '{key}' (expected one of: scheme, port, path)"
        if endpoint.get("scheme") != "http":
            yield f"{at}.scheme: expected 'http', got {endpoint.get('scheme')!r}"
        port = endpoint.get("port")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            yield f"{at}.port: expected a port number (0-65535), got {port!r}"
        path_ = endpoint.get("path", "/metrics")
        if not isinstance(path_, str) or not path_.startswith("/"):
            yield f"{at}.path: expected a path starting with '/', got {path_!r}"


# ---------------------------------------------------------------------------- counters

class BindingMetrics:
    """One binding's counters. Plain integers: the data path only adds to them."""

    __slots__ = ("namespace", "binding", "names", "opens_received", "opens_sent", "data_received", "data_sent",
                 "errors_received", "errors_sent", "closes_received", "closes_sent", "active",
                 "durations", "duration_sum", "timed")

    def __init__(self, namespace: str, binding: str, names: tuple[str, ...]):
        self.namespace = namespace
        self.binding = binding
        self.names = names
        self.opens_received = self.opens_sent = self.data_received = self.data_sent = 0
        self.errors_received = self.errors_sent = self.closes_received = self.closes_sent = 0
        self.active = 0
        self.timed = "http.duration" in names
        self.durations = [0] * (len(DURATION_BUCKETS) + 1)  # per bucket, not cumulative; the last is +Inf
        self.duration_sum = 0.0

    def observe_duration(self, milliseconds: float) -> None:
        self.durations[bisect.bisect_left(DURATION_BUCKETS, milliseconds)] += 1
        self.duration_sum += milliseconds

    def histogram(self) -> list[tuple[str, int]]:
        buckets, total = [], 0
        for bound, count in zip([*map(str, map(float, DURATION_BUCKETS)), "+Inf"], self.durations):
            total += count
            buckets.append((bound, total))
        return buckets

    def value(self, metric: str) -> int:
        if metric in ("stream.active.received", "stream.active.sent", "http.active.requests"):
            return self.active
        return getattr(self, metric.partition(".")[2].replace(".", "_"))


class _Collector:
    """prometheus-client's view of every binding's counters, read at scrape time."""

    def __init__(self) -> None:
        self.bindings: list[BindingMetrics] = []

    def collect(self) -> Iterator[Any]:
        for metric, (kind, _) in METRICS.items():
            recording = [m for m in self.bindings if metric in m.names]
            if not recording:
                continue
            family_type = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily,
                           "histogram": HistogramMetricFamily}[kind]
            what = _HELP[metric.split(".")[-1] if metric in HTTP_METRICS else metric.split(".")[1]]
            family = family_type(prometheus_name(metric), f"Zilla's {metric}: {what}",
                                 labels=["namespace", "binding"])
            for m in recording:
                if kind == "histogram":
                    family.add_metric([m.namespace, m.binding], m.histogram(), m.duration_sum)
                else:
                    family.add_metric([m.namespace, m.binding], m.value(metric))
            yield family


# ---------------------------------------------------------------------------- streams (messages)

class _Stream:
    """One metered stream's state: which directions have ended."""
    __slots__ = ("m", "received_ended", "sent_ended")

    def __init__(self, m: BindingMetrics):
        self.m = m
        self.received_ended = self.sent_ended = False

    def end_received(self, code: int) -> None:
        """The caller's side ended: the stream is over for this binding."""
        if self.received_ended:
            return
        self.received_ended = True
        m = self.m
        m.active -= 1
        if code == ABNORMAL:
            m.errors_received += 1
        else:
            m.closes_received += 1
        if not self.sent_ended:  # the reply ends with it
            self.sent_ended = True
            m.closes_sent += 1

    def end_sent(self, code: int) -> None:
        """The exit's side ended (it closes, or fails with 1006/1011)."""
        if self.sent_ended:
            return
        self.sent_ended = True
        if code in (ABNORMAL, 1011):
            self.m.errors_sent += 1
        else:
            self.m.closes_sent += 1


@implementer(IStreamEnd)
class _ToExit:
    """Wraps the exit's stream end: what the caller sends through it was received."""
    __slots__ = ("_end", "_m", "_stream", "pauseProducing", "resumeProducing", "stopProducing")

    def __init__(self, end: IStreamEnd, stream: _Stream):
        self._end, self._m, self._stream = end, stream.m, stream
        self.pauseProducing, self.resumeProducing = end.pauseProducing, end.resumeProducing
        self.stopProducing = end.stopProducing

    def stream_data(self, opcode: int, payload: bytes, fin: bool) -> None:
        self._m.data_received += len(payload)
        self._end.stream_data(opcode, payload, fin)

    def stream_end(self, code: int, reason: str) -> None:
        self._stream.end_received(code)
        self._end.stream_end(code, reason)


@implementer(IStreamEnd)
class _ToPeer:
    """Wraps the caller's stream end as the exit sees it: what the exit sends was sent."""
    __slots__ = ("_end", "_m", "_stream", "pauseProducing", "resumeProducing", "stopProducing")

    def __init__(self, end: IStreamEnd, stream: _Stream):
        self._end, self._m, self._stream = end, stream.m, stream
        self.pauseProducing, self.resumeProducing = end.pauseProducing, end.resumeProducing
        self.stopProducing = end.stopProducing

    def stream_data(self, opcode: int, payload: bytes, fin: bool) -> None:
        self._m.data_sent += len(payload)
        self._end.stream_data(opcode, payload, fin)

    def stream_end(self, code: int, reason: str) -> None:
        self._stream.end_sent(code)
        self._end.stream_end(code, reason)


def metered_open(open_: Any, m: BindingMetrics | None, count_received: bool = True,
                 on_open: Any = None, on_refused: Any = None) -> Any:
    """An exit's `open(info, peer)` that meters the stream for `m`'s binding (opens, data,
    ends) and reports the outcome to on_open() / on_refused(StreamRefused)."""

    def opened(end: IStreamEnd, stream: _Stream | None) -> IStreamEnd:
        if on_open is not None:
            on_open()
        if stream is None:
            return end
        stream.m.opens_sent += 1
        stream.m.active += 1
        return _ToExit(end, stream)

    def refused(refusal: StreamRefused) -> None:
        if m is not None:
            m.errors_sent += 1
        if on_refused is not None:
            on_refused(refusal)

    def open(info: Any, peer: IStreamEnd) -> Any:
        stream = None
        if m is not None:
            if count_received:
                m.opens_received += 1
            stream = _Stream(m)
            peer = _ToPeer(peer, stream)
        try:
            end = open_(info, peer)
        except StreamRefused as e:
            refused(e)
            raise
        if isinstance(end, Deferred):
            def failed(failure: Failure) -> Failure:
                if failure.check(StreamRefused):
                    refused(failure.value)
                return failure
            return end.addCallbacks(opened, failed, callbackArgs=(stream,))
        return opened(end, stream)

    return open


@implementer(IStreamExit)
class MeteredExit:
    """A stream exit (echo, fan, ws client) as its callers see it when it records metrics:
    every stream opened through it is metered for its binding. Anything else asked of it
    (its name, its connections) is the exit's own."""

    __slots__ = ("exit", "open")

    def __init__(self, exit_: Any, open_: Any):
        self.exit = exit_
        self.open = open_

    def __getattr__(self, name: str) -> Any:
        return getattr(self.exit, name)


@implementer(IHttpRequestExit)
class MeteredRequestExit(MeteredExit):
    """A metered stream exit that also answers plain HTTP requests (echo): those pass to
    it unmetered (open_request is the exit's own, by __getattr__)."""

    __slots__ = ()


def _ws_details(info: Any, shown_path: str) -> str:
    scheme = {"http": "ws", "https": "wss"}.get(info.scheme, info.scheme)
    return f"{info.identity or '-'} GET {scheme}://{info.authority or ''}{shown_path} {info.protocol or '-'}"


class WsServerObserver:
    """What a ws server tells its metrics and events (BINDING_WS_REQUEST_ACCEPTED/REJECTED)
    about each upgrade request: a stream is received with the request and sent (opened)
    when the exit its routes chose accepts it. The ws server calls:

    - rejected(trace_id, status, reason, identity=None) when it refuses the upgrade itself;
    - opening(trace_id, info, shown_path, exit_) with the exit it chose, and opens the stream
      through the exit this returns, which reports accepted(trace_id, info, shown_path) or
      the exit's refusal.
    """

    __slots__ = ("m", "events")

    def __init__(self, m: BindingMetrics | None, events: BindingEvents | None):
        self.m = m
        self.events = events

    def rejected(self, trace_id: int, status: int, reason: str, identity: str | None = None) -> None:
        if self.m is not None:
            self.m.opens_received += 1
            self.m.errors_sent += 1
        if self.events is not None:
            self.events.rejected(trace_id, status, reason, identity)

    def accepted(self, trace_id: int, info: Any, shown_path: str) -> None:
        if self.events is not None:
            self.events.accepted(trace_id, _ws_details(info, shown_path))

    def opening(self, trace_id: int, info: Any, shown_path: str, exit_: Any) -> Any:
        if self.m is not None:
            self.m.opens_received += 1
        events = self.events

        def refused(refusal: StreamRefused) -> None:
            if events is not None:
                events.rejected(trace_id, refusal.status, refusal.logged, info.identity)
        return MeteredExit(exit_, metered_open(exit_.open, self.m, False,
                                               lambda: self.accepted(trace_id, info, shown_path), refused))


# ---------------------------------------------------------------------------- connections (bytes)

class _MeteredConnection:
    """A server connection (tcp, tls, http) counted as one stream of bytes. It stands in for
    the binding's protocol toward the transport (reads are counted on the way in) and hands
    that protocol the transport itself, its `write` counted in place: the layers above keep
    the real transport (Autobahn wants the TLS protocol itself to find its channel id)."""

    def __init__(self, m: BindingMetrics, wrapped: Any, seconds: Callable[[], float]):
        self.wrappedProtocol = wrapped
        self.m = m
        self.seconds = seconds  # the reactor's clock, for http.duration
        directlyProvides(self, providedBy(wrapped))  # half-close, TLS handshake listeners

    def makeConnection(self, transport: Any) -> None:
        m = self.m
        m.opens_received += 1
        m.opens_sent += 1
        m.active += 1
        if m.timed:
            self.started = self.seconds()
        if hasattr(type(transport), "writeSomeData"):
            # A socket (tcp.Server): count what reaches it, whether through write() and the
            # reactor's doWrite or written through at once (zillatw.twistedcompat).
            send = transport.writeSomeData

            def counted_send(data: Any) -> Any:
                sent = send(data)
                if type(sent) is int:  # else the exception of a lost connection
                    m.data_sent += sent
                return sent
            transport.writeSomeData = counted_send
        else:  # TLS, or another protocol's transport
            write = transport.write

            def counted_write(data: bytes) -> None:
                m.data_sent += len(data)
                write(data)
            # writeSequence through counted_write: some transports' writeSequence calls
            # their own write (TLS), which would count twice
            transport.write = counted_write
            transport.writeSequence = lambda data: counted_write(b"".join(data))
        self.transport = transport
        self.wrappedProtocol.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.m.data_received += len(data)
        self.wrappedProtocol.dataReceived(data)

    def connectionLost(self, reason: Failure = None) -> None:
        m = self.m
        m.active -= 1
        if reason is None or reason.check(error.ConnectionDone):
            m.closes_received += 1
        else:
            m.errors_received += 1
        m.closes_sent += 1
        if m.timed:
            m.observe_duration((self.seconds() - self.started) * 1000)
        self.wrappedProtocol.connectionLost(reason)

    def __getattr__(self, name: str) -> Any:  # logPrefix, readConnectionLost, handshakeCompleted...
        return getattr(self.wrappedProtocol, name)


@implementer(IProtocolFactory)
class MeteredFactory:
    """A factory of server connections (an http or tls server as the exit of a tcp or tls
    server; or, for a tcp server, each exit it hands connections to) whose protocols are
    metered as streams of one binding. Everything else is the factory's own."""

    def __init__(self, factory: Any, m: BindingMetrics, seconds: Callable[[], float]):
        self.wrappedFactory = factory
        self.m = m
        self.seconds = seconds

    def buildProtocol(self, addr: Any) -> Any:
        protocol = self.wrappedFactory.buildProtocol(addr)
        return None if protocol is None else _MeteredConnection(self.m, protocol, self.seconds)

    def __getattr__(self, name: str) -> Any:  # doStart, doStop, logPrefix, the binding's own
        return getattr(self.wrappedFactory, name)


# ---------------------------------------------------------------------------- the whole

class Metrics:
    """Every namespace's metrics and the prometheus exporters that serve them."""

    def __init__(self, config: Config, events: Mapping[str, Events] | None = None, *, reactor: Any):
        self.reactor = reactor  # its exporters listen on it, http.duration is timed by it
        self.registry = CollectorRegistry(auto_describe=False)
        self._collector = _Collector()
        self.registry.register(self._collector)
        # the fan bindings' Redis links (zillatw.bindings.fan.redis), which they add as they are built
        self.fan_redis_links = RedisCollector()
        self.registry.register(self.fan_redis_links)
        self._events = dict(events or {})
        self._metrics: dict[str, BindingMetrics | None] = {}
        self._declared = {ns.name: tuple(ns.telemetry.get("metrics") or ()) for ns in config.namespaces}
        # port -> paths served there, from every namespace's prometheus exporters
        self.endpoints: dict[int, set[str]] = {}
        for ns in config.namespaces:
            for exporter in (ns.telemetry.get("exporters") or {}).values():
                if exporter["type"] == "prometheus":
                    for endpoint in exporter["options"]["endpoints"]:
                        self.endpoints.setdefault(endpoint["port"], set()).add(endpoint.get("path", "/metrics"))
        self._listening: list[Any] = []

    def metrics(self, binding: BindingConfig) -> BindingMetrics | None:
        """The binding's counters (one set per binding), if it records any metric."""
        if binding.qname in self._metrics:
            return self._metrics[binding.qname]
        names = selected(binding, self._declared.get(binding.namespace, ()))
        m = self._metrics[binding.qname] = BindingMetrics(binding.namespace, binding.name, names) if names else None
        if m is not None:
            self._collector.bindings.append(m)
        return m

    def metered_exit(self, caller: BindingConfig, target: BindingConfig, built: Any) -> Any:
        """`built` (the binding `target`) as the exit of `caller`: wrapped so that its streams
        are counted for `target` when it records metrics (a ws server reports through its
        observer instead) and, for a tcp server, also for `caller`, whose streams are the
        connections it hands on. Unwrapped, at no cost, when neither records any."""
        exit_ = built
        m = self.metrics(target) if not (target.type == "ws" and target.kind == "server") else None
        if m is not None:
            if IStreamExit.providedBy(built):
                metered = MeteredRequestExit if IHttpRequestExit.providedBy(built) else MeteredExit
                exit_ = metered(built, metered_open(built.open, m))
            elif IProtocolFactory.providedBy(built):
                exit_ = MeteredFactory(built, m, self.reactor.seconds)
        handing_on = self.metrics(caller) if caller.type == "tcp" and caller.kind == "server" else None
        if handing_on is not None:
            exit_ = MeteredFactory(exit_, handing_on, self.reactor.seconds)
        return exit_

    def ws_server_observer(self, binding: BindingConfig) -> WsServerObserver | None:
        """What a ws server reports its upgrades to, or None if it records no metric and
        its namespace has no events."""
        events = self._events.get(binding.namespace)
        binding_events = events.binding(binding.namespace, binding.name, binding.type) \
            if events is not None and events.enabled else None
        m = self.metrics(binding)
        return WsServerObserver(m, binding_events) if m is not None or binding_events is not None else None

    # ---- the prometheus exporters

    def listen(self, reactor: Any) -> Deferred:
        """Serve every prometheus endpoint; fires with the bound ports."""
        from prometheus_client.twisted import MetricsResource
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        @defer.inlineCallbacks
        def start() -> Any:
            for port, paths in sorted(self.endpoints.items()):
                root = Resource()
                for path in sorted(paths):
                    parent = root
                    segments = [s.encode() for s in path.strip("/").split("/")]
                    for segment in segments[:-1]:
                        child = parent.children.get(segment)
                        if child is None:
                            child = Resource()
                            parent.putChild(segment, child)
                        parent = child
                    parent.putChild(segments[-1], MetricsResource(self.registry))
                site = Site(root)
                site.noisy = False
                site.log = lambda request: None  # no access log line per scrape
                listening = yield endpoints.TCP4ServerEndpoint(reactor, port).listen(site)
                self._listening.append(listening)
            return self.ports()

        d = start()

        def failed(failure: Failure) -> Failure:
            self.stop()
            return failure
        return d.addErrback(failed)

    def ports(self) -> list[int]:
        """The ports the prometheus exporters listen on (useful with port 0)."""
        return [p.getHost().port for p in self._listening]

    def stop(self) -> Deferred:
        listening, self._listening = self._listening, []
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in listening])
