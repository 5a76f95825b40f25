"""The relay's fast path: frame helpers (zillatw.wsframes), writing through to the socket
(zillatw.writethrough), and frames that must still take Autobahn's path end to end."""

from __future__ import annotations

import os

from autobahn.websocket.xormasker import create_xor_masker
from twisted.internet import defer, reactor, tcp
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from zillatw import writethrough, wsframes
from zillatw.test.support import (chain, client_frame, connect_raw, connect_ws, close_ws, parse_server_frames,
                                  split_response, start_gateway, upgrade_request, wait)

SIZES = (0, 1, 3, 4, 5, 125, 126, 1023, 1024, 1025, 4099, 65535, 65536, 70001)


class MaskTests(unittest.TestCase):
    def test_same_as_autobahn_for_every_size(self):
        for size in SIZES:
            data, mask = os.urandom(size), os.urandom(4)
            expected = create_xor_masker(mask, size).process(data) if size else b""
            self.assertEqual(wsframes.apply_mask(data, mask), expected, size)
            self.assertEqual(wsframes._py_apply_mask(data, mask), expected, size)  # without websockets' C code

    def test_masking_twice_gives_the_data_back(self):
        data, mask = os.urandom(300), b"\xff\x00\x81\x7e"
        self.assertEqual(wsframes.apply_mask(wsframes.apply_mask(data, mask), mask), data)


class FrameTests(unittest.TestCase):
    def test_encoded_frames_parse_back(self):
        for size in SIZES:
            for opcode in (1, 2):
                payload = b"a" * size
                for masked in (False, True):
                    frame = wsframes.encode_frame(opcode, payload, True, masked)
                    found = wsframes.whole_message(frame, masked, 0xFFFF)
                    if size > 0xFFFF:
                        self.assertIsNone(found)  # 8-byte lengths are Autobahn's
                        continue
                    op, start, end = found
                    self.assertEqual((op, end), (opcode, len(frame)))
                    body = frame[start:end]
                    if masked:
                        body = wsframes.apply_mask(body, frame[start - 4:start])
                    self.assertEqual(body, payload)

    def test_same_bytes_as_the_hand_built_client_frame(self):
        frame = wsframes.encode_frame(2, b"hello", True, masked=True)
        self.assertEqual(frame, client_frame(2, b"hello", mask=frame[2:6]))
        self.assertEqual(parse_server_frames(wsframes.encode_frame(1, b"x" * 200, False, masked=False)),
                         [(1, False, b"x" * 200)])

    def test_partial_frame_says_how_much_it_needs(self):
        frame = client_frame(2, b"z" * 300)
        self.assertEqual(wsframes.whole_message(frame[:100], True, 0xFFFF), len(frame))

    def test_everything_else_is_left_to_autobahn(self):
        cases = {
            "fragment": client_frame(2, b"a", fin=False),
            "continuation": client_frame(0, b"a"),
            "ping": client_frame(9, b"a"),
            "close": client_frame(8, b"\x03\xe8"),
            "rsv1 (deflate)": client_frame(2, b"a", rsv=4),
            "reserved opcode": client_frame(3, b"a"),
            "unmasked from a client": wsframes.encode_frame(2, b"a", True, masked=False),
            "over the limit": client_frame(2, b"a" * 200),
            "8-byte length": client_frame(2, b"a" * 65536),
            "non-minimal length": b"\x82\xfe\x00\x05\x00\x00\x00\x00hello",
            "one byte": b"\x82",
        }
        for name, frame in cases.items():
            self.assertIsNone(wsframes.whole_message(frame, True, 100), name)
        self.assertIsNone(wsframes.whole_message(client_frame(2, b"a"), False, 100), "masked to a client")


class _Sink(Protocol):
    def __init__(self):
        self.data = b""

    def dataReceived(self, data):
        self.data += data


class WriteThroughTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_an_idle_tcp_transport_sends_at_once(self):
        factory = Factory.forProtocol(_Sink)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = yield connect_raw(port.getHost().port)
        self.addCleanup(client.transport.loseConnection)
        transport = client.transport
        # The Twisted internals writethrough reads; a release that renames them fails here.
        self.assertIsInstance(transport, tcp.Client)
        for name in ("dataBuffer", "_tempDataBuffer", "connected", "disconnecting", "_aborting",
                     "_writeDisconnecting", "TLS"):
            self.assertTrue(hasattr(transport, name), name)
        writethrough.write(transport, b"hello")
        self.assertNotIn(transport, reactor.getWriters())  # sent, not registered for writing
        self.assertEqual((transport.dataBuffer, transport._tempDataBuffer), (b"", []))

        transport.write(b" buffered")  # something waits: the next write queues behind it
        writethrough.write(transport, b" world")
        self.assertEqual(transport._tempDataBuffer, [b" buffered", b" world"])

    def test_other_transports_are_written_to(self):
        transport = StringTransport()
        writethrough.write(transport, b"abc")
        self.assertEqual(transport.value(), b"abc")


class EndToEndTests(unittest.TestCase):
    """Frames the fast path must leave to Autobahn still get Autobahn's answers."""

    @defer.inlineCallbacks
    def raw(self, *frames):
        gateway, port = yield start_gateway(self, chain(ws_options={"max-message-size": 1000, "close-timeout": 0.2}))
        client = yield connect_raw(port)
        client.transport.write(upgrade_request())
        yield client.until(4)
        while b"\r\n\r\n" not in client.data:
            yield client.until(len(client.data) + 1)
        start = len(client.data) - len(split_response(client.data)[2])
        client.transport.write(b"".join(frames))
        data = yield client.done
        return parse_server_frames(data[start:])

    @defer.inlineCallbacks
    def test_invalid_utf8_in_one_frame_is_1007(self):
        frames = yield self.raw(client_frame(1, "héllo".encode() + b"\xff"))
        self.assertEqual(frames[-1][0], 8)
        self.assertEqual(frames[-1][2][:2], b"\x03\xef")

    @defer.inlineCallbacks
    def test_valid_then_over_the_limit(self):
        frames = yield self.raw(client_frame(2, b"ok"), client_frame(1, "ü".encode()), client_frame(2, b"x" * 1001))
        self.assertEqual(frames[:2], [(2, True, b"ok"), (1, True, "ü".encode())])
        self.assertEqual(frames[-1][0], 8)
        self.assertEqual(frames[-1][2][:2], b"\x03\xf1")  # 1009 message too big

    @defer.inlineCallbacks
    def test_unmasked_frame_is_1002(self):
        frames = yield self.raw(wsframes.encode_frame(2, b"a", True, masked=False))
        self.assertEqual(frames[-1][2][:2], b"\x03\xea")

    @defer.inlineCallbacks
    def test_frames_split_across_reads_and_batched_in_one(self):
        gateway, port = yield start_gateway(self, chain())
        client = yield connect_ws(port)
        payloads = [os.urandom(n) for n in (10, 3000, 60000, 0, 125, 126)]
        raw = b"".join(wsframes.encode_frame(2, p, True, masked=True) for p in payloads)
        client.transport.write(raw[:7])  # a header in two pieces
        yield wait(0.05)
        client.transport.write(raw[7:])  # the rest and several frames in one write
        for payload in payloads:
            binary, frames = yield client.messages.get()
            self.assertEqual((binary, b"".join(frames)), (True, payload))
        yield close_ws(client)

    @defer.inlineCallbacks
    def test_whole_messages_bypass_autobahns_frame_parser(self):
        gateway, port = yield start_gateway(self, chain())
        client = yield connect_ws(port)
        (server,) = gateway.binding("ws0").connections
        parsed = []
        begin = server.onFrameBegin  # Autobahn's per-frame hook

        def onFrameBegin():
            parsed.append(server.current_frame.opcode)
            begin()
        server.onFrameBegin = onFrameBegin
        client.sendMessage(b"fast", True)
        client.sendMessage("fäst".encode(), False)
        self.assertEqual((yield client.messages.get()), (True, [b"fast"]))
        self.assertEqual((yield client.messages.get()), (False, ["fäst".encode()]))
        self.assertEqual(parsed, [])
        yield close_ws(client)
        self.assertEqual(parsed, [8])  # the close frame is Autobahn's
