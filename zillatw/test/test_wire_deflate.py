"""permessage-deflate in zillatw.wire (RFC 7692): negotiation, compressed messages in
both roles with every parameter (testsuite groups 12 and 13), the rules on RSV1, bounded
inflating (deflate bombs) and relaying compressed payloads as they are."""

from __future__ import annotations

import os
import random
import tracemalloc
import zlib
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from zillatw.test.wire_support import failure, failure_code, feed, messages, raw_frame, read_frames, sent, server
from zillatw.wire import (
    CloseCode,
    Connection,
    DeflateParams,
    Delivery,
    Fragment,
    NegotiationError,
    Opcode,
    Role,
    client_accept,
    client_offer,
    server_accept,
)
from zillatw.wire.deflate import INFLATE_CHUNK, can_relay, parse_extensions


def deflate_raw(payload: bytes, bits: int = 15) -> bytes:
    """A message compressed as RFC 7692 §7.2.1 says, by zlib directly."""
    z = zlib.compressobj(9, zlib.DEFLATED, -bits)
    data = z.compress(payload) + z.flush(zlib.Z_SYNC_FLUSH)
    assert data.endswith(b"\x00\x00\xff\xff")
    return data[:-4]


def inflate_raw(data: bytes) -> bytes:
    return zlib.decompressobj(-15).decompress(data + b"\x00\x00\xff\xff")


def accepted(offer: str, **options: Any) -> tuple[DeflateParams, str]:
    """server_accept's answer to an offer it must accept."""
    answer = server_accept(offer, **options)
    assert answer is not None, f"declined: {offer}"
    return answer


class NegotiationTests(SynchronousTestCase):
    def test_parse_extensions(self) -> None:
        self.assertEqual(parse_extensions('permessage-deflate; client_max_window_bits; server_max_window_bits="10", '
                                          'x-webkit-deflate-frame'),
                         [("permessage-deflate", [("client_max_window_bits", None), ("server_max_window_bits", "10")]),
                          ("x-webkit-deflate-frame", [])])
        for bad in ("; a", "permessage-deflate; =1", "permessage-deflate; a b", "permessage-deflate; x="):
            with self.assertRaises(NegotiationError):
                parse_extensions(bad)

    def test_server_accepts_the_plain_offer(self) -> None:
        self.assertEqual(server_accept("permessage-deflate"), (DeflateParams(), "permessage-deflate"))
        self.assertIsNone(server_accept(None))
        self.assertIsNone(server_accept("x-webkit-deflate-frame"))

    def test_server_echoes_what_was_asked(self) -> None:
        params, header = accepted("permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
                                       "server_max_window_bits=10; client_max_window_bits=12")
        self.assertEqual(params, DeflateParams(True, True, 10, 12))
        self.assertEqual(header, "permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
                                 "server_max_window_bits=10; client_max_window_bits=12")

    def test_server_accepts_an_asked_window_by_naming_it(self) -> None:
        params, header = accepted("permessage-deflate; server_max_window_bits=15")
        self.assertEqual(header, "permessage-deflate; server_max_window_bits=15")
        self.assertEqual(client_accept(header, max_window_bits=15), params)

    def test_server_caps_windows_only_where_the_client_allows(self) -> None:
        params, header = accepted("permessage-deflate; client_max_window_bits", max_window_bits=11)
        self.assertEqual(params, DeflateParams(False, False, 11, 11))
        self.assertEqual(header, "permessage-deflate; server_max_window_bits=11; client_max_window_bits=11")
        params, header = accepted("permessage-deflate", max_window_bits=11)
        self.assertEqual(params.client_max_window_bits, 15)  # not offered: may not be limited
        self.assertNotIn("client_max_window_bits", header)

    def test_server_asks_a_smaller_client_window_only_where_the_client_allows(self) -> None:
        params, header = accepted("permessage-deflate; client_max_window_bits", client_window_bits=12)
        self.assertEqual(params, DeflateParams(False, False, 15, 12))
        self.assertEqual(header, "permessage-deflate; client_max_window_bits=12")
        params, _ = accepted("permessage-deflate; client_max_window_bits=10", client_window_bits=12)
        self.assertEqual(params.client_max_window_bits, 10)  # already below
        params, header = accepted("permessage-deflate", client_window_bits=12)
        self.assertEqual((params.client_max_window_bits, header), (15, "permessage-deflate"))

    def test_server_declines_bad_offers_and_takes_the_next(self) -> None:
        for bad in ("permessage-deflate; foo", "permessage-deflate; server_max_window_bits=16",
                    "permessage-deflate; server_max_window_bits", "permessage-deflate; client_max_window_bits=7",
                    "permessage-deflate; server_no_context_takeover=1",
                    "permessage-deflate; client_no_context_takeover; client_no_context_takeover"):
            self.assertIsNone(server_accept(bad), bad)
            self.assertEqual(server_accept(bad + ", permessage-deflate; client_no_context_takeover"),
                             (DeflateParams(client_no_context_takeover=True),
                              "permessage-deflate; client_no_context_takeover"))

    def test_client_side(self) -> None:
        offer = client_offer(no_context_takeover=True, max_window_bits=12)
        self.assertEqual(offer, "permessage-deflate; client_max_window_bits; client_no_context_takeover; "
                                "server_no_context_takeover; server_max_window_bits=12")
        params, header = accepted(offer)
        self.assertEqual(client_accept(header, no_context_takeover=True, max_window_bits=12), params)
        self.assertIsNone(client_accept(None))
        narrowed = client_accept("permessage-deflate; client_max_window_bits=9")
        assert narrowed is not None, "declined"
        self.assertEqual(narrowed.client_max_window_bits, 9)
        for bad in ("permessage-deflate; server_max_window_bits=13", "x-other",
                    "permessage-deflate, permessage-deflate", "permessage-deflate; unknown"):
            with self.assertRaises(NegotiationError):
                client_accept(bad, max_window_bits=12)
        with self.assertRaises(NegotiationError):
            client_accept("permessage-deflate", no_context_takeover=True)


