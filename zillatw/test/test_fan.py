"""The fan server's eviction of a member that falls behind: the bounds on what is queued for
it (counted on plain stream ends), the drain bound on a Clock, and over loopback sockets a
member that stops reading, is evicted, and still reads its backlog and its 1013 seconds
later while the others keep receiving."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from zillatw import ConfigError, build_gateway
from zillatw.bindings.echo.binding import EchoServer
from zillatw.bindings.fan.binding import DRAIN_TIMEOUT, MAX_LAG, MAX_LAG_MESSAGES, FanMember, FanServer
from zillatw.bindings.http.binding import HttpServer
from zillatw.bindings.ws.binding import WsServer
from zillatw.config import Route
from zillatw.stream import BINARY, IStreamEnd, StreamInfo
from zillatw.test.pki import PASSWORD, TlsTestCase, client_tls, connect_wss, tls_chain
from zillatw.test.support import (
    RawClient,
    chain,
    client_frame,
    connect_ws,
    eventually,
    parse_server_frames,
    split_response,
    start_gateway,
    upgrade_request,
)


@implementer(IStreamEnd)
class Member:
    """A member's connection as the fan sees it: records what it is sent and how it ended."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.ended: tuple[int, str] | None = None
        self.reading = True

    def stream_data(self, opcode: int, payload: bytes, fin: bool) -> None:
        self.received.append(payload)

    def stream_end(self, code: int, reason: str) -> None:
        self.ended = (code, reason)

    def pauseProducing(self) -> None:
        self.reading = False

    def resumeProducing(self) -> None:
        self.reading = True

    def stopProducing(self) -> None:
        pass


class EvictionBoundsTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.fan = FanServer("fan", EchoServer(), max_lag=1000, max_lag_messages=5)
        self.publisher_end = Member()
        self.slow_end = Member()
        self.publisher = self.join(self.publisher_end)
        self.slow = self.join(self.slow_end)

    def join(self, end: Member) -> FanMember:
        member = self.fan.open(StreamInfo(), end)
        assert isinstance(member, FanMember)  # a fan without Redis opens at once
        return member

    def publish(self, size: int, count: int = 1) -> None:
        for _ in range(count):
            self.publisher.stream_data(BINARY, b"x" * size, True)

    def test_defaults(self):
        fan = FanServer("fan", EchoServer())
        self.assertEqual((fan.max_lag, fan.max_lag_messages, fan.drain_timeout),
                         (MAX_LAG, MAX_LAG_MESSAGES, DRAIN_TIMEOUT))
        self.assertEqual((MAX_LAG, MAX_LAG_MESSAGES, DRAIN_TIMEOUT), (4 * 1024 * 1024, 4096, 10.0))

    def test_a_full_socket_may_hold_max_lag_messages_more_then_the_member_is_evicted(self):
        self.slow.pauseProducing()  # its transport's buffer is full
        self.publish(1, count=5)
        self.assertIsNone(self.slow_end.ended)
        self.assertEqual(len(self.slow_end.received), 5)
        self.publish(1)
        self.assertEqual(self.slow_end.ended, (1013, "fan member too slow: messages were not read in time"))
        self.assertEqual(len(self.slow_end.received), 5)  # the 6th was not queued
        self.assertEqual(self.fan.members(), 1)
        self.publish(1, count=10)  # the others go on
        self.assertEqual(len(self.publisher_end.received), 16)
        self.assertEqual(len(self.slow_end.received), 5)

    def test_and_max_lag_bytes(self):
        self.slow.pauseProducing()
        self.publish(500, count=2)
        self.assertIsNone(self.slow_end.ended)
        self.publish(1)
        self.assertEqual(self.slow_end.ended[0], 1013)

    def test_a_drained_socket_starts_the_count_again(self):
        for _ in range(3):
            self.slow.pauseProducing()
            self.publish(200, count=5)
            self.slow.resumeProducing()
        self.assertIsNone(self.slow_end.ended)
        self.assertEqual(len(self.slow_end.received), 15)

    def test_a_member_that_keeps_up_is_never_evicted(self):
        self.publish(10_000, count=100)
        self.assertIsNone(self.slow_end.ended)


class ConfigTests(unittest.SynchronousTestCase):
    def test_the_bounds_are_checked_by_name(self):
        config = chain(apps={"fan": {"type": "fan", "kind": "server", "exit": "echo",
                                     "options": {"max-lag": -1, "max-lag-messages": 1.5, "drain-timeout": 0}},
                             "echo": {"type": "echo", "kind": "server"}}, ws_routes=[{"exit": "fan"}])
        with self.assertRaises(ConfigError) as raised:
            build_gateway(config)
        problems = "\n".join(raised.exception.problems)
        for key in ("max-lag", "max-lag-messages", "drain-timeout"):
            self.assertIn(f"bindings.fan.options.{key}:", problems)


