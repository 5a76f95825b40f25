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

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily
from twisted.internet import defer, endpoints
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory
from twisted.python.failure import Failure

from zillatw.bytestream import MeteredBytesExit
from zillatw.config import BindingConfig, Config
from zillatw.errors import did_you_mean
from zillatw.matching import matcher
from zillatw.stream import IBytesExit, IHttpExit, IHttpRequestExit, IStreamExit
from zillatw.telemetry import httpexchanges, httpsizes, otlp
from zillatw.telemetry.accesslog import check_stdout
from zillatw.telemetry.events import Events
from zillatw.telemetry.instrument import (
    BindingMetrics,
    MeteredExit,
    MeteredFactory,
    MeteredRequestExit,
    WsServerObserver,
    metered_open,
)
from zillatw.telemetry.sessions import SessionObserver

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
HTTP_METRICS = {"http.active.requests": ("gauge", ""), "http.duration": ("histogram", "milliseconds"),
                "http.request.size": ("histogram", "bytes"), "http.response.size": ("histogram", "bytes")}
METRICS = {**STREAM_METRICS, **HTTP_METRICS}
# The exporters zillatw serves: stdout (events, zillatw.telemetry.events), prometheus (metrics),
# otlp (zillatw.telemetry.otlp) and health (ours: zillatw.telemetry.health); Zilla's others pass
# the schema and are refused by name.
SUPPORTED_EXPORTERS = ("stdout", "prometheus", "otlp", "health")
# Zilla's, not recorded by zillatw yet: refused by name when declared.
UNRECORDED_METRICS = ("grpc.active.requests", "grpc.duration", "grpc.request.size", "grpc.response.size",
           "grpc.requests.per.rpc", "grpc.responses.per.rpc")

_HELP = {
    "active": "streams open", "opens": "streams opened", "data": "bytes",
    "errors": "streams ended by an error", "closes": "streams closed",
}


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
    yield from otlp.check_attributes(f"{where}telemetry.attributes", telemetry.get("attributes"))
    for index, name in enumerate(declared):
        if name in UNRECORDED_METRICS:
            yield (f"{where}telemetry.metrics[{index}]: metric '{name}' is not recorded by this zillatw yet "
                   f"(supported: {', '.join(METRICS)})")
        elif name not in METRICS:
            yield f"{where}telemetry.metrics[{index}]: unknown metric '{name}'{did_you_mean(name, METRICS)}"
    for name, exporter in (telemetry.get("exporters") or {}).items():
        check_options = {"prometheus": _check_prometheus, "stdout": check_stdout, "otlp": otlp.check_options}.get(
            exporter["type"])
        yield from check_options(f"{where}telemetry.exporters.{name}.options", exporter.get("options")) \
            if check_options is not None else ()
    for binding in namespace.bindings.values():
        base = f"{where}bindings.{binding.name}.telemetry"
        yield from httpsizes.check_attributes(f"{base}.attributes", binding)
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


# ---------------------------------------------------------------------------- the prometheus view

class _Collector:
    """prometheus-client's view of every binding's counters, read at scrape time."""

    def __init__(self) -> None:
        self.bindings: list[BindingMetrics] = []

    def collect(self) -> Iterator[Any]:
        for metric, (kind, _) in METRICS.items():
            recording = [m for m in self.bindings if metric in m.names]
            if not recording or metric in HTTP_METRICS:  # httpexchanges' and httpsizes' collectors
                continue
            family_type = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = family_type(prometheus_name(metric), f"Zilla's {metric}: {_HELP[metric.split('.')[1]]}",
                                 labels=["namespace", "binding"])
            for m in recording:
                family.add_metric([m.namespace, m.binding], m.value(metric))
            yield family


class SampleSources:
    """prometheus-client's view of counters a binding keeps itself (a fan's Redis link): each
    source's `samples()` gives (name, "counter" | "gauge", help, value), labelled with the
    namespace and binding that added it (`Metrics.add_samples`)."""

    def __init__(self) -> None:
        self.sources: list[tuple[str, str, Any]] = []

    def collect(self) -> Iterator[Any]:
        families: dict[str, Any] = {}
        for namespace, binding, source in self.sources:
            for name, kind, help_, value in source.samples():
                family = families.get(name)
                if family is None:
                    family_type = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                    family = families[name] = family_type(name, help_, labels=["namespace", "binding"])
                family.add_metric([namespace, binding], value)
        yield from families.values()


# ---------------------------------------------------------------------------- the whole

