"""zillatw.wire framing, bytes in and events out: Autobahn testsuite groups 1 (framing),
2 (pings and pongs), 3 (reserved bits) and 4 (opcodes), masking and length encodings."""

from __future__ import annotations

import os
import struct

from twisted.trial.unittest import SynchronousTestCase

from zillatw.test.wire_support import (
    MASK,
    close_payload,
    failure,
    failure_code,
    feed,
    messages,
    raw_frame,
    read_frames,
    sent,
    server,
    xor,
)
from zillatw.wire import CloseCode, Connection, Fragment, Opcode, Ping, Pong, Role, State
from zillatw.wire.frames import _py_apply_mask, apply_mask, encode_frame, frame_head, parse_head, rotate_mask


class MaskTests(SynchronousTestCase):
    def test_masks_as_the_rfc_says(self) -> None:
        for size in (0, 1, 3, 4, 5, 125, 1000, 70000):
            data = os.urandom(size)
            self.assertEqual(apply_mask(data, MASK), xor(data, MASK))
            self.assertEqual(_py_apply_mask(data, MASK), xor(data, MASK))

    def test_rotated_mask_continues_a_payload_read_in_pieces(self) -> None:
        data = os.urandom(37)
        masked = xor(data, MASK)
        pieces, offset = [], 0
        for size in (3, 1, 6, 27):
            pieces.append(apply_mask(masked[offset:offset + size], rotate_mask(MASK, offset)))
            offset += size
        self.assertEqual(b"".join(pieces), data)


class EncodeTests(SynchronousTestCase):
    def test_lengths_are_minimal(self) -> None:
        for size, head_size in ((0, 2), (125, 2), (126, 4), (0xFFFF, 4), (0x10000, 10)):
            head, payload = encode_frame(Opcode.BINARY, b"x" * size)
            self.assertEqual(len(head), head_size)
            self.assertEqual(read_frames(head + payload), [(True, 0, 2, b"x" * size)])

    def test_client_frames_are_masked_with_a_fresh_mask(self) -> None:
        one = encode_frame(Opcode.TEXT, b"hello", masked=True)
        two = encode_frame(Opcode.TEXT, b"hello", masked=True)
        self.assertEqual(one[0][1] & 0x80, 0x80)
        self.assertNotEqual(one[0][2:6], two[0][2:6])
        self.assertEqual(read_frames(b"".join(one)), [(True, 0, 1, b"hello")])

    def test_head_with_rsv1_and_no_fin(self) -> None:
        self.assertEqual(frame_head(0x40 | 0x1, 5), b"\x41\x05")

    def test_big_payload_is_not_concatenated(self) -> None:
        conn = Connection(Role.SERVER)
        payload = os.urandom(4096)
        chunks = conn.encode_fragment(Opcode.BINARY, payload)
        self.assertEqual(len(chunks), 2)
        self.assertIs(chunks[1], payload)  # the caller's bytes, as they are (no mask, no copy)


class ParseHeadTests(SynchronousTestCase):
    def test_incomplete_heads(self) -> None:
        frame = raw_frame(2, b"x" * 70000)
        for cut in range(0, 14):
            self.assertIsNone(parse_head(frame[:cut], 0, True, False))
        self.assertEqual(parse_head(frame, 0, True, False), (0x82, 70000, 14, MASK))

    def test_refusals(self) -> None:
        cases = {
            "reserved bits": raw_frame(1, b"x", rsv=2),
            "reserved opcode": raw_frame(3),
            "must be masked": raw_frame(1, b"x", mask=None),
            "16-bit length": raw_frame(2, b"x" * 125, length_form=16),
            "64-bit length used": raw_frame(2, b"x" * 0xFFFF, length_form=64),
            "fragmented control": raw_frame(9, fin=False),
            "longer than 125": raw_frame(9, b"x" * 126),
            "most significant bit": struct.pack("!BBQ", 0x82, 0xFF, 1 << 63) + MASK,
        }
        for words, frame in cases.items():
            with self.assertRaises(Exception) as caught:
                parse_head(frame, 0, True, False)
            self.assertIn(words, caught.exception.reason)
            self.assertEqual(caught.exception.code, CloseCode.PROTOCOL_ERROR)


