"""An http server's per-request metrics, as Zilla's metrics-http records them on the requests
it routes to its exits: `http.active.requests` (a gauge), `http.duration` (a histogram, in
milliseconds) and the body sizes of zillatw.telemetry.httpsizes, each labelled by the
binding's `telemetry.attributes` (`method: ${http.request.method}`).

What Zilla does (HttpActiveRequestsMetricContext, HttpDurationMetricContext):
- a request counts as active from when the server hands it to its exit until its response
  has ended, or either way was aborted (Zilla's: until both ways, see _Exchange);
- its duration goes from then until its response has ended; an aborted one is not timed;
- the labels are the request's fields from its head and, for the duration, the response's
  from its head (`status: ${http.response.status}`). The gauge goes up and down under the
  request's labels only: Zilla's takes its `-1` under the merged ones, which leaves a series
  at +1 and another at -1 for every request once a response attribute is configured.

Requests refused before their exit (400 by validation, 404, 401) are not requests of the
exit and are not recorded. An upgrade is a request until its connection ends (its WebSocket
closes); the ws server answers it itself, so its response fields are empty, except for an
upgrade the ws server refuses at once, whose status is the refusal's.

Cost: a recording http server's exits are wrapped once, when the graph hands them over
(MeasuredExit). Per plain request: one exchange record, its labels read from the head once
(nothing read when no attribute is configured), and one wrapper call per body piece each
way. Per upgrade: one record; the WebSocket's reads go straight to its protocol (the
wrapper hands the http server the protocol's own dataReceived), so its data path is as it was.

Bound: at most httpsizes.MAX_LABEL_SETS label sets per binding and metric (the rest under
httpsizes.OVERFLOW).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from zope.interface import directlyProvides, implementer, providedBy

from zillatw.stream import HttpHead, IHttpExchangeEnd, ISpliceSink, SpliceSink, splice_sink_of
from zillatw.telemetry.httpsizes import Attributes, SizeHistogram, bounded, histogram_counts
from zillatw.wire.http1 import HttpError

# http.duration's buckets, in milliseconds (upper bounds; +Inf follows)
DURATION_BUCKETS = (1, 5, 10, 50, 100, 500, 1_000, 5_000, 10_000, 60_000, 300_000, 3_600_000, 86_400_000)
_LIMITS = (*map(str, map(float, DURATION_BUCKETS)), "+Inf")
DURATION_HELP = "from a request's arrival at its exit until its response ends (an upgraded one's WebSocket closes)"
ACTIVE_HELP = "requests in progress"


class DurationHistogram:
    """One binding's http.duration, per label set: counts per bucket (not cumulative), then the sum."""

    __slots__ = ("namespace", "binding", "attributes", "series")

    def __init__(self, namespace: str, binding: str, attributes: Attributes):
        self.namespace, self.binding, self.attributes = namespace, binding, attributes
        self.series: dict[tuple[str, ...], list[float]] = {}
        if not attributes.names:  # the one series, served from the start (zero until a request)
            self.series[()] = [0] * (len(DURATION_BUCKETS) + 2)

    def observe(self, labels: tuple[str, ...], milliseconds: float) -> None:
        counts = histogram_counts(self.series, labels, len(DURATION_BUCKETS) + 2)
        counts[bisect.bisect_left(DURATION_BUCKETS, milliseconds)] += 1
        counts[-1] += milliseconds

    def buckets(self, labels: tuple[str, ...]) -> list[tuple[str, float]]:
        """Cumulative, as prometheus-client takes them."""
        cumulative, total = [], 0.0
        for limit, count in zip(_LIMITS, self.series[labels][:-1], strict=True):
            total += count
            cumulative.append((limit, total))
        return cumulative


class ActiveGauge:
    """One binding's http.active.requests, per label set."""

    __slots__ = ("namespace", "binding", "attributes", "series")

    def __init__(self, namespace: str, binding: str, attributes: Attributes):
        self.namespace, self.binding, self.attributes = namespace, binding, attributes
        self.series: dict[tuple[str, ...], int] = {}
        if not attributes.names:
            self.series[()] = 0

    def opened(self, labels: tuple[str, ...]) -> tuple[str, ...]:
        """One more under `labels` (or the overflow's); the key to close it under."""
        key = bounded(self.series, labels)
        self.series[key] = self.series.get(key, 0) + 1
        return key


