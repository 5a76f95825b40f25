"""The tcp client's upstream pools (zillatw.bindings.tcp.pool): attempts, retries, probes
and their timing on a Clock with a dialer that needs no socket; then end to end, a ws proxy
in front of two real upstream WebSocket servers on loopback."""

from __future__ import annotations

import io
import os
from collections import Counter

import yaml
from autobahn.twisted.websocket import WebSocketServerFactory
from prometheus_client import generate_latest
from twisted.internet import defer, error, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from zillatw import build_gateway
from zillatw.bindings.tcp.binding import TcpClient
from zillatw.bindings.tcp.pool import _SHARED, PooledTcpClient, _CountedFactory, pool_options
from zillatw.bindings.tcp.upstreams import PASSIVE_REJOIN, Pool
from zillatw.errors import ConfigError
from zillatw.runtime.gateway import load_config
from zillatw.stream import StreamRefused
from zillatw.telemetry.events import Events
from zillatw.test.pki import PASSWORD, TlsTestCase, client_tls, connect_wss, start_wss_upstream
from zillatw.test.support import (
    ReactorTimer,
    Upstream,
    close_ws,
    connect_ws,
    eventually,
    proxy_config,
    start_gateway,
)

A, B, C = ("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.3", 80)


class FakeDial:
    """The dialer of a pool on a Clock: each upstream is up (connects at once), refused, or
    hangs (times out after the attempt's timeout, on the clock)."""

    def __init__(self, clock: task.Clock):
        self.clock = clock
        self.behaviour: dict[tuple[str, int], str] = {}
        self.calls: list[tuple[tuple[str, int], float, bool]] = []  # (upstream, timeout, is a probe)
        self.connections: list[tuple[tuple[str, int], object]] = []

    def __call__(self, reactor, host, port, timeout, factory):
        key = (host, port)
        probe = not isinstance(factory, _CountedFactory)
        self.calls.append((key, timeout, probe))
        how = self.behaviour.get(key, "up")
        if how == "refused":
            return defer.fail(error.ConnectionRefusedError("Connection refused"))
        if how == "hang":
            d = defer.Deferred(lambda _: timer.cancel())
            timer = self.clock.callLater(timeout, d.errback, error.TimeoutError())
            return d
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        protocol.makeConnection(StringTransport())
        if not probe:
            self.connections.append((key, protocol))
        return defer.succeed(protocol)

    def real(self) -> list[tuple[str, int]]:
        return [key for key, _, probe in self.calls if not probe]


class Caller(Protocol):
    lost = False

    def connectionLost(self, reason=None):
        self.lost = True


class PoolOnAClock(unittest.TestCase):
    def pooled(self, *upstreams, **options):
        self.clock = task.Clock()
        self.dial = FakeDial(self.clock)
        self.lines: list[str] = []
        events = Events([self.lines.append]).binding("test", "pool0", "tcp")
        options["upstreams"] = [{"host": host, "port": port} for host, port in upstreams]
        ups, balance, retries, settings = pool_options(options)
        client = PooledTcpClient("test:pool0", Pool(ups, balance, settings), retries, events,
                                 reactor=self.clock, dial=self.dial)
        self.addCleanup(client.stop_service)
        return client

    def connect(self, client, timeout=10.0):
        return client.connect(Factory.forProtocol(Caller), None, timeout)

    def events(self, name):
        """The details of each BINDING_TCP_<name> event."""
        return [line.split(" ", 5)[-1] for line in self.lines if f"BINDING_TCP_{name} " in line]