class FramingTests(SynchronousTestCase):
    """Group 1: text and binary messages of every length encoding, whole and in pieces."""

    SIZES = (0, 125, 126, 127, 128, 0xFFFF, 0x10000, 0x10001, 1 << 20)

    def test_whole_frames(self) -> None:
        for opcode in (1, 2):
            for size in self.SIZES:
                payload = b"*" * size
                events = feed(server(), raw_frame(opcode, payload))
                self.assertEqual(events, [Fragment(Opcode(opcode), payload, True)])

    def test_frames_arriving_byte_by_byte_and_in_pieces(self) -> None:
        for opcode in (1, 2):
            for size in (0, 125, 126, 0xFFFF, 0x10000):
                payload = bytes(range(48, 58)) * (size // 10) + b"0" * (size % 10)
                frame = raw_frame(opcode, payload)
                for step in (1, 997) if size < 200 else (997, 65536):
                    conn = server()
                    events = feed(conn, *(frame[i:i + step] for i in range(0, len(frame), step)))
                    self.assertEqual(messages(events), [(opcode, payload)])
                    self.assertIsNone(failure(events))

    def test_stream_delivery_hands_over_payload_as_it_arrives(self) -> None:
        payload = os.urandom(1 << 20)
        frame = raw_frame(2, payload)
        conn = server()
        delivered = 0
        for i in range(0, len(frame), 65536):
            events = feed(conn, frame[i:i + 65536])
            delivered += sum(len(e.data) for e in events)
            # all but the head's 14 bytes of what came is handed on at once
            self.assertEqual(delivered, min(i + 65536, len(frame)) - 14)
        self.assertEqual(delivered, len(payload))

    def test_several_frames_in_one_read(self) -> None:
        data = raw_frame(1, b"one") + raw_frame(2, b"two") + raw_frame(1, b"three"[:2])
        self.assertEqual(messages(feed(server(), data)), [(1, b"one"), (2, b"two"), (1, b"th")])

    def test_client_role_reads_unmasked_frames_and_refuses_masked_ones(self) -> None:
        client = Connection(Role.CLIENT)
        self.assertEqual(messages(feed(client, raw_frame(1, b"hi", mask=None))), [(1, b"hi")])
        events = feed(client, raw_frame(1, b"hi"))
        self.assertEqual(failure(events), (CloseCode.PROTOCOL_ERROR, "server frames must not be masked"))
        frames = sent(client)
        self.assertEqual(frames[0][2], Opcode.CLOSE)
        self.assertEqual(frames[0][3][:2], b"\x03\xea")

    def test_server_role_refuses_unmasked_frames(self) -> None:
        conn = server()
        events = feed(conn, raw_frame(1, b"hi", mask=None))
        self.assertEqual(failure(events), (CloseCode.PROTOCOL_ERROR, "client frames must be masked"))
        self.assertIs(conn.state, State.CLOSED)

    def test_non_minimal_lengths_fail(self) -> None:
        for frame in (raw_frame(2, b"x" * 10, length_form=16), raw_frame(2, b"x" * 300, length_form=64)):
            events = feed(server(), frame)
            self.assertEqual(failure_code(events), CloseCode.PROTOCOL_ERROR)

    def test_server_sends_unmasked_frames(self) -> None:
        conn = server()
        conn.send_fragment(Opcode.TEXT, b"hello")
        data = b"".join(conn.data_to_send())
        self.assertEqual(data, b"\x81\x05hello")


class PingPongTests(SynchronousTestCase):
    """Group 2."""

    def test_ping_is_answered_with_its_payload(self) -> None:
        for payload in (b"", b"Hello, world!", os.urandom(125)):
            conn = server()
            self.assertEqual(feed(conn, raw_frame(9, payload)), [Ping(payload)])
            self.assertEqual(sent(conn), [(True, 0, Opcode.PONG, payload)])

    def test_ping_over_125_bytes_fails(self) -> None:
        conn = server()
        events = feed(conn, raw_frame(9, b"x" * 126))
        self.assertEqual(failure(events), (CloseCode.PROTOCOL_ERROR, "control frame longer than 125 bytes"))
        self.assertEqual([f[2] for f in sent(conn)], [Opcode.CLOSE])

    def test_ping_in_pieces(self) -> None:
        conn = server()
        frame = raw_frame(9, b"chopped ping")
        self.assertEqual(feed(conn, *(frame[i:i + 1] for i in range(len(frame)))), [Ping(b"chopped ping")])
        self.assertEqual(sent(conn), [(True, 0, Opcode.PONG, b"chopped ping")])

    def test_unsolicited_pong_is_only_an_event(self) -> None:
        conn = server()
        self.assertEqual(feed(conn, raw_frame(10, b"pong"), raw_frame(1, b"after")),
                         [Pong(b"pong"), Fragment(Opcode.TEXT, b"after", True)])
        self.assertEqual(sent(conn), [])

    def test_ten_pings_ten_pongs(self) -> None:
        conn = server()
        feed(conn, b"".join(raw_frame(9, b"p%d" % i) for i in range(10)))
        self.assertEqual([f[3] for f in sent(conn)], [b"p%d" % i for i in range(10)])

    def test_without_auto_pong_the_caller_answers(self) -> None:
        conn = server(auto_pong=False)
        self.assertEqual(feed(conn, raw_frame(9, b"x")), [Ping(b"x")])
        self.assertEqual(sent(conn), [])
        conn.send_pong(b"x")
        self.assertEqual(sent(conn), [(True, 0, Opcode.PONG, b"x")])

    def test_send_ping_over_125_bytes_is_refused(self) -> None:
        with self.assertRaises(Exception) as caught:
            server().send_ping(b"x" * 126)
        self.assertIn("at most 125 bytes", str(caught.exception))


class ReservedBitsTests(SynchronousTestCase):
    """Group 3: any RSV bit without an extension fails, after what came before it."""

    def test_each_reserved_bit_combination(self) -> None:
        for rsv in range(1, 8):
            for opcode in (1, 2, 9):
                conn = server()
                events = feed(conn, raw_frame(1, b"before") + raw_frame(opcode, b"x", rsv=rsv)
                              + raw_frame(9, b"after"))
                self.assertEqual(events[0], Fragment(Opcode.TEXT, b"before", True))
                self.assertEqual(failure_code(events), CloseCode.PROTOCOL_ERROR)
                self.assertNotIn(Ping(b"after"), events)  # nothing after the failure is read
                self.assertEqual([f[2] for f in sent(conn)], [Opcode.CLOSE])


class OpcodeTests(SynchronousTestCase):
    """Group 4: reserved opcodes fail the connection, with or without a payload."""

    def test_reserved_opcodes(self) -> None:
        for opcode in (3, 4, 5, 6, 7, 11, 12, 13, 14, 15):
            for payload in (b"", b"reserved"):
                conn = server()
                events = feed(conn, raw_frame(1, b"ok") + raw_frame(opcode, payload) + raw_frame(9))
                self.assertEqual(messages(events), [(1, b"ok")])
                self.assertEqual(failure(events), (CloseCode.PROTOCOL_ERROR, f"reserved opcode {opcode}"))
                close = sent(conn)[-1]
                self.assertEqual(close[3], close_payload(1002, f"reserved opcode {opcode}".encode()))

    def test_nothing_is_read_after_a_failure(self) -> None:
        conn = server()
        feed(conn, raw_frame(3))
        self.assertEqual([f[2] for f in sent(conn)], [Opcode.CLOSE])
        self.assertEqual(feed(conn, raw_frame(1, b"late"), raw_frame(9)), [])
        self.assertEqual(sent(conn), [])