class HttpServerMeters:
    """What one recording http server records per request (None: not selected)."""

    def __init__(self, attributes: Attributes, seconds: Callable[[], float], *,
                 active: ActiveGauge | None = None, durations: DurationHistogram | None = None,
                 request_sizes: SizeHistogram | None = None, response_sizes: SizeHistogram | None = None):
        self.attributes, self.seconds = attributes, seconds
        self.active, self.durations = active, durations
        self.request_sizes, self.response_sizes = request_sizes, response_sizes
        self.labelled = bool(attributes.names)


class ExchangeCollector:
    """prometheus-client's view of every recording http server's gauges and durations."""

    def __init__(self) -> None:
        self.gauges: list[ActiveGauge] = []
        self.histograms: list[DurationHistogram] = []

    def collect(self) -> Iterator[Any]:
        if self.gauges:
            extra = sorted({name for g in self.gauges for name in g.attributes.names})
            gauges = GaugeMetricFamily("http_active_requests", f"Zilla's http.active.requests: {ACTIVE_HELP}",
                                       labels=["namespace", "binding", *extra])
            for gauge in self.gauges:
                for labels, value in list(gauge.series.items()):
                    gauges.add_metric(_label_values(gauge, labels, extra), value)
            yield gauges
        if self.histograms:
            extra = sorted({name for h in self.histograms for name in h.attributes.names})
            durations = HistogramMetricFamily("http_duration_milliseconds", f"Zilla's http.duration: {DURATION_HELP}",
                                              labels=["namespace", "binding", *extra])
            for histogram in self.histograms:
                for labels, counts in list(histogram.series.items()):
                    durations.add_metric(_label_values(histogram, labels, extra), histogram.buckets(labels), counts[-1])
            yield durations


def _label_values(metric: ActiveGauge | DurationHistogram, labels: tuple[str, ...], extra: list[str]) -> list[str]:
    by_name = dict(zip(metric.attributes.names, labels, strict=True))
    return [metric.namespace, metric.binding, *(by_name.get(name, "") for name in extra)]


# ---------------------------------------------------------------------------- one request

class _Exchange:
    """One request between the http server and its exit: open until its response ends (or
    either way is aborted). Zilla's waits for the request's end too; ours would wait for
    ever when a response ends first (an early 413: the server closes the connection
    without the request's end), and in every other exchange the request ends first."""

    __slots__ = ("meters", "request_labels", "response_labels", "started", "active_key", "closed")

    def __init__(self, meters: HttpServerMeters, request_labels: tuple[str, ...]):
        self.meters = meters
        self.request_labels = request_labels
        self.response_labels: tuple[str, ...] = ()
        self.started = meters.seconds() if meters.durations is not None else 0.0
        self.active_key = meters.active.opened(request_labels) if meters.active is not None else None
        self.closed = False

    def response_head(self, headers: dict[str, str]) -> None:
        if self.meters.labelled:
            self.response_labels = self.meters.attributes.labels("response", headers)

    def finish(self, timed: bool) -> None:
        """Over: its response ended or its upgraded connection closed (timed), or aborted."""
        if self.closed:
            return
        self.closed = True
        meters = self.meters
        if self.active_key is not None and meters.active is not None:
            meters.active.series[self.active_key] -= 1
        if timed and meters.durations is not None:
            meters.durations.observe(meters.attributes.merged(self.request_labels, self.response_labels),
                                     (meters.seconds() - self.started) * 1000)


