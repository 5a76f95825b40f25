"""Zilla's `http.request.size` and `http.response.size`: histograms of plain HTTP bodies, in
bytes, recorded by an http server, optionally labelled by the binding's
`telemetry.attributes` (`method: ${http.request.method}`, `status: ${http.response.status}`).

As Zilla records them (runtime/metrics-http HttpSizeMetricContext): a body's size is its
Content-Length when the head gives one, else the bytes that passed; it is recorded when the
body ends (an aborted one is not). Buckets are Zilla's 63 powers of two
(engine HistogramsLayout): a size goes to bucket floor(log2 size) (0 and 1 to the first),
whose limit, 2**(index + 1), is the `le` label. Request attributes label request sizes and
response attributes response sizes, from that head (HttpAttributeHelper); a field the head
lacks is an empty label. `path` is the path without its query (Zilla's has the query).

Recorded by zillatw.telemetry.httpexchanges, which wraps a recording http server's exits
(one call and one addition per body piece). Requests refused before their exit (400 by
validation, 404, 401) are not recorded. Upgrades are not recorded: their body is the
WebSocket, measured by `stream.data.*`.

Bound: at most MAX_LABEL_SETS label sets per binding and metric; later ones are recorded
under OVERFLOW in every attribute (a path per request must not grow memory without end).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client.core import HistogramMetricFamily

BUCKETS = 63
LIMITS = tuple(str(float(2 ** (i + 1))) for i in range(BUCKETS - 1)) + ("+Inf",)  # the last is Zilla's 2**63
MAX_LABEL_SETS = 1024
OVERFLOW = "_other"
SIZE_METRICS = {"http.request.size": "HTTP request content length",    # Zilla's descriptions
                "http.response.size": "HTTP response content length"}
EXPRESSION = re.compile(r"^\$\{http\.(request|response)\.([^}]+)\}$")
FIELDS = {"method": ":method", "path": ":path", "status": ":status"}


def check_attributes(where: str, binding: Any) -> Iterator[str]:
    """Problems in a binding's `telemetry.attributes` (only an http server's label metrics)."""
    attributes = binding.telemetry.get("attributes")
    if attributes is None:
        return
    if not (binding.type == "http" and binding.kind == "server"):
        yield (f"{where}: not supported by this zillatw yet on {'an' if binding.type[:1] in 'aeiou' else 'a'} "
               f"{binding.type} {binding.kind} (an http server's label its http metrics)")
        return
    for name, value in attributes.items():
        if not isinstance(value, str) or not EXPRESSION.match(value):
            yield (f"{where}.{name}: expected ${{http.request.<field>}} or ${{http.response.<field>}} "
                   f"(method, path, status or a header name), got {value!r}")


class Attributes:
    """A binding's attributes: label names (sorted) and where each value comes from."""

    def __init__(self, config: Mapping[str, str] | None):
        self.names = tuple(sorted(config or {}))
        self.fields: dict[str, list[tuple[int, str]]] = {"request": [], "response": []}
        for index, name in enumerate(self.names):
            found = EXPRESSION.match((config or {})[name])
            if found is not None:
                self.fields[found.group(1)].append((index, FIELDS.get(found.group(2), found.group(2).lower())))

    def labels(self, which: str, headers: Mapping[str, str]) -> tuple[str, ...]:
        values = [""] * len(self.names)
        for index, header in self.fields[which]:
            value = headers.get(header, "")
            # the path without its query: a label per query string would be unbounded, and a
            # query may carry credentials (access_token), which are never exported
            values[index] = value.partition("?")[0] if header == ":path" else value
        return tuple(values)

    def merged(self, request: tuple[str, ...], response: tuple[str, ...]) -> tuple[str, ...]:
        """One exchange's labels: the request's fields from its head, the response's from its
        (Zilla's http.duration takes both)."""
        if not response or not self.fields["response"]:
            return request
        values = list(request)
        for index, _ in self.fields["response"]:
            values[index] = response[index]
        return tuple(values)


def bounded(series: Mapping[tuple[str, ...], Any], labels: tuple[str, ...]) -> tuple[str, ...]:
    """The key `labels` count under: themselves, or OVERFLOW in every attribute once a
    metric of a binding has MAX_LABEL_SETS label sets."""
    if labels in series or len(series) < MAX_LABEL_SETS:
        return labels
    return (OVERFLOW,) * len(labels)


def histogram_counts(series: dict[tuple[str, ...], list[Any]], labels: tuple[str, ...], width: int) -> list[Any]:
    """The counts a histogram keeps for `labels` (or for the overflow's set, past the
    bound): `width` zeros the first time."""
    counts = series.get(labels)
    if counts is None:
        labels = bounded(series, labels)
        counts = series.get(labels)
        if counts is None:
            counts = series[labels] = [0] * width
    return counts


class SizeHistogram:
    """One binding's histogram of one size metric, per label set."""

    __slots__ = ("namespace", "binding", "attributes", "series")

    def __init__(self, namespace: str, binding: str, attributes: Attributes):
        self.namespace, self.binding, self.attributes = namespace, binding, attributes
        self.series: dict[tuple[str, ...], list[int]] = {}  # per bucket (not cumulative), then the sum

    def observe(self, labels: tuple[str, ...], size: int) -> None:
        counts = histogram_counts(self.series, labels, BUCKETS + 1)
        counts[max(size.bit_length() - 1, 0)] += 1
        counts[BUCKETS] += size


class SizeCollector:
    """prometheus-client's view of every recording http server's size histograms."""

    def __init__(self) -> None:
        self.histograms: dict[str, list[SizeHistogram]] = {metric: [] for metric in SIZE_METRICS}

    def collect(self) -> Iterator[Any]:
        for metric, help_ in SIZE_METRICS.items():
            recording = self.histograms[metric]
            if not recording:
                continue
            extra = sorted({name for h in recording for name in h.attributes.names})
            family = HistogramMetricFamily(metric.replace(".", "_") + "_bytes", f"Zilla's {metric}: {help_}",
                                           labels=["namespace", "binding", *extra])
            for histogram in recording:
                names = histogram.attributes.names
                for labels, counts in list(histogram.series.items()):
                    by_name = dict(zip(names, labels, strict=True))
                    buckets, total = [], 0
                    for limit, count in zip(LIMITS, counts[:BUCKETS], strict=True):
                        total += count
                        buckets.append((limit, total))
                    family.add_metric([histogram.namespace, histogram.binding, *(by_name.get(n, "") for n in extra)],
                                      buckets, counts[BUCKETS])
            yield family
