"""Prometheus and health under `twistd zillaws -w 2`: one scrape of the supervisor is the sum
over the workers (a real run), and the sum's rules (sans-IO)."""

from __future__ import annotations

import glob
import os
import signal
import tempfile
from typing import Any

import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.trial import unittest

from zillatw.runtime.workers import STATUS_FD, Supervisor
from zillatw.telemetry.health import Readiness
from zillatw.telemetry.prometheus_workers import Aggregate
from zillatw.test.http_support import probe
from zillatw.test.process_support import _ProcessReactor, server_pid, spawn_workers, worker_pids
from zillatw.test.support import chain, connect_raw, connect_ws, eventually, free_port, upgrade_request

METRICS = ["stream.opens.received", "stream.active.received", "stream.data.received", "http.duration"]


def metered_chain(port: int, metrics_port: int, health_port: int) -> dict[str, Any]:
    config = chain(ws_options={"close-timeout": 30})
    config["bindings"]["tcp0"]["options"]["port"] = port
    config["bindings"]["ws0"]["telemetry"] = {"metrics": ["stream.*"]}
    config["bindings"]["http0"]["telemetry"] = {"metrics": ["http.*"]}
    config["telemetry"]["metrics"] = METRICS
    config["telemetry"]["exporters"].update({
        "prom": {"type": "prometheus", "options": {"endpoints": [{"scheme": "http", "port": metrics_port}]}},
        "health": {"type": "health", "options": {"host": "127.0.0.1", "port": health_port}},
    })
    return config


