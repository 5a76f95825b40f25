"""Metrics, the prometheus exporter and the readiness file: real loopback sockets, real
WebSocket clients, /metrics fetched over HTTP. (Events: test_events.)"""

from __future__ import annotations

import copy
import os
import signal

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial import unittest

from zillatw import ConfigError, build_gateway
from zillatw.telemetry.instrument import MeteredExit
from zillatw.test.netns import ExampleNetwork
from zillatw.test.support import (
    STREAM,
    OnAClock,
    chain,
    client_frame,
    close_ws,
    connect_raw,
    connect_ws,
    eventually,
    http_get,
    metered,
    parse_server_frames,
    raw_exchange,
    split_response,
    start_gateway,
    upgrade_request,
    value,
)


@defer.inlineCallbacks
def scrape(gateway, path: str = "/metrics"):
    """{(sample name, binding): value} of every sample; all must be in namespace 'test'."""
    code, text = yield http_get(gateway.metrics_ports()[0], path)
    assert code == 200, (code, text)
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert sample.labels["namespace"] == "test", sample
            assert set(sample.labels) - {"le"} == {"namespace", "binding"}, sample
            name = sample.name + (f'{{le="{sample.labels["le"]}"}}' if "le" in sample.labels else "")
            samples[(name, sample.labels["binding"])] = sample.value
    return samples, text


def of(samples: dict, binding: str) -> dict:
    return {name: value for (name, b), value in samples.items() if b == binding}




class PrometheusTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_known_traffic_gives_exact_counters(self):
        gateway, port = yield start_gateway(self, metered())
        clients = []
        for _ in range(3):
            client = yield connect_ws(port, protocols=["echo"])
            clients.append(client)
        for client in clients:
            for size in range(1, 11):  # 10 messages of 1..10 times 10 bytes: 550 bytes
                client.sendMessage(b"m" * (10 * size), isBinary=True)
            for size in range(1, 11):
                _, frames = yield client.messages.get()
                self.assertEqual(b"".join(frames), b"m" * (10 * size))
        refused = yield raw_exchange(port, upgrade_request(headers={"Sec-WebSocket-Protocol": "nope"}))
        self.assertTrue(refused.startswith(b"HTTP/1.1 404"), refused)

        samples, _ = yield scrape(gateway)  # while the three are open
        for binding in ("ws0", "echo"):
            self.assertEqual((of(samples, binding)["stream_active_received"],
                              of(samples, binding)["stream_active_sent"]), (3, 3), binding)
        self.assertEqual(of(samples, "http0")["http_active_requests"], 3)

        for client in clients:
            result = yield close_ws(client)
            self.assertEqual(result[:2], (True, 1000))
        yield eventually(lambda: value(gateway, "http_active_requests", "http0") == 0
                         and value(gateway, "stream_closes_received_total", "ws0") == 3)

        samples, text = yield scrape(gateway)
        self.assertEqual(of(samples, "ws0"), {
            "stream_active_received": 0, "stream_active_sent": 0,
            "stream_opens_received_total": 4,  # the refused handshake too
            "stream_opens_sent_total": 3,
            "stream_data_received_bytes_total": 1650, "stream_data_sent_bytes_total": 1650,
            "stream_errors_received_total": 0, "stream_errors_sent_total": 1,
            "stream_closes_received_total": 3, "stream_closes_sent_total": 3,
        })
        self.assertEqual(of(samples, "echo"), {
            "stream_active_received": 0, "stream_active_sent": 0,
            "stream_opens_received_total": 3, "stream_opens_sent_total": 3,
            "stream_data_received_bytes_total": 1650, "stream_data_sent_bytes_total": 1650,
            "stream_errors_received_total": 0, "stream_errors_sent_total": 0,
            "stream_closes_received_total": 3, "stream_closes_sent_total": 3,
        })
        http0 = of(samples, "http0")
        self.assertEqual({k: v for k, v in http0.items() if "data" not in k and "duration" not in k}, {
            "http_active_requests": 0, "stream_active_received": 0, "stream_active_sent": 0,
            "stream_opens_received_total": 4, "stream_opens_sent_total": 4,
            "stream_errors_received_total": 0, "stream_errors_sent_total": 0,
            "stream_closes_received_total": 4, "stream_closes_sent_total": 4,
        })
        # Wire bytes: 1650 of payload plus frame heads, masks and the handshakes.
        self.assertGreater(http0["stream_data_received_bytes_total"], 1650 + 30 * 6)
        self.assertGreater(http0["stream_data_sent_bytes_total"], 1650 + 30 * 2)
        self.assertEqual(of(samples, "tcp0"), {}, "tcp0 has no telemetry.metrics: it records nothing")
        # http.duration: one observation per request (connection), in milliseconds
        self.assertEqual((http0["http_duration_milliseconds_count"],
                          http0['http_duration_milliseconds_bucket{le="+Inf"}']), (4, 4))
        self.assertEqual(http0['http_duration_milliseconds_bucket{le="86400000.0"}'], 4)
        self.assertGreater(http0["http_duration_milliseconds_sum"], 0)
        self.assertLess(http0["http_duration_milliseconds_sum"], 4 * 60_000)
        # Zilla's Prometheus names and labels, as text.
        self.assertIn('stream_opens_received_total{binding="ws0",namespace="test"} 4.0', text)
        self.assertRegex(text, "# TYPE stream_data_received_bytes(_total)? counter")
        self.assertIn("# TYPE stream_active_received gauge", text)
        self.assertNotIn("_created", text)

    @defer.inlineCallbacks
    def test_connection_bytes_are_exact(self):
        """tcp and http servers count bytes as read and written: what a raw client sent and got."""
        gateway, port = yield start_gateway(self, metered(bindings={"tcp0": ["stream.data.*"],
                                                                    "http0": ["stream.data.*", "stream.opens.*"]}))
        raw = yield connect_raw(port)
        sent = upgrade_request(headers={"Sec-WebSocket-Protocol": "echo"}) + client_frame(0x1, b"hello")
        raw.transport.write(sent)
        yield raw.until(1)
        yield raw.until(raw.data.index(b"\r\n\r\n") + 4 + 2 + 5)
        self.assertEqual(parse_server_frames(split_response(raw.data)[2]), [(0x1, True, b"hello")])
        close = client_frame(0x8, (1000).to_bytes(2, "big"))
        raw.transport.write(close)
        received = yield raw.done
        self.assertEqual(parse_server_frames(split_response(received)[2])[-1], (0x8, True, (1000).to_bytes(2, "big")))
        yield eventually(lambda: value(gateway, "stream_data_received_bytes_total", "tcp0") == len(sent + close))
        samples, _ = yield scrape(gateway)
        for binding in ("tcp0", "http0"):
            self.assertEqual(of(samples, binding)["stream_data_received_bytes_total"], len(sent + close))
            self.assertEqual(of(samples, binding)["stream_data_sent_bytes_total"], len(received))
        # Globs select: tcp0 records data only, http0 data and opens; nothing else of either.
        self.assertEqual(sorted(of(samples, "tcp0")), ["stream_data_received_bytes_total",
                                                       "stream_data_sent_bytes_total"])
        self.assertEqual(sorted(of(samples, "http0")), ["stream_data_received_bytes_total",
                                                        "stream_data_sent_bytes_total",
                                                        "stream_opens_received_total", "stream_opens_sent_total"])
        self.assertEqual(of(samples, "ws0"), {})
        self.assertEqual(of(samples, "echo"), {})

    @defer.inlineCallbacks
    def test_globs_choose_what_each_binding_records(self):
        gateway, port = yield start_gateway(self, metered(bindings={"ws0": ["stream.opens.*"],
                                                                    "echo": ["stream.data.received"]}))
        client = yield connect_ws(port, protocols=["echo"])
        client.sendMessage(b"12345")
        yield client.messages.get()
        yield close_ws(client)
        samples, _ = yield scrape(gateway)
        self.assertEqual(of(samples, "ws0"), {"stream_opens_received_total": 1, "stream_opens_sent_total": 1})
        self.assertEqual(of(samples, "echo"), {"stream_data_received_bytes_total": 5})
        self.assertEqual(of(samples, "http0"), {})

    @defer.inlineCallbacks
    def test_binding_records_only_what_the_namespace_declares(self):
        config = metered(bindings={"http0": ["stream.*"], "ws0": ["stream.*"], "echo": ["stream.*"]})
        config["telemetry"]["metrics"] = ["stream.opens.received"]
        gateway, port = yield start_gateway(self, config)
        client = yield connect_ws(port, protocols=["echo"])
        yield close_ws(client)
        yield eventually(lambda: value(gateway, "stream_opens_received_total", "echo") == 1)
        samples, _ = yield scrape(gateway)
        self.assertEqual(samples, {("stream_opens_received_total", "http0"): 1,
                                   ("stream_opens_received_total", "ws0"): 1,
                                   ("stream_opens_received_total", "echo"): 1})

    @defer.inlineCallbacks
    def test_exit_refusal_and_abnormal_close_are_errors(self):
        """An exit that refuses the stream (a ws client whose upstream is not there: 502) is
        an error sent; a client that drops its socket is an error received."""
        from twisted.internet.endpoints import TCP4ServerEndpoint
        from twisted.internet.protocol import Factory, Protocol
        closed = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Protocol))
        dead_port = closed.getHost().port
        yield closed.stopListening()
        config = metered(bindings={"ws0": ["stream.*"], "echo": ["stream.*"]})
        config["bindings"]["ws0"]["routes"] = [{"when": [{"protocol": "echo"}], "exit": "echo"},
                                               {"when": [{"path": "/up"}], "exit": "proxy"}]
        config["bindings"].update({
            "proxy": {"type": "ws", "kind": "client", "exit": "http1", "telemetry": {"metrics": ["stream.*"]}},
            "http1": {"type": "http", "kind": "client", "exit": "tcp1"},
            "tcp1": {"type": "tcp", "kind": "client", "options": {"host": "127.0.0.1", "port": dead_port}},
        })
        gateway, port = yield start_gateway(self, config)
        refused = yield raw_exchange(port, upgrade_request("/up"))
        self.assertTrue(refused.startswith(b"HTTP/1.1 502"), refused)
        raw = yield connect_raw(port)
        raw.transport.write(upgrade_request(headers={"Sec-WebSocket-Protocol": "echo"}))
        yield raw.until(1)
        yield eventually(lambda: value(gateway, "stream_active_received", "echo") == 1)
        raw.transport.abortConnection()
        yield raw.done
        yield eventually(lambda: value(gateway, "stream_active_received", "echo") == 0)
        samples, _ = yield scrape(gateway)
        ws0, proxy, echo = of(samples, "ws0"), of(samples, "proxy"), of(samples, "echo")
        self.assertEqual((ws0["stream_opens_received_total"], ws0["stream_opens_sent_total"],
                          ws0["stream_errors_sent_total"], ws0["stream_errors_received_total"],
                          ws0["stream_closes_received_total"]), (2, 1, 1, 1, 0))
        self.assertEqual((proxy["stream_opens_received_total"], proxy["stream_opens_sent_total"],
                          proxy["stream_errors_sent_total"]), (1, 0, 1))
        self.assertEqual((echo["stream_opens_received_total"], echo["stream_errors_received_total"],
                          echo["stream_active_received"]), (1, 1, 0))
        events = gateway.events_text.getvalue()
        self.assertRegex(events, r"test:ws0 \[[^]]+\] \[[0-9a-f]{16}d\] BINDING_WS_REQUEST_REJECTED - 502 "
                                 r"upstream unreachable")

    @defer.inlineCallbacks
    def test_fan_counts_each_delivery(self):
        """ws.reflect: a fan's members' messages go once to its exit (echo) and back to every member."""
        config = metered(bindings={"ws0": ["stream.*"], "echo": ["stream.*"]})
        config["bindings"]["ws0"]["routes"] = [{"exit": "fan"}]
        config["bindings"]["fan"] = {"type": "fan", "kind": "server", "exit": "echo",
                                     "telemetry": {"metrics": ["stream.*"]}}
        gateway, port = yield start_gateway(self, config)
        a = yield connect_ws(port)
        b = yield connect_ws(port)
        a.sendMessage(b"hello")  # 5 bytes in, 10 out: to a and to b
        self.assertEqual((yield a.messages.get()), (False, [b"hello"]))
        self.assertEqual((yield b.messages.get()), (False, [b"hello"]))
        samples, _ = yield scrape(gateway)
        fan, echo, ws0 = of(samples, "fan"), of(samples, "echo"), of(samples, "ws0")
        self.assertEqual((fan["stream_opens_received_total"], fan["stream_active_received"],
                          fan["stream_data_received_bytes_total"], fan["stream_data_sent_bytes_total"]), (2, 2, 5, 10))
        self.assertEqual((echo["stream_opens_received_total"], echo["stream_data_received_bytes_total"],
                          echo["stream_data_sent_bytes_total"]), (1, 5, 5))  # the group's one stream
        self.assertEqual((ws0["stream_data_received_bytes_total"], ws0["stream_data_sent_bytes_total"]), (5, 10))
        yield close_ws(a)
        yield close_ws(b)
        yield eventually(lambda: value(gateway, "stream_active_received", "fan") == 0)
        self.assertEqual(value(gateway, "stream_closes_received_total", "fan"), 2)

    @defer.inlineCallbacks
    def test_ws_client_streams(self):
        """A proxy's ws client opens its stream when the upstream answers (a Deferred) and
        counts what it relays; the upstream is another gateway, echoing."""
        upstream, upstream_port = yield start_gateway(self, chain())
        config = metered(bindings={"ws0": ["stream.*"]})
        config["bindings"]["ws0"]["routes"] = [{"exit": "proxy"}]
        config["bindings"].update({
            "proxy": {"type": "ws", "kind": "client", "exit": "http1", "telemetry": {"metrics": ["stream.*"]}},
            "http1": {"type": "http", "kind": "client", "exit": "tcp1"},
            "tcp1": {"type": "tcp", "kind": "client", "options": {"host": "127.0.0.1", "port": upstream_port}},
        })
        gateway, port = yield start_gateway(self, config)
        client = yield connect_ws(port)
        client.sendMessage(b"through", isBinary=True)
        self.assertEqual((yield client.messages.get()), (True, [b"through"]))
        samples, _ = yield scrape(gateway)
        proxy = of(samples, "proxy")
        self.assertEqual((proxy["stream_opens_received_total"], proxy["stream_opens_sent_total"],
                          proxy["stream_active_received"], proxy["stream_data_received_bytes_total"],
                          proxy["stream_data_sent_bytes_total"]), (1, 1, 1, 7, 7))
        yield close_ws(client, 4000)
        yield eventually(lambda: value(gateway, "stream_active_received", "proxy") == 0)
        self.assertEqual((value(gateway, "stream_closes_received_total", "proxy"),
                          value(gateway, "stream_errors_received_total", "proxy")), (1, 0))

    @defer.inlineCallbacks
    def test_two_namespaces_one_endpoint(self):
        """Every namespace's metrics are served by the exporter, told apart by `namespace`."""
        other = chain()
        other["name"] = "other"
        other["telemetry"] = {"metrics": ["stream.opens.received"]}
        other["bindings"]["echo"]["telemetry"] = {"metrics": ["stream.*"]}
        gateway, _ = yield start_gateway(self, [metered(), other])
        test_port, other_port = gateway.ports()
        client = yield connect_ws(test_port, protocols=["echo"])
        yield close_ws(client)
        for _ in range(2):
            client = yield connect_ws(other_port)
            yield close_ws(client)
        code, text = yield http_get(gateway.metrics_ports()[0])
        self.assertEqual(code, 200)
        opens = {(s.labels["namespace"], s.labels["binding"]): s.value
                 for family in text_string_to_metric_families(text) for s in family.samples
                 if s.name == "stream_opens_received_total"}
        self.assertEqual(opens, {("test", "http0"): 1, ("test", "ws0"): 1, ("test", "echo"): 1, ("other", "echo"): 2})

    def test_http_duration_lasts_until_the_websocket_closes(self):
        on = OnAClock(metered(bindings={"http0": ["http.duration"]}))  # timed on the gateway's reactor
        connection, transport = on.connect()
        connection.dataReceived(upgrade_request(headers={"Sec-WebSocket-Protocol": "echo"}))
        self.assertIn(b"101 Switching Protocols", transport.value())
        on.clock.advance(0.15)
        self.assertEqual(value(on.gateway, "http_duration_milliseconds_count", "http0"), 0)  # still open
        connection.connectionLost(Failure(ConnectionDone()))
        text = generate_latest(on.gateway.metrics.registry).decode()
        http0 = {s.name + s.labels.get("le", ""): s.value for f in text_string_to_metric_families(text)
                 for s in f.samples if s.labels["binding"] == "http0"}
        self.assertEqual((http0["http_duration_milliseconds_bucket100.0"],
                          http0["http_duration_milliseconds_bucket500.0"],
                          http0["http_duration_milliseconds_bucket+Inf"]), (0, 1, 1))
        self.assertAlmostEqual(http0["http_duration_milliseconds_sum"], 150)
        self.assertIn("# TYPE http_duration_milliseconds histogram", text)
        self.assertEqual(len(http0), 2 + 14)  # _count, _sum and 13 buckets and +Inf

    def test_duration_buckets(self):
        from zillatw.telemetry.httpexchanges import DURATION_BUCKETS, DurationHistogram
        from zillatw.telemetry.httpsizes import Attributes
        m = DurationHistogram("ns", "b", Attributes(None))
        for ms in (0.2, 1, 1.5, 7, 99_999_999):
            m.observe((), ms)
        buckets = dict(m.buckets(()))
        self.assertEqual(len(buckets), len(DURATION_BUCKETS) + 1)
        self.assertEqual((buckets["1.0"], buckets["5.0"], buckets["10.0"], buckets["86400000.0"], buckets["+Inf"]),
                         (2, 3, 4, 4, 5))  # cumulative; a bound is inclusive
        self.assertEqual(m.series[()][-1], 0.2 + 1 + 1.5 + 7 + 99_999_999)

    @defer.inlineCallbacks
    def test_custom_path_only(self):
        gateway, _ = yield start_gateway(self, metered(path="/ops/prom"))
        code, text = yield http_get(gateway.metrics_ports()[0], "/ops/prom")
        self.assertEqual(code, 200)
        self.assertIn("stream_opens_received_total", text)
        code, _ = yield http_get(gateway.metrics_ports()[0], "/metrics")
        self.assertEqual(code, 404)

    @defer.inlineCallbacks
    def test_exporter_stops_with_the_gateway(self):
        gateway = build_gateway(metered())
        gateway.startService()
        yield gateway.listening
        port = gateway.metrics_ports()[0]
        code, _ = yield http_get(port)
        self.assertEqual(code, 200)
        yield gateway.stopService()
        self.assertEqual(gateway.metrics_ports(), [])
        yield self.assertFailure(http_get(port), ConnectionRefusedError, Exception)


class NoMetricsTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_bindings_without_metrics_are_not_wrapped(self):
        gateway, port = yield start_gateway(self, chain())  # stdout exporter, no metrics
        caller = gateway.config.binding("test:ws0")
        self.assertIs(gateway.graph.exit("test:echo", caller), gateway.binding("echo"))
        self.assertIs(gateway.graph.exit("test:http0", gateway.config.binding("test:tcp0")), gateway.binding("http0"))
        self.assertEqual(gateway.metrics_ports(), [])
        client = yield connect_ws(port)
        client.sendMessage(b"still echoes")
        self.assertEqual((yield client.messages.get()), (False, [b"still echoes"]))
        yield close_ws(client)

    @defer.inlineCallbacks
    def test_metering_decorates_and_leaves_the_built_bindings_unchanged(self):
        gateway, _ = yield start_gateway(self, metered(bindings={"tcp0": ["stream.*"], "http0": ["stream.*"],
                                                                 "ws0": ["stream.*"], "echo": ["stream.*"]}))
        for name, method in (("echo", "open"), ("http0", "buildProtocol"), ("tcp0", "route"),
                             ("ws0", "accept_request")):
            self.assertNotIn(method, vars(gateway.binding(name)))
        self.assertIsInstance(gateway.graph.exit("test:echo", gateway.config.binding("test:ws0")), MeteredExit)
        self.assertIsNotNone(gateway.binding("ws0").observer)

    @defer.inlineCallbacks
    def test_no_telemetry_at_all_gives_the_ws_server_no_observer(self):
        config = chain()
        del config["telemetry"]
        gateway, _ = yield start_gateway(self, config)
        self.assertIsNone(gateway.binding("ws0").observer)