class _Measured:
    """An exchange end passed through, its body counted; `target` receives the calls."""

    __slots__ = ("target", "exchange", "sizes", "length", "counted", "done",
                 "pauseProducing", "resumeProducing", "stopProducing")
    ends_exchange = False  # the response's end is the exchange's

    def __init__(self, target: Any, exchange: _Exchange, sizes: SizeHistogram | None, length: int | None):
        self.target, self.exchange, self.sizes, self.length = target, exchange, sizes, length
        self.counted = 0
        self.done = False
        self.pauseProducing = target.pauseProducing
        self.resumeProducing = target.resumeProducing
        self.stopProducing = target.stopProducing

    def exchange_head(self, head: HttpHead) -> None:
        self.target.exchange_head(head)

    def exchange_data(self, data: bytes) -> None:
        self.counted += len(data)
        self.target.exchange_data(data)

    def splice_sink(self) -> SpliceSink | None:
        """The target's, its bytes counted here too (ISpliceSink)."""
        sink = splice_sink_of(self.target)
        if sink is not None:
            sink.counts.append(self._count)
        return sink

    def _count(self, size: int) -> None:
        self.counted += size

    def exchange_end(self) -> None:
        if not self.done:
            self.done = True
            self._record()
            if self.ends_exchange:
                self.exchange.finish(timed=True)
        self.target.exchange_end()

    def _record(self) -> None:
        if self.sizes is not None:
            self.sizes.observe(self.exchange.request_labels, self.length if self.length is not None else self.counted)

    def exchange_abort(self, status: int, reason: str, detail: str) -> None:
        self.done = True  # an aborted body is not recorded, nor the exchange timed
        self.exchange.finish(timed=False)
        self.target.exchange_abort(status, reason, detail)


@implementer(IHttpExchangeEnd, ISpliceSink)
class _MeasuredRequest(_Measured):
    __slots__ = ()


@implementer(IHttpExchangeEnd, ISpliceSink)
class _MeasuredResponse(_Measured):
    __slots__ = ()
    ends_exchange = True

    def exchange_head(self, head: HttpHead) -> None:
        self.length = head.length
        self.exchange.response_head(head.headers)
        self.target.exchange_head(head)

    def _record(self) -> None:
        if self.sizes is not None:
            exchange = self.exchange
            # ended without a head (echo's bodiless 200): every response attribute empty
            labels = exchange.response_labels or ("",) * len(exchange.meters.attributes.names)
            self.sizes.observe(labels, self.length if self.length is not None else self.counted)


class MeasuredExit:
    """A recording http server's exit: each plain request (open_request) and each upgrade
    (accept_request) it takes is measured. Anything else asked of it is the exit's own, and
    it provides what the exit provides (an echo is a stream exit too)."""

    def __init__(self, exit_: Any, meters: HttpServerMeters):
        self.exit = exit_
        self.meters = meters
        directlyProvides(self, providedBy(exit_))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.exit, name)

    def _labels(self, headers: dict[str, str]) -> tuple[str, ...]:
        meters = self.meters
        return meters.attributes.labels("request", headers) if meters.labelled else ()

    def open_request(self, head: HttpHead, peer: IHttpExchangeEnd, trace_id: int) -> IHttpExchangeEnd:
        meters = self.meters
        exchange = _Exchange(meters, self._labels(head.headers))
        response = _MeasuredResponse(peer, exchange, meters.response_sizes, None)
        try:
            end = self.exit.open_request(head, response, trace_id)
        except BaseException:
            exchange.finish(timed=False)  # refused by the exit: answered by the server, never opened
            raise
        return _MeasuredRequest(end, exchange, meters.request_sizes, head.length)

    def accept_request(self, request: Any, headers: dict[str, str], transport: Any, **kwargs: Any) -> Any:
        exchange = _Exchange(self.meters, self._labels(headers))
        try:
            taken = self.exit.accept_request(request, headers, transport, **kwargs)
        except HttpError as e:
            # the exit refused it (a ws server's 404, 429...): a request answered at once
            exchange.response_head({":status": str(e.status)})
            exchange.finish(timed=True)
            raise
        except BaseException:
            exchange.finish(timed=False)
            raise
        return _UpgradedConnection(taken, exchange)


class _UpgradedConnection:
    """The protocol that took an upgraded request's connection, as the http server holds it:
    the request is over when the connection is. Reads go to the protocol's own dataReceived."""

    def __init__(self, taken: Any, exchange: _Exchange):
        self.taken = taken
        self.exchange = exchange
        self.dataReceived = taken.dataReceived
        directlyProvides(self, providedBy(taken))

    def __getattr__(self, name: str) -> Any:  # makeConnection, take_over, session_expired...
        return getattr(self.taken, name)

    def connectionLost(self, reason: Any = None) -> None:
        self.exchange.finish(timed=True)
        self.taken.connectionLost(reason)
