"""The otlp exporter (zillatw.telemetry.otlp) against a real OTLP/HTTP receiver on loopback, which
decodes the protobuf bodies with opentelemetry-proto; the interval on a Clock."""

from __future__ import annotations

import copy
import io
import json
import logging
from typing import Any

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from zillatw import build_gateway
from zillatw.errors import ConfigError
from zillatw.telemetry.otlp import FINAL_WAIT, OtlpExporter
from zillatw.test.netns import ExampleNetwork
from zillatw.test.support import chain, close_ws, connect_ws, eventually


class Receiver(Resource):
    """An OTLP/HTTP collector: records each POST (path, headers, body) and answers `status`;
    with `hang`, never answers."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        self.status = 200
        self.hang = False
        self.held: list[Any] = []

    def render_POST(self, request: Any) -> Any:
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.posts.append((request.path.decode(), headers, request.content.read()))
        if self.hang:
            self.held.append(request)
            return NOT_DONE_YET
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", b"application/x-protobuf")
        return b""

    def bodies(self, path: str, message: Any) -> list[Any]:
        decoded = []
        for at, _, body in self.posts:
            if at == path:
                decoded.append(message.FromString(body))
        return decoded


class _Site(Site):
    """Keeps its connections, to end them with the test (the exporter's are kept alive)."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.connections: list[Any] = []

    def log(self, request: Any) -> None:
        """No access log line per request."""

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        self.connections.append(protocol)
        return protocol


def start_receiver(case: unittest.TestCase, on: int = 0) -> tuple[Receiver, int]:
    """A collector's OTLP/HTTP port on 127.0.0.1 and `on` (0: one the system picks)."""
    receiver = Receiver()
    site = _Site(receiver)
    port: Any = reactor.listenTCP(on, site, interface="127.0.0.1")  # type: ignore[arg-type]

    def open_ones() -> list[Any]:
        # the transport is the HTTP channel's, inside the protocol Site builds
        transports = [getattr(getattr(p, "_channel", p), "transport", None) for p in site.connections]
        return [t for t in transports if t is not None and t.connected]

    @defer.inlineCallbacks
    def stop() -> Any:
        for transport in open_ones():
            transport.abortConnection()
        yield port.stopListening()
        yield eventually(lambda: not open_ones())
    case.addCleanup(stop)
    return receiver, port.getHost().port


def otlp_config(location: str, **options: Any) -> dict:
    config = chain()
    config["telemetry"] = {
        "attributes": {"service.name": "edge", "deployment.environment": "test"},
        "metrics": ["stream.opens.received", "stream.active.received", "stream.data.received"],
        "exporters": {"otlp0": {"type": "otlp", "options": {"interval": 5, "endpoint": {"location": location},
                                                            **options}}},
    }
    config["bindings"]["ws0"]["telemetry"] = {"metrics": ["stream.*"]}
    return config


@defer.inlineCallbacks
def start_on_a_clock(case: unittest.TestCase, config: dict | str, stop: bool = True, env: Any = None) -> Any:
    """A gateway on the real reactor whose otlp exporters count time on a Clock."""
    events = io.StringIO()
    gateway = build_gateway(config, event_stream=events, env=env)
    gateway.events_text = events  # type: ignore[attr-defined]
    clock = Clock()
    for exporter in gateway.metrics.otlp:
        exporter.clock = clock
    gateway.startService()
    if stop:
        case.addCleanup(gateway.stopService)
    ports = yield gateway.listening
    return gateway, ports[0], clock


def attributes(items: Any) -> dict[str, Any]:
    values = {}
    for item in items:
        kind = item.value.WhichOneof("value")
        values[item.key] = getattr(item.value, kind) if kind else None
    return values


class ExportTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_metrics_and_logs_reach_the_collector(self):
        receiver, port = start_receiver(self)
        gateway, ws_port, clock = yield start_on_a_clock(self, otlp_config(
            f"http://127.0.0.1:{port}", credentials={"headers": {"authorization": "Bearer t0ken"}}))
        client = yield connect_ws(ws_port, "/chat")
        client.sendMessage(b"12345")
        yield client.messages.get()
        yield close_ws(client)
        clock.advance(4.9)
        self.assertEqual(receiver.posts, [])  # not before the interval
        clock.advance(0.1)
        yield eventually(lambda: len(receiver.posts) == 2)
        paths = sorted(path for path, _, _ in receiver.posts)
        self.assertEqual(paths, ["/v1/logs", "/v1/metrics"])
        for _, headers, _ in receiver.posts:
            self.assertEqual(headers["authorization"], "Bearer t0ken")
            self.assertEqual(headers["content-type"], "application/x-protobuf")
        [metrics] = receiver.bodies("/v1/metrics", ExportMetricsServiceRequest)
        [resource_metrics] = metrics.resource_metrics
        resource = attributes(resource_metrics.resource.attributes)
        self.assertEqual((resource["service.name"], resource["deployment.environment"]), ("edge", "test"))
        self.assertIn("process.pid", resource)
        found = {}
        for metric in resource_metrics.scope_metrics[0].metrics:
            data = metric.WhichOneof("data")
            for point in getattr(metric, data).data_points:
                found[(metric.name, data, attributes(point.attributes)["binding"])] = (
                    point.as_int if point.WhichOneof("value") == "as_int" else point.as_double,
                    attributes(point.attributes))
        opens, point = found[("stream.opens.received", "sum", "ws0")]
        self.assertEqual(opens, 1)
        self.assertEqual(point, {"namespace": "test", "binding": "ws0", "service.name": "edge"})
        self.assertEqual(found[("stream.data.received", "sum", "ws0")][0], 5)
        self.assertEqual(found[("stream.active.received", "gauge", "ws0")][0], 0)
        [logs] = receiver.bodies("/v1/logs", ExportLogsServiceRequest)
        records = [r for scope in logs.resource_logs[0].scope_logs for r in scope.log_records]
        by_event = {attributes(r.attributes)["event.name"]: r for r in records}
        self.assertIn("ENGINE_STARTED", by_event)
        accepted = by_event["BINDING_WS_REQUEST_ACCEPTED"]
        self.assertEqual(attributes(accepted.attributes)["path"], "/chat")
        self.assertTrue(accepted.body.string_value.startswith("test:ws0 - GET ws://"))
        self.assertEqual(accepted.severity_text, "INFO")
        session = attributes(by_event["BINDING_WS_SESSION_ENDED"].attributes)
        self.assertEqual((session["bytes_received"], session["closed_by"]), (5, "client"))
        self.assertFalse(any("t0ken" in str(attributes(r.attributes)) + r.body.string_value for r in records))
        # the next interval: cumulative metrics again; no events left to send
        clock.advance(5)
        yield eventually(lambda: len(receiver.posts) == 3)
        self.assertEqual(receiver.posts[-1][0], "/v1/metrics")

    @defer.inlineCallbacks
    def test_overrides_resolve_against_the_location_and_signals_choose(self):
        receiver, port = start_receiver(self)
        gateway, _, clock = yield start_on_a_clock(self, otlp_config(
            f"http://127.0.0.1:{port}/base/", signals=["metrics"],
            endpoint={"location": f"http://127.0.0.1:{port}/base/", "overrides": {"metrics": "collect/m"}}))
        self.assertFalse(gateway.events["test"].queues)  # no logs: events are not kept for it
        clock.advance(5)
        yield eventually(lambda: len(receiver.posts) == 1)
        self.assertEqual(receiver.posts[0][0], "/base/collect/m")


    @defer.inlineCallbacks
    def test_shutdown_sends_what_is_left(self):
        receiver, port = start_receiver(self)
        gateway, ws_port, clock = yield start_on_a_clock(self, otlp_config(f"http://127.0.0.1:{port}"), stop=False)
        client = yield connect_ws(ws_port)
        yield gateway.stopService()  # no interval passed: the last export carries it all
        _, code, _ = yield client.closed
        self.assertEqual(code, 1001)
        self.assertEqual(sorted(path for path, _, _ in receiver.posts), ["/v1/logs", "/v1/metrics"])
        [logs] = receiver.bodies("/v1/logs", ExportLogsServiceRequest)
        records = [attributes(r.attributes) for scope in logs.resource_logs[0].scope_logs for r in scope.log_records]
        [session] = [r for r in records if r["event.name"] == "BINDING_WS_SESSION_ENDED"]
        self.assertEqual((session["code"], session["closed_by"]), (1001, "gateway"))  # written while draining


    @defer.inlineCallbacks
    def test_the_example_configuration(self):
        """conf/ws.echo.otlp.yaml unchanged, on 7114 in a network namespace of the test's own
        (zillatw.test.netns), the collector on 4318 as the file's comment runs it."""
        network = ExampleNetwork(self)
        receiver, port = start_receiver(self, network.port(4318))
        gateway, _, clock = yield start_on_a_clock(self, network.config("ws.echo.otlp.yaml"),
                                                   env={"OTLP_COLLECTOR": f"http://localhost:{port}"})
        ws_port = network.port(7114)
        self.assertEqual(gateway.metrics.otlp[0].interval, 30)
        client = yield connect_ws(ws_port, protocols=["echo"])
        client.sendMessage(b"hello")
        yield client.messages.get()
        yield close_ws(client)
        clock.advance(30)
        yield eventually(lambda: len(receiver.posts) == 2)
        [logs] = receiver.bodies("/v1/logs", ExportLogsServiceRequest)
        names = [attributes(r.attributes)["event.name"] for r in logs.resource_logs[0].scope_logs[0].log_records]
        self.assertIn("BINDING_WS_SESSION_ENDED", names)
        self.assertEqual(attributes(logs.resource_logs[0].resource.attributes)["service.name"], "zillatw-ws-echo")
        lines = [json.loads(line) for line in gateway.events_text.getvalue().splitlines()]
        self.assertIn("BINDING_WS_SESSION_ENDED", [line["event"] for line in lines])


class FailureTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_refusing_collector_is_one_event_then_one_when_it_recovers(self):
        receiver, port = start_receiver(self)
        receiver.status = 400
        config = otlp_config(f"http://127.0.0.1:{port}", signals=["metrics"])
        config["telemetry"]["exporters"]["stdout"] = {"type": "stdout"}
        gateway, _, clock = yield start_on_a_clock(self, config)
        exporter = gateway.metrics.otlp[0]
        out = io.StringIO()
        gateway.events["test"]._sinks.append(lambda record: out.write(record.event + " " + record.details + "\n"))
        library_lines: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = library_lines.append  # type: ignore[method-assign]
        logging.getLogger("opentelemetry").addHandler(handler)
        self.addCleanup(logging.getLogger("opentelemetry").removeHandler, handler)
        for count in range(1, 4):
            clock.advance(5)
            yield eventually(lambda count=count: len(receiver.posts) == count and not exporter.busy)
        self.assertEqual(out.getvalue().count("OTLP_EXPORT_FAILED"), 1)
        self.assertIn(f"OTLP_EXPORT_FAILED - metrics http://127.0.0.1:{port}/v1/metrics", out.getvalue())
        self.assertIn("400", out.getvalue())  # the library's reason, once, in the event
        self.assertEqual(library_lines, [])  # and not a line of its own per interval
        receiver.status = 200
        clock.advance(5)
        yield eventually(lambda: "OTLP_EXPORT_RECOVERED" in out.getvalue())
        self.assertEqual(exporter.exported["metrics"], 1)

    @defer.inlineCallbacks
    def test_a_dead_collector_is_one_event(self):
        receiver, port = start_receiver(self)
        yield defer.maybeDeferred(self._cleanups.pop()[0])  # stop listening: the port refuses from now on
        gateway, ws_port, clock = yield start_on_a_clock(self, otlp_config(f"http://127.0.0.1:{port}",
                                                                            interval=1, signals=["metrics"]))
        exporter = gateway.metrics.otlp[0]
        for _ in range(3):
            clock.advance(1)
            yield eventually(lambda: not exporter.busy)
        self.assertEqual(exporter.failing, {"metrics"})
        client = yield connect_ws(ws_port)  # and the gateway serves on
        client.sendMessage(b"still here")
        self.assertEqual((yield client.messages.get()), (False, [b"still here"]))
        yield close_ws(client)

    @defer.inlineCallbacks
    def test_a_collector_that_never_answers_stalls_nothing(self):
        receiver, port = start_receiver(self)
        receiver.hang = True
        gateway, ws_port, clock = yield start_on_a_clock(self, otlp_config(f"http://127.0.0.1:{port}", interval=1))
        exporter = gateway.metrics.otlp[0]
        clock.advance(1)
        yield eventually(lambda: len(receiver.posts) >= 1)
        client = yield connect_ws(ws_port)
        for _ in range(5):  # intervals pass while the first posts hang: nothing piles up
            clock.advance(1)
            client.sendMessage(b"ping")
            self.assertEqual((yield client.messages.get()), (False, [b"ping"]))
        self.assertLessEqual(len(receiver.posts), 2)  # one per signal in flight, at most
        self.assertTrue(exporter.busy)
        yield close_ws(client)
        yield eventually(lambda: not exporter.busy)  # the posts time out within the interval
        receiver.posts.clear()
        finished = exporter.finish()  # a shutdown waits FINAL_WAIT at most for the last export
        yield eventually(lambda: receiver.posts)
        self.assertFalse(finished.called)
        clock.advance(FINAL_WAIT)
        self.assertTrue(finished.called)


class ConfigTests(unittest.TestCase):
    def problems(self, change: Any) -> list[str]:
        config = otlp_config("http://127.0.0.1:4318")
        change(config["telemetry"], config["telemetry"]["exporters"]["otlp0"]["options"])
        with self.assertRaises(ConfigError) as caught:
            build_gateway(copy.deepcopy(config))
        return caught.exception.problems

    def test_refused_by_name(self):
        at = "telemetry.exporters.otlp0.options"
        cases = [
            (lambda t, o: o.update(interval=0), f"{at}.interval: expected a number of seconds above 0, got 0"),
            (lambda t, o: o.update(signals=["traces"]), f"{at}.signals: expected a list of distinct signals"),
            (lambda t, o: o["endpoint"].update(location="ftp://x"), f"{at}.endpoint.location: expected an http://"),
            (lambda t, o: o["endpoint"].update(protocol="grpc"), f"{at}.endpoint.protocol: expected 'http'"),
            (lambda t, o: o["endpoint"].update(overrides={"traces": "/t"}), f"{at}.endpoint.overrides.traces: not"),
            (lambda t, o: o.update(tls={"trust": ["ca"]}), f"{at}.tls: not supported by this zillatw yet"),
            (lambda t, o: o.update(credentials={"headers": {"x": "secret-value"}}), f"{at}.credentials: expected"),
            (lambda t, o: o.pop("endpoint"), f"{at}.endpoint: expected a mapping with location"),
            (lambda t, o: t["attributes"].update(team=["a"]), "telemetry.attributes.team: expected a string value"),
        ]
        for change, expected in cases:
            problems = self.problems(change)
            self.assertTrue(any(p.startswith(expected) for p in problems), (expected, problems))
            self.assertFalse(any("secret-value" in p for p in problems))

    def test_the_authorization_header_is_not_in_the_dumped_configuration(self):
        config = otlp_config("http://127.0.0.1:4318", credentials={"headers": {"authorization": "Bearer t0ken"}})
        dumped = build_gateway(config).config.dump()  # what -v prints
        self.assertNotIn("t0ken", dumped)
        self.assertIn("authorization: REDACTED", dumped)

    def test_binding_attributes_stay_refused(self):
        config = otlp_config("http://127.0.0.1:4318")
        config["bindings"]["ws0"]["telemetry"]["attributes"] = {"path": "${http.request.path}"}
        with self.assertRaises(ConfigError) as caught:
            build_gateway(config)
        self.assertTrue(any(p.startswith("bindings.ws0.telemetry.attributes: not supported by this zillatw yet")
                            for p in caught.exception.problems), caught.exception.problems)


class DataModelTests(unittest.SynchronousTestCase):
    def test_histograms_become_per_bucket_counts_under_zillas_names(self):
        from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
        from prometheus_client.core import HistogramMetricFamily

        from zillatw.telemetry.metrics import METRICS, prometheus_name
        family = HistogramMetricFamily("http_duration_milliseconds", "d", labels=["namespace", "binding"])
        family.add_metric(["ns", "http0"], [("1.0", 1), ("5.0", 3), ("+Inf", 4)], 42.0)
        other = HistogramMetricFamily("http_duration_milliseconds", "d", labels=["namespace", "binding"])
        other.add_metric(["elsewhere", "http0"], [("+Inf", 9)], 1.0)  # another namespace's: not this exporter's
        exporter = OtlpExporter("ns", "o", {"endpoint": {"location": "http://x"}}, {"service.name": "s"},
                                collect=lambda: [], records=None, emit=lambda *a: None, clock=Clock(),
                                call_from_thread=lambda *a: None,
                                names={prometheus_name(m): (m, METRICS[m][1]) for m in METRICS})
        request = encode_metrics(exporter.metrics_data([family, other], 1))
        [metric] = request.resource_metrics[0].scope_metrics[0].metrics  # the other namespace's left out
        self.assertEqual((metric.name, metric.unit), ("http.server.duration", "milliseconds"))
        [point] = metric.histogram.data_points
        self.assertEqual((list(point.bucket_counts), list(point.explicit_bounds), point.count, point.sum),
                         ([1, 2, 1], [1.0, 5.0], 4, 42.0))
        self.assertFalse(point.HasField("min"))  # not known: not sent
        self.assertEqual(attributes(point.attributes), {"namespace": "ns", "binding": "http0", "service.name": "s"})

    def test_recovering_says_how_many_events_were_dropped(self):
        from zillatw.telemetry.accesslog import EventRecord, RecordQueue
        records = RecordQueue(limit=2)
        for n in range(5):
            records(EventRecord(n, "ns", "b", n, "E", "-"))
        said: list[str] = []
        exporter = OtlpExporter("ns", "o", {"endpoint": {"location": "http://user:pw@127.0.0.1:4318"}}, {},
                                collect=lambda: [], records=records, emit=lambda e, d: said.append(f"{e} {d}"),
                                clock=Clock(), call_from_thread=lambda *a: None)
        exporter._done("logs", False, "refused")
        exporter._done("logs", False, "refused again")  # still failing: nothing more said
        exporter._done("logs", True, "")
        self.assertEqual(said, ["OTLP_EXPORT_FAILED - logs http://127.0.0.1:4318/v1/logs refused",
                                "OTLP_EXPORT_RECOVERED - logs http://127.0.0.1:4318/v1/logs (3 events dropped so far)"])