@defer.inlineCallbacks
def scrape(port: int) -> Any:
    """{(sample name, labels): value} of one scrape."""
    response = yield treq.get(f"http://127.0.0.1:{port}/metrics", persistent=False)
    text = yield treq.text_content(response)
    assert response.code == 200, (response.code, text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def ws0(name: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, (("binding", "ws0"), ("namespace", "test"))


def http0(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted({"binding": "http0", "namespace": "test", **labels}.items()))


class WorkersScrapeTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_one_scrape_is_the_sum_over_two_workers_and_survives_a_killed_one(self):
        port, metrics_port, health_port = free_port(), free_port(), free_port()
        before = set(glob.glob(os.path.join(tempfile.gettempdir(), "zillatw-metrics-*")))
        child, process, _ = spawn_workers(self, metered_chain(port, metrics_port, health_port), 2,
                                          "--drain-timeout", "3")
        yield eventually(lambda: child.out.count(b"listening") >= 2 or child.ended.called, timeout=30)
        self.assertEqual(child.out.count(b"ENGINE_STARTED"), 2, child.out)
        pids = worker_pids(child.out)
        self.assertEqual((yield probe(health_port, "/ready"))[0], 200)

        # Connections on both workers: the sum counts them all, neither worker alone does.
        clients, served = [], {}
        while len(served) < 2 or len(clients) < 6:
            client = yield connect_ws(port)
            clients.append(client)
            served.setdefault(server_pid(client, pids.values()), []).append(client)
            self.assertLess(len(clients), 400, "the kernel gave every connection to one worker")
        total = len(clients)
        for client in clients:
            client.sendMessage(b"12345")
            yield client.messages.get()
        # Two finish (http.duration observes a request when its WebSocket closes), one per worker.
        for worker_clients in served.values():
            closing = worker_clients.pop()
            closing.sendClose(1000)
            yield closing.closed
            clients.remove(closing)
        sums = yield scrape(metrics_port)
        self.assertEqual(sums[ws0("stream_opens_received_total")], total)
        self.assertEqual(sums[ws0("stream_data_received_bytes_total")], 5 * total)
        self.assertEqual(sums[ws0("stream_active_received")], total - 2)
        self.assertEqual(sums[http0("http_duration_milliseconds_count")], 2)
        self.assertEqual(sums[http0("http_duration_milliseconds_bucket", le="+Inf")], 2)
        self.assertGreater(sums[http0("http_duration_milliseconds_sum")], 0)
        self.assertTrue(all(len(c) < total for c in served.values()))  # so each worker counted only some

        # A worker killed: its connections are gone from the gauge, not from the counters; /ready
        # is 503 until it is back.
        killed = pids[1]
        lost = len(served[killed])
        os.kill(killed, signal.SIGKILL)
        yield eventually(lambda: worker_pids(child.out)[1] != killed, timeout=10)
        sums = yield scrape(metrics_port)
        self.assertEqual(sums[ws0("stream_opens_received_total")], total)
        yield eventually(lambda: child.out.count(b"listening") >= 3, timeout=20)
        for client in served[killed]:
            yield client.closed
        clients = [c for c in clients if c not in served[killed]]
        sums = yield scrape(metrics_port)
        self.assertEqual(sums[ws0("stream_opens_received_total")], total)
        self.assertEqual(sums[ws0("stream_active_received")], total - 2 - lost)
        self.assertEqual((yield probe(health_port, "/ready"))[0], 200)

        # SIGTERM: /ready says draining while a peer that never answers holds the drain.
        silent = yield connect_raw(port)
        silent.transport.write(upgrade_request())
        yield silent.until(len(b"HTTP/1.1 101 "))
        process.signalProcess(signal.SIGTERM)
        yield eventually(lambda: b"stopping 2 workers" in child.out, timeout=10)
        self.assertEqual((yield probe(health_port, "/ready"))[::2], (503, b"draining\n"))
        self.assertEqual((yield probe(health_port, "/health"))[0], 200)
        self.assertEqual((yield child.ended), (0, None), child.out)
        silent.transport.loseConnection()
        for client in clients:
            client.transport.loseConnection()
        # The run's socket directory is gone with it.
        self.assertEqual(set(glob.glob(os.path.join(tempfile.gettempdir(), "zillatw-metrics-*"))), before)


EXPOSITION = """# HELP c_total a counter
# TYPE c_total counter
c_total{{b="x"}} {c}
# HELP g a gauge
# TYPE g gauge
g{{b="x"}} {g}
# HELP h a histogram
# TYPE h histogram
h_bucket{{le="1.0"}} {h1}
h_bucket{{le="+Inf"}} {h}
h_count {h}
h_sum {hs}
"""


def answer(c: float, g: float, h1: float = 0, h: float = 0, hs: float = 0) -> str:
    return EXPOSITION.format(c=c, g=g, h1=h1, h=h, hs=hs)


def values(aggregate: Aggregate) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in aggregate.families() for s in m.samples}


class AggregateTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.aggregate = Aggregate()
        for pid in (1, 2):
            self.aggregate.worker_started(pid)

    def test_counters_buckets_and_gauges_are_summed(self):
        self.aggregate.update(1, answer(c=3, g=2, h1=1, h=2, hs=1.5))
        self.aggregate.update(2, answer(c=4, g=1, h1=0, h=1, hs=7))
        self.assertEqual(values(self.aggregate), {
            ("c_total", (("b", "x"),)): 7, ("g", (("b", "x"),)): 3,
            ("h_bucket", (("le", "1.0"),)): 1, ("h_bucket", (("le", "+Inf"),)): 3,
            ("h_count", ()): 3, ("h_sum", ()): 8.5})

    def test_a_gone_worker_keeps_its_counts_not_its_gauges(self):
        self.aggregate.update(1, answer(c=3, g=2, h=2, hs=4))
        self.aggregate.update(2, answer(c=4, g=1, h=1, hs=1))
        self.aggregate.worker_gone(2)
        self.aggregate.update(2, answer(c=100, g=100))  # too late: ignored
        self.aggregate.worker_started(3)
        self.aggregate.update(3, answer(c=1, g=5))
        got = values(self.aggregate)
        self.assertEqual(got[("c_total", (("b", "x"),))], 3 + 4 + 1)
        self.assertEqual(got[("h_count", ())], 3)
        self.assertEqual(got[("g", (("b", "x"),))], 2 + 5)

    def test_a_worker_whose_counts_go_back_a_reload_does_not_make_the_sum_go_back(self):
        self.aggregate.update(1, answer(c=10, g=4))
        self.aggregate.update(1, answer(c=2, g=1))  # reloaded: counting again from 0
        self.assertEqual(values(self.aggregate)[("c_total", (("b", "x"),))], 12)
        self.aggregate.update(1, "")  # every binding of it removed
        self.assertEqual(values(self.aggregate)[("c_total", (("b", "x"),))], 12)
        self.assertNotIn(("g", (("b", "x"),)), values(self.aggregate))

    def test_a_worker_that_did_not_answer_counts_with_its_last_answer(self):
        self.aggregate.update(1, answer(c=10, g=4))
        self.aggregate.update(2, answer(c=1, g=1))
        # worker 2 timed out this time: no update; its last answer stands
        self.aggregate.update(1, answer(c=11, g=4))
        self.assertEqual(values(self.aggregate)[("c_total", (("b", "x"),))], 12)

    def test_series_labelled_by_attributes_are_summed_per_label_set(self):
        from prometheus_client import CollectorRegistry, generate_latest

        from zillatw.telemetry import httpexchanges, httpsizes
        for pid, requests in ((1, [("GET", 3.0), ("POST", 700.0)]), (2, [("GET", 20.0)])):
            collector = httpexchanges.ExchangeCollector()
            at = ("test", "http0", httpsizes.Attributes({"method": "${http.request.method}"}))
            collector.gauges.append(gauge := httpexchanges.ActiveGauge(*at))
            collector.histograms.append(durations := httpexchanges.DurationHistogram(*at))
            for method, milliseconds in requests:
                durations.observe((method,), milliseconds)
                gauge.opened((method,))
            registry = CollectorRegistry(auto_describe=False)
            registry.register(collector)
            self.aggregate.update(pid, generate_latest(registry).decode())
        got = values(self.aggregate)

        def labelled(name: str, method: str, **more: str) -> float:
            return got[(name, tuple(sorted({"namespace": "test", "binding": "http0", "method": method,
                                             **more}.items())))]
        self.assertEqual(labelled("http_active_requests", "GET"), 2)
        self.assertEqual(labelled("http_active_requests", "POST"), 1)
        self.assertEqual(labelled("http_duration_milliseconds_count", "GET"), 2)
        self.assertEqual(labelled("http_duration_milliseconds_sum", "GET"), 23.0)
        self.assertEqual(labelled("http_duration_milliseconds_bucket", "GET", le="5.0"), 1)
        self.assertEqual(labelled("http_duration_milliseconds_count", "POST"), 1)  # worker 1's only


class SupervisorReadinessTests(unittest.SynchronousTestCase):
    """The supervisor's /ready from its workers' status lines, on a clock."""

    def test_ready_while_every_worker_is(self):
        clock = _ProcessReactor()
        supervisor = Supervisor(clock, 2, [], [])
        supervisor.startService()
        first, second = clock.spawned
        self.assertIs(supervisor.readiness(), Readiness.STARTING)
        first.childDataReceived(STATUS_FD, b"rea")  # a line may come in pieces
        first.childDataReceived(STATUS_FD, b"dy\n")
        self.assertTrue(first.ready)
        self.assertIs(supervisor.readiness(), Readiness.STARTING)
        second.childDataReceived(STATUS_FD, b"ready\n")
        self.assertIs(supervisor.readiness(), Readiness.READY)
        second.childDataReceived(STATUS_FD, b"x" * 10_000)  # no line: nothing kept beyond a line's bound
        self.assertLessEqual(len(second._status), 64)
        second.childDataReceived(STATUS_FD, b"\ndraining\n")  # e.g. orphaned, stopping on its own
        self.assertIs(supervisor.readiness(), Readiness.STARTING)
        second.childDataReceived(STATUS_FD, b"ready\n")
        self.assertIs(supervisor.readiness(), Readiness.READY)
        supervisor.stopService()
        self.assertIs(supervisor.readiness(), Readiness.DRAINING)
