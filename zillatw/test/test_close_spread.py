"""`--close-spread SECONDS`: a stop's 1001 closes spread evenly over the window, on a Clock;
through real sockets, proxied connections still close with 1001 on both sides; and the flag
through `twistd zillaws`."""

from __future__ import annotations

import signal
from typing import Any

from twisted.internet import defer
from twisted.python import usage
from twisted.trial import unittest

from zillatw.runtime.closespread import CloseSpread
from zillatw.tap import Options
from zillatw.test.process_support import start_own_gateway, start_twistd
from zillatw.test.support import (
    OnAClock,
    chain,
    connect_ws,
    eventually,
    free_port,
    parse_server_frames,
    proxy_config,
    start_upstream,
    upgrade_request,
)

TICK = 0.001


def open_websockets(on: OnAClock, count: int) -> list[tuple[Any, Any, int]]:
    """`count` upgraded connections: (protocol, transport, where the frames start)."""
    opened = []
    for n in range(count):
        connection, transport = on.connect(client_port=40000 + n)
        connection.dataReceived(upgrade_request())
        assert b"101 Switching Protocols" in transport.value(), transport.value()
        opened.append((connection, transport, transport.value().index(b"\r\n\r\n") + 4))
    return opened


def close_code(transport: Any, start: int) -> int | None:
    frames = [f for f in parse_server_frames(transport.value()[start:]) if f[0] == 0x8]
    return int.from_bytes(frames[0][2][:2], "big") if frames else None


def close_times(on: OnAClock, opened: list[tuple[Any, Any, int]], until: float) -> list[float]:
    """Move the clock by TICK up to `until` s, noting when each connection got its close
    (per connection, in the order of `opened`)."""
    began = on.clock.seconds()
    seen: dict[int, float] = {}
    while True:
        for n, (_, transport, start) in enumerate(opened):
            if n not in seen and close_code(transport, start) is not None:
                seen[n] = round(on.clock.seconds() - began, 6)
        if on.clock.seconds() - began >= until:
            break
        on.clock.advance(TICK)
    return [seen[n] for n in sorted(seen)]


def spread_calls(on: OnAClock) -> list[Any]:
    return [call for call in on.clock.getDelayedCalls()
            if call.active() and isinstance(getattr(getattr(call, "func", None), "__self__", None), CloseSpread)]


class CloseSpreadOnAClockTests(unittest.SynchronousTestCase):
    def test_100_connections_spread_over_2_s_get_their_closes_at_even_intervals(self):
        on = OnAClock(chain(ws_options={"close-timeout": 30}), drain_timeout=5.0, close_spread=2.0)
        opened = open_websockets(on, 100)
        stopped = on.gateway.stopService()
        times = sorted(close_times(on, opened, 2.5))  # in the order the server chose
        self.assertEqual(len(times), 100)
        self.assertEqual({close_code(t, s) for _, t, s in opened}, {1001})
        self.assertEqual(times[0], 0.0)  # the first at once
        self.assertLess(times[-1], 2.0)  # the last within the window
        gaps = sorted(b - a for a, b in zip(times, times[1:], strict=False))
        # i * 2 s / 100: every 20 ms, to within a tick of the clock the test moves
        self.assertGreaterEqual(gaps[0], 0.02 - TICK - 1e-9)
        self.assertLessEqual(gaps[-1], 0.02 + TICK + 1e-9)
        self.assertLessEqual(abs(times[-1] - 1.98), TICK + 1e-9)  # the 100th at 99 * 20 ms
        # No peer answered: the drain ends at its timeout, dropping them all.
        self.assertNoResult(stopped)
        on.clock.pump([0.05] * 60)
        self.successResultOf(stopped)
        self.assertTrue(all(t.disconnected for _, t, _ in opened))

    def test_no_spread_closes_all_at_once(self):
        on = OnAClock(chain(), drain_timeout=5.0)
        opened = open_websockets(on, 20)
        on.gateway.stopService()
        self.assertEqual(close_times(on, opened, 0.0), [0.0] * 20)

    def test_connections_gone_meanwhile_are_skipped_and_the_drain_ends_when_all_are(self):
        on = OnAClock(chain(ws_options={"close-timeout": 30}), drain_timeout=5.0, close_spread=1.0)
        opened = open_websockets(on, 10)
        for connection, _, _ in opened[5:]:  # half of them leave before their turn
            connection.connectionLost(None)
        stopped = on.gateway.stopService()
        self.assertEqual(sorted(close_times(on, opened[:5], 1.0)), [0.0, 0.2, 0.4, 0.6, 0.8])
        for connection, _, _ in opened[:5]:  # the peers answer (their socket closes)
            connection.connectionLost(None)
        on.clock.advance(0.02)
        self.successResultOf(stopped)
        self.assertEqual(spread_calls(on), [])  # nothing of the spread is left waiting

    def test_the_drain_timeout_cancels_what_is_left_of_a_spread(self):
        on = OnAClock(chain(ws_options={"close-timeout": 30}), drain_timeout=1.0, close_spread=1.0)
        opened = open_websockets(on, 4)
        stopped = on.gateway.stopService()
        on.clock.pump([0.01] * 110)
        self.successResultOf(stopped)
        self.assertTrue(all(t.disconnected for _, t, _ in opened))
        self.assertEqual(spread_calls(on), [])

    def test_many_closes_due_within_a_tick_go_out_together(self):
        clock = OnAClock(chain()).clock
        calls: list[float] = []
        spread = CloseSpread(clock, 0.01, [lambda: calls.append(clock.seconds()) for _ in range(1000)])
        spread.start()
        reactor_calls = 0
        while not spread.done():
            reactor_calls += 1
            clock.advance(0.005)
        self.assertEqual(len(calls), 1000)
        self.assertLessEqual(reactor_calls, 3)  # not one reactor call per connection
        self.assertLess(calls[-1] - calls[0], 0.01 + 1e-9)


