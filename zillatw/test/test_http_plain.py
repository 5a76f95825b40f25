"""Plain (non-upgrade) requests through the http server: keep-alive, pipelining, HTTP/1.0,
`Connection: close`, the idle and body timeouts (on a Clock), the head and body limits,
CORS, and upgrades on the same listener. Echo is the exit here; test_http_proxy covers the
http client. Real loopback sockets, responses parsed by the small reader below (not by
zillatw's own parsers)."""

from __future__ import annotations

import copy
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from zillatw.test.http_support import connect_http, plain_chain, request
from zillatw.test.support import close_ws, connect_ws, eventually, start_gateway


class KeepAliveTests(unittest.TestCase):
    @defer.inlineCallbacks
    def serve(self, options: dict[str, Any] | None = None) -> Any:
        self.gateway, self.port = yield start_gateway(self, plain_chain(options))
        return self.port

    @defer.inlineCallbacks
    def test_requests_on_one_connection(self):
        port = yield self.serve()
        client = yield connect_http(port)
        self.addCleanup(client.transport.loseConnection)
        for index in range(3):
            client.send(request("POST", "/", f"message {index}".encode(), {"Content-Type": "text/plain"}))
            replies = yield client.responses(index + 1)
            reply = replies[index]
            self.assertEqual((reply.status, reply.body), (200, f"message {index}".encode()))
            self.assertEqual(reply.headers["content-type"], "text/plain")
            self.assertNotIn("connection", reply.headers)
        self.assertFalse(client.is_closed)
        events = self.gateway.events_text.getvalue()
        self.assertEqual(events.count("BINDING_HTTP_REQUEST_ACCEPTED"), 3)

    @defer.inlineCallbacks
    def test_pipelined_requests_answered_in_order(self):
        port = yield self.serve()
        client = yield connect_http(port)
        self.addCleanup(client.transport.loseConnection)
        client.send(b"".join(request("POST", f"/{i}", b"x" * i + b"!") for i in range(50)))
        replies = yield client.responses(50)
        self.assertEqual([r.body for r in replies], [b"x" * i + b"!" for i in range(50)])

    @defer.inlineCallbacks
    def test_chunked_request_gets_chunked_echo(self):
        port = yield self.serve()
        client = yield connect_http(port)
        self.addCleanup(client.transport.loseConnection)
        client.send(request("POST", "/", None, {"Transfer-Encoding": "chunked"}) + b"5\r\nhello\r\n")
        client.send(b"6\r\n world\r\n0\r\n\r\n")
        (reply,) = yield client.responses(1)
        self.assertEqual((reply.headers["transfer-encoding"], reply.body), ("chunked", b"hello world"))

    @defer.inlineCallbacks
    def test_connection_close_honoured(self):
        port = yield self.serve()
        client = yield connect_http(port)
        client.send(request("GET", "/", headers={"Connection": "close"}))
        (reply,) = yield client.responses(1)
        self.assertEqual(reply.headers.get("connection"), "close")
        yield client.closed

    @defer.inlineCallbacks
    def test_http_1_0_closes_after_the_response(self):
        port = yield self.serve()
        client = yield connect_http(port)
        client.send(request("POST", "/", b"old", version="HTTP/1.0", host=None))
        (reply,) = yield client.responses(1)
        self.assertEqual((reply.body, reply.headers.get("connection")), (b"old", "close"))
        yield client.closed

    @defer.inlineCallbacks
    def test_http_1_0_keep_alive_when_asked(self):
        port = yield self.serve()
        client = yield connect_http(port)
        self.addCleanup(client.transport.loseConnection)
        for index in range(2):
            client.send(request("POST", "/", b"old", {"Connection": "keep-alive"}, version="HTTP/1.0", host=None))
            replies = yield client.responses(index + 1)
            self.assertEqual(replies[index].headers.get("connection"), "keep-alive")
        self.assertFalse(client.is_closed)

    @defer.inlineCallbacks
    def test_head_request_gets_no_body(self):
        port = yield self.serve()
        client = yield connect_http(port)
        self.addCleanup(client.transport.loseConnection)
        client.head_only = True
        client.send(request("HEAD", "/"))
        (reply,) = yield client.responses(1)
        self.assertEqual(reply.status, 200)
        client.head_only = False
        client.send(request("POST", "/", b"after"))
        replies = yield client.responses(2)
        self.assertEqual(replies[1].body, b"after")

    @defer.inlineCallbacks
    def test_expect_continue_answered(self):
        port = yield self.serve()
        client = yield connect_http(port)
        self.addCleanup(client.transport.loseConnection)
        client.send(request("POST", "/", None, {"Content-Length": "4", "Expect": "100-continue"}))
        yield eventually(lambda: b"100 Continue" in client.raw)
        client.send(b"body")
        (reply,) = yield client.responses(1)
        self.assertEqual(reply.body, b"body")

    @defer.inlineCallbacks
    def test_upgrade_on_the_same_listener_and_connection(self):
        port = yield self.serve()
        ws = yield connect_ws(port)
        ws.sendMessage(b"ws still works")
        self.assertEqual(b"".join((yield ws.messages.get())[1]), b"ws still works")
        yield close_ws(ws)
        client = yield connect_http(port)
        self.addCleanup(client.transport.loseConnection)
        client.send(request("POST", "/", b"plain first"))
        yield client.responses(1)
        client.send(request("GET", "/", headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                                 "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                                                 "Sec-WebSocket-Version": "13"}))
        yield eventually(lambda: b"101 Switching Protocols" in client.raw)

    @defer.inlineCallbacks
    def test_idle_timeout_on_a_clock(self):
        port = yield self.serve({"idle-timeout": 5})
        clock = Clock()
        self.gateway.binding("http0").reactor = clock
        client = yield connect_http(port)
        client.send(request("POST", "/", b"one"))
        yield client.responses(1)
        clock.advance(4)
        self.assertFalse(client.is_closed)
        clock.advance(2)
        yield client.closed
        self.assertEqual(len(client.replies), 1)  # closed without an unasked-for response
        self.assertEqual(client.data, b"")

    @defer.inlineCallbacks
    def test_idle_timeout_counts_from_the_last_response_with_one_timer(self):
        port = yield self.serve({"idle-timeout": 5, "head-timeout": 3})
        clock = Clock()
        self.gateway.binding("http0").reactor = clock
        client = yield connect_http(port)
        client.send(request("POST", "/", b"one"))
        yield client.responses(1)
        clock.advance(4)
        client.send(request("POST", "/", b"two"))  # a whole head in one read: no head timer
        yield client.responses(2)
        self.assertEqual(len(clock.getDelayedCalls()), 1)  # the connection's one idle timer
        clock.advance(4)  # the timer fires 5 s after the first response: idle for 4 only
        self.assertFalse(client.is_closed)
        clock.advance(1.5)
        yield client.closed
        self.assertEqual(len(client.replies), 2)

    @defer.inlineCallbacks
    def test_a_kept_alive_connections_partial_next_head_times_out(self):
        port = yield self.serve({"head-timeout": 3})
        clock = Clock()
        self.gateway.binding("http0").reactor = clock
        client = yield connect_http(port)
        client.send(request("POST", "/", b"one"))
        yield client.responses(1)
        clock.advance(30)  # idle, but under the idle timeout: the head timer starts at its first bytes
        client.send(b"POST / HTTP/1.1\r\nHost: loc")
        yield eventually(lambda: len(clock.getDelayedCalls()) == 2)
        clock.advance(2.5)
        self.assertFalse(client.is_closed)
        clock.advance(1)
        yield client.closed
        self.assertIn(b"HTTP/1.1 408 ", client.raw)

    @defer.inlineCallbacks
    def test_body_timeout_on_a_clock(self):
        port = yield self.serve({"body-timeout": 7})
        clock = Clock()
        self.gateway.binding("http0").reactor = clock
        client = yield connect_http(port)
        client.send(request("POST", "/", None, {"Content-Length": "10"}) + b"abc")
        yield eventually(lambda: b"abc" in client.raw)  # echo streamed the first bytes back
        clock.advance(6)
        self.assertFalse(client.is_closed)
        clock.advance(2)
        yield client.closed  # a response had begun: cut off, never completed


class LimitTests(unittest.TestCase):
    @defer.inlineCallbacks
    def exchange(self, raw: bytes, options: dict[str, Any] | None = None) -> Any:
        gateway, port = yield start_gateway(self, plain_chain(options))
        client = yield connect_http(port)
        client.send(raw)
        yield client.closed
        self.events = gateway.events_text.getvalue()
        return client

    @defer.inlineCallbacks
    def assertRefused(self, raw: bytes, status: int, options: dict[str, Any] | None = None) -> Any:
        client = yield self.exchange(raw, options)
        self.assertTrue(client.raw.startswith(f"HTTP/1.1 {status} ".encode()), client.raw[:80])
        self.assertNotIn(b"server:", client.raw.lower())
        self.assertIn(f"BINDING_HTTP_REQUEST_REJECTED - {status}", self.events)

    def test_both_framings_refused(self):
        return self.assertRefused(request("POST", "/", None, {"Transfer-Encoding": "chunked",
                                                              "Content-Length": "3"}) + b"abc", 400)

    def test_unknown_coding_refused(self):
        return self.assertRefused(request("POST", "/", None, {"Transfer-Encoding": "gzip"}), 400)

    @defer.inlineCallbacks
    def test_malformed_chunk_cuts_the_exchange(self):
        """Echo's response has begun: a broken chunk ends the connection, never a whole reply."""
        client = yield self.exchange(request("POST", "/", None, {"Transfer-Encoding": "chunked"}) + b"zz\r\n")
        self.assertTrue(client.is_closed)
        self.assertEqual(client.replies, [])  # aborted: what echo had begun never completes

    def test_body_over_the_limit_refused(self):
        return self.assertRefused(request("POST", "/", b"x" * 11), 413, {"max-request-body": 10})

    def test_chunked_body_over_the_limit_cut_off(self):
        """Echo answers as the body arrives; a chunk past the limit ends the connection."""
        raw = request("POST", "/", None, {"Transfer-Encoding": "chunked"}) + b"5\r\nhello\r\n9\r\n"
        d = self.exchange(raw, {"max-request-body": 8})

        def check(client: Any) -> None:
            self.assertTrue(client.is_closed)
            self.assertEqual(client.replies, [])  # never a complete response
        return d.addCallback(check)

    def test_head_limit_applies(self):
        return self.assertRefused(request("GET", "/", headers={"X-Big": "x" * 9000}), 431)

    def test_origin_form_required(self):
        return self.assertRefused(request("GET", "http://elsewhere/"), 400)

    def test_host_checked(self):
        return self.assertRefused(request("GET", "/", host="user@host"), 400)

    @defer.inlineCallbacks
    def test_secrets_redacted_in_events(self):
        gateway, port = yield start_gateway(self, plain_chain())
        client = yield connect_http(port)
        self.addCleanup(client.transport.loseConnection)
        client.send(request("GET", "/x?access_token=s3cr3t&a=1"))
        yield client.responses(1)
        events = gateway.events_text.getvalue()
        self.assertIn("BINDING_HTTP_REQUEST_ACCEPTED", events)
        self.assertNotIn("s3cr3t", events)


class AccessControlTests(unittest.TestCase):
    CROSS = {"access-control": {"policy": "cross-origin", "allow": {"origins": ["https://app.example"]}}}

    @defer.inlineCallbacks
    def exchange(self, raw: bytes, options: dict[str, Any] | None) -> Any:
        gateway, port = yield start_gateway(self, plain_chain(copy.deepcopy(options)))
        client = yield connect_http(port)
        self.addCleanup(client.transport.loseConnection)
        client.send(raw)
        return client

    @defer.inlineCallbacks
    def test_preflight_answered_and_connection_kept(self):
        client = yield self.exchange(request("OPTIONS", "/", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST"}), self.CROSS)
        (reply,) = yield client.responses(1)
        self.assertEqual(reply.status, 204)
        self.assertEqual(reply.headers["access-control-allow-origin"], "https://app.example")
        self.assertEqual(reply.headers["access-control-allow-methods"], "*")  # allow.methods unset: all
        client.send(request("POST", "/", b"then", {"Origin": "https://app.example"}))
        replies = yield client.responses(2)
        self.assertEqual(replies[1].body, b"then")
        self.assertEqual(replies[1].headers["access-control-allow-origin"], "https://app.example")
        self.assertEqual(replies[1].headers["vary"], "Origin")

    @defer.inlineCallbacks
    def test_preflight_from_another_origin_refused(self):
        client = yield self.exchange(request("OPTIONS", "/", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}), self.CROSS)
        yield client.closed
        self.assertTrue(client.raw.startswith(b"HTTP/1.1 403 "))

    @defer.inlineCallbacks
    def test_same_origin_refuses_a_foreign_page(self):
        client = yield self.exchange(request("POST", "/", b"x", {"Origin": "https://evil.example"}), None)
        yield client.closed
        self.assertTrue(client.raw.startswith(b"HTTP/1.1 403 "))

    @defer.inlineCallbacks
    def test_exposed_headers_named(self):
        options = copy.deepcopy(self.CROSS)
        options["access-control"]["expose"] = {"headers": ["x-extra"]}
        client = yield self.exchange(request("POST", "/", b"x", {"Origin": "https://app.example",
                                                                 "Content-Type": "text/plain"}), options)
        (reply,) = yield client.responses(1)
        self.assertEqual(reply.headers["access-control-allow-origin"], "https://app.example")
        self.assertNotIn("access-control-expose-headers", reply.headers)  # content-type is safelisted
