"""http.request.size and http.response.size (zillatw.telemetry.httpsizes): Zilla's buckets,
what a size is (Content-Length, else the bytes that passed), labels from an http server's
telemetry.attributes, the label-set bound, and the same points on otlp."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from zillatw.telemetry import httpsizes
from zillatw.telemetry.metrics import METRICS, prometheus_name
from zillatw.telemetry.otlp import OtlpExporter
from zillatw.test.http_support import connect_http, plain_chain, request, sample
from zillatw.test.support import close_ws, connect_ws, start_gateway, when_opened
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
        from zillatw.test.support import eventually
        yield eventually(lambda: b"abc" in client.raw)
        client.transport.loseConnection()
        yield client.closed
        code, text = yield get(gateway.metrics_ports()[0])
        base = {"binding": "http0", "namespace": "test"}
        self.assertEqual(sample(text, "http_request_size_bytes_count", **base), None)  # no series at all
        self.assertIn("# TYPE http_request_size_bytes histogram", text)
        self.assertEqual(sample(text, "http_duration_milliseconds_count", **base), 2)  # both connections

    @defer.inlineCallbacks
    def test_wrapped_only_when_a_size_metric_is_selected(self):
        for globs, wrapped in ((["http.duration"], False), (["http.request.size"], True)):
            config = sized_chain()
            config["bindings"]["http0"]["telemetry"] = {"metrics": globs}
            gateway, _ = yield start_gateway(self, config)
            exit_ = gateway.binding("http0").route({":method": "GET", ":path": "/"})
            self.assertEqual(isinstance(exit_, httpsizes.SizedRequestExit), wrapped, globs)
            yield gateway.stopService()


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