class CloseSpreadOptionTests(unittest.SynchronousTestCase):
    def test_a_spread_longer_than_the_drain_timeout_is_refused_by_name(self):
        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions(["--close-spread", "20"])
        self.assertEqual(str(caught.exception), "--close-spread 20: longer than --drain-timeout 10; "
                                                "the closes must all be sent within the drain")
        with self.assertRaises(usage.UsageError):
            Options().parseOptions(["--close-spread", "-1"])
        options = Options()
        options.parseOptions(["--close-spread", "20", "--drain-timeout", "30"])
        self.assertEqual((options["close-spread"], options["drain-timeout"]), (20.0, 30.0))
        self.assertEqual(Options()["close-spread"], 0.0)

    def test_the_embedding_api_refuses_it_too(self):
        with self.assertRaises(ValueError):
            OnAClock(chain(), drain_timeout=1.0, close_spread=2.0)


class CloseSpreadProxyTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_proxied_connections_close_with_1001_on_both_sides(self):
        upstream, upstream_port = start_upstream(self)
        gateway, port = yield start_own_gateway(self, proxy_config(upstream_port))
        gateway.close_spread = 0.2
        clients = yield defer.gatherResults([connect_ws(port, protocols=["echo"]) for _ in range(3)])
        yield eventually(lambda: len(upstream.connections) == 3)
        yield gateway.stopService()
        results = yield defer.gatherResults([client.closed for client in clients])
        self.assertEqual([result[1] for result in results], [1001] * 3)
        self.assertEqual([code for code, _ in upstream.closes], [1001] * 3)


class CloseSpreadTwistdTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_sigterm_with_a_spread_closes_every_websocket_with_1001_and_exits_0(self):
        port = free_port()
        config = chain()
        config["bindings"]["tcp0"]["options"]["port"] = port
        _, child, process = yield start_twistd(self, config, "--drain-timeout", "5", "--close-spread", "0.5")
        clients = yield defer.gatherResults([connect_ws(port) for _ in range(20)])
        process.signalProcess(signal.SIGTERM)
        results = yield defer.gatherResults([client.closed for client in clients])
        self.assertEqual([result[:2] for result in results], [(True, 1001)] * 20)
        self.assertEqual((yield child.ended), (0, None), child.out)
        self.assertIn(b"closing 20 connections over 0.5 s", child.out)
