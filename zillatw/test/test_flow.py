"""Flow control and fan-out under load, measured in bytes buffered, not in time."""

from __future__ import annotations

import hashlib

from twisted.internet import defer, reactor
from twisted.trial import unittest

from zillatw.test.support import (
    buffered,
    chain,
    client_frame,
    close_ws,
    connect_ws,
    eventually,
    parse_server_frames,
    raw_ws,
    start_gateway,
)

MESSAGE = 64 * 1024


class EchoBackPressureTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_client_that_does_not_read_stops_being_read(self):
        # no keepalive pings: this client neither reads nor answers them while it is paused,
        # and a slow machine can take longer than the ping interval here
        gateway, port = yield start_gateway(self, chain(ws_options={"ping-interval": 0}))
        client, start = yield raw_ws(port)
        client.transport.pauseProducing()  # the client stops reading its socket
        count = 400  # 25 MiB: more than loopback's socket buffers hold
        payloads = [bytes([i % 251]) * MESSAGE for i in range(count)]
        client.transport.writeSequence([client_frame(0x2, p) for p in payloads])
        server = yield self._server_connection(gateway)

        # The gateway stops reading from a client it cannot write to, so what it holds stays
        # near one socket read plus Twisted's 64 KiB write threshold.
        yield eventually(lambda: server.transport not in reactor.getReaders(), timeout=10)
        peak = buffered(server.transport)
        self.assertLess(peak, 1024 * 1024)
        self.assertGreater(buffered(client.transport), 0, "the sender was not held back")

        # Nothing is lost once the client reads again.
        client.transport.resumeProducing()
        expected = start + count * (10 + MESSAGE)  # 64 KiB needs the 8-byte length form
        yield client.until(expected)
        frames = parse_server_frames(client.data[start:])
        self.assertEqual(len(frames), count)
        self.assertEqual(hashlib.sha256(b"".join(f[2] for f in frames)).digest(),
                         hashlib.sha256(b"".join(payloads)).digest())
        client.transport.loseConnection()
        yield client.done

    @defer.inlineCallbacks
    def _server_connection(self, gateway):
        ws = gateway.binding("ws0")
        yield eventually(lambda: len(ws.connections) == 1)
        return next(iter(ws.connections))


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
