"""zillatw.wire.http1body: body framing, bytes in and body pieces out, with its bounds."""

from __future__ import annotations

from twisted.trial import unittest

from zillatw.wire.http1body import (
    LAST_CHUNK,
    MAX_CHUNK_LINE,
    MAX_TRAILER_BYTES,
    BodyDecoder,
    BodyError,
    Framing,
    chunk,
    end_to_end_headers,
    request_framing,
    response_framing,
)


def decode_all(decoder: BodyDecoder, data: bytes, step: int) -> bytes:
    out = []
    for at in range(0, len(data), step):
        out += decoder.feed(data[at:at + step])
        if decoder.done:
            break
    return b"".join(out)


class FramingTests(unittest.TestCase):
    def test_request_framing(self):
        self.assertEqual(request_framing({}), (Framing.NONE, 0))
        self.assertEqual(request_framing({"content-length": "12"}), (Framing.LENGTH, 12))
        self.assertEqual(request_framing({"content-length": "0"}), (Framing.NONE, 0))
        self.assertEqual(request_framing({"content-length": "5, 5"}), (Framing.LENGTH, 5))
        self.assertEqual(request_framing({"transfer-encoding": "Chunked"}), (Framing.CHUNKED, 0))

    def test_smuggling_shapes_refused(self):
        for headers in ({"content-length": "5", "transfer-encoding": "chunked"},
                        {"content-length": "5, 6"}, {"content-length": "-1"}, {"content-length": "0x10"},
                        {"content-length": "1" * 19}, {"content-length": "\u0661\u0662"},
                        {"transfer-encoding": "gzip, chunked"},
                        {"transfer-encoding": "chunked, chunked"}):
            with self.assertRaises(BodyError, msg=headers):
                request_framing(headers)

    def test_response_framing(self):
        self.assertEqual(response_framing({"content-length": "3"}, 200, "GET"), (Framing.LENGTH, 3))
        self.assertEqual(response_framing({"content-length": "3"}, 200, "HEAD"), (Framing.NONE, 0))
        self.assertEqual(response_framing({}, 204, "GET"), (Framing.NONE, 0))
        self.assertEqual(response_framing({}, 304, "GET"), (Framing.NONE, 0))
        self.assertEqual(response_framing({}, 200, "GET"), (Framing.UNTIL_CLOSE, 0))
        self.assertEqual(response_framing({"transfer-encoding": "gzip, chunked"}, 200, "GET"), (Framing.CHUNKED, 0))
        self.assertEqual(response_framing({"transfer-encoding": "gzip"}, 200, "GET"), (Framing.UNTIL_CLOSE, 0))

    def test_hop_by_hop_removed(self):
        headers = {":method": "GET", "connection": "close, x-secret", "x-secret": "1", "keep-alive": "5",
                   "te": "trailers", "transfer-encoding": "chunked", "upgrade": "h2c", "proxy-authorization": "b",
                   "proxy-connection": "keep-alive", "trailer": "x", "host": "h", "content-length": "1",
                   "accept": "*/*"}
        self.assertEqual(end_to_end_headers(headers), {":method": "GET", "accept": "*/*"})


class LengthTests(unittest.TestCase):
    def test_byte_by_byte_and_rest(self):
        decoder = BodyDecoder(Framing.LENGTH, 5)
        self.assertEqual(decode_all(decoder, b"hello", 1), b"hello")
        self.assertTrue(decoder.done)
        decoder = BodyDecoder(Framing.LENGTH, 5)
        self.assertEqual(decoder.feed(b"helloGET / HTTP/1.1\r\n"), [b"hello"])
        self.assertEqual(decoder.rest, b"GET / HTTP/1.1\r\n")

    def test_whole_read_passed_without_copy(self):
        data = b"x" * 1000
        decoder = BodyDecoder(Framing.LENGTH, 2000)
        self.assertIs(decoder.feed(data)[0], data)

    def test_limit(self):
        with self.assertRaises(BodyError):
            BodyDecoder(Framing.LENGTH, 11, max_body=10)

    def test_bytes_skipped_by_a_splice_count_and_complete(self):
        decoder = BodyDecoder(Framing.LENGTH, 10)
        self.assertEqual(decoder.feed(b"abc"), [b"abc"])
        self.assertEqual(decoder.length_left(), 7)
        decoder.skip(4)
        self.assertEqual((decoder.length_left(), decoder.received, decoder.done), (3, 7, False))
        with self.assertRaises(ValueError):
            decoder.skip(4)  # past the body's end: never taken as the next request's
        decoder.skip(3)
        self.assertEqual((decoder.length_left(), decoder.received, decoder.done, decoder.rest), (0, 10, True, b""))

    def test_only_a_length_body_can_be_skipped(self):
        for decoder in (BodyDecoder(Framing.CHUNKED), BodyDecoder(Framing.UNTIL_CLOSE), BodyDecoder(Framing.NONE)):
            self.assertEqual(decoder.length_left(), 0)
            with self.assertRaises(ValueError):
                decoder.skip(1)

    def test_until_close(self):
        decoder = BodyDecoder(Framing.UNTIL_CLOSE)
        self.assertEqual(decoder.feed(b"abc"), [b"abc"])
        self.assertFalse(decoder.done)
        decoder.finish_at_close()
        self.assertTrue(decoder.done)

    def test_short_body_at_close(self):
        decoder = BodyDecoder(Framing.LENGTH, 5)
        decoder.feed(b"abc")
        self.assertRaises(BodyError, decoder.finish_at_close)


