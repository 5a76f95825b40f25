"""The health exporter: /health and /ready over real loopback HTTP, through a gateway's life
(starting, ready, at capacity, reloading, draining), and its own bounds on a Clock."""

from __future__ import annotations

import copy
import io
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest

from zillatw import build_gateway
from zillatw.errors import ConfigError
from zillatw.runtime.gateway import build_generation, load_config
from zillatw.telemetry.health import HEAD_TIMEOUT, MAX_CONNECTIONS, HealthFactory, Readiness, answer
from zillatw.test.http_support import probe
from zillatw.test.support import chain, connect_raw, connect_ws, raw_exchange, upgrade_request


def with_health(config: dict[str, Any], port: int = 0, **options: Any) -> dict[str, Any]:
    config = copy.deepcopy(config)
    config["telemetry"]["exporters"]["health0"] = {"type": "health",
                                                   "options": {"host": "127.0.0.1", "port": port, **options}}
    return config




class HealthGatewayTests(unittest.TestCase):
    def build(self, config: dict[str, Any], **kwargs: Any) -> Any:
        self.events = io.StringIO()
        gateway = build_gateway(config, event_stream=self.events, **kwargs)
        self.addCleanup(lambda: gateway.stopService() if gateway.running else None)
        return gateway

    @defer.inlineCallbacks
    def test_starting_then_ready_head_and_anything_else_404(self):
        gateway = self.build(with_health(chain()))
        # Listening before the gateway starts: what a probe hears while listeners bind.
        [port] = yield gateway.health.open([("127.0.0.1", 0)])
        self.assertEqual((yield probe(port, "/ready"))[::2], (503, b"starting\n"))
        self.assertEqual((yield probe(port, "/health"))[::2], (200, b"ok\n"))
        gateway.startService()
        yield gateway.listening
        self.assertIs(gateway.readiness, Readiness.READY)
        self.assertEqual(gateway.health_ports(), [port])  # startService kept the socket
        status, headers, body = yield probe(port, "/ready")
        self.assertEqual((status, body), (200, b"ready\n"))
        self.assertEqual(headers["cache-control"], "no-store")
        self.assertNotIn("server", headers)
        status, headers, body = yield probe(port, "/ready", "HEAD")
        self.assertEqual((status, headers["content-length"], body), (200, "6", b""))
        self.assertEqual((yield probe(port, "/ready?verbose=1"))[0], 200)
        for method, path in [("GET", "/"), ("GET", "/metrics"), ("POST", "/ready"), ("GET", "/readyz")]:
            self.assertEqual((yield probe(port, path, method))[0], 404, (method, path))
        malformed = yield raw_exchange(port, b"GET /ready HTTP/2.0\r\n\r\n")
        self.assertTrue(malformed.startswith(b"HTTP/1.1 505 "), malformed)

    @defer.inlineCallbacks
    def test_ready_answers_while_the_ws_server_is_at_its_connection_cap(self):
        gateway = self.build(with_health(chain(ws_options={"max-connections": 2})))
        gateway.startService()
        [port] = yield gateway.listening
        [health] = gateway.health_ports()
        clients = yield defer.gatherResults([connect_ws(port) for _ in range(2)])
        refused = yield raw_exchange(port, upgrade_request())
        self.assertTrue(refused.startswith(b"HTTP/1.1 503 "), refused)  # the cap is reached
        self.assertEqual((yield probe(health, "/ready"))[0], 200)
        self.assertEqual((yield probe(health, "/health"))[0], 200)
        for client in clients:
            client.sendClose(1000)
        yield defer.gatherResults([client.closed for client in clients])

    @defer.inlineCallbacks
    def test_ready_is_503_while_draining_health_stays_200_and_both_go_at_the_end(self):
        # A peer that never answers the 1001 keeps the gateway draining until the timeout.
        gateway = self.build(with_health(chain(ws_options={"close-timeout": 30})), drain_timeout=1.0)
        gateway.startService()
        [port] = yield gateway.listening
        [health] = gateway.health_ports()
        silent = yield connect_raw(port)
        silent.transport.write(upgrade_request())
        yield silent.until(len(b"HTTP/1.1 101 "))
        stopped = gateway.stopService()
        self.assertIs(gateway.readiness, Readiness.DRAINING)
        self.assertEqual((yield probe(health, "/ready"))[::2], (503, b"draining\n"))
        self.assertEqual((yield probe(health, "/health"))[0], 200)
        self.assertNoResult(stopped)
        yield stopped
        yield self.assertFailure(connect_raw(health), ConnectionRefusedError)

    @defer.inlineCallbacks
    def test_a_reload_keeps_readiness_and_the_listener_a_moved_address_moves(self):
        gateway = self.build(with_health(chain()))
        gateway.startService()
        yield gateway.listening
        [before] = gateway.health_ports()
        seen = []
        gateway.readiness_listeners.append(seen.append)
        same = build_generation(load_config(with_health(chain())), gateway.reactor, io.StringIO())
        self.assertTrue((yield gateway.switch_to(same)))
        self.assertEqual(gateway.health_ports(), [before])  # the same socket, never closed
        self.assertEqual((yield probe(before, "/ready"))[0], 200)
        from zillatw.test.support import free_port
        moved = free_port()
        other = build_generation(load_config(with_health(chain(), moved)), gateway.reactor, io.StringIO())
        self.assertTrue((yield gateway.switch_to(other)))
        self.assertEqual(gateway.health_ports(), [moved])
        self.assertEqual((yield probe(moved, "/ready"))[0], 200)
        yield self.assertFailure(connect_raw(before), ConnectionRefusedError)
        self.assertEqual(seen, [])  # READY throughout

    @defer.inlineCallbacks
    def test_a_reload_whose_health_address_cannot_listen_changes_nothing(self):
        gateway = self.build(with_health(chain()))
        gateway.startService()
        yield gateway.listening
        [before] = gateway.health_ports()
        taken = gateway.ports()[0]  # the gateway's own ws listener: in use
        other = build_generation(load_config(with_health(chain(), taken)), gateway.reactor, io.StringIO())
        self.assertFalse((yield gateway.switch_to(other)))
        self.assertEqual(gateway.health_ports(), [before])
        self.assertEqual((yield probe(before, "/ready"))[0], 200)
        self.assertIn("CONFIG_RELOAD_FAILED cannot listen", self.events.getvalue())


    @defer.inlineCallbacks
    def test_a_health_address_in_use_fails_the_start(self):
        first = self.build(with_health(chain()))
        first.startService()
        yield first.listening
        second = self.build(with_health(chain(), first.health_ports()[0]))
        second.startService()
        yield self.assertFailure(second.listening, CannotListenError)
        self.assertIs(second.readiness, Readiness.STARTING)

    @defer.inlineCallbacks
    def test_a_worker_serves_no_exporter_and_refuses_a_reload_that_moves_one(self):
        gateway = self.build(with_health(chain()))
        gateway.serves_exporters = False  # what zillatw.runtime.workers.become_worker sets: the supervisor serves them
        seen: list[Readiness] = []
        gateway.readiness_listeners.append(seen.append)
        gateway.startService()
        yield gateway.listening
        self.assertEqual(gateway.health_ports(), [])
        from zillatw.test.support import free_port
        other = build_generation(load_config(with_health(chain(), free_port())), gateway.reactor, io.StringIO())
        self.assertFalse((yield gateway.switch_to(other)))
        self.assertIn("CONFIG_RELOAD_FAILED telemetry.exporters: with workers (-w), the supervisor serves the "
                      "prometheus and health endpoints, so a reload cannot change them", self.events.getvalue())
        yield gateway.stopService()
        self.assertEqual(seen, [Readiness.READY, Readiness.DRAINING])  # what a worker reports


