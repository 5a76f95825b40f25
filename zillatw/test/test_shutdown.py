"""Graceful shutdown: Gateway.stopService in process, and SIGTERM/SIGINT to
`twistd -n zillaws` in a child process."""

from __future__ import annotations

import signal

from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.trial import unittest

from zillatw.test.process_support import start_own_gateway, start_twistd
from zillatw.test.support import (
    OnAClock,
    chain,
    connect_raw,
    connect_ws,
    eventually,
    free_port,
    parse_server_frames,
    proxy_config,
    split_response,
    start_upstream,
    upgrade_request,
)


class StopServiceTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_every_websocket_gets_1001_and_stop_waits_for_them(self):
        gateway, port = yield start_own_gateway(self, chain())
        clients = yield defer.gatherResults([connect_ws(port) for _ in range(5)])
        stopped = gateway.stopService()
        results = yield defer.gatherResults([client.closed for client in clients])
        self.assertEqual([result[:2] for result in results], [(True, 1001)] * 5)
        self.assertEqual({result[2] for result in results}, {"going away"})
        yield stopped
        self.assertEqual(gateway.binding("ws0").open_count(), 0)
        yield self.assertFailure(connect_ws(port), ConnectionRefusedError)  # no longer accepting

    def test_a_peer_that_does_not_close_is_dropped_at_the_drain_timeout(self):
        config = chain(ws_options={"close-timeout": 30})  # only the drain timeout can end it
        on = OnAClock(config, drain_timeout=0.5)
        connection, transport = on.connect()
        connection.dataReceived(upgrade_request())
        self.assertIn(b"101 Switching Protocols", transport.value())
        start = transport.value().index(b"\r\n\r\n") + 4
        stopped = on.gateway.stopService()
        frames = parse_server_frames(transport.value()[start:])
        self.assertEqual(frames[0][0], 0x8)
        self.assertEqual(int.from_bytes(frames[0][2][:2], "big"), 1001)
        on.clock.pump([0.01] * 48)
        self.assertNoResult(stopped)  # the peer has not answered: still draining at 0.48 s
        self.assertFalse(transport.disconnected)
        on.clock.pump([0.01] * 3)
        self.successResultOf(stopped)  # and dropped once the 0.5 s are up
        self.assertTrue(transport.disconnected)

    @defer.inlineCallbacks
    def test_a_request_still_being_read_gets_503(self):
        gateway, port = yield start_own_gateway(self, chain())
        raw = yield connect_raw(port)
        raw.transport.write(upgrade_request()[:20])
        yield eventually(lambda: gateway.binding("http0").open_count() == 1)
        yield gateway.stopService()
        yield raw.done
        status, headers, _ = split_response(raw.data)
        self.assertEqual((status, headers["connection"]), ("HTTP/1.1 503 Service Unavailable", "close"))

    @defer.inlineCallbacks
    def test_proxied_connections_close_with_1001_on_both_sides(self):
        upstream, upstream_port = start_upstream(self)
        gateway, port = yield start_own_gateway(self, proxy_config(upstream_port))
        clients = yield defer.gatherResults([connect_ws(port, protocols=["echo"]) for _ in range(3)])
        yield eventually(lambda: len(upstream.connections) == 3)
        yield gateway.stopService()
        results = yield defer.gatherResults([client.closed for client in clients])
        self.assertEqual([result[1] for result in results], [1001] * 3)
        self.assertEqual([code for code, _ in upstream.closes], [1001] * 3)
        self.assertEqual(gateway.binding("south_ws_client").open_count(), 0)


class SignalTests(unittest.TestCase):
    """twistd as users run it; SIGTERM drains and exits 0, a second signal exits at once."""

    @defer.inlineCallbacks
    def start_twistd(self, ws_options=None, extra_args=()):
        port = free_port()
        config = chain(ws_options=ws_options)
        config["bindings"]["tcp0"]["options"]["port"] = port
        _, child, process = yield start_twistd(self, config, *extra_args)
        return child, process, port

    @defer.inlineCallbacks
    def test_sigterm_closes_100_websockets_with_1001_and_exits_0_within_the_drain_timeout(self):
        child, process, port = yield self.start_twistd(extra_args=["--drain-timeout", "5"])
        clients = yield defer.gatherResults([connect_ws(port) for _ in range(100)])
        clients[0].sendMessage(b"all open")
        self.assertEqual((yield clients[0].messages.get())[1], [b"all open"])
        process.signalProcess(signal.SIGTERM)
        results = yield defer.gatherResults([client.closed for client in clients])
        code, signal_number = yield child.ended
        # every close clean: none was left for the drain timeout to abort
        self.assertEqual([result[:2] for result in results], [(True, 1001)] * 100)
        self.assertEqual((code, signal_number), (0, None), child.out)
        self.assertIn(b"SIGTERM received", child.out)
        self.assertIn(b"closing 100 connections", child.out)

    @defer.inlineCallbacks
    def test_sigint_drains_too(self):
        child, process, port = yield self.start_twistd()
        client = yield connect_ws(port)
        process.signalProcess(signal.SIGINT)
        _, code, _ = yield client.closed
        self.assertEqual(code, 1001)
        self.assertEqual((yield child.ended), (0, None))

    @defer.inlineCallbacks
    def test_a_second_signal_exits_at_once(self):
        # A client that never answers the close: without the second signal the process
        # would wait the whole drain timeout (60 s).
        child, process, port = yield self.start_twistd(ws_options={"close-timeout": 60},
                                                       extra_args=["--drain-timeout", "60"])
        raw = yield connect_raw(port)
        raw.transport.write(upgrade_request())
        yield eventually(lambda: b"\r\n\r\n" in raw.data)
        start = raw.data.index(b"\r\n\r\n") + 4
        process.signalProcess(signal.SIGTERM)
        yield eventually(lambda: parse_server_frames(raw.data[start:]), timeout=10)  # the 1001 went out
        self.assertFalse(child.ended.called)  # and the process waits for the peer
        process.signalProcess(signal.SIGTERM)
        code, signal_number = yield child.ended
        self.assertEqual((code, signal_number), (None, signal.SIGTERM))  # not the drain's end, which exits 0
        raw.transport.loseConnection()
        yield raw.done

    @defer.inlineCallbacks
    def test_idle_gateway_exits_0_at_once(self):
        # a drain timeout longer than the test's own: an idle gateway must not wait for it
        child, process, port = yield self.start_twistd(extra_args=["--drain-timeout", "600"])
        process.signalProcess(signal.SIGTERM)
        self.assertEqual((yield child.ended), (0, None))
        self.assertIn(b"Main loop terminated.", child.out)