class ConfigTests(unittest.TestCase):
    def problems(self, change) -> list[str]:
        config = metered()
        change(config)
        with self.assertRaises(ConfigError) as caught:
            build_gateway(config)
        return caught.exception.problems

    def test_unknown_and_unsupported_metric_names(self):
        def change(c):
            c["telemetry"]["metrics"] = ["stream.opens.recieved", "grpc.duration", "stream.closes.sent",
                                         "http.duration"]
        self.assertEqual(self.problems(change), [
            "telemetry.metrics[0]: unknown metric 'stream.opens.recieved' (did you mean 'stream.opens.received'?)",
            "telemetry.metrics[1]: metric 'grpc.duration' is not recorded by this zillatw yet (supported: "
            + ", ".join(STREAM + ["http.active.requests", "http.duration", "http.request.size",
                                  "http.response.size"]) + ")",
        ])

    def test_glob_without_declared_metrics(self):
        def change(c):
            del c["telemetry"]["metrics"]
            c["bindings"]["http0"].pop("telemetry")
            c["bindings"]["echo"].pop("telemetry")
        self.assertEqual(self.problems(change), [
            "bindings.ws0.telemetry.metrics[0]: 'stream.*' selects none of the namespace's telemetry.metrics "
            "(there are none)"])

    def test_binding_that_records_nothing_it_selects(self):
        def change(c):
            c["bindings"]["ws0"]["telemetry"] = {"metrics": ["http.*"]}
            c["bindings"]["client0"] = {"type": "tcp", "kind": "client", "options": {"host": "x", "port": 1},
                                        "telemetry": {"metrics": ["stream.*"]}}
        self.assertEqual(self.problems(change), [
            "bindings.ws0.telemetry.metrics: a ws server records none of http.active.requests, http.duration in "
            "this zillatw yet",
            "bindings.client0.telemetry.metrics: a tcp client records none of " + ", ".join(STREAM)
            + " in this zillatw yet"])

    def test_prometheus_options(self):
        def change(c):
            c["telemetry"]["exporters"]["prom"]["options"] = {"endpoints": [
                {"scheme": "https", "port": 70000, "path": "metrics", "host": "x"}]}
            c["telemetry"]["exporters"]["bare"] = {"type": "prometheus"}
        self.assertEqual(self.problems(change), [
            "telemetry.exporters.prom.options.endpoints[0].host: unknown key 'host' (expected one of: scheme, "
            "port, path)",
            "telemetry.exporters.prom.options.endpoints[0].scheme: expected 'http', got 'https'",
            "telemetry.exporters.prom.options.endpoints[0].port: expected a port number (0-65535), got 70000",
            "telemetry.exporters.prom.options.endpoints[0].path: expected a path starting with '/', got 'metrics'",
            "telemetry.exporters.bare.options: missing required key 'endpoints' (a list of {scheme: http, "
            "port, path})",
        ])

    def test_attributes_refused_by_name(self):
        def change(c):
            c["telemetry"]["attributes"] = {"service.namespace": "x"}
            c["bindings"]["http0"]["telemetry"]["attributes"] = {"method": "${http.request.method}"}
        config = metered()
        change(config)
        build_gateway(config)  # valid: the namespace's are the otlp exporter's; http0's label its sizes

        def bad(c):
            c["bindings"]["http0"]["telemetry"]["attributes"] = {"method": "${request.method}"}
            c["bindings"]["ws0"]["telemetry"]["attributes"] = {"path": "${http.request.path}"}
        self.assertEqual(self.problems(bad), [
            "bindings.http0.telemetry.attributes.method: expected ${http.request.<field>} or "
            "${http.response.<field>} (method, path, status or a header name), got '${request.method}'",
            "bindings.ws0.telemetry.attributes: not supported by this zillatw yet on a ws server "
            "(an http server's label its http metrics)"])


class ReadyFileTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_written_when_listening_removed_on_stop(self):
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as stale:  # left by a crashed run: removed until listening
            stale.write("stale\n")
        gateway = build_gateway(metered())
        gateway.ready_file = path
        gateway.startService()
        yield gateway.listening
        with open(path) as ready:
            self.assertEqual(ready.read(), f"{os.getpid()}\n")
        yield gateway.stopService()
        self.assertFalse(os.path.exists(path))

    @defer.inlineCallbacks
    def test_not_written_when_a_port_is_taken(self):
        first = build_gateway(metered())
        first.startService()
        self.addCleanup(first.stopService)
        yield first.listening
        config = metered()
        config["bindings"]["tcp0"]["options"]["port"] = first.ports()[0]
        second = build_gateway(config)
        second.ready_file = path = os.path.abspath(self.mktemp())
        second.startService()
        self.addCleanup(second.stopService)
        yield self.assertFailure(second.listening, Exception)
        self.assertFalse(os.path.exists(path))

    @defer.inlineCallbacks
    def test_twistd_ready_file_and_metrics(self):
        """conf/ws.echo.metrics.yaml unchanged, twistd's child on 7114 and 7190 in a network
        namespace of the test's own (zillatw.test.netns: the child is forked inside)."""
        from zillatw.test.process_support import ENV, ROOT, TWISTD, Collect
        network = ExampleNetwork(self)
        port, metrics_port = network.port(7114), network.port(7190)
        config, ready = network.config("ws.echo.metrics.yaml"), os.path.abspath(self.mktemp())
        child = Collect()
        process = reactor.spawnProcess(child, TWISTD[0], TWISTD + ["-n", "--pidfile=", "zillaws", "-c", config,
                                                                   "--ready-file", ready], env=ENV, path=ROOT)
        try:
            yield eventually(lambda: os.path.exists(ready) or child.ended.called, timeout=20)
            self.assertTrue(os.path.exists(ready), child.out)
            with open(ready) as f:
                self.assertEqual(int(f.read()), process.pid)
            client = yield connect_ws(port, protocols=["echo"])
            client.sendMessage(b"0123456789")
            yield client.messages.get()
            yield close_ws(client)
            code, body = yield http_get(metrics_port)
            self.assertEqual(code, 200)
            self.assertIn('stream_opens_received_total{binding="north_echo_server",namespace="example"} 1.0', body)
            self.assertIn('stream_data_received_bytes_total{binding="north_echo_server",namespace="example"} 10.0',
                          body)
            self.assertIn('stream_opens_received_total{binding="north_tcp_server",namespace="example"} 1.0', body)
        finally:
            if not child.ended.called:
                process.signalProcess(signal.SIGTERM)
        yield child.ended
        self.assertFalse(os.path.exists(ready), "the ready file outlived the process")


class TlsMeteringTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_metered_tls_and_http_keep_the_https_scheme(self):
        """tcp -> tls -> http, all three metered: the http server still sees a TLS transport
        (its route asks for :scheme https), tcp counts the encrypted bytes, ws the payload."""
        from pathlib import Path

        from zillatw.test.pki import PASSWORD, Pki, client_tls, connect_wss, tls_chain
        folder = Path(self.mktemp())
        folder.mkdir(parents=True)
        ca = Pki(folder)
        store = str(folder / "localhost.p12")
        with open(store, "wb") as f:
            f.write(ca.localhost.p12("localhost", PASSWORD))
        config = tls_chain({"keys": {"store": store, "password": PASSWORD}}, {"keys": ["localhost"]},
                           http_routes=[{"when": [{"headers": {":scheme": "https", "upgrade": "websocket"}}],
                                         "exit": "ws0"}])
        config["telemetry"] = copy.deepcopy(metered()["telemetry"])
        for name in ("tcp0", "tls0", "http0", "ws0"):
            config["bindings"][name]["telemetry"] = {"metrics": ["stream.*"]}
        gateway, port = yield start_gateway(self, config)
        client = yield connect_wss(port, client_tls(ca.ca))
        client.sendMessage(b"x" * 1000, isBinary=True)
        self.assertEqual((yield client.messages.get()), (True, [b"x" * 1000]))
        samples, _ = yield scrape(gateway)
        tcp0, tls0, http0, ws0 = (of(samples, b) for b in ("tcp0", "tls0", "http0", "ws0"))
        self.assertEqual([m["stream_opens_received_total"] for m in (tcp0, tls0, http0, ws0)], [1, 1, 1, 1])
        self.assertEqual(ws0["stream_data_received_bytes_total"], 1000)
        self.assertEqual(tcp0["stream_data_received_bytes_total"], tls0["stream_data_received_bytes_total"])
        # TLS records and the handshake cost more than the plaintext the http server read
        self.assertGreater(tls0["stream_data_received_bytes_total"], http0["stream_data_received_bytes_total"] + 500)
        self.assertGreater(http0["stream_data_received_bytes_total"], 1000)
        self.assertGreater(http0["stream_data_sent_bytes_total"], 1000)  # 101 and the echo, in plaintext
        self.assertGreater(tls0["stream_data_sent_bytes_total"], http0["stream_data_sent_bytes_total"] + 500)
        self.assertEqual(tcp0["stream_data_sent_bytes_total"], tls0["stream_data_sent_bytes_total"])
        yield close_ws(client)
        self.assertIn(f"BINDING_HTTP_REQUEST_ACCEPTED - GET https://localhost:{port}/", gateway.events_text.getvalue())
        self.assertIn(f"BINDING_WS_REQUEST_ACCEPTED - GET wss://localhost:{port}/ -", gateway.events_text.getvalue())