class HealthTests(PoolOnAClock):
    def test_a_dead_upstream_is_down_within_interval_times_fails_and_back_after_it_returns(self):
        client = self.pooled(A, B, health={"interval": 2, "timeout": 1, "fails": 2, "passes": 1})
        b = client.pool.upstreams[1]
        client.start_service()
        self.assertEqual(Counter(key for key, _, probe in self.dial.calls if probe), {A: 1, B: 1})  # at once
        self.clock.advance(1)
        self.dial.behaviour[B] = "refused"  # B dies at t=1
        self.clock.advance(2)
        self.assertTrue(client.pool.state(b).up)  # one failed probe (t=2) of the 2 needed
        self.clock.advance(2)  # t=5: interval x fails after it died
        self.assertFalse(client.pool.state(b).up)
        refused = "Connection was refused by other side: Connection refused."
        self.assertEqual(self.events("UPSTREAM_DOWN"), [f"10.0.0.2:80 2 failures, the last: {refused}"])
        for _ in range(6):
            self.successResultOf(self.connect(client))
        self.assertEqual(set(self.dial.real()), {A})  # down: not even tried
        self.dial.behaviour[B] = "up"  # back at t=5
        self.clock.advance(2)  # interval x passes
        self.assertTrue(client.pool.state(b).up)
        self.assertEqual(len(self.events("UPSTREAM_UP")), 1)
        before = len(self.dial.real())
        for _ in range(4):
            self.successResultOf(self.connect(client))
        self.assertEqual(set(self.dial.real()[before:]), {A, B})

    def test_while_an_upstream_dies_every_new_connection_succeeds_on_another(self):
        client = self.pooled(A, B, health={"interval": 60, "timeout": 1})
        client.start_service()
        self.dial.behaviour[B] = "refused"
        for _ in range(10):
            self.successResultOf(self.connect(client))
        self.assertEqual(Counter(self.dial.real()), {A: 10, B: 2})  # B: tried until 2 failures took it down
        self.assertFalse(client.pool.state(client.pool.upstreams[1]).up)

    def test_failed_connects_count_toward_fails_and_without_probes_it_is_tried_again_later(self):
        client = self.pooled(A, B)  # no health: passive only, fails 2
        client.start_service()
        self.dial.behaviour[A] = "refused"
        self.successResultOf(self.connect(client))  # A fails, B serves
        self.assertEqual(len(self.events("UPSTREAM_FAILED")), 1)
        self.successResultOf(self.connect(client))
        self.successResultOf(self.connect(client))  # the second failure of A in a row
        self.assertEqual(len(self.events("UPSTREAM_DOWN")), 1)
        self.assertIn("2 failures", self.events("UPSTREAM_DOWN")[0])
        self.assertEqual([call for call in self.dial.calls if call[2]], [])  # no probe at all
        self.clock.advance(PASSIVE_REJOIN)
        self.assertEqual(len(self.events("UPSTREAM_UP")), 1)
        self.assertTrue(client.pool.state(client.pool.upstreams[0]).up)

    def test_probes_stop_when_the_configuration_stops(self):
        client = self.pooled(A, B, health={"interval": 1, "timeout": 1})
        client.start_service()
        self.dial.behaviour[B] = "hang"
        self.clock.advance(1)
        client.stop_service()
        self.assertEqual(self.clock.getDelayedCalls(), [])  # the loops and the hanging probe's timer
        calls = len(self.dial.calls)
        self.clock.advance(10)
        self.assertEqual(len(self.dial.calls), calls)
        self.assertNotIn((id(self.clock), "test:pool0"), _SHARED)

    def test_a_reloaded_configuration_takes_over_the_probes_and_the_states(self):
        old = self.pooled(A, B, health={"interval": 1, "timeout": 1, "fails": 1})
        old.start_service()
        self.dial.behaviour[B] = "refused"
        self.clock.advance(1)  # B down
        options = {"upstreams": [{"host": h, "port": p} for h, p in (A, C)],
                   "health": {"interval": 1, "timeout": 1, "fails": 1}}
        ups, balance, retries, settings = pool_options(options)
        new = PooledTcpClient("test:pool0", Pool(ups, balance, settings), retries, old.events, reactor=self.clock,
                              dial=self.dial)
        self.addCleanup(new.stop_service)
        self.assertIs(new.pool.states, old.pool.states)
        new.start_service()  # B is no longer listed: it drains
        self.assertEqual(len(self.events("UPSTREAM_DRAINING")), 1)
        self.dial.calls.clear()
        self.clock.advance(1)
        self.assertEqual(Counter(key for key, _, probe in self.dial.calls if probe), {A: 1, C: 1})  # once each
        old.stop_service()  # the retired one's last connection closed
        self.clock.advance(1)
        self.assertEqual(Counter(key for key, _, probe in self.dial.calls if probe), {A: 2, C: 2})


    def test_a_reload_to_a_single_host_stops_the_probes_and_drains_the_pool(self):
        old = self.pooled(A, B, health={"interval": 1, "timeout": 1})
        old.start_service()
        TcpClient("pool0", "10.0.0.9", 80, reactor=self.clock, qname="test:pool0").start_service()
        calls = len(self.dial.calls)
        self.clock.advance(5)
        self.assertEqual(len(self.dial.calls), calls)
        self.assertEqual(old.pool.available(), [])  # the retired configuration sends none there either
        old.stop_service()
        self.assertNotIn((id(self.clock), "test:pool0"), _SHARED)