class HealthBoundsTests(unittest.SynchronousTestCase):
    def connect(self, factory: HealthFactory, port: int = 40000) -> tuple[Any, StringTransport]:
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
        transport = StringTransport()
        if protocol is not None:
            protocol.makeConnection(transport)
        return protocol, transport

    def test_a_head_not_sent_in_time_gets_408_and_a_deaf_peer_is_aborted(self):
        clock = MemoryReactorClock()
        factory = HealthFactory(clock, lambda: Readiness.READY)
        protocol, transport = self.connect(factory)
        protocol.dataReceived(b"GET /rea")
        clock.advance(HEAD_TIMEOUT - 0.1)
        self.assertEqual(transport.value(), b"")
        clock.advance(0.1)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "), transport.value())
        self.assertTrue(transport.disconnecting)
        clock.advance(HEAD_TIMEOUT)
        self.assertTrue(transport.disconnected)  # StringTransport.abortConnection

    def test_a_large_head_is_refused_and_connections_are_capped(self):
        clock = MemoryReactorClock()
        factory = HealthFactory(clock, lambda: Readiness.READY)
        protocol, transport = self.connect(factory)
        protocol.dataReceived(b"GET /ready HTTP/1.1\r\nX: " + b"a" * 4096)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "), transport.value())
        protocol.connectionLost(None)
        held = [self.connect(factory, 40001 + n)[0] for n in range(MAX_CONNECTIONS)]
        self.assertNotIn(None, held)
        self.assertIsNone(self.connect(factory, 50000)[0])  # one more is closed at once
        held[0].connectionLost(None)
        self.assertIsNotNone(self.connect(factory, 50001)[0])

    def test_answers(self):
        self.assertTrue(answer("GET", "/ready", Readiness.STARTING).startswith(b"HTTP/1.1 503 "))
        self.assertTrue(answer("GET", "/ready", Readiness.DRAINING).endswith(b"\r\n\r\ndraining\n"))
        self.assertTrue(answer("HEAD", "/health", Readiness.DRAINING).endswith(b"Content-Length: 3\r\n"
                                                                                b"Content-Type: text/plain; "
                                                                                b"charset=utf-8\r\n\r\n"))


class HealthConfigTests(unittest.SynchronousTestCase):
    def problems(self, options: Any) -> list[str]:
        config = chain()
        config["telemetry"]["exporters"]["h"] = {"type": "health", "options": options}
        with self.assertRaises(ConfigError) as caught:
            load_config(config)
        return caught.exception.problems

    def test_options_are_checked_by_name(self):
        self.assertEqual(self.problems({"port": 7180, "path": "/healthz"}),
                         ["telemetry.exporters.h.options.path: not allowed here (expected one of: host, port)"])
        self.assertEqual(self.problems({"host": "127.0.0.1"}),
                         ["telemetry.exporters.h.options: missing required key 'port' (options: {host, port})"])
        self.assertEqual(self.problems({"port": 70000}),
                         ["telemetry.exporters.h.options.port: expected a port number (0-65535), got 70000"])
        load_config(with_health(chain(), 7180))  # valid