class Metrics:
    """Every namespace's metrics and the prometheus exporters that serve them."""

    def __init__(self, config: Config, events: Mapping[str, Events] | None = None, *, reactor: Any):
        self.reactor = reactor  # its exporters listen on it, http.duration is timed by it
        self.registry = CollectorRegistry(auto_describe=False)
        self._collector = _Collector()
        self.registry.register(self._collector)
        # counters bindings keep themselves (a fan's Redis link), added as they are built
        self._sources = SampleSources()
        self.registry.register(self._sources)
        self._sizes = httpsizes.SizeCollector()  # http.request.size, http.response.size
        self.registry.register(self._sizes)
        self._exchanges = httpexchanges.ExchangeCollector()  # http.active.requests, http.duration
        self.registry.register(self._exchanges)
        self._http_meters: dict[str, httpexchanges.HttpServerMeters | None] = {}
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
        self.otlp = otlp.exporters(config, self._events, self.registry.collect, reactor,  # zillatw.telemetry.otlp
                                   {prometheus_name(m): (m, METRICS[m][1]) for m in METRICS})

    def add_samples(self, namespace: str, binding: str, source: Any) -> None:
        """Serve the counters `source.samples()` gives, labelled with its binding."""
        self._sources.sources.append((namespace, binding, source))

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
        # a tcp or tls server hands echo or fan byte streams (issue 15): counted as such
        as_bytes = caller.kind == "server" and caller.type in ("tcp", "tls") and IBytesExit.providedBy(built)
        if m is not None:
            if as_bytes:
                exit_ = MeteredBytesExit(built, m)
            elif IStreamExit.providedBy(built):
                metered = MeteredRequestExit if IHttpRequestExit.providedBy(built) else MeteredExit
                exit_ = metered(built, metered_open(built.open, m))
            elif IProtocolFactory.providedBy(built):
                exit_ = MeteredFactory(built, m)
        if caller.type == "http" and caller.kind == "server" and (IHttpRequestExit.providedBy(built)
                                                                  or IHttpExit.providedBy(built)):
            meters = self._http_server_meters(caller)
            if meters is not None:  # its requests are measured (zillatw.telemetry.httpexchanges)
                exit_ = httpexchanges.MeasuredExit(exit_, meters)
        handing_on = self.metrics(caller) if caller.type == "tcp" and caller.kind == "server" else None
        if handing_on is not None:
            exit_ = MeteredBytesExit(exit_, handing_on) if as_bytes else MeteredFactory(exit_, handing_on)
        return exit_

    def _http_server_meters(self, server: BindingConfig) -> httpexchanges.HttpServerMeters | None:
        """What an http server records per request (one set per binding, its labels' names
        resolved once), or None when it records none of the http metrics."""
        if server.qname in self._http_meters:
            return self._http_meters[server.qname]
        m = self.metrics(server)
        names = m.names if m is not None else ()
        meters = None
        if any(name in HTTP_METRICS for name in names):
            attributes = httpsizes.Attributes(server.telemetry.get("attributes"))
            at = (server.namespace, server.name, attributes)
            sizes = {name: httpsizes.SizeHistogram(*at) for name in httpsizes.SIZE_METRICS if name in names}
            for name, histogram in sizes.items():
                self._sizes.histograms[name].append(histogram)
            active = httpexchanges.ActiveGauge(*at) if "http.active.requests" in names else None
            durations = httpexchanges.DurationHistogram(*at) if "http.duration" in names else None
            if active is not None:
                self._exchanges.gauges.append(active)
            if durations is not None:
                self._exchanges.histograms.append(durations)
            meters = httpexchanges.HttpServerMeters(
                attributes, self.reactor.seconds, active=active, durations=durations,
                request_sizes=sizes.get("http.request.size"), response_sizes=sizes.get("http.response.size"))
        self._http_meters[server.qname] = meters
        return meters

    def ws_server_observer(self, binding: BindingConfig) -> WsServerObserver | SessionObserver | None:
        """What a ws server reports its upgrades to, or None if it records no metric and
        its namespace has no events."""
        events = self._events.get(binding.namespace)
        binding_events = events.binding(binding.namespace, binding.name, binding.type) \
            if events is not None and events.enabled else None
        m = self.metrics(binding)
        if binding_events is not None:  # and its session events (zillatw.telemetry.sessions)
            return SessionObserver(WsServerObserver(m, binding_events), binding_events, self.reactor.seconds)
        return WsServerObserver(m, None) if m is not None else None

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
                site.log = lambda request: None  # type: ignore[method-assign]  # no access log line per scrape
                listening = yield endpoints.TCP4ServerEndpoint(reactor, port).listen(site)
                self._listening.append(listening)
            for exporter in self.otlp:  # and the otlp exporters' intervals (zillatw.telemetry.otlp)
                exporter.start()
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
        for exporter in self.otlp:
            exporter.stop()
        listening, self._listening = self._listening, []
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in listening])