class AttemptTests(PoolOnAClock):
    def test_retries_try_other_upstreams_never_one_twice_then_502(self):
        client = self.pooled(A, B, C)
        for key in (A, B, C):
            self.dial.behaviour[key] = "refused"
        refusal = self.failureResultOf(self.connect(client), StreamRefused).value
        self.assertEqual(sorted(self.dial.real()), sorted([A, B, C]))
        self.assertEqual((refusal.status, refusal.reason), (502, "upstream unreachable"))
        for address in ("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"):
            self.assertIn(f"{address} Connection was refused", refusal.detail)

    def test_more_retries_than_other_upstreams_try_each_once(self):
        client = self.pooled(A, B, retries=5)
        self.dial.behaviour[A] = self.dial.behaviour[B] = "refused"
        self.failureResultOf(self.connect(client), StreamRefused)
        self.assertEqual(sorted(self.dial.real()), [A, B])

    def test_retries_bound_the_attempts(self):
        client = self.pooled(A, B, C, retries=1)
        for key in (A, B, C):
            self.dial.behaviour[key] = "refused"
        self.failureResultOf(self.connect(client), StreamRefused)
        self.assertEqual(len(self.dial.real()), 2)
        client = self.pooled(A, B, retries=0)
        self.dial.behaviour[A] = "refused"
        self.failureResultOf(self.connect(client), StreamRefused)
        self.assertEqual(self.dial.real(), [A])

    def test_a_timeout_is_a_failure_and_the_attempts_share_the_time(self):
        client = self.pooled(A, B)
        self.dial.behaviour[A] = "hang"
        connecting = self.connect(client, timeout=10)
        self.assertNoResult(connecting)
        self.assertEqual(self.dial.calls[0][1], 5.0)  # two attempts may share the 10 s
        self.clock.advance(5)
        self.successResultOf(connecting)
        self.assertEqual(self.dial.calls[1], (B, 5.0, False))
        self.assertEqual(client.pool.state(client.pool.upstreams[0]).connect_failures, 1)
        self.assertEqual(self.events("UPSTREAM_FAILED"), ["10.0.0.1:80 no connection within 5 s"])

    def test_every_attempt_timing_out_is_504(self):
        client = self.pooled(A, B)
        self.dial.behaviour[A] = self.dial.behaviour[B] = "hang"
        connecting = self.connect(client, timeout=4)
        self.clock.advance(2)
        self.clock.advance(2)
        refusal = self.failureResultOf(connecting, StreamRefused).value
        self.assertEqual((refusal.status, refusal.reason), (504, "upstream timed out"))

    def test_all_down_fails_at_once_with_a_clear_502(self):
        client = self.pooled(A, B, health={"interval": 5, "timeout": 1, "fails": 1})
        self.dial.behaviour[A] = self.dial.behaviour[B] = "refused"
        client.start_service()  # the first probes take both down
        self.dial.calls.clear()
        refusal = self.failureResultOf(self.connect(client), StreamRefused).value
        self.assertEqual((refusal.status, refusal.reason), (502, "no upstream available"))
        self.assertIn("all 2 upstreams are down", refusal.detail)
        self.assertEqual(self.dial.calls, [])

    def test_a_live_stream_counts_until_its_connection_closes(self):
        client = self.pooled(A, B, balance="least-connections")
        protocol = self.successResultOf(self.connect(client))
        self.assertIsInstance(protocol, Caller)  # the caller's protocol, not our stand-in
        key, counted = self.dial.connections[0]
        upstream = next(u for u in client.pool.upstreams if u.key == key)
        self.assertEqual(client.pool.state(upstream).active, 1)
        self.assertIs(counted.transport, protocol.transport)  # the protocol has the socket itself
        counted.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(protocol.lost)
        self.assertEqual(client.pool.state(upstream).active, 0)

    def test_a_caller_giving_up_cancels_the_attempt_without_blaming_the_upstream(self):
        client = self.pooled(A, B)
        self.dial.behaviour[A] = "hang"
        connecting = self.connect(client)
        connecting.cancel()
        self.failureResultOf(connecting, defer.CancelledError)
        state = client.pool.state(client.pool.upstreams[0])
        self.assertEqual((state.active, state.connect_failures, len(self.dial.calls)), (0, 0, 1))
        self.assertEqual(self.clock.getDelayedCalls(), [])


