"""zillatw.wire connections, bytes in and events out: Autobahn testsuite groups 5
(fragmentation), 6 (UTF-8), 7 (closing), 9 (limits, big messages) and 10 (fragmented
messages); the state table. (Random round trips, and real clients: test_wire_roundtrip.)"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from zillatw.test.wire_support import close_payload, failure, failure_code, feed, messages, raw_frame, sent, server
from zillatw.wire import (
    CloseCode,
    CloseReceived,
    Delivery,
    Fragment,
    LocalProtocolError,
    Opcode,
    Ping,
    State,
    clip_reason,
    is_wire_code,
)
from zillatw.wire.state import TRANSITIONS, Transition, next_state

KOSME = "κόσμε".encode()


class FragmentationTests(SynchronousTestCase):
    """Group 5."""

    def test_fragmented_control_frames_fail(self) -> None:
        for opcode in (9, 10):
            events = feed(server(), raw_frame(opcode, b"frag", fin=False) + raw_frame(0, b"ment"))
            self.assertEqual(failure(events), (CloseCode.PROTOCOL_ERROR, "fragmented control frame"))

    def test_fragments_are_relayed_with_opcode_and_fin(self) -> None:
        for opcode in (1, 2):
            events = feed(server(), raw_frame(opcode, b"frag", fin=False), raw_frame(0, b"men", fin=False),
                          raw_frame(0, b"t"))
            self.assertEqual(events, [Fragment(Opcode(opcode), b"frag", False),
                                      Fragment(Opcode.CONTINUATION, b"men", False),
                                      Fragment(Opcode.CONTINUATION, b"t", True)])

    def test_pings_inside_a_fragmented_message(self) -> None:
        conn = server()
        events = feed(conn, raw_frame(1, b"frag", fin=False) + raw_frame(9, b"ping") + raw_frame(0, b"ment"))
        self.assertEqual(events[1], Ping(b"ping"))
        self.assertEqual(messages(events), [(1, b"fragment")])
        self.assertEqual(sent(conn), [(True, 0, Opcode.PONG, b"ping")])

    def test_pings_between_fragments_arriving_byte_by_byte(self) -> None:
        data = (raw_frame(1, b"fr", fin=False) + raw_frame(9, b"a") + raw_frame(0, b"ag", fin=False)
                + raw_frame(9, b"b") + raw_frame(0, b"ment"))
        conn = server()
        events = feed(conn, *(data[i:i + 1] for i in range(len(data))))
        self.assertEqual(messages(events), [(1, b"fragment")])
        self.assertEqual([f[3] for f in sent(conn)], [b"a", b"b"])

    def test_continuation_without_a_message_fails(self) -> None:
        for fin in (True, False):
            events = feed(server(), raw_frame(0, b"orphan", fin=fin))
            self.assertEqual(failure(events), (CloseCode.PROTOCOL_ERROR, "continuation frame with no message begun"))

    def test_new_message_inside_a_fragmented_one_fails(self) -> None:
        for opcode in (1, 2):
            events = feed(server(), raw_frame(1, b"one", fin=False) + raw_frame(opcode, b"two"))
            self.assertEqual(failure(events),
                             (CloseCode.PROTOCOL_ERROR, "a new message began inside a fragmented one"))

    def test_empty_fragments(self) -> None:
        events = feed(server(), raw_frame(1, b"", fin=False) + raw_frame(0, b"", fin=False) + raw_frame(0, b""))
        self.assertEqual(messages(events), [(1, b"")])

    def test_message_delivery_gathers_a_message(self) -> None:
        """Group 10.1: a message in 1300-byte frames comes out whole when asked for."""
        payload = os.urandom(65536)
        frames = [raw_frame(2 if i == 0 else 0, payload[i:i + 1300], fin=i + 1300 >= len(payload))
                  for i in range(0, len(payload), 1300)]
        events = feed(server(delivery=Delivery.MESSAGE), b"".join(frames))
        self.assertEqual(events, [Fragment(Opcode.BINARY, payload, True)])

    def test_frame_delivery_keeps_frames_read_in_pieces(self) -> None:
        data = raw_frame(2, b"a" * 3000, fin=False) + raw_frame(0, b"b" * 3000)
        conn = server(delivery=Delivery.FRAME)
        events = feed(conn, *(data[i:i + 100] for i in range(0, len(data), 100)))
        self.assertEqual(events, [Fragment(Opcode.BINARY, b"a" * 3000, False),
                                  Fragment(Opcode.CONTINUATION, b"b" * 3000, True)])

    def test_sending_fragments(self) -> None:
        conn = server()
        conn.send_fragment(Opcode.TEXT, b"frag", fin=False)
        conn.send_ping(b"in between")
        conn.send_fragment(Opcode.CONTINUATION, b"ment")
        self.assertEqual(sent(conn), [(False, 0, 1, b"frag"), (True, 0, 9, b"in between"), (True, 0, 0, b"ment")])

    def test_sending_out_of_order_is_refused(self) -> None:
        conn = server()
        with self.assertRaises(LocalProtocolError):
            conn.send_fragment(Opcode.CONTINUATION, b"x")
        conn.send_fragment(Opcode.BINARY, b"x", fin=False)
        with self.assertRaises(LocalProtocolError):
            conn.send_fragment(Opcode.TEXT, b"y")
        with self.assertRaises(LocalProtocolError):
            conn.send_fragment(Opcode.PING, b"y")


# (payload, valid) pairs from the testsuite's 6.x groups (Markus Kuhn's UTF-8 test file)
UTF8_CASES = [
    (KOSME, True), (b"hello\xc2\xa2world", True), (b"hello\xf0\xa4\xad\xa2world", True),
    (b"\xf4\x8f\xbf\xbf", True), (b"\xef\xbf\xbf", True), (b"\xed\x9f\xbf", True), (b"", True),
    (b"\xf8\x88\x80\x80\x80", False), (b"\xf4\x90\x80\x80", False), (b"\x80", False), (b"\xbf", False),
    (b"\xc0 \xc1 ", False), (b"\xe0\x80", False), (b"\xfe", False), (b"\xff", False), (b"\xc0\xaf", False),
    (b"\xe0\x80\xaf", False), (b"\xc1\xbf", False), (b"\xc0\x80", False), (b"\xed\xa0\x80", False),
    (b"\xed\xbf\xbf", False), (b"\xed\xa0\x80\xed\xb0\x80", False), (KOSME + b"\xed\xa0\x80edited", False),
]


class Utf8Tests(SynchronousTestCase):
    """Group 6: text must be UTF-8, checked across fragments, failing on the first bad byte."""

    def test_single_frame_messages(self) -> None:
        for payload, valid in UTF8_CASES:
            events = feed(server(), raw_frame(1, payload))
            if valid:
                self.assertEqual(messages(events), [(1, payload)])
            else:
                self.assertEqual(failure(events), (CloseCode.INVALID_DATA, "text message is not UTF-8"), payload)

    def test_messages_in_one_byte_fragments(self) -> None:
        for payload, valid in UTF8_CASES:
            if not payload:
                continue
            frames = [raw_frame(1 if i == 0 else 0, payload[i:i + 1], fin=i == len(payload) - 1)
                      for i in range(len(payload))]
            events = feed(server(), b"".join(frames))
            self.assertEqual(failure(events) is None, valid, payload)
            if not valid:
                self.assertEqual(failure_code(events), CloseCode.INVALID_DATA)

    def test_fails_fast_inside_a_frame(self) -> None:
        """6.4.3/6.4.4: the frame arrives in pieces; the piece with the bad byte fails it."""
        bad = KOSME + b"\xf4\x90\x80\x80" + b"edited" * 100
        frame = raw_frame(1, bad)
        conn = server()
        head = len(frame) - len(bad)
        first = feed(conn, frame[:head + len(KOSME)])
        self.assertEqual(first, [Fragment(Opcode.TEXT, KOSME, False)])
        second = feed(conn, frame[head + len(KOSME):head + len(KOSME) + 2])  # \xf4\x90: already impossible
        self.assertEqual(failure(second), (CloseCode.INVALID_DATA, "text message is not UTF-8"))

    def test_fails_fast_across_frames(self) -> None:
        """6.4.1/6.4.2: the bad fragment fails the connection before the last one comes."""
        conn = server()
        self.assertIsNone(failure(feed(conn, raw_frame(1, KOSME, fin=False))))
        self.assertEqual(failure_code(feed(conn, raw_frame(0, b"\xf4\x90\x80\x80", fin=False))),
                         CloseCode.INVALID_DATA)
        self.assertIs(conn.state, State.CLOSED)

    def test_character_split_across_frames_is_fine(self) -> None:
        events = feed(server(), raw_frame(1, KOSME[:3], fin=False) + raw_frame(0, KOSME[3:]))
        self.assertEqual(messages(events), [(1, KOSME)])

    def test_message_ending_inside_a_character_fails(self) -> None:
        events = feed(server(), raw_frame(1, KOSME[:3], fin=False) + raw_frame(0, b""))
        self.assertEqual(failure(events), (CloseCode.INVALID_DATA, "text message ends inside a UTF-8 character"))

    def test_binary_is_not_checked(self) -> None:
        self.assertEqual(messages(feed(server(), raw_frame(2, b"\xff\xfe"))), [(2, b"\xff\xfe")])

    def test_without_inspection_uncompressed_text_is_still_checked(self) -> None:
        # only compressed messages pass unchecked (test_wire_deflate.RelayTests): plain text
        # costs no inflating, and failing at its first invalid byte is what peers expect
        self.assertEqual(failure_code(feed(server(inspect=False), raw_frame(1, b"ok \xff"))), CloseCode.INVALID_DATA)
        fragmented = raw_frame(1, b"ok", fin=False) + raw_frame(0, b"\xff")
        self.assertEqual(failure_code(feed(server(inspect=False), fragmented)), CloseCode.INVALID_DATA)


class GatherTests(SynchronousTestCase):
    """Delivery.STREAM with `gather`: small frames whole (a relay keeps their boundaries),
    big ones piece by piece as they arrive, empty ones as empty fragments."""

    def test_frames_up_to_gather_come_whole_whatever_the_reads(self) -> None:
        conn = server(gather=1000)
        wire = raw_frame(2, b"a" * 1000, fin=False) + raw_frame(0, b"b" * 10)
        events = feed(conn, *(wire[i:i + 7] for i in range(0, len(wire), 7)))
        self.assertEqual([(e.opcode, e.data, e.fin) for e in events],
                         [(Opcode.BINARY, b"a" * 1000, False), (Opcode.CONTINUATION, b"b" * 10, True)])

    def test_a_bigger_frame_streams(self) -> None:
        conn = server(gather=1000)
        wire = raw_frame(2, b"c" * 5000)
        events = feed(conn, wire[:3000], wire[3000:])
        self.assertEqual(len(events), 2)
        self.assertEqual(b"".join(e.data for e in events), b"c" * 5000)
        self.assertEqual([e.fin for e in events], [False, True])

    def test_empty_frames_are_fragments(self) -> None:
        events = feed(server(), raw_frame(2, b"", fin=False) + raw_frame(0, b"x", fin=False) + raw_frame(0, b""))
        self.assertEqual([(e.opcode, e.data, e.fin) for e in events],
                         [(Opcode.BINARY, b"", False), (Opcode.CONTINUATION, b"x", False),
                          (Opcode.CONTINUATION, b"", True)])


class CloseTests(SynchronousTestCase):
    """Group 7 and the state table."""

    def test_peer_close_is_echoed_and_closes(self) -> None:
        conn = server()
        events = feed(conn, raw_frame(8, close_payload(1000, b"bye")))
        self.assertEqual(events, [CloseReceived(1000, "bye")])
        self.assertEqual(sent(conn), [(True, 0, 8, close_payload(1000, b"bye"))])
        self.assertIs(conn.state, State.CLOSED)
        self.assertEqual(conn.close_received, (1000, "bye"))

    def test_nothing_is_read_after_a_close(self) -> None:
        """7.1.2-7.1.4: a second close, a ping or text after the close are ignored."""
        for after in (raw_frame(8, close_payload(1000)), raw_frame(9, b"ping"), raw_frame(1, b"text")):
            conn = server()
            events = feed(conn, raw_frame(8, close_payload(1000)) + after)
            self.assertEqual(events, [CloseReceived(1000, "")])
            self.assertEqual(len(sent(conn)), 1)

    def test_close_inside_a_fragmented_message(self) -> None:
        """7.1.5."""
        conn = server()
        events = feed(conn, raw_frame(1, b"frag", fin=False) + raw_frame(8, close_payload(1000))
                      + raw_frame(0, b"ment"))
        self.assertEqual(events, [Fragment(Opcode.TEXT, b"frag", False), CloseReceived(1000, "")])

    def test_close_payloads(self) -> None:
        """7.3.x: empty, code only, code and reason, the longest reason; and the bad ones."""
        ok = {b"": (CloseCode.NO_STATUS, "", b""), close_payload(1000): (1000, "", close_payload(1000)),
              close_payload(1000, b"reason"): (1000, "reason", close_payload(1000, b"reason")),
              close_payload(1000, b"r" * 123): (1000, "r" * 123, close_payload(1000, b"r" * 123))}
        for payload, (code, reason, echo) in ok.items():
            conn = server()
            self.assertEqual(feed(conn, raw_frame(8, payload)), [CloseReceived(code, reason)])
            self.assertEqual(sent(conn), [(True, 0, 8, echo)])
        bad = {b"\x03": (1002, "close frame with a 1-byte payload"),
               close_payload(1000, b"r" * 124): (1002, "control frame longer than 125 bytes"),
               close_payload(1000, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited"):
                   (1007, "close reason is not UTF-8")}
        for payload, expected in bad.items():
            conn = server()
            self.assertEqual(failure(feed(conn, raw_frame(8, payload))), expected)
            self.assertEqual(sent(conn)[0][3][:2], expected[0].to_bytes(2, "big"))

    def test_close_codes(self) -> None:
        """7.7 (valid, echoed), 7.9 and 7.13 (invalid: 1002)."""
        for code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999):
            conn = server()
            self.assertEqual(feed(conn, raw_frame(8, close_payload(code))), [CloseReceived(code, "")])
            self.assertEqual(sent(conn), [(True, 0, 8, close_payload(code))])
        for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535):
            events = feed(server(), raw_frame(8, close_payload(code)))
            self.assertEqual(failure(events), (CloseCode.PROTOCOL_ERROR,
                                               f"close code {code} is not allowed in a close frame"))

    def test_we_close_first(self) -> None:
        conn = server()
        conn.send_close(1001, "going away")
        self.assertIs(conn.state, State.CLOSE_SENT)  # the caller's close timeout runs now
        self.assertEqual(sent(conn), [(True, 0, 8, close_payload(1001, b"going away"))])
        with self.assertRaises(LocalProtocolError):
            conn.send_fragment(Opcode.TEXT, b"late")
        with self.assertRaises(LocalProtocolError):
            conn.send_ping()
        # data still in flight from the peer is delivered, but not answered
        events = feed(conn, raw_frame(1, b"in flight") + raw_frame(9) + raw_frame(8, close_payload(1001)))
        self.assertEqual(events, [Fragment(Opcode.TEXT, b"in flight", True), Ping(b""), CloseReceived(1001, "")])
        self.assertEqual(sent(conn), [])
        self.assertIs(conn.state, State.CLOSED)

    def test_may_send_follows_the_state(self) -> None:
        conn = server()
        events = feed(conn, raw_frame(1, b"valid") + raw_frame(3))
        self.assertEqual(messages(events), [(1, b"valid")])  # delivered, but the connection failed after it
        self.assertFalse(conn.may_send)
        self.assertTrue(server().may_send)
        answering = server(answer_close=False)
        feed(answering, raw_frame(8, close_payload(1000)))
        self.assertTrue(answering.may_send)

    def test_caller_answers_close_itself(self) -> None:
        conn = server(answer_close=False)
        feed(conn, raw_frame(8, close_payload(1000)))
        self.assertIs(conn.state, State.CLOSE_RECEIVED)
        conn.send_fragment(Opcode.TEXT, b"last words")  # RFC 6455 §5.5.1: may finish first
        conn.send_close(1000)
        self.assertEqual([f[2] for f in sent(conn)], [1, 8])
        self.assertIs(conn.state, State.CLOSED)

    def test_close_without_code_and_refused_codes(self) -> None:
        conn = server()
        conn.send_close(CloseCode.NO_STATUS)
        self.assertEqual(sent(conn), [(True, 0, 8, b"")])
        for code in (1006, 1015, 999, 5000):  # (1005 is "no code": the empty close above)
            with self.assertRaises(LocalProtocolError):
                server().send_close(code)

    def test_long_reason_is_clipped(self) -> None:
        conn = server()
        conn.send_close(1000, "é" * 100)
        payload = sent(conn)[0][3]
        self.assertEqual(payload[2:].decode(), "é" * 61)

    def test_eof(self) -> None:
        conn = server()
        feed(conn, raw_frame(1, b"half", fin=False))
        conn.receive_eof()
        self.assertIs(conn.state, State.CLOSED)
        self.assertIsNone(conn.close_received)
        self.assertEqual(feed(conn, raw_frame(0, b"more")), [])

    def test_clip_reason(self) -> None:
        self.assertEqual(clip_reason("short"), b"short")
        self.assertEqual(clip_reason("x" * 200), b"x" * 123)
        self.assertEqual(clip_reason("x" * 122 + "€"), b"x" * 122)  # € is 3 bytes: cut before it
        self.assertEqual(clip_reason("x" * 120 + "€"), b"x" * 120 + "€".encode())
        self.assertEqual(clip_reason(b"\xf0\x9f\x98\x80" * 40, 10), b"\xf0\x9f\x98\x80" * 2)

    def test_is_wire_code(self) -> None:
        self.assertEqual([c for c in range(900, 5100) if is_wire_code(c)],
                         [1000, 1001, 1002, 1003, *range(1007, 1015), *range(3000, 5000)])

    def test_state_table(self) -> None:
        self.assertIs(next_state(State.OPEN, Transition.SEND_CLOSE), State.CLOSE_SENT)
        self.assertIs(next_state(State.CLOSE_SENT, Transition.RECEIVE_CLOSE), State.CLOSED)
        self.assertIs(next_state(State.CLOSE_RECEIVED, Transition.SEND_CLOSE), State.CLOSED)
        for state in State:
            self.assertIs(next_state(state, Transition.EOF), State.CLOSED)
        for state, transition in ((State.CLOSE_SENT, Transition.SEND_CLOSE), (State.CLOSED, Transition.SEND_CLOSE),
                                  (State.CLOSED, Transition.RECEIVE_CLOSE)):
            self.assertNotIn((state, transition), TRANSITIONS)
            with self.assertRaises(LocalProtocolError):
                next_state(state, transition)


class LimitTests(SynchronousTestCase):
    """Group 9, and the limits: 1009 as soon as a length says so, before any buffering."""

    def test_big_messages_in_64k_reads(self) -> None:
        for opcode, frame_size in ((1, None), (2, None), (2, 65536), (1, 4096)):
            payload = b"\x2a" * (1 << 20)
            if frame_size is None:
                data = raw_frame(opcode, payload)
            else:
                data = b"".join(raw_frame(opcode if i == 0 else 0, payload[i:i + frame_size],
                                          fin=i + frame_size >= len(payload))
                                for i in range(0, len(payload), frame_size))
            conn = server(max_message_size=1 << 20)
            events = feed(conn, *(data[i:i + 65536] for i in range(0, len(data), 65536)))
            self.assertEqual(messages(events), [(opcode, payload)])
            self.assertGreaterEqual(len(events), 16)  # streamed, never gathered whole

    def test_frame_limit_fails_on_the_head(self) -> None:
        conn = server(max_frame_size=1000)
        frame = raw_frame(2, b"x" * 1001)
        events = feed(conn, frame[:8])  # the head alone: no payload has come
        self.assertEqual(failure(events), (CloseCode.MESSAGE_TOO_BIG, "frame of 1001 bytes over the limit of 1000"))
        self.assertEqual(sent(conn)[0][3][:2], b"\x03\xf1")

    def test_message_limit_counts_fragments(self) -> None:
        conn = server(max_message_size=1000)
        events = feed(conn, raw_frame(2, b"x" * 600, fin=False), raw_frame(0, b"x" * 401)[:8])
        self.assertEqual(messages(events), [])
        self.assertEqual(failure_code(events), CloseCode.MESSAGE_TOO_BIG)

    def test_message_limit_on_a_single_frame(self) -> None:
        for size in (0x10000, 1 << 40):
            head = bytes([0x82, 0xFF]) + size.to_bytes(8, "big") + b"\0\0\0\0"
            self.assertEqual(failure_code(feed(server(max_message_size=1000), head)), CloseCode.MESSAGE_TOO_BIG)

    def test_small_limits_hold_for_small_frames(self) -> None:
        for options in ({"max_message_size": 10}, {"max_frame_size": 10}):
            conn = server(**options)
            self.assertEqual(messages(feed(conn, raw_frame(2, b"x" * 10))), [(2, b"x" * 10)])
            self.assertEqual(failure_code(feed(conn, raw_frame(1, b"x" * 11))), CloseCode.MESSAGE_TOO_BIG)

    def test_exactly_the_limit_passes(self) -> None:
        conn = server(max_message_size=1000, max_frame_size=500)
        events = feed(conn, raw_frame(2, b"x" * 500, fin=False) + raw_frame(0, b"x" * 500))
        self.assertEqual(messages(events), [(2, b"x" * 1000)])

    def test_many_small_messages(self) -> None:
        """9.7/9.8: a thousand messages in one read."""
        data = b"".join(raw_frame(1 + i % 2, b"m%d" % i) for i in range(1000))
        conn = server()
        self.assertEqual(messages(feed(conn, data)), [(1 + i % 2, b"m%d" % i) for i in range(1000)])


class DeferredFailureTests(SynchronousTestCase):
    """defer_failure: a relay answers the valid messages read before a bad frame, then fails."""

    def test_the_close_waits_for_complete_failure(self) -> None:
        conn = server(defer_failure=True)
        events = feed(conn, raw_frame(1, b"valid") + raw_frame(3, b"reserved opcode"))
        self.assertEqual(messages(events), [(1, b"valid")])
        self.assertEqual(failure_code(events), CloseCode.PROTOCOL_ERROR)
        self.assertIs(conn.state, State.OPEN)
        self.assertEqual(conn.data_to_send(), [])
        conn.send_fragment(Opcode.TEXT, b"valid")  # the echo of the valid one still goes
        conn.complete_failure()
        self.assertIs(conn.state, State.CLOSED)
        frames = sent(conn)
        self.assertEqual([f[2] for f in frames], [1, 8])
        self.assertEqual(frames[1][3][:2], (1002).to_bytes(2, "big"))
        self.assertEqual(feed(conn, raw_frame(1, b"after")), [])  # nothing more is read
        conn.complete_failure()  # once only
        self.assertEqual(conn.data_to_send(), [])
