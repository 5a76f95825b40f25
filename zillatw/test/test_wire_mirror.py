"""A mirror (an echo) sending permessage-deflate messages back as they came (RFC 7692 §7.2.3:
each direction one LZ77 stream): the core's `mirror` mode against an independent client
(zlib and frames built by hand), and the gateway's echo against the `websockets` client."""

from __future__ import annotations

import json
import random
import zlib
from typing import Any

from twisted.internet import defer, threads
from twisted.trial.unittest import SynchronousTestCase, TestCase

from zillatw.bindings.echo.binding import EchoEnd
from zillatw.bindings.ws.binding import CLIENT_WINDOW_BITS
from zillatw.telemetry.sessions import relay_behind
from zillatw.test.support import chain, start_gateway
from zillatw.test.wire_support import failure_code, feed, raw_frame, read_frames
from zillatw.wire import Connection, DeflateParams, Fragment, Role, connection, deflate, server_accept
from zillatw.wire.deflate import can_mirror

TAIL = b"\x00\x00\xff\xff"


class PeerCompressor:
    """The client's side, independent of the code under test: one zlib compressor and one
    inflater for the whole connection (context takeover unless told), as RFC 7692 §7.2.1
    and §7.2.2 describe them."""

    def __init__(self, params: DeflateParams, mem_level: int = 5) -> None:
        self.params = params
        self.mem_level = mem_level
        self.compressor = self._compressor()
        self.inflater = zlib.decompressobj(-params.server_max_window_bits)

    def _compressor(self) -> Any:
        return zlib.compressobj(6, zlib.DEFLATED, -self.params.client_max_window_bits, self.mem_level)

    def frames(self, opcode: int, payload: bytes, pieces: int = 1, compress: bool = True) -> bytes:
        """One message as `pieces` masked frames, compressed (RSV1 on the first) unless told not to."""
        if compress and self.params.client_no_context_takeover:
            self.compressor = self._compressor()
        step = max(1, -(-len(payload) // pieces))
        parts = [payload[i:i + step] for i in range(0, len(payload), step)] or [b""]
        wire = b""
        for n, part in enumerate(parts):
            last = n == len(parts) - 1
            data = part
            if compress:
                data = self.compressor.compress(part) + self.compressor.flush(zlib.Z_SYNC_FLUSH)
                if last:
                    assert data.endswith(TAIL)
                    data = data[:-4]
            wire += raw_frame(0 if n else opcode, data, fin=last, rsv=4 if compress and n == 0 else 0)
        return wire

    def read(self, data: bytes) -> list[tuple[int, bytes, bytes]]:
        """Server frames to messages: (opcode, payload as inflated, bytes as on the wire)."""
        result = []
        opcode, compressed, wire, plain = 0, False, b"", b""
        for fin, rsv, frame_opcode, payload in read_frames(data):
            if frame_opcode:
                opcode, compressed, wire, plain = frame_opcode, bool(rsv & 4), b"", b""
            wire += payload
            if compressed:
                plain += self.inflater.decompress(payload + (TAIL if fin else b""))
            else:
                plain += payload
            if fin:
                result.append((opcode, plain, wire))
                if compressed and self.params.server_no_context_takeover:
                    self.inflater = zlib.decompressobj(-self.params.server_max_window_bits)
        return result


def json_document(n: int) -> bytes:
    rng = random.Random(n)
    return json.dumps({"id": n, "user": {"name": rng.choice(["Ana", "Bo", "Céline"]), "tags": ["a", "b"]},
                       "items": [{"sku": f"SKU-{rng.randrange(100)}", "qty": rng.randint(1, 3)}
                                 for _ in range(rng.randint(1, 30))]}).encode()


def count_deflaters(case: Any) -> list[int]:
    """A 1 in the list for each compressor (Deflater) a Connection makes from now on."""
    made: list[int] = []

    class Counting(deflate.Deflater):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            made.append(1)
            super().__init__(*args, **kwargs)
    case.patch(connection, "Deflater", Counting)
    return made


def mirror_echo(conn: Connection, wire: bytes) -> list[Any]:
    """What an echo does: every fragment back as it came (compressed ones with RSV1 kept)."""
    events = feed(conn, wire)
    for event in events:
        if type(event) is Fragment and conn.may_send:
            conn.send_fragment(event.opcode, event.data, event.fin, event.compressed and event.opcode != 0)
    return events


class CanMirrorTests(SynchronousTestCase):
    def test_the_peer_window_must_fit_and_a_promised_reset_be_kept(self) -> None:
        cases = [
            (DeflateParams(), True),
            (DeflateParams(server_max_window_bits=12, client_max_window_bits=12), True),
            (DeflateParams(server_max_window_bits=15, client_max_window_bits=12), True),
            # the client compresses with 32 KiB, its inflater keeps 4 KiB of ours: a reference may miss
            (DeflateParams(server_max_window_bits=12, client_max_window_bits=15), False),
            # the client's inflater starts afresh each message, its compressor does not
            (DeflateParams(server_no_context_takeover=True), False),
            (DeflateParams(client_no_context_takeover=True), True),
            (DeflateParams(server_no_context_takeover=True, client_no_context_takeover=True), True),
            (DeflateParams(server_max_window_bits=9, client_max_window_bits=9), True),
            # a 256-byte window: zlib's compressor uses 512 when asked for it
            (DeflateParams(server_max_window_bits=8, client_max_window_bits=8), False),
        ]
        for params, expected in cases:
            self.assertEqual(can_mirror(params, True), expected, params)
            flipped = DeflateParams(params.client_no_context_takeover, params.server_no_context_takeover,
                                    params.client_max_window_bits, params.server_max_window_bits)
            self.assertEqual(can_mirror(flipped, False), expected, flipped)

    def test_a_mirror_with_parameters_that_do_not_allow_it_is_refused(self) -> None:
        with self.assertRaises(ValueError):
            Connection(Role.SERVER, deflate=DeflateParams(server_no_context_takeover=True), mirror=True)


class MirrorTests(SynchronousTestCase):
    def exchange(self, params: DeflateParams, messages: list[tuple[int, bytes, int, bool]]) -> None:
        """Each (opcode, payload, pieces, compress) sent, mirrored, read back by the client."""
        made = count_deflaters(self)
        conn = Connection(Role.SERVER, deflate=params, mirror=True)
        peer = PeerCompressor(params)
        for opcode, payload, pieces, compress in messages:
            wire = peer.frames(opcode, payload, pieces, compress)
            events = mirror_echo(conn, wire)
            self.assertIsNone(failure_code(events))
            (back,) = peer.read(b"".join(conn.data_to_send()))
            self.assertEqual(back[:2], (opcode, payload))
            sent_payload = b"".join(p for _, _, _, p in read_frames(wire))
            self.assertEqual(back[2], sent_payload)  # the bytes as they came: not compressed again
        self.assertEqual(made, [])  # the mirror made no compressor of its own

    def test_messages_referring_back_to_earlier_ones_come_back_readable(self) -> None:
        """With context takeover, a repeated document compresses to a few bytes that only
        mean something with the earlier messages in the window: the client's inflater has
        them because they came back too. Uncompressed messages in between are in neither
        window (RFC 7692 §6) and go back uncompressed."""
        documents = [json_document(n % 4) for n in range(12)]
        messages = [(1, doc, 1 + n % 3, n % 5 != 4) for n, doc in enumerate(documents)]
        messages += [(2, bytes(range(256)) * 40, 2, True), (1, "é€𝄞".encode() * 500, 4, True), (2, b"", 1, True)]
        for params in (DeflateParams(), DeflateParams(server_max_window_bits=12, client_max_window_bits=9),
                       DeflateParams(client_no_context_takeover=True),
                       DeflateParams(client_no_context_takeover=True, server_no_context_takeover=True)):
            self.exchange(params, messages)
        # the repeats are short on the wire: they do refer back
        peer = PeerCompressor(DeflateParams())
        first, again = peer.frames(1, documents[0]), peer.frames(1, documents[0])
        self.assertLess(len(again), len(first) // 4)

    def test_a_mirror_still_inflates_checks_and_bounds(self) -> None:
        params = DeflateParams()
        conn = Connection(Role.SERVER, deflate=params, mirror=True)
        events = mirror_echo(conn, PeerCompressor(params).frames(1, b"ok \xff not utf-8", 1))
        self.assertEqual(failure_code(events), 1007)
        self.assertFalse([e for e in events if type(e) is Fragment])  # nothing of it went back
        conn = Connection(Role.SERVER, deflate=params, mirror=True, max_message_size=1000)
        events = mirror_echo(conn, PeerCompressor(params).frames(2, bytes(100_000), 1))
        self.assertEqual(failure_code(events), 1009)
        conn = Connection(Role.SERVER, deflate=params, mirror=True)
        events = mirror_echo(conn, PeerCompressor(params).frames(1, "aé".encode() * 3000, 3))
        self.assertIsNone(failure_code(events))
        conn = Connection(Role.SERVER, deflate=params, mirror=True)
        broken = PeerCompressor(params).frames(1, "aé".encode() * 3000 + b"\xc3", 3)  # ends inside a character
        self.assertEqual(failure_code(mirror_echo(conn, broken)), 1007)

    def test_what_a_mirror_sends_of_its_own_is_not_compressed(self) -> None:
        conn = Connection(Role.SERVER, deflate=DeflateParams(), mirror=True)
        conn.send_fragment(1, b"x" * 1000)
        ((fin, rsv, opcode, payload),) = read_frames(b"".join(conn.data_to_send()))
        self.assertEqual((fin, rsv, opcode, payload), (True, 0, 1, b"x" * 1000))


class GatewayEchoTests(TestCase):
    """The echo binding behind a ws server is a mirror (zillatw.stream.IMirrorEnd)."""

    @defer.inlineCallbacks
    def echo_through(self, server_max_window_bits: int | None) -> Any:
        made = count_deflaters(self)
        gateway, port = yield start_gateway(self, chain())
        sent = [json_document(n % 3).decode() for n in range(20)] + [bytes(range(256)) * 300, "é" * 70000]
        echoed, offer, client = yield threads.deferToThread(_websockets_exchange, port, sent, server_max_window_bits)
        self.assertEqual(echoed, sent)
        (server,) = gateway.binding("ws0").connections
        # chain() exports events: sessions wrap the echo's end, and the ws server sees through them
        self.wrapped = (type(server.stream_peer), type(relay_behind(server.stream_peer)))
        yield threads.deferToThread(client.close)
        return server.conn, made, offer

    @defer.inlineCallbacks
    def test_compressed_messages_go_back_as_they_came(self) -> Any:
        conn, made, offer = yield self.echo_through(None)
        agreed = server_accept(offer, client_window_bits=CLIENT_WINDOW_BITS)
        assert agreed is not None
        self.assertEqual(agreed[0], conn.deflate)
        self.assertEqual((conn.deflate.server_max_window_bits, conn.deflate.client_max_window_bits), (15, 12))
        self.assertTrue(conn.mirror)
        self.assertEqual(made, [])
        wrapper, behind = self.wrapped
        self.assertEqual((wrapper is EchoEnd, behind), (False, EchoEnd))

    @defer.inlineCallbacks
    def test_a_client_window_wider_than_ours_is_compressed_again(self) -> Any:
        """The client compresses with 32 KiB and reads ours with 1 KiB: no mirror."""
        conn, made, _ = yield self.echo_through(10)
        self.assertFalse(conn.mirror)
        self.assertEqual(made, [1])


def _websockets_exchange(port: int, sent: list[Any], server_max_window_bits: int | None
                         ) -> tuple[list[Any], str, Any]:
    """`sent` echoed through the gateway by the websockets client (memLevel 5 as its
    default); -> (the echoes, the client's offer, the client still open)."""
    from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
    from websockets.sync.client import connect
    factory = ClientPerMessageDeflateFactory(server_max_window_bits=server_max_window_bits,
                                             client_max_window_bits=True, compress_settings={"memLevel": 5})
    echoed = []
    ws = connect(f"ws://127.0.0.1:{port}/", compression=None, extensions=[factory], max_size=None, open_timeout=10)
    try:
        assert ws.request is not None
        offer = ws.request.headers["Sec-WebSocket-Extensions"]
        for n, message in enumerate(sent):
            if n % 4 == 3:  # fragmented
                ws.send([message[i:i + 1000] for i in range(0, len(message), 1000)])
            else:
                ws.send(message)
            echoed.append(ws.recv(timeout=10))
    except BaseException:
        ws.close()
        raise
    return echoed, offer, ws