# ---------------------------------------------------------------------------- end to end

def pool_config(ports, **options):
    config = proxy_config(0)
    client = config["bindings"]["south_tcp_client"]
    client["options"] = {"upstreams": [{"host": "127.0.0.1", "port": port, **({"weight": weight} if weight else {})}
                                       for port, weight in ports], **options}
    return config


def upstream_of(factories, count_before):
    """Which upstream each connection opened since `count_before` reached."""
    return [index for index, factory in enumerate(factories)
            for _ in factory.connections[count_before[index]:]]


def echo_factory():
    """An upstream WebSocket echo server's factory (test_proxy's Upstream protocol)."""
    factory = WebSocketServerFactory()
    factory.protocol = Upstream
    factory._batched_timer = ReactorTimer()
    factory.setProtocolOptions(maxMessagePayloadSize=0, autoFragmentSize=0)
    factory.requests, factory.closes, factory.connections = [], [], []
    factory.select, factory.echo, factory.received = (lambda offered: offered[0] if offered else None), True, 0
    return factory


class Upstreams:
    """Upstream echo servers on loopback, which a test can kill and bring back."""

    def __init__(self, case, count=2):
        self.case = case
        self.factories = [echo_factory() for _ in range(count)]
        self.listening = [self._listen(factory, 0) for factory in self.factories]
        self.ports = [listening.getHost().port for listening in self.listening]

    def _listen(self, factory, port):
        listening = reactor.listenTCP(port, factory, interface="127.0.0.1")
        self.case.addCleanup(listening.stopListening)
        return listening

    def kill(self, index):
        """Stop listening and drop its connections: connects are refused from now on."""
        self.listening[index].stopListening()
        for connection in self.factories[index].connections:
            connection.transport.abortConnection()

    def revive(self, index):
        self.listening[index] = self._listen(self.factories[index], self.ports[index])

    def counts(self):
        return [len(factory.connections) for factory in self.factories]


