"""Prometheus and health under `twistd zillaws -w N`: the supervisor serves the configured
endpoints, and a scrape answers with the sum over the workers.

Why the supervisor aggregates rather than prometheus-client's multiprocess mode: a worker's
counters are plain integers its bindings add to (zillatw.telemetry.metrics) and a collector reads at
scrape time; multiprocess mode would put every one in a memory-mapped file written on each
read, write and message (a cost on the data path), and its collector reads only those files,
so ours (and the fan's Redis link counters) would be lost. Asking each worker for its own
exposition keeps the data path as it is and every metric exact:
- counters and histograms (buckets, `_count`, `_sum`: all share DURATION_BUCKETS) are summed;
  they stay monotonic across a worker's restart or reload: what a worker had counted when
  last seen is kept (`retired`) once it is gone or its count goes back (a restart, a reload,
  a binding removed), so the sum never goes back (Prometheus would read that as a reset, and
  rate() as a burst); what it counted between its last scrape and its end is lost;
- gauges (`stream.active.*`, `http.active.requests`, `zillatw_fan_redis_connected`) are
  summed over the workers alive now: streams open in all, Redis links up in all.

Each worker serves its exposition on a UNIX socket in a directory the supervisor makes for
the run (0700, removed at exit): a connection gets the exposition and is closed. A worker
that does not answer within SCRAPE_TIMEOUT, or answers more than MAX_SCRAPE_BYTES, counts
with its last answer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from zillatw.telemetry.health import Address, HealthEndpoints, Readiness

log = Logger()
SCRAPE_TIMEOUT = 5.0
MAX_SCRAPE_BYTES = 16 * 1024 * 1024
MONOTONIC = ("counter", "histogram")

Series = tuple[str, str, tuple[tuple[str, str], ...]]  # family, sample name, labels


# ---------------------------------------------------------------------------- in a worker

class _Exposition(Protocol):
    def __init__(self, registry: Callable[[], Any]):
        self.registry = registry

    def connectionMade(self) -> None:
        self.transport.write(generate_latest(self.registry()))  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


def serve_worker_metrics(reactor: Any, path: str, registry: Callable[[], Any]) -> Any:
    """In a worker: answer each connection on the UNIX socket `path` with the exposition of
    `registry()` (the current generation's, asked each time: a reload replaces it)."""
    if os.path.exists(path):  # a previous worker of this index, killed
        os.remove(path)
    return reactor.listenUNIX(path, Factory.forProtocol(lambda: _Exposition(registry)), mode=0o600)


# ---------------------------------------------------------------------------- in the supervisor

class _Reader(Protocol):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_SCRAPE_BYTES:
            self.chunks = []
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.size > MAX_SCRAPE_BYTES:
            self.done.errback(ValueError(f"more than {MAX_SCRAPE_BYTES} bytes of metrics"))
        else:
            self.done.callback(b"".join(self.chunks))


def scrape_worker(reactor: Any, path: str) -> defer.Deferred:
    """A worker's exposition (bytes) from its UNIX socket, within SCRAPE_TIMEOUT."""
    reader = _Reader()
    connecting = connectProtocol(UNIXClientEndpoint(reactor, path, timeout=int(SCRAPE_TIMEOUT)), reader)
    connecting.addCallback(lambda _: reader.done)
    return connecting.addTimeout(SCRAPE_TIMEOUT, reactor)


class Aggregate:
    """The sum over workers of their expositions, kept monotonic where it must be."""

    def __init__(self) -> None:
        self.meta: dict[str, tuple[str, str]] = {}         # family -> (type, help), first seen first
        self.retired: dict[Series, float] = {}             # what workers gone or reset had counted
        self.last: dict[int, dict[Series, float]] = {}     # per live worker (pid): its last answer

    def worker_started(self, pid: int) -> None:
        self.last.setdefault(pid, {})

    def worker_gone(self, pid: int) -> None:
        self._retire(self.last.pop(pid, {}), {})

    def update(self, pid: int, text: str) -> None:
        """A worker's answer; one from a worker already gone is ignored."""
        if pid not in self.last:
            return
        now: dict[Series, float] = {}
        for family in text_string_to_metric_families(text):
            self.meta.setdefault(family.name, (family.type, family.documentation))
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue  # a time, not a count: never summed
                now[(family.name, sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        self._retire(self.last[pid], now)
        self.last[pid] = now

    def _retire(self, before: dict[Series, float], now: dict[Series, float]) -> None:
        for series, value in before.items():
            if self.meta[series[0]][0] in MONOTONIC and now.get(series, -1.0) < value:
                self.retired[series] = self.retired.get(series, 0.0) + value

    def families(self) -> Iterator[Metric]:
        totals: dict[Series, float] = dict(self.retired)
        for answer in self.last.values():
            for series, value in answer.items():
                totals[series] = totals.get(series, 0.0) + value
        by_family: dict[str, list[tuple[Series, float]]] = {}
        for series, value in totals.items():
            by_family.setdefault(series[0], []).append((series, value))
        for name, (kind, documentation) in self.meta.items():
            if name not in by_family:
                continue
            metric = Metric(name, documentation, kind)
            for (_, sample, labels), value in by_family[name]:
                metric.add_sample(sample, dict(labels), value)
            yield metric

    def collect(self) -> Iterator[Metric]:  # a prometheus-client collector
        return self.families()


class _Scrape(Resource):
    """One prometheus endpoint of the supervisor: scrapes every worker, answers the sum."""

    isLeaf = True

    def __init__(self, exporters: "SupervisorExporters"):
        super().__init__()
        self.exporters = exporters

    def render_GET(self, request: Any) -> Any:
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)  # the scraper gave up first

        def answer(body: bytes) -> None:
            if not gone:
                request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
                request.write(body)
                request.finish()
        self.exporters.scrape().addCallback(answer)
        return NOT_DONE_YET


class SupervisorExporters:
    """The supervisor's prometheus endpoints (port -> paths, as zillatw.telemetry.metrics reads them)
    and health listeners, over the workers `workers()` names as (pid, metrics socket path)."""

    def __init__(self, reactor: Any, endpoints: dict[int, set[str]], health: Iterable[Address],
                 readiness: Callable[[], Readiness], workers: Callable[[], list[tuple[int, str]]]):
        self.reactor = reactor
        self.endpoints = endpoints
        self.health_addresses = list(health)
        self.health = HealthEndpoints(reactor, readiness)
        self.workers = workers
        self.aggregate = Aggregate()
        self.listening: list[Any] = []

    def listen(self) -> None:
        """Listen on every endpoint now (CannotListenError if one cannot)."""
        self.health.open_now(self.health_addresses)
        for port, paths in sorted(self.endpoints.items()):
            root = Resource()
            for path in sorted(paths):
                parent = root
                segments = [s.encode() for s in path.strip("/").split("/")]
                for segment in segments[:-1]:
                    parent = parent.children.get(segment) or _child(parent, segment)
                parent.putChild(segments[-1], _Scrape(self))
            site = Site(root)
            site.noisy = False
            site.log = lambda request: None  # type: ignore[method-assign]  # no line per scrape
            self.listening.append(self.reactor.listenTCP(port, site))

    def ports(self) -> list[int]:
        return [port.getHost().port for port in self.listening]

    def scrape(self) -> defer.Deferred:
        """Ask every worker, then fire with the exposition of the sum."""
        def asked(pid: int, path: str) -> defer.Deferred:
            d = scrape_worker(self.reactor, path)

            def failed(failure: Failure) -> None:
                log.warn("zillatw: metrics of worker pid {pid} unavailable ({error}); counting its last ones",
                         pid=pid, error=failure.getErrorMessage() or failure.type.__name__)
            return d.addCallback(lambda data: self.aggregate.update(pid, data.decode("utf-8"))).addErrback(failed)
        asking = [asked(pid, path) for pid, path in self.workers()]
        return defer.gatherResults(asking, consumeErrors=True).addCallback(lambda _: generate_latest(self.aggregate))

    def stop(self) -> defer.Deferred:
        listening, self.listening = self.listening, []
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in listening] + [self.health.stop()],
                                   consumeErrors=True)


def _child(parent: Resource, segment: bytes) -> Resource:
    child = Resource()
    parent.putChild(segment, child)
    return child
