"""fan on tcp and tls byte streams (issue 15): conf/tcp.reflect.yaml and conf/tls.reflect.yaml
driven as Zilla's READMEs do (two nc / openssl s_client sessions), byte and WebSocket members
in one group, the ws fan's pacing and eviction rules on a Clock, and a group across two
gateways through a real Redis."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial import unittest

from zillatw.test.netns import ExampleNetwork
from zillatw.test.pki import localhost_keystore, tls_connect
from zillatw.test.process_support import RedisServer, conf_text, serve_text
from zillatw.test.support import OnAClock, close_ws, connect_raw, connect_ws, eventually, free_port, start_gateway


class TcpReflectTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        network = ExampleNetwork(self)
        self.port = network.port(12345)
        self.gateway, _ = yield start_gateway(self, network.config("tcp.reflect.yaml"))

    @defer.inlineCallbacks
    def connected(self, count: int) -> Any:
        clients = []
        for _ in range(count):
            client = yield connect_raw(self.port)
            self.addCleanup(client.transport.loseConnection)
            clients.append(client)
        fan = self.gateway.generation.bindings["example:north_fan_server"]
        yield eventually(lambda: fan.members() == count)
        return clients

    @defer.inlineCallbacks
    def test_what_one_sends_every_client_gets_the_sender_included(self):
        a, b = yield self.connected(2)
        a.transport.write(b"Hello, one\n")
        for client in (a, b):
            self.assertEqual((yield client.until(11)), b"Hello, one\n")
        b.transport.write(b"Hello, two\n")
        for client in (a, b):
            self.assertEqual((yield client.until(22)), b"Hello, one\nHello, two\n")

    @defer.inlineCallbacks
    def test_a_client_that_leaves_is_no_member(self):
        a, b, c = yield self.connected(3)
        c.transport.loseConnection()
        yield c.done
        fan = self.gateway.generation.bindings["example:north_fan_server"]
        yield eventually(lambda: fan.members() == 2)
        a.transport.write(b"still here")
        self.assertEqual((yield b.until(10)), b"still here")



class MixedTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_ws_and_tcp_members_share_a_group(self):
        """A byte chunk reaches a WebSocket member as one binary message; a WebSocket
        message reaches a byte member as its payload."""
        raw_port, ws_port = free_port(), free_port()
        config = {"name": "mixed", "bindings": {
            "tcp_raw": {"type": "tcp", "kind": "server", "options": {"host": "127.0.0.1", "port": raw_port},
                        "exit": "fan0"},
            "tcp_ws": {"type": "tcp", "kind": "server", "options": {"host": "127.0.0.1", "port": ws_port},
                       "exit": "http0"},
            "http0": {"type": "http", "kind": "server", "routes": [{"exit": "ws0"}]},
            "ws0": {"type": "ws", "kind": "server", "exit": "fan0"},
            "fan0": {"type": "fan", "kind": "server", "exit": "echo0"},
            "echo0": {"type": "echo", "kind": "server"}}}
        gateway, _ = yield start_gateway(self, config)
        raw = yield connect_raw(raw_port)
        self.addCleanup(raw.transport.loseConnection)
        ws = yield connect_ws(ws_port)
        fan = gateway.generation.bindings["mixed:fan0"]
        yield eventually(lambda: fan.members() == 2)
        raw.transport.write(b"\x00bytes")
        binary, frames = yield ws.messages.get()
        self.assertEqual((binary, b"".join(frames)), (True, b"\x00bytes"))
        ws.sendMessage("text message".encode())
        self.assertEqual((yield raw.until(18)), b"\x00bytestext message")
        yield close_ws(ws)


class TlsReflectTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_two_s_clients_with_alpn_echo_hear_each_other(self):
        network = ExampleNetwork(self)
        folder = Path(self.mktemp())
        ca = localhost_keystore(folder)
        os.environ["KEYSTORE_PASSWORD"] = "generated"
        self.addCleanup(os.environ.pop, "KEYSTORE_PASSWORD")
        port = network.port(23456)
        gateway, _ = yield start_gateway(self, network.config("tls.reflect.yaml", folder))
        a = yield tls_connect(port, ca, alpn=["echo"])
        b = yield tls_connect(port, ca, alpn=["echo"])
        fan = gateway.generation.bindings["example:north_fan_server"]
        yield eventually(lambda: fan.members() == 2)
        a.transport.write(b"Hello, world\n")
        for client in (a, b):
            self.assertEqual((yield client.until(13)), b"Hello, world\n")
        for client in (a, b):
            client.transport.loseConnection()
            yield client.done


class FlowTests(unittest.TestCase):
    """The ws fan's rules for byte members, on a Clock: a StringTransport's producer is the
    socket's (pauseProducing = its buffer is full)."""

    def gateway(self, **options: Any) -> OnAClock:
        return OnAClock({"name": "t", "bindings": {
            "tcp0": {"type": "tcp", "kind": "server", "options": {"host": "127.0.0.1", "port": 7000}, "exit": "fan0"},
            "fan0": {"type": "fan", "kind": "server", "exit": "echo0", "options": options},
            "echo0": {"type": "echo", "kind": "server"}}})

    def test_a_slow_member_is_evicted_behind_a_bounded_backlog_then_aborted(self):
        gateway = self.gateway(**{"max-lag": 100, "drain-timeout": 5})
        (fast, fast_socket), (_, slow_socket) = gateway.connect(client_port=1), gateway.connect(client_port=2)
        slow_socket.producer.pauseProducing()  # its socket is full
        for _ in range(10):
            fast.dataReceived(b"x" * 10)  # 100 bytes queued for the slow one: the bound
        self.assertFalse(slow_socket.disconnecting)
        fast.dataReceived(b"one more")
        self.assertEqual(fast_socket.value(), b"x" * 100 + b"one more")
        self.assertTrue(slow_socket.disconnecting)  # closed behind what it was sent
        self.assertEqual(slow_socket.value(), b"x" * 100)
        self.assertFalse(slow_socket.disconnected)
        gateway.clock.advance(5)
        self.assertTrue(slow_socket.disconnected)  # not read in time: aborted
        fan = gateway.gateway.generation.bindings["t:fan0"]
        self.assertEqual(fan.members(), 1)
        self.assertFalse(fast_socket.disconnecting)

    def test_an_evicted_member_that_reads_its_backlog_leaves_no_deadline(self):
        gateway = self.gateway(**{"max-lag": 10, "drain-timeout": 5})
        (fast, _), (slow, slow_socket) = gateway.connect(client_port=1), gateway.connect(client_port=2)
        slow_socket.producer.pauseProducing()
        fast.dataReceived(b"z" * 11)
        self.assertTrue(slow_socket.disconnecting)
        self.assertEqual(len(gateway.clock.getDelayedCalls()), 1)
        slow.connectionLost(Failure(ConnectionDone()))  # it read all, the close went through
        self.assertEqual(gateway.clock.getDelayedCalls(), [])

    def test_max_lag_messages_counts_chunks(self):
        gateway = self.gateway(**{"max-lag-messages": 3})
        (fast, _), (_, slow_socket) = gateway.connect(client_port=1), gateway.connect(client_port=2)
        slow_socket.producer.pauseProducing()
        for _ in range(3):
            fast.dataReceived(b"y")
        self.assertFalse(slow_socket.disconnecting)
        fast.dataReceived(b"y")
        self.assertTrue(slow_socket.disconnecting)

    def test_while_every_member_is_full_no_member_is_read(self):
        gateway = self.gateway()
        (_, a_socket), (_, b_socket) = gateway.connect(client_port=1), gateway.connect(client_port=2)
        a_socket.producer.pauseProducing()
        self.assertEqual((a_socket.producerState, b_socket.producerState), ("producing", "producing"))
        b_socket.producer.pauseProducing()
        self.assertEqual((a_socket.producerState, b_socket.producerState), ("paused", "paused"))
        a_socket.producer.resumeProducing()
        self.assertEqual((a_socket.producerState, b_socket.producerState), ("producing", "producing"))

    def test_stop_closes_byte_members_and_drops_them_at_the_drain_timeout(self):
        gateway = self.gateway()
        _, socket = gateway.connect()
        fan = gateway.gateway.generation.bindings["t:fan0"]
        self.assertEqual(fan.open_count(), 1)
        fan.going_away()
        self.assertTrue(socket.disconnecting)
        fan.drop_all()
        self.assertTrue(socket.disconnected)
        self.assertEqual(fan.open_count(), 0)