class EndToEndTests(unittest.TestCase):
    @defer.inlineCallbacks
    def gateway(self, config):
        self.gateway_, port = yield start_gateway(self, config)
        return port

    @defer.inlineCallbacks
    def open_many(self, port, count):
        clients = []
        for _ in range(count):
            clients.append((yield connect_ws(port, protocols=["echo"])))
        self.addCleanup(lambda: defer.gatherResults([close_ws(c) for c in clients]))
        return clients

    @defer.inlineCallbacks
    def open_tracked(self, port, ups, count):
        """(client, index of the upstream it reached) for `count` WebSockets opened in turn."""
        opened = []
        for _ in range(count):
            before = ups.counts()
            client = (yield self.open_many(port, 1))[0]
            grown = [now - then for now, then in zip(ups.counts(), before, strict=True)]
            opened.append((client, grown.index(1)))
        return opened

    @defer.inlineCallbacks
    def test_one_upstream_killed_mid_run_new_connections_all_succeed_on_the_other(self):
        ups = Upstreams(self)
        port = yield self.gateway(pool_config([(p, None) for p in ups.ports],
                                              health={"interval": 0.1, "timeout": 0.1, "fails": 2, "passes": 1}))
        yield self.open_many(port, 4)
        self.assertEqual(ups.counts(), [2, 2])
        ups.kill(1)
        clients = yield self.open_many(port, 20)  # none fails while a healthy upstream exists
        self.assertEqual(ups.counts()[0], 2 + 20)
        for client in clients[:3]:
            client.sendMessage(b"still here")
            self.assertEqual((yield client.messages.get()), (False, [b"still here"]))
        pool = self.gateway_.binding("south_tcp_client").pool
        yield eventually(lambda: not pool.state(pool.upstreams[1]).up)
        self.assertIn(f"BINDING_TCP_UPSTREAM_DOWN 127.0.0.1:{ups.ports[1]}", self.gateway_.events_text.getvalue())
        ups.revive(1)
        yield eventually(lambda: pool.state(pool.upstreams[1]).up)
        self.assertIn(f"BINDING_TCP_UPSTREAM_UP 127.0.0.1:{ups.ports[1]}", self.gateway_.events_text.getvalue())
        reached = yield self.open_tracked(port, ups, 4)
        self.assertEqual({index for _, index in reached}, {0, 1})

    @defer.inlineCallbacks
    def test_least_connections_spreads_100_long_lived_websockets_evenly(self):
        ups = Upstreams(self)
        port = yield self.gateway(pool_config([(p, None) for p in ups.ports], balance="least-connections"))
        yield self.open_many(port, 100)
        self.assertEqual(ups.counts(), [50, 50])
        pool = self.gateway_.binding("south_tcp_client").pool
        self.assertEqual([pool.state(u).active for u in pool.upstreams], [50, 50])

    @defer.inlineCallbacks
    def test_least_connections_with_weights_one_to_two_spreads_a_third_to_two_thirds(self):
        ups = Upstreams(self)
        port = yield self.gateway(pool_config([(ups.ports[0], None), (ups.ports[1], 2)], balance="least-connections"))
        yield self.open_many(port, 100)
        self.assertEqual(ups.counts(), [33, 67])

    @defer.inlineCallbacks
    def test_closed_websockets_free_their_upstream_for_least_connections(self):
        ups = Upstreams(self)
        port = yield self.gateway(pool_config([(p, None) for p in ups.ports], balance="least-connections"))
        reached = yield self.open_tracked(port, ups, 4)
        self.assertEqual(ups.counts(), [2, 2])
        pool = self.gateway_.binding("south_tcp_client").pool
        for client, index in reached:
            if index == 0:
                yield close_ws(client)
        yield eventually(lambda: pool.state(pool.upstreams[0]).active == 0)
        yield self.open_many(port, 2)
        self.assertEqual(ups.counts(), [4, 2])  # both new ones went to the emptied upstream

    @defer.inlineCallbacks
    def test_round_robin_takes_turns(self):
        ups = Upstreams(self, 3)
        port = yield self.gateway(pool_config([(p, None) for p in ups.ports]))
        reached = yield self.open_tracked(port, ups, 6)
        self.assertEqual([index for _, index in reached], [0, 1, 2, 0, 1, 2])

    @defer.inlineCallbacks
    def test_all_upstreams_down_is_a_502_at_once(self):
        ups = Upstreams(self)
        port = yield self.gateway(pool_config([(p, None) for p in ups.ports], retries=1))
        ups.kill(0)
        ups.kill(1)
        failure = yield self.assertFailure(connect_ws(port, protocols=["echo"]), ConnectionError)
        self.assertIn("502", str(failure))
        events = self.gateway_.events_text.getvalue()
        self.assertIn("upstream unreachable", events)
        self.assertIn(f"127.0.0.1:{ups.ports[0]}", events)
        self.assertIn(f"127.0.0.1:{ups.ports[1]}", events)

    @defer.inlineCallbacks
    def test_metrics_per_upstream(self):
        ups = Upstreams(self)
        port = yield self.gateway(pool_config([(p, None) for p in ups.ports]))
        yield self.open_many(port, 3)
        ups.kill(1)
        yield self.open_many(port, 1)  # tries the dead one first, then the other
        text = generate_latest(self.gateway_.metrics.registry).decode()
        first, second = (f'binding="south_tcp_client",namespace="test",upstream="127.0.0.1:{p}"' for p in ups.ports)
        self.assertIn(f"zillatw_upstream_active_streams{{{first}}} 3.0", text)
        self.assertIn(f"zillatw_upstream_connect_failures_total{{{second}}} 1.0", text)
        self.assertIn(f"zillatw_upstream_up{{{first}}} 1.0", text)