def pair(params: DeflateParams, **options: Any) -> tuple[Connection, Connection]:
    return (Connection(Role.CLIENT, deflate=params, max_message_size=None, **options),
            Connection(Role.SERVER, deflate=params, max_message_size=None, **options))


class CompressedMessageTests(SynchronousTestCase):
    """Groups 12 and 13: messages of many sizes, every parameter combination, both ways."""

    def test_reads_what_zlib_writes(self) -> None:
        payload = b"Hello, Hello, Hello! " * 100
        compressed = deflate_raw(payload)
        events = feed(server(deflate=DeflateParams()), raw_frame(1, compressed, rsv=4))
        self.assertEqual(messages(events), [(1, payload)])
        # fragmented: RSV1 on the first frame only
        events = feed(server(deflate=DeflateParams()), raw_frame(1, compressed[:10], fin=False, rsv=4)
                      + raw_frame(0, compressed[10:]))
        self.assertEqual(messages(events), [(1, payload)])

    def test_writes_what_zlib_reads(self) -> None:
        conn = server(deflate=DeflateParams())
        payload = os.urandom(100) * 50
        conn.send_fragment(Opcode.BINARY, payload[:3000], fin=False)
        conn.send_fragment(Opcode.CONTINUATION, payload[3000:])
        frames = sent(conn)
        self.assertEqual([(f[0], f[1], f[2]) for f in frames], [(False, 4, 2), (True, 0, 0)])
        self.assertEqual(inflate_raw(frames[0][3] + frames[1][3]), payload)
        self.assertLess(len(frames[0][3] + frames[1][3]), len(payload) // 10)

    def test_parameter_combinations_both_ways(self) -> None:
        rng = random.Random(13)
        for server_nct in (False, True):
            for client_nct in (False, True):
                for bits in (8, 9, 12, 15):
                    params = DeflateParams(server_nct, client_nct, bits, bits)
                    client, srv = pair(params, delivery=Delivery.MESSAGE)
                    sizes = [0, 16, 64, 256, 1024, 4096, 8192, 65536, 131072]
                    payloads = [bytes(rng.choice(b"abc ") for _ in range(size)) for size in sizes]
                    for payload in payloads:
                        client.send_fragment(Opcode.TEXT, payload)
                        srv.send_fragment(Opcode.BINARY, payload)
                    to_server, to_client = b"".join(client.data_to_send()), b"".join(srv.data_to_send())
                    got = feed(srv, *(to_server[i:i + 1000] for i in range(0, len(to_server), 1000)))
                    self.assertEqual(messages(got), [(1, p) for p in payloads], params)
                    self.assertEqual(messages(feed(client, to_client)), [(2, p) for p in payloads], params)
                    # zlib cannot compress with a 256-byte window: such a sender sends plain messages
                    self.assertEqual(all(f[1] == 0 for f in read_frames(to_client)), bits == 8)

    def test_no_context_takeover_makes_messages_independent(self) -> None:
        payload = b"the same message again and again " * 20
        for reset in (False, True):
            conn = server(deflate=DeflateParams(server_no_context_takeover=reset))
            conn.send_fragment(Opcode.TEXT, payload)
            conn.send_fragment(Opcode.TEXT, payload)
            first, second = (f[3] for f in sent(conn))
            if reset:
                self.assertEqual(first, second)
                self.assertEqual(inflate_raw(second), payload)
            else:
                self.assertLess(len(second), len(first) // 2)  # refers back to the first

    def test_small_messages_can_go_uncompressed(self) -> None:
        conn = server(deflate=DeflateParams(), min_compress_size=100)
        conn.send_fragment(Opcode.TEXT, b"tiny")
        conn.send_fragment(Opcode.TEXT, b"x" * 100)
        self.assertEqual([f[1] for f in sent(conn)], [0, 4])

    def test_rsv1_rules(self) -> None:
        deflate = DeflateParams()
        cases = [(server(), raw_frame(1, deflate_raw(b"x"), rsv=4), "reserved bits"),
                 (server(deflate=deflate), raw_frame(1, deflate_raw(b"xy")[:1], fin=False, rsv=4)
                  + raw_frame(0, deflate_raw(b"xy")[1:], rsv=4), "RSV1 set on a continuation frame"),
                 (server(deflate=deflate), raw_frame(9, b"", rsv=4), "compressed control frame")]
        for conn, data, words in cases:
            code, reason = failure(feed(conn, data)) or (None, "")
            self.assertEqual(code, CloseCode.PROTOCOL_ERROR)
            self.assertIn(words, reason)

    def test_invalid_deflate_data_fails(self) -> None:
        events = feed(server(deflate=DeflateParams()), raw_frame(2, b"\xff\xff\xff\xff", rsv=4))
        self.assertEqual(failure_code(events), CloseCode.INVALID_DATA)

    def test_compressed_text_is_checked_after_inflating(self) -> None:
        events = feed(server(deflate=DeflateParams()), raw_frame(1, deflate_raw(b"ok \xff"), rsv=4))
        self.assertEqual(failure(events), (CloseCode.INVALID_DATA, "text message is not UTF-8"))


class BombTests(SynchronousTestCase):
    """Inflating stops at the message limit: the limit bounds what is allocated, not the input."""

    def test_bomb_fails_with_1009_and_allocates_no_more_than_the_limit(self) -> None:
        z = zlib.compressobj(9, zlib.DEFLATED, -15)
        block = bytes(1 << 20)
        bomb = b"".join(z.compress(block) for _ in range(256)) + z.flush(zlib.Z_SYNC_FLUSH)  # 256 MiB of zeros
        frame = raw_frame(2, bomb[:-4], rsv=4)
        self.assertLess(len(frame), 1 << 20)
        conn = server(deflate=DeflateParams(), max_message_size=1 << 20)
        tracemalloc.start()
        try:
            events = []
            for i in range(0, len(frame), 65536):
                conn.receive_data(frame[i:i + 65536])
                events += conn.events_received()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertEqual(failure(events), (CloseCode.MESSAGE_TOO_BIG, "inflated message over the size limit"))
        delivered = [len(e.data) for e in events if isinstance(e, Fragment)]
        self.assertLessEqual(sum(delivered), 1 << 20)
        self.assertLess(peak, 3 << 20)  # the events above hold up to 1 MiB; zlib another window

    def test_inflated_pieces_are_bounded(self) -> None:
        payload = bytes(1 << 20)
        conn = server(deflate=DeflateParams(), max_message_size=1 << 20)
        events = feed(conn, raw_frame(2, deflate_raw(payload), rsv=4))
        self.assertEqual(messages(events), [(2, payload)])
        self.assertEqual(max(len(e.data) for e in events), INFLATE_CHUNK)

    def test_exactly_the_limit_inflates(self) -> None:
        payload = bytes(100000)
        for limit, fails in ((100000, False), (99999, True)):
            conn = server(deflate=DeflateParams(), max_message_size=limit, delivery=Delivery.MESSAGE)
            events = feed(conn, raw_frame(2, deflate_raw(payload), rsv=4))
            self.assertEqual(failure(events) is not None, fails)
            if not fails:
                self.assertEqual(events, [Fragment(Opcode.BINARY, payload, True)])


class MemoryTests(SynchronousTestCase):
    def test_idle_connections_hold_no_compressor(self) -> None:
        """zlib's compressor is ~260 KiB: made for the first compressed message, not before."""
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            idle = [Connection(Role.SERVER, deflate=DeflateParams()) for _ in range(100)]
            per_idle = (tracemalloc.get_traced_memory()[0] - before) / len(idle)
            idle[0].send_fragment(Opcode.TEXT, b"now it compresses")
            per_used = tracemalloc.get_traced_memory()[0] - before - per_idle * len(idle)
        finally:
            tracemalloc.stop()
        self.assertLess(per_idle, 2048)
        self.assertGreater(per_used, 100 * 1024)


class RelayTests(SynchronousTestCase):
    """A proxy that does not need the payload passes compressed bytes on as they are."""

    def test_compressed_fragments_pass_through(self) -> None:
        params = DeflateParams()
        browser = Connection(Role.CLIENT, deflate=params)
        gateway_in = Connection(Role.SERVER, deflate=params, inspect=False)
        gateway_out = Connection(Role.CLIENT, deflate=params)
        upstream = Connection(Role.SERVER, deflate=params)
        self.assertTrue(can_relay(params, True, params, False))
        payloads = [b"first " * 1000, "€uro".encode() * 3000, b""]
        for payload in payloads:
            browser.send_fragment(Opcode.TEXT, payload[:7], fin=False)
            browser.send_fragment(Opcode.CONTINUATION, payload[7:])
        wire = b"".join(browser.data_to_send())
        events = feed(gateway_in, *(wire[i:i + 500] for i in range(0, len(wire), 500)))
        self.assertTrue(all(e.compressed for e in events))
        self.assertLess(sum(len(e.data) for e in events), sum(map(len, payloads)) // 10)
        for event in events:
            gateway_out.send_fragment(event.opcode, event.data, event.fin, compressed=True)
        got = feed(upstream, *gateway_out.data_to_send())
        self.assertIsNone(failure(got))
        self.assertEqual(messages(got), [(1, p) for p in payloads])

    def test_a_message_begun_compressed_goes_on_as_it_is(self) -> None:
        conn = Connection(Role.SERVER, deflate=DeflateParams())
        compressed = deflate_raw(b"relayed as it is")
        conn.send_fragment(Opcode.TEXT, compressed[:5], fin=False, compressed=True)
        conn.send_fragment(Opcode.CONTINUATION, compressed[5:])  # not compressed a second time
        frames = sent(conn)
        self.assertEqual([f[1] for f in frames], [4, 0])
        self.assertEqual(inflate_raw(frames[0][3] + frames[1][3]), b"relayed as it is")

    def test_can_relay(self) -> None:
        wide, narrow = DeflateParams(), DeflateParams(client_max_window_bits=10, server_max_window_bits=10)
        self.assertFalse(can_relay(wide, True, narrow, False))   # the browser's window is wider than upstream's
        self.assertTrue(can_relay(narrow, True, wide, False))
        promised = DeflateParams(client_no_context_takeover=True)
        self.assertFalse(can_relay(wide, True, promised, False))  # upstream was promised no takeover
        self.assertTrue(can_relay(promised, True, promised, False))

    def test_compressed_send_needs_deflate(self) -> None:
        with self.assertRaises(Exception) as caught:
            server().send_fragment(Opcode.TEXT, b"x", compressed=True)
        self.assertIn("without permessage-deflate", str(caught.exception))
