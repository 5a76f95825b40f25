"""The ws server's session event (zillatw.telemetry.sessions): BINDING_WS_SESSION_ENDED with the
client, route, subprotocol, identity, duration, counts each way, close code and closer."""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial import unittest

from zillatw.telemetry.sessions import SessionObserver
from zillatw.test.support import (
    OnAClock,
    chain,
    client_frame,
    close_ws,
    connect_raw,
    connect_ws,
    eventually,
    proxy_config,
    start_gateway,
    start_upstream,
    upgrade_request,
)
from zillatw.wire import deflate


def json_events(config: dict) -> dict:
    config["telemetry"]["exporters"]["stdout"]["options"] = {"format": "json"}
    return config


def sessions(gateway) -> list[dict]:
    lines = [json.loads(line) for line in gateway.events_text.getvalue().splitlines()]
    return [line for line in lines if line["event"] == "BINDING_WS_SESSION_ENDED"]


class SessionEventTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_client_closes_after_two_messages(self):
        gateway, port = yield start_gateway(self, json_events(chain([{"when": [{"protocol": "echo"}],
                                                                        "exit": "echo"}])))
        client = yield connect_ws(port, protocols=["nope", "echo"])
        for payload in (b"abc", b"defg"):
            client.sendMessage(payload)
            yield client.messages.get()
        local = client.transport.getHost()
        yield close_ws(client, 4000)
        yield eventually(lambda: sessions(gateway))
        [session] = sessions(gateway)
        self.assertEqual({k: session[k] for k in ("client", "route", "protocol", "identity", "messages_received",
                                                  "bytes_received", "messages_sent", "bytes_sent", "code",
                                                  "closed_by", "binding")},
                         {"client": f"127.0.0.1:{local.port}", "route": "echo", "protocol": "echo", "identity": None,
                          "messages_received": 2, "bytes_received": 7, "messages_sent": 2, "bytes_sent": 7,
                          "code": 4000, "closed_by": "client", "binding": "ws0"})
        self.assertGreaterEqual(session["duration_ms"], 0)

    @defer.inlineCallbacks
    def test_the_gateway_going_away_closed_it(self):
        gateway, port = yield start_gateway(self, json_events(chain()))
        client = yield connect_ws(port)
        gateway.binding("ws0").going_away("shutting down")
        wasClean, code, _ = yield client.closed
        self.assertEqual(code, 1001)
        [session] = sessions(gateway)
        self.assertEqual((session["code"], session["closed_by"]), (1001, "gateway"))

    @defer.inlineCallbacks
    def test_a_client_breaking_the_protocol_is_closed_by_the_gateway(self):
        gateway, port = yield start_gateway(self, json_events(chain()))
        raw = yield connect_raw(port)
        raw.transport.write(upgrade_request())
        yield raw.until(1)
        raw.transport.write(client_frame(0x3, b"reserved opcode"))
        yield raw.done
        [session] = sessions(gateway)
        self.assertEqual((session["code"], session["closed_by"], session["messages_received"]), (1002, "gateway", 0))

    @defer.inlineCallbacks
    def test_the_upstream_closing_first(self):
        _, upstream_port = start_upstream(self)
        gateway, port = yield start_gateway(self, json_events(proxy_config(upstream_port)))
        client = yield connect_ws(port, protocols=["chat"])
        client.sendMessage(b"close:4001")
        _, code, _ = yield client.closed
        self.assertEqual(code, 4001)
        yield eventually(lambda: sessions(gateway))
        [session] = sessions(gateway)
        self.assertEqual({k: session[k] for k in ("route", "protocol", "code", "closed_by", "messages_received",
                                                  "bytes_received", "messages_sent")},
                         {"route": "south_ws_client", "protocol": "chat", "code": 4001, "closed_by": "upstream",
                          "messages_received": 1, "bytes_received": 10, "messages_sent": 0})

    @defer.inlineCallbacks
    def test_compressed_messages_still_pass_as_they_are_and_are_counted(self):
        worked = []
        for name, method in (("Inflater", "inflate"), ("Deflater", "compress")):
            cls = getattr(deflate, name)
            original = getattr(cls, method)
            self.patch(cls, method, lambda self, *a, _o=original, _n=name: worked.append(_n) or _o(self, *a))
        _, upstream_port = start_upstream(self, compress=True)
        gateway, port = yield start_gateway(self, json_events(proxy_config(upstream_port)))
        client = yield connect_ws(port, compress=True)
        for _ in range(3):
            client.sendMessage(b"compressible " * 1000, True)
            yield client.messages.get()
        yield close_ws(client)
        yield eventually(lambda: sessions(gateway))
        [session] = sessions(gateway)
        self.assertEqual(worked, [])  # counting did not make the gateway inflate or compress
        self.assertEqual((session["messages_received"], session["messages_sent"]), (3, 3))
        self.assertLess(session["bytes_received"], 3 * 13000)  # compressed bytes, as they passed

    @defer.inlineCallbacks
    def test_with_metrics_on_the_same_streams(self):
        config = json_events(chain())
        config["telemetry"]["metrics"] = ["stream.data.received"]
        config["bindings"]["ws0"]["telemetry"] = {"metrics": ["stream.*"]}
        gateway, port = yield start_gateway(self, config)
        client = yield connect_ws(port)
        client.sendMessage(b"metered")
        yield client.messages.get()
        yield close_ws(client)
        yield eventually(lambda: sessions(gateway))
        [session] = sessions(gateway)
        self.assertEqual((session["bytes_received"], session["closed_by"]), (7, "client"))
        self.assertEqual(gateway.metrics.metrics(gateway.config.binding("test:ws0")).data_received, 7)

    def test_duration_on_the_gateways_clock(self):
        on = OnAClock(json_events(chain()))
        connection, transport = on.connect(client_port=40123)
        connection.dataReceived(upgrade_request())
        self.assertIn(b"101 Switching Protocols", transport.value())
        on.clock.advance(2.5)
        connection.dataReceived(client_frame(0x1, b"hi"))
        connection.dataReceived(client_frame(0x8, (1000).to_bytes(2, "big")))
        connection.connectionLost(Failure(ConnectionDone()))
        [line] = [json.loads(x) for x in on.events.getvalue().splitlines() if "SESSION_ENDED" in x]
        self.assertEqual((line["duration_ms"], line["client"], line["messages_received"], line["messages_sent"],
                          line["code"], line["closed_by"]), (2500, "127.0.0.1:40123", 1, 1, 1000, "client"))

    def test_text_line(self):
        on = OnAClock(chain())
        connection, transport = on.connect(client_port=40124)
        connection.dataReceived(upgrade_request())
        on.clock.advance(0.25)
        connection.dataReceived(client_frame(0x2, b"xyz"))
        connection.connectionLost(Failure(ConnectionDone()))  # no close frame: 1006
        [line] = [x for x in on.events.getvalue().splitlines() if "SESSION_ENDED" in x]
        self.assertTrue(line.endswith("BINDING_WS_SESSION_ENDED - 127.0.0.1:40124 echo - 250ms "
                                      "received 1/3B sent 1/3B 1006 client"), line)


class CostTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_without_an_event_exporter_nothing_is_wrapped(self):
        config = chain()
        del config["telemetry"]
        gateway, port = yield start_gateway(self, config)
        self.assertIsNone(gateway.binding("ws0").observer)
        client = yield connect_ws(port)
        yield close_ws(client)
        self.assertEqual(gateway.events_text.getvalue(), "")

    @defer.inlineCallbacks
    def test_with_one_the_observer_is_decorated(self):
        gateway, _ = yield start_gateway(self, chain())
        self.assertIsInstance(gateway.binding("ws0").observer, SessionObserver)