class OverTlsTests(TlsTestCase):
    @defer.inlineCallbacks
    def test_a_tls_client_in_front_of_a_pool_verifies_each_upstream(self):
        """tls client -> pooled tcp client: the TLS connection rides the counted connection."""
        upstreams = [start_wss_upstream(self, self.pki.localhost) for _ in range(2)]
        config = self.tls_proxy_config(0, {"trust": ["backend"], "sni": ["localhost"]},
                                                {"trust": {"store": self.backend_truststore(),
                                                           "password": PASSWORD}})
        config["bindings"]["south_tcp_client"]["options"] = {
            "upstreams": [{"host": "127.0.0.1", "port": port} for _, port in upstreams], "balance": "least-connections"}
        gateway, port = yield start_gateway(self, config)
        clients = []
        for _ in range(4):
            client = yield connect_wss(port, client_tls(self.pki.ca), protocols=["echo"])
            client.sendMessage(b"through a pool", isBinary=True)
            self.assertEqual(b"".join((yield client.messages.get())[1]), b"through a pool")
            clients.append(client)
        self.assertEqual([len(factory.connections) for factory, _ in upstreams], [2, 2])
        pool = gateway.binding("south_tcp_client").pool
        self.assertEqual([pool.state(u).active for u in pool.upstreams], [2, 2])
        for client in clients:
            yield close_ws(client)
        yield eventually(lambda: [pool.state(u).active for u in pool.upstreams] == [0, 0])


