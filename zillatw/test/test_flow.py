"""Flow control and fan-out under load, measured in bytes buffered, not in time."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from zillatw.test.support import (
    assert_echoed_under_back_pressure,
    chain,
    close_ws,
    connect_ws,
    start_gateway,
)

MESSAGE = 64 * 1024


class EchoBackPressureTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_client_that_does_not_read_stops_being_read(self):
        # no keepalive pings: this client neither reads nor answers them while it is paused,
        # and a slow machine can take longer than the ping interval here
        gateway, port = yield start_gateway(self, chain(ws_options={"ping-interval": 0}))
        count = 400  # 25 MiB: more than loopback's socket buffers hold
        yield assert_echoed_under_back_pressure(self, gateway, port, [bytes([i % 251]) * MESSAGE for i in range(count)])


class FanTests(unittest.TestCase):
    def config(self):
        return chain(apps={
            "fan": {"type": "fan", "kind": "server", "exit": "echo"},
            "echo": {"type": "echo", "kind": "server"},
        }, ws_routes=[{"exit": "fan"}])

    @defer.inlineCallbacks
    def test_fragmented_messages_from_members_do_not_interleave(self):
        gateway, port = yield start_gateway(self, self.config())
        a = yield connect_ws(port)
        b = yield connect_ws(port)
        a.sendFrame(1, b"a1", fin=False)
        b.sendMessage(b"b-whole")
        a.sendFrame(0, b"a2", fin=True)
        for client in (a, b):
            first = yield client.messages.get()
            second = yield client.messages.get()
            self.assertEqual([b"".join(first[1]), b"".join(second[1])], [b"b-whole", b"a1a2"])
        yield close_ws(a)
        yield close_ws(b)
