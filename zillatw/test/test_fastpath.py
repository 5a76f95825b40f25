"""The relay's fast path end to end: the core's frame helpers (zillatw.wire.frames) against
other implementations, and frames that must leave the core's fast path for its general
parser. Writing through to the socket is zillatw.twistedcompat's (test_twistedcompat)."""

from __future__ import annotations

import os

from autobahn.websocket.xormasker import create_xor_masker
from twisted.internet import defer
from twisted.trial import unittest

from zillatw.test.support import (
    chain,
    client_frame,
    close_ws,
    connect_raw,
    connect_ws,
    parse_server_frames,
    split_response,
    start_gateway,
    upgrade_request,
    wait,
)
from zillatw.wire import connection, frames
from zillatw.wire.frames import encode_frame, parse_head

SIZES = (0, 1, 3, 4, 5, 125, 126, 1023, 1024, 1025, 4099, 65535, 65536, 70001)


class MaskTests(unittest.TestCase):
    def test_same_as_autobahn_for_every_size(self):
        for size in SIZES:
            data, mask = os.urandom(size), os.urandom(4)
            expected = create_xor_masker(mask, size).process(data) if size else b""
            self.assertEqual(frames.apply_mask(data, mask), expected, size)
            self.assertEqual(frames._py_apply_mask(data, mask), expected, size)  # without websockets' C code

    def test_masking_twice_gives_the_data_back(self):
        data, mask = os.urandom(300), b"\xff\x00\x81\x7e"
        self.assertEqual(frames.apply_mask(frames.apply_mask(data, mask), mask), data)


class FrameTests(unittest.TestCase):
    def test_encoded_frames_parse_back(self):
        for size in SIZES:
            for opcode in (1, 2):
                payload = b"a" * size
                for masked in (False, True):
                    frame = b"".join(encode_frame(opcode, payload, True, masked))
                    first, length, start, mask = parse_head(frame, 0, masked, False)
                    self.assertEqual((first & 0x0F, start + length), (opcode, len(frame)))
                    body = frame[start:]
                    if masked:
                        body = frames.apply_mask(body, mask)
                    self.assertEqual(body, payload)

    def test_same_bytes_as_the_hand_built_client_frame(self):
        frame = b"".join(encode_frame(2, b"hello", True, masked=True))
        self.assertEqual(frame, client_frame(2, b"hello", mask=frame[2:6]))
        self.assertEqual(parse_server_frames(b"".join(encode_frame(1, b"x" * 200, False, masked=False))),
                         [(1, False, b"x" * 200)])

    def test_a_big_payload_is_not_copied(self):
        payload = os.urandom(100000)
        head, body = encode_frame(2, payload, True, masked=False)
        self.assertIs(body, payload)


class EndToEndTests(unittest.TestCase):
    """Frames the core's fast path must leave to its general parser still get its answers."""

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
        frames = yield self.raw(b"".join(encode_frame(2, b"a", True, masked=False)))
        self.assertEqual(frames[-1][2][:2], b"\x03\xea")

    @defer.inlineCallbacks
    def test_frames_split_across_reads_and_batched_in_one(self):
        gateway, port = yield start_gateway(self, chain())
        client = yield connect_ws(port)
        payloads = [os.urandom(n) for n in (10, 3000, 60000, 0, 125, 126)]
        raw = b"".join(b"".join(encode_frame(2, p, True, masked=True)) for p in payloads)
        client.transport.write(raw[:7])  # a header in two pieces
        yield wait(0.05)
        client.transport.write(raw[7:])  # the rest and several frames in one write
        for payload in payloads:
            binary, frames = yield client.messages.get()
            self.assertEqual((binary, b"".join(frames)), (True, payload))
        yield close_ws(client)

    @defer.inlineCallbacks
    def test_whole_small_messages_bypass_the_general_frame_parser(self):
        parsed = []

        def counting(data, pos, *args):
            parsed.append(data[pos] & 0x0F)
            return parse_head(data, pos, *args)
        self.patch(connection, "parse_head", counting)
        gateway, port = yield start_gateway(self, chain())
        client = yield connect_ws(port)
        client.sendMessage(b"fast", True)
        client.sendMessage("fäst".encode(), False)
        self.assertEqual((yield client.messages.get()), (True, [b"fast"]))
        self.assertEqual((yield client.messages.get()), (False, ["fäst".encode()]))
        self.assertEqual(parsed, [])
        yield close_ws(client)
        self.assertEqual(parsed, [8])  # the close frame takes the general path
