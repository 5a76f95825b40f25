"""zillatw.wire.http1 without sockets: RequestHeadParser (whole, byte by byte, split anywhere),
its limits and status codes (400, 414, 431, 501, 505), and render_response's bytes."""

from __future__ import annotations

import random
import re
from unittest import mock

from twisted.trial import unittest

from zillatw.wire import http1
from zillatw.wire.http1 import (
    HttpError,
    Request,
    RequestHeadParser,
    Response,
    ResponseError,
    ResponseHeadParser,
    render_response,
)

UPGRADE = (b"GET /echo?x=1 HTTP/1.1\r\n"
           b"Host: localhost:7114\r\n"
           b"Upgrade: websocket\r\n"
           b"Connection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           b"Sec-WebSocket-Version: 13\r\n"
           b"\r\n")


def feed_whole(data: bytes, **limits: int) -> tuple[Request | None, RequestHeadParser]:
    parser = RequestHeadParser(**limits)
    return parser.feed(data), parser


def feed_bytewise(data: bytes, **limits: int) -> tuple[Request | None, RequestHeadParser]:
    """Feed one byte at a time; returns the first Request and the parser."""
    parser = RequestHeadParser(**limits)
    for i in range(len(data)):
        request = parser.feed(data[i:i + 1])
        if request is not None:
            return request, parser
    return None, parser


def error_of(data: bytes, feed=feed_whole, **limits: int) -> HttpError:
    """The HttpError the parser raises for `data` (fails the test if none is raised)."""
    try:
        request, _ = feed(data, **limits)
    except HttpError as e:
        return e
    raise AssertionError(f"no HttpError for {data[:60]!r}..., got {request!r}")


def header_block(value_length: int) -> bytes:
    """A request whose header block (from the request line's LF to the blank line's CR)
    is exactly 4 + value_length bytes: LF, 'X: ', the value."""
    return b"GET / HTTP/1.1\r\nX: " + b"a" * value_length + b"\r\n\r\n"


