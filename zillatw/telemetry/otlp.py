"""Zilla's `otlp` exporter: the metrics the prometheus exporter serves and the events,
pushed every `options.interval` seconds to an OpenTelemetry collector over OTLP/HTTP
(protobuf, with opentelemetry-sdk's data model and opentelemetry-exporter-otlp-proto-http).

    telemetry:
      attributes:
        service.name: gateway            # resource attributes of both signals (Zilla's rule)
      exporters:
        otlp0:
          type: otlp
          options:
            interval: 30                 # seconds, Zilla's default
            signals: [metrics, logs]     # Zilla's default: both
            endpoint:
              protocol: http             # the only one Zilla has
              location: http://collector:4318
              overrides: {metrics: /v1/metrics, logs: /v1/logs}   # resolved against location
            credentials: {headers: {authorization: Bearer ...}}  # sent, never logged

The reactor only takes a snapshot each interval (the counters as prometheus-client collects
them, up to LOG_BATCH queued events); one thread of the exporter's own encodes and posts
it, with a timeout under the interval. A snapshot waits for nothing: while the previous
post of a signal is still out, that interval's metrics are skipped (they are cumulative: the
next carries them) and events stay queued (zillatw.telemetry.accesslog.RecordQueue: bounded, the oldest
dropped and counted). A collector that fails is one OTLP_EXPORT_FAILED event (and log line)
when it starts failing and one OTLP_EXPORT_RECOVERED when it accepts again.

Attributes, as Zilla's exporter sets them: `telemetry.attributes` are the resource's (with
the SDK's defaults and `process.pid`, which tells `-w` workers apart); each data point has
`namespace` and `binding` (the prometheus labels) and `service.name` when the attributes
name one. Metric names are Zilla's (`stream.opens.received`; http.duration and
http.active.requests of a server as `http.server.duration`, `http.server.active_requests`).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import urljoin, urlsplit

from twisted.internet import defer, task
from twisted.logger import Logger

from zillatw.telemetry.accesslog import OTLP_SIGNALS, EventRecord, RecordQueue

INTERVAL = 30  # seconds between exports, Zilla's default
OVERRIDES = {"metrics": "/v1/metrics", "logs": "/v1/logs"}
OPTIONS = ("interval", "signals", "endpoint", "credentials", "tls")
LOG_BATCH = 1000  # events sent per export at most; the rest wait (bounded) for the next
MAX_TIMEOUT = 10.0  # seconds a post may take, at most (and less than the interval)
FINAL_WAIT = 2.0  # seconds a stopping configuration waits for its last export, at most
# Zilla's OTLP names for an http server's metrics
SERVER_NAMES = {"http.duration": "http.server.duration", "http.active.requests": "http.server.active_requests",
                "http.request.size": "http.server.request.size", "http.response.size": "http.server.response.size"}
SCOPE = "zillatw"
log = Logger()


# ---------------------------------------------------------------------------- config checks

def check_options(path: str, options: Any) -> Iterator[str]:
    """Problems in an otlp exporter's `options` (Zilla's schema, and what we refuse)."""
    if not isinstance(options, Mapping):
        yield f"{path}: missing required key 'endpoint' (endpoint: {{location: http://collector:4318}})"
        return
    for key in options:
        if key not in OPTIONS:
            yield f"{path}.{key}: not allowed here (expected one of: {', '.join(OPTIONS[:4])})"
    if "tls" in options:
        yield f"{path}.tls: not supported by this zillatw yet (an https location uses the system's trusted CAs)"
    interval = options.get("interval", INTERVAL)
    if not isinstance(interval, (int, float)) or isinstance(interval, bool) or interval <= 0:
        yield f"{path}.interval: expected a number of seconds above 0, got {interval!r}"
    signals = options.get("signals", list(OTLP_SIGNALS))
    if (not isinstance(signals, list) or not signals or any(s not in OTLP_SIGNALS for s in signals)
            or len(set(signals)) != len(signals)):
        yield f"{path}.signals: expected a list of distinct signals out of {', '.join(OTLP_SIGNALS)}, got {signals!r}"
    yield from _check_endpoint(f"{path}.endpoint", options.get("endpoint"))
    if "credentials" in options:
        credentials = options["credentials"]
        headers = credentials.get("headers") if isinstance(credentials, Mapping) else None
        if (not isinstance(credentials, Mapping) or set(credentials) != {"headers"} or not isinstance(headers, Mapping)
                or set(headers) != {"authorization"} or not isinstance(headers["authorization"], str)):
            yield f"{path}.credentials: expected {{headers: {{authorization: VALUE}}}}"  # never the value itself


def _check_endpoint(path: str, endpoint: Any) -> Iterator[str]:
    if not isinstance(endpoint, Mapping) or "location" not in endpoint:
        yield f"{path}: expected a mapping with location (an http:// or https:// URL)"
        return
    for key in endpoint:
        if key not in ("protocol", "location", "overrides"):
            yield f"{path}.{key}: not allowed here (expected one of: protocol, location, overrides)"
    if endpoint.get("protocol", "http") != "http":
        yield f"{path}.protocol: expected 'http' (OTLP over HTTP), got {endpoint.get('protocol')!r}"
    location = endpoint["location"]
    if not isinstance(location, str) or urlsplit(location).scheme not in ("http", "https") \
            or not urlsplit(location).hostname:
        yield f"{path}.location: expected an http:// or https:// URL, got {location!r}"
    overrides = endpoint.get("overrides", {})
    if not isinstance(overrides, Mapping):
        yield f"{path}.overrides: expected a mapping (metrics, logs: paths or URLs)"
        return
    for key, value in overrides.items():
        if key not in OVERRIDES:
            yield f"{path}.overrides.{key}: not allowed here (expected one of: metrics, logs)"
        elif not isinstance(value, str):
            yield f"{path}.overrides.{key}: expected a path or URL, got {value!r}"


def check_attributes(path: str, attributes: Any) -> Iterator[str]:
    """`telemetry.attributes`: name -> string value (Zilla's AttributeConfig)."""
    for name, value in (attributes or {}).items():
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            yield f"{path}.{name}: expected a string value, got {value!r}"


def urls(options: Mapping[str, Any]) -> dict[str, str]:
    """Each signal's URL: the override resolved against the location (RFC 3986, as Zilla's
    URI.resolve), so a path replaces the location's path."""
    endpoint = options["endpoint"]
    overrides = {**OVERRIDES, **(endpoint.get("overrides") or {})}
    return {signal: urljoin(endpoint["location"], overrides[signal]) for signal in OVERRIDES}


def shown_url(url: str) -> str:
    """A URL as events show it: no user or password."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc).geturl()


# ---------------------------------------------------------------------------- the exporter

THREAD_PREFIX = "zillatw-otlp-"


class _LibraryLog(logging.Filter):
    """What the OTLP exporter library says in our exporters' threads: its failures come as
    log records, one per interval, which become our one event instead; kept per thread,
    and off stderr. Its records in anyone else's threads (an embedder's own exporter) pass."""

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[int, str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        thread = threading.current_thread()
        if not thread.name.startswith(THREAD_PREFIX):
            return True
        if record.levelno >= logging.WARNING:  # a post's first says most (a retry's cause)
            self.last.setdefault(thread.ident or 0, record.getMessage()[:200])
        return False

    def take(self) -> str | None:
        return self.last.pop(threading.get_ident(), None)


_errors = _LibraryLog()
for _name in ("_log_exporter", "metric_exporter"):
    logging.getLogger(f"opentelemetry.exporter.otlp.proto.http.{_name}").addFilter(_errors)


class OtlpExporter:
    """One otlp exporter of a namespace. `collect()` gives the prometheus-client metric
    families to export, `records` the namespace's queue of events (None without logs),
    `emit(event, details)` writes an event; `clock` times the interval (the reactor; a
    Clock in tests) and `call_from_thread` brings results back to the reactor thread."""

    def __init__(self, namespace: str, name: str, options: Mapping[str, Any], attributes: Mapping[str, Any], *,
                 collect: Callable[[], Any], records: RecordQueue | None, emit: Callable[[str, str], None],
                 clock: Any, call_from_thread: Callable[..., Any], names: Mapping[str, tuple[str, str]] | None = None):
        self.namespace = namespace
        self.names = dict(names or {})  # prometheus family name -> (Zilla's metric name, unit)
        self.name = name
        self.interval = float(options.get("interval", INTERVAL))
        self.signals = tuple(options.get("signals") or OTLP_SIGNALS)
        self.urls = urls(options)
        authorization = ((options.get("credentials") or {}).get("headers") or {}).get("authorization")
        self._headers = {"authorization": authorization} if authorization is not None else {}
        self.attributes = {str(k): str(v) for k, v in (attributes or {}).items()}
        self._collect = collect
        self.records = records if "logs" in self.signals else None
        self._emit = emit
        self.clock = clock  # times the interval: the reactor (a test may set a Clock before start)
        self._call_from_thread = call_from_thread
        self._loop: task.LoopingCall | None = None
        # posts for the thread: one per signal an interval (none while the last is out), and
        # the final export's (finish); so never more than a dozen
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.busy: set[str] = set()  # signals with a post still out
        self.failing: set[str] = set()
        self.started_ns = time.time_ns()
        self.exported = {"metrics": 0, "logs": 0}  # successful posts, for tests and stats
        self._finished: defer.Deferred | None = None

    def start(self) -> None:
        if self._loop is not None:
            return
        if self._thread is None:
            # a daemon: a collector that hangs must not hold the process's exit
            self._thread = threading.Thread(target=self._work, name=THREAD_PREFIX + self.name, daemon=True)
            self._thread.start()
        self._loop = task.LoopingCall(self.export)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        """No more interval exports (a reload's first step: `start` may follow); the thread
        stays for `finish`."""
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    def finish(self) -> defer.Deferred:
        """The configuration is done with (shutdown, or a reloaded one's last connection
        closed): one last export of the metrics and of every event still queued, then the
        thread ends. Fires when it has, or after FINAL_WAIT seconds: a shutdown waits that
        long at most for a collector that does not answer."""
        self.stop()
        thread, self._thread = self._thread, None
        if thread is None:
            return defer.succeed(None)
        if "metrics" in self.signals:
            self._submit("metrics", list(self._collect()))
        while self.records is not None and len(self.records):
            self._submit("logs", self.records.take(LOG_BATCH))
        self._jobs.put(None)
        finished = self._finished = defer.Deferred()
        timer = self.clock.callLater(FINAL_WAIT, self._end)
        return finished.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])

    def export(self) -> None:
        """One interval's snapshot, handed to the thread (reactor thread; never blocks)."""
        if "metrics" in self.signals and "metrics" not in self.busy:
            self._submit("metrics", list(self._collect()))
        records = self.records
        if records is not None and "logs" not in self.busy and len(records):
            self._submit("logs", records.take(LOG_BATCH))

    def _submit(self, signal: str, payload: Any) -> None:
        self._jobs.put_nowait((signal, payload, time.time_ns()))  # unbounded: never waits
        self.busy.add(signal)

    def _end(self) -> None:
        finished, self._finished = self._finished, None
        if finished is not None:
            finished.callback(None)

    # ---- the exporter's thread

    def _work(self) -> None:
        exporters: dict[str, Any] = {}
        while True:
            job = self._jobs.get()
            if job is None:
                self._call_from_thread(self._end)
                return
            signal, payload, now = job
            try:
                ok, why = self._post(exporters, signal, payload, now)
            except Exception as e:  # a bug in encoding must not end the thread
                ok, why = False, f"{type(e).__name__}: {e}"
            self._call_from_thread(self._done, signal, ok, why)

    def _post(self, exporters: dict[str, Any], signal: str, payload: Any, now: int) -> tuple[bool, str]:
        exporter = exporters.get(signal)
        timeout = min(MAX_TIMEOUT, self.interval * 0.9)
        if signal == "metrics":
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
            from opentelemetry.sdk.metrics.export import MetricExportResult
            if exporter is None:
                exporter = exporters[signal] = OTLPMetricExporter(self.urls[signal], headers=self._headers,
                                                                  timeout=timeout)
            ok = exporter.export(self.metrics_data(payload, now), timeout_millis=timeout * 1000) \
                is MetricExportResult.SUCCESS
        else:
            from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
            from opentelemetry.sdk._logs.export import LogRecordExportResult
            if exporter is None:
                exporter = exporters[signal] = OTLPLogExporter(self.urls[signal], headers=self._headers,
                                                               timeout=timeout)
            ok = exporter.export(self.log_records(payload)) is LogRecordExportResult.SUCCESS
        why = _errors.take()  # taken either way: a retry that succeeded leaves its warning
        return ok, ("" if ok else why or "the collector did not accept it")

    def _done(self, signal: str, ok: bool, why: str) -> None:
        """A post's outcome, in the reactor thread: one event when a signal starts failing,
        one when it recovers."""
        self.busy.discard(signal)
        url = shown_url(self.urls[signal])
        if ok:
            self.exported[signal] += 1
            if signal in self.failing:
                self.failing.discard(signal)
                dropped = f" ({self.records.dropped} events dropped so far)" \
                    if signal == "logs" and self.records is not None and self.records.dropped else ""
                self._emit("OTLP_EXPORT_RECOVERED", f"- {signal} {url}{dropped}")
        elif signal not in self.failing:
            self.failing.add(signal)
            log.warn("zillatw: otlp exporter {name}: cannot export {signal} to {url}: {why}", name=self.name,
                     signal=signal, url=url, why=why)
            self._emit("OTLP_EXPORT_FAILED", f"- {signal} {url} {why}")

    # ---- OTLP's data model (in the exporter's thread)

    def resource(self) -> Any:
        from opentelemetry.sdk.resources import Resource
        return Resource.create({**self.attributes, "process.pid": os.getpid()})

    def metrics_data(self, families: list[Any], now: int) -> Any:
        from opentelemetry.sdk.metrics.export import (
            AggregationTemporality,
            Gauge,
            Histogram,
            Metric,
            MetricsData,
            NumberDataPoint,
            ResourceMetrics,
            ScopeMetrics,
            Sum,
        )
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        cumulative = AggregationTemporality.CUMULATIVE
        start = self.started_ns
        metrics = []
        for family in families:
            name, unit = self.names.get(family.name, (family.name, ""))
            samples = [s for s in family.samples if s.labels.get("namespace", self.namespace) == self.namespace]
            if not samples:
                continue
            if name in SERVER_NAMES:
                name = SERVER_NAMES[name]  # zillatw records them on http servers only
            data: Any
            if family.type == "counter":
                points = [NumberDataPoint(self._point(s.labels), start, now, int(s.value))
                          for s in samples if s.name == family.name + "_total"]
                data = Sum(points, cumulative, True)
            elif family.type == "gauge":
                data = Gauge([NumberDataPoint(self._point(s.labels), start, now, s.value) for s in samples])
            elif family.type == "histogram":
                data = Histogram(self._histogram_points(family.name, samples, start, now), cumulative)
            else:
                continue
            metrics.append(Metric(name, family.documentation, unit, data))
        scope = ScopeMetrics(InstrumentationScope(SCOPE), metrics, "")
        return MetricsData([ResourceMetrics(self.resource(), [scope], "")])

    def _point(self, labels: Mapping[str, str]) -> dict[str, str]:
        point = dict(labels)
        if "service.name" in self.attributes:
            point["service.name"] = self.attributes["service.name"]
        return point

    def _histogram_points(self, name: str, samples: list[Any], start: int, now: int) -> list[Any]:
        from opentelemetry.sdk.metrics.export import HistogramDataPoint
        series: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
        for sample in samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            entry = series.setdefault(labels, {"buckets": [], "sum": 0.0, "count": 0})
            if sample.name == name + "_bucket":
                entry["buckets"].append((float(sample.labels["le"]), sample.value))
            elif sample.name == name + "_sum":
                entry["sum"] = sample.value
            elif sample.name == name + "_count":
                entry["count"] = int(sample.value)
        points = []
        for labels, entry in series.items():
            buckets = sorted(entry["buckets"])
            cumulative = [int(count) for _, count in buckets]
            # per bucket, as OTLP counts them (prometheus' are cumulative)
            counts = [c - p for c, p in zip(cumulative, [0, *cumulative[:-1]], strict=True)]
            bounds = [bound for bound, _ in buckets if bound != float("inf")]
            points.append(HistogramDataPoint(self._point(dict(labels)), start, now, entry["count"], entry["sum"],
                                             counts, bounds, None, None))  # type: ignore[arg-type]  # unknown: unset
        return points

    def log_records(self, records: list[EventRecord]) -> list[Any]:
        from opentelemetry._logs import LogRecord, SeverityNumber
        from opentelemetry.sdk._logs import ReadableLogRecord
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        resource, scope = self.resource(), InstrumentationScope(SCOPE)
        severity = {"info": SeverityNumber.INFO, "warning": SeverityNumber.WARN}
        out = []
        for record in records:
            stamp = int(record.time * 1e9)
            attributes: dict[str, Any] = {"event.name": record.event, "namespace": record.namespace,
                                          "binding": record.binding, "trace": f"{record.trace_id:016x}"}
            for key, value in (record.fields or {}).items():
                if value is not None:
                    attributes[key] = value
            level = record.level.value
            out.append(ReadableLogRecord(LogRecord(
                timestamp=stamp, observed_timestamp=stamp, severity_text=level.upper(),
                severity_number=severity[level], body=f"{record.namespace}:{record.binding} {record.details}",
                attributes=attributes, event_name=record.event), resource, scope))
        return out


def exporters(config: Any, events: Mapping[str, Any], collect: Callable[[], Any], reactor: Any,
              names: Mapping[str, tuple[str, str]]) -> list[OtlpExporter]:
    """Every namespace's otlp exporters (not started); `names`: prometheus family name ->
    (Zilla's metric name, unit)."""
    built = []
    for ns in config.namespaces:
        for name, exporter in (ns.telemetry.get("exporters") or {}).items():
            if exporter["type"] != "otlp":
                continue
            ns_events = events.get(ns.name)

            def emit(event: str, details: str, ns_events: Any = ns_events, ns_name: str = ns.name,
                     exporter_name: str = name) -> None:
                if ns_events is not None:
                    ns_events.emit(ns_name, exporter_name, 0, event, details)
            built.append(OtlpExporter(
                ns.name, name, exporter["options"], ns.telemetry.get("attributes") or {}, collect=collect,
                records=ns_events.queues.get(name) if ns_events is not None else None, emit=emit,
                clock=reactor, call_from_thread=getattr(reactor, "callFromThread", None) or _call_now, names=names))
    return built


def _call_now(function: Callable[..., Any], *args: Any) -> None:
    """A reactor without threads (a test's MemoryReactorClock): run it where it is."""
    function(*args)