class ConfigTests(unittest.SynchronousTestCase):
    def problems(self, **options):
        config = proxy_config(1)
        config["bindings"]["south_tcp_client"]["options"] = options
        with self.assertRaises(ConfigError) as raised:
            load_config(config)
        return raised.exception.problems

    def test_host_and_port_with_upstreams_are_refused_by_name(self):
        problems = self.problems(host="127.0.0.1", port=1, upstreams=[{"host": "127.0.0.1", "port": 2}])
        self.assertEqual(problems, [
            "bindings.south_tcp_client.options.host: give either 'upstreams' or 'host' and 'port', not both",
            "bindings.south_tcp_client.options.port: give either 'upstreams' or 'host' and 'port', not both"])

    def test_pool_keys_without_upstreams_are_refused(self):
        problems = self.problems(host="127.0.0.1", port=1, balance="least-connections", retries=1)
        self.assertEqual(len(problems), 2)
        self.assertTrue(all("only with 'upstreams'" in p for p in problems))

    def test_an_upstream_twice_and_overlapping_probes_are_refused(self):
        problems = self.problems(upstreams=[{"host": "h", "port": 1}, {"host": "h", "port": 1}],
                                 health={"interval": 1, "timeout": 2})
        self.assertEqual([p.split(":")[0] for p in problems], [
            "bindings.south_tcp_client.options.upstreams[1]", "bindings.south_tcp_client.options.health.timeout"])

    def test_the_issues_example_loads(self):
        """retries: 2 over two upstreams, as issue 17 writes it: each other one is tried once."""
        config = proxy_config(1)
        config["bindings"]["south_tcp_client"]["options"] = yaml.safe_load("""
            upstreams:
              - {host: 127.0.0.1, port: 8081}
              - {host: 127.0.0.1, port: 8082, weight: 2}
            balance: least-connections
            retries: 2
            health: {interval: 2, timeout: 1, fails: 2, passes: 1}
        """)
        binding = load_config(config).binding("test:south_tcp_client")
        self.assertEqual(pool_options(binding.options)[2], 2)

    def test_pool_keys_on_a_tcp_server_are_refused(self):
        config = proxy_config(1)
        config["bindings"]["tcp0"]["options"]["upstreams"] = [{"host": "h", "port": 1}]
        with self.assertRaises(ConfigError) as raised:
            load_config(config)
        self.assertIn("bindings.tcp0.options.upstreams: a tcp server listens", str(raised.exception))

    def test_bad_values_are_refused_at_their_key(self):
        for options, where in [({"upstreams": []}, "options.upstreams"),
                               ({"upstreams": [{"host": "h", "port": 0}]}, "options.upstreams[0].port"),
                               ({"upstreams": [{"host": "h", "port": 1, "weight": 0}]}, "options.upstreams[0].weight"),
                               ({"upstreams": [{"host": "h", "port": 1}], "balance": "random"}, "options.balance"),
                               ({"upstreams": [{"host": "h", "port": 1}], "health": {"fails": 0}},
                                "options.health.fails")]:
            problems = self.problems(**options)
            self.assertTrue(any(p.startswith(f"bindings.south_tcp_client.{where}") for p in problems), problems)


class ReloadTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_an_upstream_removed_on_reload_drains(self):
        ups = Upstreams(self)
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            yaml.safe_dump(pool_config([(p, None) for p in ups.ports]), f)
        events = io.StringIO()
        gateway = build_gateway(path, event_stream=events)
        gateway.startService()
        self.addCleanup(lambda: gateway.stopService() if gateway.running else None)
        port = (yield gateway.listening)[0]
        first = yield connect_ws(port, protocols=["echo"])
        second = yield connect_ws(port, protocols=["echo"])  # round-robin: one on each
        self.assertEqual(ups.counts(), [1, 1])
        with open(path, "w") as f:
            yaml.safe_dump(pool_config([(ups.ports[0], None)]), f)
        self.assertTrue((yield gateway.reload()))
        self.assertIn(f"BINDING_TCP_UPSTREAM_DRAINING 127.0.0.1:{ups.ports[1]} 1 live streams", events.getvalue())
        pool = gateway.binding("south_tcp_client").pool
        removed = ("127.0.0.1", ups.ports[1])
        self.assertIn(removed, pool.states.known())
        second.sendMessage(b"on the removed upstream")  # its live stream goes on
        self.assertEqual((yield second.messages.get()), (False, [b"on the removed upstream"]))
        more = []
        for _ in range(3):
            more.append((yield connect_ws(port, protocols=["echo"])))
        self.assertEqual(ups.counts(), [4, 1])  # no new stream for the removed one
        yield close_ws(second)
        yield eventually(lambda: removed not in pool.states.known())  # drained, forgotten
        for client in [first, *more]:
            yield close_ws(client)