class RedisTests(unittest.TestCase):
    """tcp.reflect on two gateways sharing a Redis channel: a chunk sent on one reaches the
    raw clients of both, once."""

    @defer.inlineCallbacks
    def test_a_chunk_crosses_gateways_once(self):
        redis = RedisServer()
        redis.start()
        self.addCleanup(redis.crash)
        folder = Path(self.mktemp())
        folder.mkdir()
        ports, gateways = [free_port(), free_port()], []
        for index, port in enumerate(ports):
            text = conf_text("tcp.reflect.yaml", port).replace(
                "    exit: north_echo_server",
                f"    exit: north_echo_server\n    options:\n      redis:\n        url: {redis.url}")
            (folder / str(index)).mkdir()
            gateway, _ = yield serve_text(self, folder / str(index), text)
            gateways.append(gateway)
        links = [g.generation.bindings["example:north_fan_server"].redis for g in gateways]
        yield eventually(lambda: all(link.up for link in links))
        clients = []
        for port in ports:
            client = yield connect_raw(port)
            self.addCleanup(client.transport.loseConnection)
            clients.append(client)
        yield eventually(lambda: all(g.generation.bindings["example:north_fan_server"].members() == 1
                                     for g in gateways))
        clients[0].transport.write(b"across")
        for client in clients:
            self.assertEqual((yield client.until(6)), b"across")
        clients[1].transport.write(b"back")
        for client in clients:
            self.assertEqual((yield client.until(10)), b"acrossback")
        yield eventually(lambda: links[0].received == 1 and links[1].received == 1)
        self.assertEqual([c.data for c in clients], [b"acrossback", b"acrossback"])