class HalfClosingTransport(StringTransport):
    """A StringTransport that also records TCP's half-close."""

    write_closed = False
    aborted = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class DrainTimeoutTests(unittest.SynchronousTestCase):
    """An evicted member's connection on a Clock: the http and ws bindings on string transports."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.fan = FanServer("fan", EchoServer(), max_lag=0, max_lag_messages=0, drain_timeout=7.0)
        ws = WsServer("ws", [(Route(0, "t:fan"), self.fan)], reactor=self.clock, close_timeout=2.0,
                      ping_interval=0)
        self.http = HttpServer("http", [(Route(0, "t:ws"), ws)], reactor=self.clock)
        self.publisher, self.publisher_transport = self.member()
        self.slow, self.slow_transport = self.member()

    def member(self) -> tuple[Any, HalfClosingTransport]:
        transport = HalfClosingTransport()
        protocol = self.http.buildProtocol(IPv4Address("TCP", "127.0.0.1", 0))
        protocol.makeConnection(transport)
        protocol.dataReceived(upgrade_request())
        status, _, _ = split_response(transport.value())
        self.assertEqual(status, "HTTP/1.1 101 Switching Protocols")
        transport.clear()
        return protocol, transport

    def evict_slow(self) -> None:
        producer = self.slow_transport.producer
        assert producer is not None  # the ws connection registered itself
        producer.pauseProducing()  # what Twisted does when its buffer is full
        self.slow_transport.pauseProducing()
        self.publisher.dataReceived(client_frame(0x2, b"backlog"))
        self.assertEqual(self.fan.members(), 1)

    def test_the_1013_goes_out_behind_the_backlog_then_a_half_close_not_an_abort(self):
        self.evict_slow()
        frames = parse_server_frames(self.slow_transport.value())
        self.assertEqual(frames[-1][0], 0x8)
        self.assertEqual(int.from_bytes(frames[-1][2][:2], "big"), 1013)
        self.assertTrue(self.slow_transport.write_closed)  # FIN once what is queued is written
        self.assertEqual(self.slow_transport.producerState, "producing")  # read again: its close reply
        self.assertIsNone(self.slow_transport.producer)  # nothing holds the FIN back
        self.clock.advance(2.5)  # past the ws server's close-timeout
        self.assertFalse(self.slow_transport.aborted)
        self.clock.advance(4.4)
        self.assertFalse(self.slow_transport.aborted)
        self.clock.advance(0.2)  # drain-timeout: a member that never reads again is let go
        self.assertTrue(self.slow_transport.aborted)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_member_that_answers_the_close_ends_without_an_abort(self):
        self.evict_slow()
        self.slow.dataReceived(client_frame(0x8, (1013).to_bytes(2, "big")))
        self.assertTrue(self.slow_transport.disconnecting)
        self.assertFalse(self.slow_transport.aborted)
        self.slow.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])  # the drain timer went with it


class SlowMemberTests(unittest.TestCase):
    """Over loopback: the attack that found the hole, a member that stops reading, its kernel
    buffers full. What happens when (the close timeout does not apply to an evicted member,
    the drain timeout does) is on a Clock: DrainTimeoutTests."""

    MESSAGE = 16 * 1024
    CLOSE_TIMEOUT = 0.5  # the ws server's: before, the evicted member was aborted this soon

    def config(self, **fan: Any) -> dict[str, Any]:
        return chain(apps={"fan": {"type": "fan", "kind": "server", "exit": "echo",
                                   "options": {"max-lag": 256 * 1024, "max-lag-messages": 64, **fan}},
                           "echo": {"type": "echo", "kind": "server"}},
                     ws_routes=[{"exit": "fan"}],
                     ws_options={"close-timeout": self.CLOSE_TIMEOUT, "ping-interval": 0})

    def connect_member(self, port: int) -> defer.Deferred:
        return connect_ws(port)

    def raw_endpoint(self, port: int) -> Any:
        return TCP4ClientEndpoint(reactor, "127.0.0.1", port)

    @defer.inlineCallbacks
    def slow_member(self, port: int) -> Any:
        """A raw member past its 101 that then stops reading its socket; -> (client, offset
        of its first frame byte)."""
        client = yield connectProtocol(self.raw_endpoint(port), RawClient())
        client.transport.write(upgrade_request())
        yield eventually(lambda: b"\r\n\r\n" in client.data)
        status, _, rest = split_response(client.data)
        self.assertEqual(status, "HTTP/1.1 101 Switching Protocols")
        client.transport.pauseProducing()
        return client, len(client.data) - len(rest)

    @defer.inlineCallbacks
    def publish_batch(self, publisher: Any, readers: list[Any], sent: list[int]) -> Any:
        """Publish 20 numbered messages; each reader receives them all, in order."""
        for _ in range(20):
            index = len(sent)
            publisher.sendMessage(index.to_bytes(4, "big") * (self.MESSAGE // 4), isBinary=True)
            sent.append(index)
        for client in readers:
            for index in sent[-20:]:
                _, frames = yield client.messages.get()
                self.assertEqual(b"".join(frames)[:4], index.to_bytes(4, "big"))

    @defer.inlineCallbacks
    def publish_until_evicted(self, fan: Any, publisher: Any, readers: list[Any], sent: list[int]) -> Any:
        members = fan.members()
        while fan.members() == members:
            self.assertLess(len(sent), 5000, "never evicted")
            yield self.publish_batch(publisher, readers, sent)

    @defer.inlineCallbacks
    def test_an_evicted_member_reads_its_backlog_then_its_1013(self):
        gateway, port = yield start_gateway(self, self.config())
        fan = gateway.binding("fan")
        self.assertEqual((fan.max_lag, fan.max_lag_messages, fan.drain_timeout), (256 * 1024, 64, DRAIN_TIMEOUT))
        fast = yield defer.gatherResults([self.connect_member(port) for _ in range(2)])
        slow, start = yield self.slow_member(port)
        yield eventually(lambda: fan.members() == 3)

        sent: list[int] = []
        yield self.publish_until_evicted(fan, fast[0], fast, sent)
        evicted_at = len(sent)
        # the others keep receiving while the evicted member does not read
        for _ in range(3):
            yield self.publish_batch(fast[0], fast, sent)
            self.assertFalse(slow.done.called, "the evicted member's socket was dropped while it stalled")

        slow.transport.resumeProducing()
        yield slow.done
        # a FIN, not a reset: neither the drain timeout's abort (DRAIN_TIMEOUT, 10 s) nor the
        # close timeout's (CLOSE_TIMEOUT) ended it
        self.assertIsInstance(slow.reason.value, ConnectionDone)

        frames = parse_server_frames(slow.data[start:])
        data, close = frames[:-1], frames[-1]
        self.assertEqual(close[0], 0x8)
        self.assertEqual(int.from_bytes(close[2][:2], "big"), 1013)
        self.assertEqual(close[2][2:], b"fan member too slow: messages were not read in time")
        indices = [int.from_bytes(payload[:4], "big") for _, _, payload in data]
        self.assertEqual(indices, list(range(len(indices))))  # its backlog whole, in order, then the close
        self.assertGreater(len(indices), 0)
        self.assertLessEqual(len(indices), evicted_at)
        self.assertTrue(slow.data.endswith(b"\x88" + bytes([len(close[2])]) + close[2]))  # nothing after it
        self.assertGreater(len(sent), evicted_at)  # published after the eviction: the others got those
        yield defer.gatherResults([_close(client) for client in fast])

    @defer.inlineCallbacks
    def test_an_evicted_member_that_never_reads_again_is_dropped_after_drain_timeout(self):
        gateway, port = yield start_gateway(self, self.config(**{"drain-timeout": 0.1}))
        fan = gateway.binding("fan")
        self.assertEqual(fan.drain_timeout, 0.1)
        fast = [(yield self.connect_member(port))]
        slow, _ = yield self.slow_member(port)
        yield eventually(lambda: fan.members() == 2)
        ws = gateway.binding("ws0")
        yield self.publish_until_evicted(fan, fast[0], fast, [])
        self.assertEqual(len(ws.connections), 2)  # evicted, not dropped: it has drain-timeout to read
        yield eventually(lambda: len(ws.connections) == 1, timeout=5)
        slow.transport.loseConnection()
        yield slow.done
        yield _close(fast[0])


@defer.inlineCallbacks
def _close(client: Any) -> Any:
    client.sendClose(1000)
    yield client.closed


class SlowMemberOverTlsTests(SlowMemberTests, TlsTestCase):
    """The same behind a tls server, where the evicted connection is closed, not half-closed."""

    def config(self, **fan: Any) -> dict[str, Any]:
        config = super().config(**fan)
        tls = tls_chain({"keys": {"store": self.keystore(), "password": PASSWORD}}, {"keys": ["localhost"]})
        tls["bindings"].update({name: binding for name, binding in config["bindings"].items() if name != "tcp0"})
        return tls

    def connect_member(self, port: int) -> defer.Deferred:
        return connect_wss(port, client_tls(self.pki.ca))

    def raw_endpoint(self, port: int) -> Any:
        return SSL4ClientEndpoint(reactor, "127.0.0.1", port, client_tls(self.pki.ca))