class RequestHeadTests(unittest.SynchronousTestCase):
    def test_upgrade_request_parsed_whole(self):
        request, parser = feed_whole(UPGRADE)
        self.assertEqual(request.method, "GET")
        self.assertEqual(request.target, "/echo?x=1")
        self.assertEqual(request.version, (1, 1))
        self.assertEqual(request.headers, {
            "host": "localhost:7114", "upgrade": "websocket", "connection": "Upgrade",
            "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==", "sec-websocket-version": "13"})
        self.assertEqual(request.raw_head, UPGRADE)
        self.assertEqual(parser.rest, b"")

    def test_byte_by_byte_gives_the_same_request_as_whole(self):
        whole, _ = feed_whole(UPGRADE)
        bytewise, parser = feed_bytewise(UPGRADE)
        self.assertEqual(bytewise, whole)
        self.assertEqual(parser.rest, b"")

    def test_every_split_point_gives_the_same_request(self):
        whole, _ = feed_whole(UPGRADE + b"tail")
        for cut in range(1, len(UPGRADE)):
            parser = RequestHeadParser()
            self.assertIsNone(parser.feed(UPGRADE[:cut]), cut)
            self.assertEqual(parser.feed(UPGRADE[cut:] + b"tail"), whole, cut)
            self.assertEqual(parser.rest, b"tail", cut)

    def test_incomplete_head_returns_none(self):
        parser = RequestHeadParser()
        self.assertIsNone(parser.feed(UPGRADE[:-2]))
        self.assertIsNone(parser.feed(b"\r"))
        self.assertEqual(parser.feed(b"\n").target, "/echo?x=1")

    def test_bytes_after_the_head_are_kept_in_rest(self):
        frame = b"\x81\x85\x00\x00\x00\x00hello"
        request, parser = feed_whole(UPGRADE + frame)
        self.assertEqual(request.raw_head, UPGRADE)
        self.assertEqual(parser.rest, frame)

    def test_header_names_lower_cased_and_values_trimmed(self):
        request, _ = feed_whole(b"GET / HTTP/1.1\r\nX-Mixed-CASE: \t  some value \t\r\nEmpty:\r\n\r\n")
        self.assertEqual(request.headers, {"x-mixed-case": "some value", "empty": ""})
        self.assertEqual(request.header("x-mixed-case"), "some value")
        self.assertIsNone(request.header("X-Mixed-CASE"))
        self.assertIsNone(request.header("absent"))

    def test_repeated_header_values_joined_with_comma(self):
        request, _ = feed_whole(b"GET / HTTP/1.1\r\nSec-WebSocket-Protocol: chat\r\n"
                                b"Host: h\r\nsec-websocket-protocol: superchat\r\n\r\n")
        self.assertEqual(request.headers["sec-websocket-protocol"], "chat, superchat")

    def test_header_value_colons_stay_in_the_value(self):
        request, _ = feed_whole(b"GET / HTTP/1.1\r\nHost: [::1]:7114\r\n\r\n")
        self.assertEqual(request.headers["host"], "[::1]:7114")

    def test_bare_lf_line_endings_accepted(self):
        request, parser = feed_whole(b"GET /a HTTP/1.1\nHost: x\nUpgrade: websocket\n\nrest")
        self.assertEqual(request.target, "/a")
        self.assertEqual(request.headers, {"host": "x", "upgrade": "websocket"})
        self.assertEqual(parser.rest, b"rest")

    def test_lf_lines_then_crlf_blank_line_end_the_head(self):
        for data in (b"GET /a HTTP/1.1\nHost: x\n\r\nrest", b"GET /a HTTP/1.1\r\nHost: x\n\r\nrest"):
            request, parser = feed_whole(data)
            self.assertEqual((request.target, request.headers, parser.rest), ("/a", {"host": "x"}, b"rest"))
            self.assertEqual(feed_bytewise(data)[0], request)
        request, parser = feed_whole(b"GET /b HTTP/1.1\n\r\n")
        self.assertEqual((request.target, request.headers, parser.rest), ("/b", {}, b""))

    def test_empty_lines_before_the_request_line_ignored(self):
        request, _ = feed_whole(b"\r\n\r\n\n" + UPGRADE)
        self.assertEqual(request.raw_head, UPGRADE)
        request, _ = feed_bytewise(b"\r\n\n\r\n" + UPGRADE)
        self.assertEqual(request.raw_head, UPGRADE)

    def test_request_without_headers(self):
        request, _ = feed_whole(b"OPTIONS * HTTP/1.1\r\n\r\n")
        self.assertEqual((request.method, request.target, request.headers), ("OPTIONS", "*", {}))

    def test_every_known_method_accepted(self):
        for method in ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"):
            request, _ = feed_whole(method.encode() + b" / HTTP/1.1\r\n\r\n")
            self.assertEqual(request.method, method)

    def test_http_1_0_and_1_9_parsed_with_their_version(self):
        # The parser accepts any HTTP/1.x; the WebSocket check refuses below 1.1.
        self.assertEqual(feed_whole(b"GET / HTTP/1.0\r\n\r\n")[0].version, (1, 0))
        self.assertEqual(feed_whole(b"GET / HTTP/1.9\r\n\r\n")[0].version, (1, 9))

    def test_target_kept_as_sent(self):
        request, _ = feed_whole(b"GET /caf\xc3\xa9/%20?q=a+b#frag HTTP/1.1\r\n\r\n")
        self.assertEqual(request.target, "/caf\xc3\xa9/%20?q=a+b#frag")


