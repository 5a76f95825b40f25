"""An http server's per-request metrics: http.request.size and http.response.size
(zillatw.telemetry.httpsizes: Zilla's buckets, what a size is), http.duration and
http.active.requests (zillatw.telemetry.httpexchanges: per request, plain or upgraded),
each labelled by the server's telemetry.attributes, the label-set bound, and the same
points on otlp."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial import unittest

from zillatw.telemetry import httpexchanges, httpsizes
from zillatw.telemetry.metrics import METRICS, prometheus_name
from zillatw.telemetry.otlp import OtlpExporter
from zillatw.test.h2_support import connect_h2c
from zillatw.test.http_support import connect_http, plain_chain, request, sample
from zillatw.test.support import OnAClock, close_ws, connect_ws, eventually, start_gateway, upgrade_request, when_opened
from zillatw.test.support import http_get as get

HTTP = "http.active.requests", "http.duration", "http.request.size", "http.response.size"


def sized_chain(attributes: dict[str, str] | None = None) -> dict[str, Any]:
    config = plain_chain()
    config["telemetry"] = {"metrics": list(HTTP), "exporters": {
        "stdout": {"type": "stdout"},
        "prom": {"type": "prometheus", "options": {"endpoints": [{"scheme": "http", "port": 0}]}}}}
    config["bindings"]["http0"]["telemetry"] = {"metrics": ["http.*"]}
    if attributes:
        config["bindings"]["http0"]["telemetry"]["attributes"] = attributes
    return config


class BucketTests(unittest.SynchronousTestCase):
    def test_zillas_power_of_two_buckets(self):
        histogram = httpsizes.SizeHistogram("ns", "http0", httpsizes.Attributes(None))
        for size in (0, 1, 2, 3, 4, 1023, 1024, 2 ** 62):
            histogram.observe((), size)
        counts = histogram.series[()]
        # bucket floor(log2 size), 0 and 1 in the first: le 2, 4, 8, ..., 2**63
        self.assertEqual([(httpsizes.LIMITS[i], counts[i]) for i in range(httpsizes.BUCKETS) if counts[i]],
                         [("2.0", 2), ("4.0", 2), ("8.0", 1), ("1024.0", 1), ("2048.0", 1), ("+Inf", 1)])
        self.assertEqual(counts[httpsizes.BUCKETS], 0 + 1 + 2 + 3 + 4 + 1023 + 1024 + 2 ** 62)
        self.assertEqual(len(httpsizes.LIMITS), 63)

    def test_label_sets_are_bounded(self):
        attributes = httpsizes.Attributes({"path": "${http.request.path}"})
        histogram = httpsizes.SizeHistogram("ns", "http0", attributes)
        for n in range(httpsizes.MAX_LABEL_SETS + 10):
            histogram.observe((f"/item/{n}",), 1)
        self.assertEqual(len(histogram.series), httpsizes.MAX_LABEL_SETS + 1)
        self.assertEqual(histogram.series[(httpsizes.OVERFLOW,)][0], 10)

    def test_gauge_label_sets_are_bounded_and_close_where_they_opened(self):
        gauge = httpexchanges.ActiveGauge("ns", "http0", httpsizes.Attributes({"path": "${http.request.path}"}))
        keys = [gauge.opened((f"/item/{n}",)) for n in range(httpsizes.MAX_LABEL_SETS + 3)]
        self.assertEqual(keys[-1], (httpsizes.OVERFLOW,))
        self.assertEqual(gauge.series[(httpsizes.OVERFLOW,)], 3)
        self.assertEqual(len(gauge.series), httpsizes.MAX_LABEL_SETS + 1)

    def test_a_duration_takes_the_request_and_the_response_fields(self):
        attributes = httpsizes.Attributes({"method": "${http.request.method}", "status": "${http.response.status}"})
        request_labels = attributes.labels("request", {":method": "GET"})
        self.assertEqual(attributes.merged(request_labels, attributes.labels("response", {":status": "404"})),
                         ("GET", "404"))
        self.assertEqual(attributes.merged(request_labels, ()), ("GET", ""))  # no response head

    def test_attributes_read_the_head_they_name(self):
        attributes = httpsizes.Attributes({"method": "${http.request.method}", "status": "${http.response.status}",
                                           "type": "${http.response.content-type}"})
        self.assertEqual(attributes.names, ("method", "status", "type"))
        self.assertEqual(attributes.labels("request", {":method": "PUT", ":status": "x"}), ("PUT", "", ""))
        path = httpsizes.Attributes({"path": "${http.request.path}"})
        self.assertEqual(path.labels("request", {":path": "/ws?access_token=secret"}), ("/ws",))
        self.assertEqual(attributes.labels("response", {":status": "200", "content-type": "text/plain"}),
                         ("", "200", "text/plain"))


class RecordedTests(unittest.TestCase):
    @defer.inlineCallbacks
    def serve(self, attributes: dict[str, str] | None = None) -> Any:
        gateway, port = yield start_gateway(self, sized_chain(attributes))
        client = yield connect_http(port)
        self.addCleanup(client.transport.loseConnection)
        return gateway, port, client

    @defer.inlineCallbacks
    def test_length_or_bytes_passed_labelled_by_request_and_response(self):
        gateway, port, client = yield self.serve({"method": "${http.request.method}",
                                                  "status": "${http.response.status}"})
        client.send(request("POST", "/a", b"x" * 100)
                    + request("POST", "/b", None, {"Transfer-Encoding": "chunked"}) + b"3\r\nabc\r\n0\r\n\r\n"
                    + request("GET", "/c"))
        yield client.responses(3)
        code, text = yield get(gateway.metrics_ports()[0])
        base = {"binding": "http0", "namespace": "test"}
        self.assertEqual(sample(text, "http_request_size_bytes_count", **base, method="POST", status=""), 2)
        self.assertEqual(sample(text, "http_request_size_bytes_sum", **base, method="POST", status=""), 103)
        self.assertEqual(sample(text, "http_request_size_bytes_bucket", **base, method="POST", status="",
                                le="4.0"), 1)  # the chunked one: 3 bytes passed
        self.assertEqual(sample(text, "http_request_size_bytes_bucket", **base, method="GET", status="",
                                le="2.0"), 1)
        self.assertEqual(sample(text, "http_response_size_bytes_count", **base, method="", status="200"), 3)
        self.assertEqual(sample(text, "http_response_size_bytes_sum", **base, method="", status="200"), 103)

    @defer.inlineCallbacks
    def test_a_body_cut_off_is_not_recorded_nor_an_upgrade(self):
        gateway, port, client = yield self.serve()
        ws = yield connect_ws(port)
        yield when_opened(ws)
        yield close_ws(ws)
        client.send(request("POST", "/a", None, {"Transfer-Encoding": "chunked"}) + b"3\r\nabc\r\n")
        yield eventually(lambda: b"abc" in client.raw)
        client.transport.loseConnection()
        yield client.closed
        code, text = yield get(gateway.metrics_ports()[0])
        base = {"binding": "http0", "namespace": "test"}
        self.assertEqual(sample(text, "http_request_size_bytes_count", **base), None)  # no series at all
        self.assertIn("# TYPE http_request_size_bytes histogram", text)
        # the upgrade is timed (until its WebSocket closed); the request cut off is not
        self.assertEqual(sample(text, "http_duration_milliseconds_count", **base), 1)
        self.assertEqual(sample(text, "http_active_requests", **base), 0)

    @defer.inlineCallbacks
    def test_wrapped_only_when_an_http_metric_is_selected(self):
        for globs, wrapped in ((["stream.*"], False), (["http.duration"], True), (["http.request.size"], True)):
            config = sized_chain()
            config["telemetry"]["metrics"].append("stream.opens.received")
            config["bindings"]["http0"]["telemetry"] = {"metrics": globs}
            gateway, _ = yield start_gateway(self, config)
            for headers in ({}, {"upgrade": "websocket"}):  # echo for plain requests, the ws server for upgrades
                exit_ = gateway.binding("http0").route({":method": "GET", ":path": "/", **headers})
                self.assertEqual(isinstance(exit_, httpexchanges.MeasuredExit), wrapped, globs)
            yield gateway.stopService()

    @defer.inlineCallbacks
    def test_duration_and_active_requests_labelled_per_request(self):
        gateway, port, client = yield self.serve({"method": "${http.request.method}", "path": "${http.request.path}",
                                                  "status": "${http.response.status}"})
        client.send(request("POST", "/a?access_token=secret", b"x" * 10) + request("GET", "/b"))
        yield client.responses(2)
        ws = yield connect_ws(port, "/chat")
        yield when_opened(ws)
        refused = yield connect_http(port)  # an upgrade the ws server refuses at once
        refused.send(upgrade_request(path="/nope", headers={"Sec-WebSocket-Version": "7"}))
        yield refused.closed
        metrics = gateway.metrics_ports()[0]
        code, text = yield get(metrics)
        base = {"binding": "http0", "namespace": "test"}
        # the gauge: under the request's fields (the response's are empty), the WebSocket still open
        self.assertEqual(sample(text, "http_active_requests", **base, method="GET", path="/chat", status=""), 1)
        self.assertEqual(sample(text, "http_active_requests", **base, method="POST", path="/a", status=""), 0)
        duration = "http_duration_milliseconds_count"
        self.assertEqual(sample(text, duration, **base, method="POST", path="/a", status="200"), 1)
        self.assertEqual(sample(text, duration, **base, method="GET", path="/b", status="200"), 1)
        self.assertEqual(sample(text, duration, **base, method="GET", path="/nope", status="426"), 1)  # its refusal
        self.assertEqual(sample(text, duration, **base, method="GET", path="/chat", status=""), None)  # still open
        self.assertNotIn("secret", text)
        yield close_ws(ws)
        yield eventually(lambda: gateway.binding("ws0").open_count() == 0)
        code, text = yield get(metrics)
        self.assertEqual(sample(text, "http_active_requests", **base, method="GET", path="/chat", status=""), 0)
        self.assertEqual(sample(text, duration, **base, method="GET", path="/chat", status=""), 1)

    @defer.inlineCallbacks
    def test_each_stream_of_an_http2_connection_is_a_request(self):
        gateway, port, _ = yield self.serve({"method": "${http.request.method}", "status": "${http.response.status}"})
        client = yield connect_h2c(self, port)
        streams = [client.request("POST", f"/{n}", b"h2 body", {"content-type": "text/plain"}) for n in range(3)]
        yield eventually(lambda: all(client.done(stream) for stream in streams))
        code, text = yield get(gateway.metrics_ports()[0])
        base = {"binding": "http0", "namespace": "test"}
        self.assertEqual(sample(text, "http_duration_milliseconds_count", **base, method="POST", status="200"), 3)
        self.assertEqual(sample(text, "http_active_requests", **base, method="POST", status=""), 0)
        self.assertEqual(sample(text, "http_request_size_bytes_sum", **base, method="POST", status=""), 21)

    def test_each_request_of_a_connection_is_timed_on_the_reactor(self):
        config = sized_chain({"method": "${http.request.method}"})
        config["bindings"]["http0"]["telemetry"]["metrics"] = ["http.duration", "http.active.requests"]
        on = OnAClock(config)
        connection, transport = on.connect()
        connection.dataReceived(request("POST", "/slow", None, {"Transfer-Encoding": "chunked"}))
        on.clock.advance(0.25)
        meters = on.gateway.metrics._http_meters["test:http0"]
        self.assertEqual(meters.active.series, {("POST",): 1})
        connection.dataReceived(b"0\r\n\r\n" + request("GET", "/quick"))
        self.assertEqual(transport.value().count(b"HTTP/1.1 200"), 2)
        durations = meters.durations.series
        self.assertEqual((durations[("POST",)][-1], durations[("GET",)][-1]), (250.0, 0.0))
        self.assertEqual(meters.active.series, {("POST",): 0, ("GET",): 0})
        connection.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(sum(counts[-2] for counts in durations.values()), 0)  # nothing above a day


class OtlpTests(unittest.SynchronousTestCase):
    def test_points_carry_the_attributes_under_zillas_server_names(self):
        from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
        collector = httpsizes.SizeCollector()
        histogram = httpsizes.SizeHistogram("ns", "http0", httpsizes.Attributes({"method": "${http.request.method}"}))
        collector.histograms["http.request.size"].append(histogram)
        histogram.observe(("POST",), 13)
        exporter = OtlpExporter("ns", "o", {"endpoint": {"location": "http://x"}}, {},
                                collect=lambda: [], records=None, emit=lambda *a: None, clock=Clock(),
                                call_from_thread=lambda *a: None,
                                names={prometheus_name(m): (m, METRICS[m][1]) for m in METRICS})
        request = encode_metrics(exporter.metrics_data(list(collector.collect()), 1))
        [metric] = request.resource_metrics[0].scope_metrics[0].metrics
        self.assertEqual((metric.name, metric.unit), ("http.server.request.size", "bytes"))
        [point] = metric.histogram.data_points
        self.assertEqual((point.count, point.sum), (1, 13.0))
        self.assertEqual({a.key: a.value.string_value for a in point.attributes},
                         {"namespace": "ns", "binding": "http0", "method": "POST"})

    def test_duration_and_active_points_carry_the_attributes(self):
        from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
        collector = httpexchanges.ExchangeCollector()
        at = ("ns", "http0", httpsizes.Attributes({"method": "${http.request.method}"}))
        collector.gauges.append(gauge := httpexchanges.ActiveGauge(*at))
        collector.histograms.append(durations := httpexchanges.DurationHistogram(*at))
        gauge.opened(("GET",))
        durations.observe(("PUT",), 7)
        exporter = OtlpExporter("ns", "o", {"endpoint": {"location": "http://x"}}, {"service.name": "edge"},
                                collect=lambda: [], records=None, emit=lambda *a: None, clock=Clock(),
                                call_from_thread=lambda *a: None,
                                names={prometheus_name(m): (m, METRICS[m][1]) for m in METRICS})
        request = encode_metrics(exporter.metrics_data(list(collector.collect()), 1))
        metrics = {m.name: m for m in request.resource_metrics[0].scope_metrics[0].metrics}
        [active] = metrics["http.server.active_requests"].gauge.data_points
        self.assertEqual((active.as_int or active.as_double, {a.key: a.value.string_value for a in active.attributes}),
                         (1, {"namespace": "ns", "binding": "http0", "method": "GET", "service.name": "edge"}))
        [point] = metrics["http.server.duration"].histogram.data_points
        self.assertEqual((point.count, point.sum), (1, 7.0))
        self.assertEqual({a.key: a.value.string_value for a in point.attributes},
                         {"namespace": "ns", "binding": "http0", "method": "PUT", "service.name": "edge"})