class ChunkedTests(unittest.TestCase):
    BODY = b"5\r\nhello\r\n1;ext=1\r\n \r\nA\r\n0123456789\r\n0\r\nx-t: 1\r\n\r\n"

    def test_every_split(self):
        for step in range(1, len(self.BODY) + 1):
            decoder = BodyDecoder(Framing.CHUNKED)
            self.assertEqual(decode_all(decoder, self.BODY + b"NEXT", step), b"hello 0123456789", msg=step)
            self.assertTrue(decoder.done)

    def test_rest_after_last_chunk(self):
        decoder = BodyDecoder(Framing.CHUNKED)
        self.assertEqual(b"".join(decoder.feed(b"3\r\nabc\r\n0\r\n\r\nGET /")), b"abc")
        self.assertEqual(decoder.rest, b"GET /")

    def test_bare_lf_lines(self):
        decoder = BodyDecoder(Framing.CHUNKED)
        self.assertEqual(b"".join(decoder.feed(b"3\nabc\n0\n\n")), b"abc")
        self.assertTrue(decoder.done)

    def test_encoder_round_trip(self):
        encoded = b"".join(chunk(b"abc") + chunk(b"x" * 300)) + LAST_CHUNK
        decoder = BodyDecoder(Framing.CHUNKED)
        self.assertEqual(b"".join(decoder.feed(encoded)), b"abc" + b"x" * 300)
        self.assertTrue(decoder.done)

    def test_malformed(self):
        for body in (b"zz\r\n", b"-1\r\n", b"3\r\nabcd\r\n", b"1" * 16 + b"\r\n", b" 3\r\nabc\r\n",
                     b"0\r\nnot a field\r\n\r\n", b"0\r\n folded: x\r\n\r\n"):
            decoder = BodyDecoder(Framing.CHUNKED)
            with self.assertRaises(BodyError, msg=body):
                decoder.feed(body)

    def test_chunk_line_bound(self):
        decoder = BodyDecoder(Framing.CHUNKED)
        decoder.feed(b"3;" + b"e" * (MAX_CHUNK_LINE - 10))  # within the bound, line unfinished
        with self.assertRaises(BodyError):
            decoder.feed(b"e" * 20)

    def test_trailer_bound(self):
        decoder = BodyDecoder(Framing.CHUNKED)
        decoder.feed(b"0\r\n")
        line = b"x-t: " + b"v" * 100 + b"\r\n"
        with self.assertRaises(BodyError):
            for _ in range(MAX_TRAILER_BYTES // len(line) + 2):
                decoder.feed(line)

    def test_limit(self):
        decoder = BodyDecoder(Framing.CHUNKED, max_body=10)
        decoder.feed(b"5\r\nhello\r\n")
        with self.assertRaises(BodyError):
            decoder.feed(b"6\r\n")

    def test_held_bytes_bounded_for_a_large_body(self):
        """A 64 MiB chunked body in 64 KiB reads: the decoder holds no body bytes itself."""
        decoder = BodyDecoder(Framing.CHUNKED)
        piece = b"".join(chunk(b"y" * 65000))
        total = 0
        for _ in range(1024):
            total += sum(len(p) for p in decoder.feed(piece))
            self.assertLess(len(decoder._line), 16)
        decoder.feed(LAST_CHUNK)
        self.assertEqual(total, 65000 * 1024)
        self.assertTrue(decoder.done)