class LimitTests(unittest.SynchronousTestCase):
    def test_long_request_line_is_414(self):
        error = error_of(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n")
        self.assertEqual(error.status, 414)
        self.assertEqual(error.reason, "request line longer than 8192 bytes")

    def test_long_request_line_is_414_before_its_end_arrives(self):
        parser = RequestHeadParser()
        parser.feed(b"GET /" + b"a" * 8187)  # 8192 bytes, no line end yet
        with self.assertRaises(HttpError) as caught:
            parser.feed(b"a")
        self.assertEqual(caught.exception.status, 414)

    def test_request_line_limit_boundary(self):
        line = b"GET /" + b"a" * (100 - len(b"GET / HTTP/1.1") - 1) + b" HTTP/1.1"  # 99 bytes, CR is the 100th
        self.assertEqual(len(line), 99)
        self.assertIsNotNone(feed_whole(line + b"\r\n\r\n", max_request_line=100)[0])
        self.assertIsNotNone(feed_bytewise(line + b"\r\n\r\n", max_request_line=100)[0])
        self.assertEqual(error_of(line + b"a\r\n\r\n", max_request_line=100).status, 414)
        self.assertEqual(error_of(line + b"a\r\n\r\n", feed_bytewise, max_request_line=100).status, 414)

    def test_headers_over_8_kib_are_431(self):
        error = error_of(b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n")
        self.assertEqual(error.status, 431)
        self.assertEqual(error.reason, "request headers larger than 8192 bytes")

    def test_headers_over_8_kib_are_431_before_their_end_arrives(self):
        parser = RequestHeadParser()
        parser.feed(b"GET / HTTP/1.1\r\nX-Big: ")
        with self.assertRaises(HttpError) as caught:
            for _ in range(9):
                parser.feed(b"b" * 1024)
        self.assertEqual(caught.exception.status, 431)

    def test_header_limit_boundary_whole(self):
        self.assertIsNotNone(feed_whole(header_block(8188))[0])  # a 8192-byte block
        self.assertEqual(error_of(header_block(8189)).status, 431)

    def test_header_limit_does_not_depend_on_how_bytes_arrive(self):
        # A block of exactly the limit is accepted when fed byte by byte too, not refused
        # while its last CRLF CRLF is still arriving.
        request, _ = feed_bytewise(header_block(8188))
        self.assertEqual(request.headers["x"], "a" * 8188)
        self.assertEqual(error_of(header_block(8189), feed_bytewise).status, 431)

    def test_header_limit_outcome_same_for_every_split(self):
        for terminator in (b"\r\n\r\n", b"\n\n", b"\n\r\n"):
            for length in range(4, 12):  # blocks of 8 to 15 bytes around a limit of 12
                data = b"GET / HTTP/1.1\r\nX: " + b"a" * length + terminator
                try:
                    expected = feed_whole(data, max_header_bytes=12)[0].headers
                except HttpError as e:
                    expected = e.status
                self.assertEqual(expected, {"x": "a" * length} if length <= 8 else 431)
                for cut in range(1, len(data)):
                    parser = RequestHeadParser(max_header_bytes=12)
                    try:
                        request = parser.feed(data[:cut]) or parser.feed(data[cut:])
                        got = request.headers
                    except HttpError as e:
                        got = e.status
                    self.assertEqual(got, expected, (terminator, length, cut))

    def test_more_than_max_headers_is_431(self):
        head = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n"
        error = error_of(head)
        self.assertEqual((error.status, error.reason), (431, "more than 100 request headers"))
        self.assertEqual(len(feed_whole(head, max_headers=101)[0].headers), 101)

    def test_limits_are_configurable(self):
        self.assertEqual(error_of(b"GET /abcdefghij HTTP/1.1\r\n\r\n", max_request_line=10).reason,
                         "request line longer than 10 bytes")
        self.assertEqual(error_of(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", max_header_bytes=8).reason,
                         "request headers larger than 8 bytes")


class MalformedTests(unittest.SynchronousTestCase):
    def assertStatus(self, data: bytes, status: int, reason: str) -> None:
        for feed in (feed_whole, feed_bytewise):
            error = error_of(data, feed)
            self.assertEqual((error.status, error.reason), (status, reason), (feed.__name__, data))

    def test_request_line_without_three_parts_is_400(self):
        reason = "malformed request line (expected 'METHOD target HTTP/1.1')"
        self.assertStatus(b"GET /\r\n\r\n", 400, reason)
        self.assertStatus(b"GET / HTTP/1.1 extra\r\n\r\n", 400, reason)
        self.assertStatus(b"GET  / HTTP/1.1\r\n\r\n", 400, reason)  # two spaces: an empty part
        self.assertStatus(b"GET /a b HTTP/1.1\r\n\r\n", 400, reason)

    def test_method_not_a_token_is_400(self):
        self.assertStatus(b"GE(T / HTTP/1.1\r\n\r\n", 400, "malformed request method")
        self.assertStatus(b"G\xc9T / HTTP/1.1\r\n\r\n", 400, "malformed request method")

    def test_malformed_version_is_400(self):
        self.assertStatus(b"GET / HTTP/11\r\n\r\n", 400, "malformed HTTP version 'HTTP/11'")
        self.assertStatus(b"GET / http/1.1\r\n\r\n", 400, "malformed HTTP version 'http/1.1'")
        self.assertStatus(b"GET / HTTP/1.10\r\n\r\n", 400, "malformed HTTP version 'HTTP/1.10'")

    def test_other_major_versions_are_505(self):
        self.assertStatus(b"GET / HTTP/2.0\r\n\r\n", 505,
                          "HTTP version 2.0 is not supported (expected HTTP/1.1)")
        self.assertStatus(b"GET / HTTP/0.9\r\n\r\n", 505,
                          "HTTP version 0.9 is not supported (expected HTTP/1.1)")

    def test_version_checked_before_method(self):
        self.assertEqual(error_of(b"BREW / HTTP/2.0\r\n\r\n").status, 505)

    def test_unknown_method_is_501(self):
        self.assertStatus(b"BREW /pot HTTP/1.1\r\n\r\n", 501, "method BREW is not implemented")

    def test_methods_are_case_sensitive(self):
        self.assertStatus(b"get / HTTP/1.1\r\n\r\n", 501, "method get is not implemented")

    def test_obsolete_line_folding_is_400(self):
        reason = "obsolete header line folding is not allowed"
        self.assertStatus(b"GET / HTTP/1.1\r\nX-A: one\r\n two\r\n\r\n", 400, reason)
        self.assertStatus(b"GET / HTTP/1.1\r\nX-A: one\r\n\ttwo\r\n\r\n", 400, reason)

    def test_header_without_colon_is_400(self):
        self.assertStatus(b"GET / HTTP/1.1\r\nHost localhost\r\n\r\n", 400,
                          "malformed header line (starting 'Host')")

    def test_whitespace_before_the_colon_is_400(self):
        self.assertStatus(b"GET / HTTP/1.1\r\nHost : localhost\r\n\r\n", 400,
                          "malformed header line (starting 'Host')")

    def test_empty_header_name_is_400(self):
        self.assertStatus(b"GET / HTTP/1.1\r\n: value\r\n\r\n", 400, "malformed header line")

    def test_malformed_header_line_names_at_most_32_bytes_of_its_name(self):
        error = error_of(b"GET / HTTP/1.1\r\n" + b"x" * 100 + b"\r\n\r\n")
        self.assertEqual(error.reason, f"malformed header line (starting {'x' * 32!r})")

    def test_a_malformed_credentials_line_is_not_quoted(self):
        # a line without its colon may still carry a token: only the name part is named
        error = error_of(b"GET / HTTP/1.1\r\nAuthorization Bearer eyJsecret.token\r\n\r\n")
        self.assertEqual(error.reason, "malformed header line (starting 'Authorization')")

    def test_control_characters_in_a_value_are_400(self):
        # RFC 9110 §5.5; VT and FF are also line breaks to str.splitlines(), where a second
        # reader of the head would see a header this parser did not
        for byte in (b"\x0b", b"\x0c", b"\x1c", b"\x1e", b"\x7f", b"\x01"):
            head = b"GET / HTTP/1.1\r\nHost: x\r\nX-A: one" + byte + b"sec-websocket-extensions: x\r\n\r\n"
            self.assertStatus(head, 400, "the x-a header contains a control character")

    def test_obs_text_and_tabs_in_a_value_are_kept(self):
        request = RequestHeadParser().feed(b"GET / HTTP/1.1\r\nX-A: caf\xe9\x85\tend\r\n\r\n")
        self.assertEqual(request.headers["x-a"], "caf\xe9\x85\tend")

    def test_bare_cr_is_400(self):
        reason = "bare CR or NUL in the request head"
        self.assertStatus(b"GET /a\rX-Injected:1 HTTP/1.1\r\nHost: x\r\n\r\n", 400, reason)
        self.assertStatus(b"GET / HTTP/1.1\r\nSec-WebSocket-Protocol: chat\rX:1\r\n\r\n", 400, reason)
        self.assertStatus(b"GET / HTTP/1.1\r\nHost: x\r\r\n\r\n", 400, reason)

    def test_nul_is_400(self):
        self.assertStatus(b"GET / HTTP/1.1\r\nX-A: a\x00b\r\n\r\n", 400, "bare CR or NUL in the request head")

    def test_http_error_carries_status_reason_and_no_headers(self):
        error = error_of(b"BREW / HTTP/1.1\r\n\r\n")
        self.assertEqual(error.args, (501, "method BREW is not implemented"))
        self.assertEqual(error.headers, ())


class RenderResponseTests(unittest.SynchronousTestCase):
    def test_status_only(self):
        self.assertEqual(render_response(404),
                         b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")

    def test_reason_becomes_a_plain_text_body(self):
        self.assertEqual(render_response(400, "the Host header is missing"),
                         b"HTTP/1.1 400 Bad Request\r\n"
                         b"Connection: close\r\n"
                         b"Content-Length: 27\r\n"
                         b"Content-Type: text/plain; charset=utf-8\r\n"
                         b"\r\n"
                         b"the Host header is missing\n")

    def test_extra_headers_come_first(self):
        self.assertEqual(render_response(426, "need 13", (("Sec-WebSocket-Version", "13"),)),
                         b"HTTP/1.1 426 Upgrade Required\r\n"
                         b"Sec-WebSocket-Version: 13\r\n"
                         b"Connection: close\r\n"
                         b"Content-Length: 8\r\n"
                         b"Content-Type: text/plain; charset=utf-8\r\n"
                         b"\r\n"
                         b"need 13\n")

    def test_content_length_counts_utf8_bytes(self):
        response = render_response(400, "caf\u00e9")
        self.assertIn(b"\r\nContent-Length: 6\r\n", response)
        self.assertTrue(response.endswith(b"\r\n\r\ncaf\xc3\xa9\n"))

    def test_status_phrases(self):
        for status, phrase in ((408, b"Request Timeout"), (414, b"URI Too Long"),
                               (431, b"Request Header Fields Too Large"), (501, b"Not Implemented"),
                               (502, b"Bad Gateway"), (504, b"Gateway Timeout"),
                               (505, b"HTTP Version Not Supported")):
            self.assertTrue(render_response(status).startswith(b"HTTP/1.1 %d %s\r\n" % (status, phrase)))

    def test_unknown_status_is_called_error(self):
        self.assertTrue(render_response(299).startswith(b"HTTP/1.1 299 Error\r\n"))

    def test_rendered_error_parses_back_as_a_head(self):
        # The status line has three parts and headers are well formed: a response parser
        # that splits like ours sees them.
        head, _, body = render_response(431, "too big").partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.assertEqual(lines[0].split(b" ", 2), [b"HTTP/1.1", b"431", b"Request Header Fields Too Large"])
        headers = dict(line.split(b": ", 1) for line in lines[1:])
        self.assertEqual(int(headers[b"Content-Length"]), len(body))


class ResponseHeadTests(unittest.SynchronousTestCase):
    """An upstream's answer to the ws client: the request parser's rules, for a response."""

    def parse(self, *chunks: bytes) -> tuple[Response | None, bytes]:
        parser = ResponseHeadParser()
        response = None
        for chunk in chunks:
            response = parser.feed(chunk)
        return response, parser.rest

    def test_a_101_fed_in_pieces_and_what_follows_it(self):
        head = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"X-A: 1\r\nX-A: 2\r\n\r\n")
        parser = ResponseHeadParser()
        for byte in head[:-1]:
            self.assertIsNone(parser.feed(bytes([byte])))
        response = parser.feed(head[-1:] + b"\x81\x00")
        self.assertEqual((response.status, response.reason, response.version), (101, "Switching Protocols", (1, 1)))
        self.assertEqual(response.headers, {"upgrade": "websocket", "connection": "Upgrade", "x-a": "1, 2"})
        self.assertEqual(parser.rest, b"\x81\x00")

    def test_bare_lf_and_no_headers(self):
        response, rest = self.parse(b"HTTP/1.1 200 OK\nA: b\n\nbody")
        self.assertEqual((response.status, response.headers, rest), (200, {"a": "b"}, b"body"))
        response, rest = self.parse(b"HTTP/1.1 204\r\n\r\n")
        self.assertEqual((response.status, response.reason, rest), (204, "", b""))

    def test_malformed_heads_are_refused(self):
        for head, why in [(b"HTTP/1.1 101 OK\r\nA: b\rc\r\n\r\n", "bare CR"),
                          (b"HTTP/1.1 101 OK\r\nA: b\0\r\n\r\n", "NUL"),
                          (b"HTTP/2 101\r\n\r\n", "status line"),
                          (b"HTTP/1.1 1010 OK\r\n\r\n", "status line"),
                          (b"ICY 200 OK\r\n\r\n", "status line"),
                          (b"HTTP/1.1 101 OK\r\nA: b\r\n folded\r\n\r\n", "folding"),
                          (b"HTTP/1.1 101 OK\r\nno colon\r\n\r\n", "malformed header"),
                          (b"HTTP/1.1 101 OK\r\nA: \x01\r\n\r\n", "control character")]:
            with self.assertRaises(ResponseError) as raised:
                self.parse(head)
            self.assertIn(why, str(raised.exception), head)

    def test_limits(self):
        with self.assertRaises(ResponseError):
            self.parse(b"HTTP/1.1 101 " + b"x" * 9000)
        with self.assertRaises(ResponseError):
            self.parse(b"HTTP/1.1 101 OK\r\n" + b"A: " + b"b" * 9000)
        with self.assertRaises(ResponseError):
            self.parse(b"HTTP/1.1 101 OK\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(101)) + b"\r\n")


class WellFormedFastPathTests(unittest.TestCase):
    """A head whose header lines are all well formed is split without the per-line checks:
    it must give header_fields' very answer, and every other head the checks' errors."""

    PIECES = [b"Host: a", b"host:b", b"X-Dup: 1", b"x-dup:  2 ", b"Empty:", b"Sp: \t v \t",
              b"Latin: \xe9t\xe9", b"Tab:\tx", b"CL: 5", b"Bad Name: x", b" folded", b"NoColon",
              b"Ctl: a\x01b", b"Nul: a\x00b", b"Cr: a\rb", b"Del: \x7f", b"Ok: ~!", b":empty-name"]

    def heads(self, count=3000):
        rng = random.Random(6455)
        for _ in range(count):
            lines = [rng.choice(self.PIECES) for _ in range(rng.randint(0, 6))]
            ends = [rng.choice([b"\r\n", b"\n"]) for _ in lines]
            yield b"".join(line + end for line, end in zip(lines, ends, strict=True)), rng.choice([b"\r\n", b"\n"])

    def outcome(self, parser, raw):
        try:
            return ("ok", parser(max_headers=4).feed(raw).headers)
        except (HttpError, ResponseError) as e:
            return ("error", str(e))

    def test_requests_and_responses_agree_with_the_line_by_line_checks(self):
        fast_seen = 0
        for block, blank in self.heads():
            for parser, first, pattern in ((RequestHeadParser, b"GET / HTTP/1.1\r\n", "_WELL_FORMED_FIELDS_AND_BLANK"),
                                           (ResponseHeadParser, b"HTTP/1.1 200 OK\r\n", "_WELL_FORMED_FIELDS")):
                raw = first + block + blank
                got = self.outcome(parser, raw)
                with mock.patch.object(http1, pattern, re.compile(b"(?!)")):  # the line-by-line path only
                    expected = self.outcome(parser, raw)
                self.assertEqual(got, expected, raw)
                fast_seen += got[0] == "ok"
        self.assertGreater(fast_seen, 100)  # the fast path was taken, often
