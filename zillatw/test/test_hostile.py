"""The attacks that found holes in the request hand-over and the proxy (issue 12), each done
as the attacker did it, over raw loopback sockets, asserting the safe outcome."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from zillatw.bindings.http.routes import pseudo_headers
from zillatw.bindings.ws import binding as ws_binding
from zillatw.config import Route
from zillatw.test import pki
from zillatw.test.pki import PASSWORD, Signer, client_tls, guarded_config, raw_tls_exchange, tls_chain
from zillatw.test.support import (
    chain,
    client_frame,
    connect_raw,
    eventually,
    parse_server_frames,
    port_of,
    proxy_config,
    raw_exchange,
    split_response,
    start_gateway,
    upgrade_request,
    wait,
)
from zillatw.wire.handshake import accept_key
from zillatw.wire.http1 import RequestHeadParser

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
BARE_LF_UPGRADE = (b"GET /echo HTTP/1.1\nHost: localhost\nUpgrade: websocket\nConnection: Upgrade\n"
                   b"Sec-WebSocket-Key: " + KEY.encode() + b"\nSec-WebSocket-Version: 13\n")


def resident_kib() -> int:
    """This process's resident set (the gateway runs in it), from /proc."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


class HeldUpstream(Protocol):
    """A raw upstream that reads the upgrade request and answers 101 only when told."""

    def connectionMade(self) -> None:
        self.received = b""
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def answer(self) -> None:
        head = self.received.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        headers = {line.partition(":")[0].lower(): line.partition(":")[2].strip() for line in head[1:]}
        assert self.transport is not None
        self.transport.write(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                              f"Sec-WebSocket-Accept: {accept_key(headers['sec-websocket-key'])}\r\n\r\n").encode())

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.lost.append(self)


class HeldUpstreams(ServerFactory):
    """The HeldUpstream connections made and those lost, in order."""

    protocol = HeldUpstream

    def __init__(self) -> None:
        self.connections: list[HeldUpstream] = []
        self.lost: list[HeldUpstream] = []


def start_held_upstream(case: unittest.TestCase) -> tuple[HeldUpstreams, int]:
    factory = HeldUpstreams()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    case.addCleanup(port.stopListening)
    return factory, port_of(port)


class BareLineFeedTests(unittest.TestCase):
    """Finding 1: a head ending in bare LF was accepted by zillatw's parser, then Autobahn
    waited for CRLF CRLF forever (no answer, every later byte kept, a core pinned)."""

    @defer.inlineCallbacks
    def setUp(self):
        self.gateway, self.port = yield start_gateway(self, chain())

    @defer.inlineCallbacks
    def _upgraded_and_echoing(self, head: bytes) -> Any:
        client = yield connect_raw(self.port)
        client.transport.write(head + client_frame(0x2, b"ping"))
        data = yield client.until(1)
        yield eventually(lambda: b"\r\n\r\n" in client.data and len(split_response(client.data)[2]) >= 6,
                         timeout=2)
        status, headers, rest = split_response(client.data)
        self.assertEqual(status, "HTTP/1.1 101 Switching Protocols", data)
        self.assertEqual(parse_server_frames(rest)[0], (0x2, True, b"ping"))
        client.transport.loseConnection()

    def test_bare_lf_head_is_upgraded_at_once(self):
        return self._upgraded_and_echoing(BARE_LF_UPGRADE + b"\n")

    def test_lf_lines_with_a_final_crlf_are_upgraded_at_once(self):
        return self._upgraded_and_echoing(BARE_LF_UPGRADE + b"\r\n")


class HandshakeHeadTests(unittest.TestCase):
    """Findings 10 and 9: the WebSocket layer acts on the head zillatw parsed, and every
    answer is the gateway's own."""

    @defer.inlineCallbacks
    def setUp(self):
        self.gateway, self.port = yield start_gateway(self, chain())

    @defer.inlineCallbacks
    def test_a_header_hidden_behind_nel_cannot_negotiate_deflate(self):
        # Latin-1 0x85 is NEL, a line break to str.splitlines(): a second parser of the raw
        # head would see a Sec-WebSocket-Extensions line that zillatw's parser did not.
        hidden = {"X-A": "a\x85Sec-WebSocket-Extensions: permessage-deflate"}
        data = yield raw_exchange(self.port, upgrade_request("/", hidden) + client_frame(0x8, b"\x03\xe8"))
        status, headers, _ = split_response(data)
        self.assertEqual(status, "HTTP/1.1 101 Switching Protocols")
        self.assertNotIn("sec-websocket-extensions", headers)

    @defer.inlineCallbacks
    def test_a_handshake_header_with_a_non_ascii_byte_is_400_before_it_is_accepted(self):
        for name in ("Sec-WebSocket-Extensions", "Sec-WebSocket-Protocol", "Host"):
            data = yield raw_exchange(self.port, upgrade_request("/", {name: "x\xe9"}))
            status, _, body = split_response(data)
            self.assertEqual(status, "HTTP/1.1 400 Bad Request", name)
            self.assertIn(b"must be ASCII" if name != "Host" else b"Host header", body)
        self.assertNotIn("ACCEPTED", self.gateway.events_text.getvalue())

    @defer.inlineCallbacks
    def test_a_header_hidden_behind_a_vertical_tab_is_400(self):
        hidden = {"X-A": "a\x0bSec-WebSocket-Extensions: permessage-deflate"}
        data = yield raw_exchange(self.port, upgrade_request("/", hidden))
        status, headers, body = split_response(data)
        self.assertEqual(status, "HTTP/1.1 400 Bad Request")
        self.assertIn(b"control character", body)

    @defer.inlineCallbacks
    def test_the_101_names_no_library(self):
        data = yield raw_exchange(self.port, upgrade_request("/") + client_frame(0x8, b"\x03\xe8"))
        status, headers, _ = split_response(data)
        self.assertEqual(status, "HTTP/1.1 101 Switching Protocols")
        self.assertNotIn("server", headers)

    @defer.inlineCallbacks
    def test_426_names_the_protocol_to_upgrade_to(self):
        data = yield raw_exchange(self.port, upgrade_request("/", {"Sec-WebSocket-Version": "8"}))
        status, headers, body = split_response(data)
        self.assertEqual(status, "HTTP/1.1 426 Upgrade Required")
        self.assertEqual((headers["upgrade"], headers["sec-websocket-version"]), ("websocket", "13"))
        self.assertEqual(int(headers["content-length"]), len(body))

    @defer.inlineCallbacks
    def test_targets_that_are_not_a_path_are_400(self):
        for target in ("@evil.example/x", "http://evil.example/x", "*", "/x#frag"):
            data = yield raw_exchange(self.port, upgrade_request(target))
            status, _, body = split_response(data)
            self.assertEqual(status, "HTTP/1.1 400 Bad Request", target)
            self.assertIn(b"origin-form", body)
        self.assertIn("BINDING_HTTP_REQUEST_REJECTED - 400 the request target must be a path",
                      self.gateway.events_text.getvalue())

    @defer.inlineCallbacks
    def test_hosts_with_userinfo_or_a_path_are_400(self):
        for host in ("user@evil.example", "evil.example/x", "a b", "localhost:99999", "localhost:x"):
            data = yield raw_exchange(self.port, upgrade_request("/", {"Host": host}))
            status, _, body = split_response(data)
            self.assertEqual(status, "HTTP/1.1 400 Bad Request", host)
            self.assertIn(b"Host header", body)


class ProxyHandOverTests(unittest.TestCase):
    """Findings 2, 3, 4 and 9 on the proxy: ws server -> ws client -> upstream."""

    @defer.inlineCallbacks
    def setUp(self):
        self.upstream, upstream_port = start_held_upstream(self)
        self.gateway, self.port = yield start_gateway(self, proxy_config(upstream_port))

    def ws_server(self) -> Any:
        return self.gateway.binding("ws0")

    @defer.inlineCallbacks
    def test_heads_sent_before_the_101_are_frames_of_this_connection(self):
        client = yield connect_raw(self.port)
        client.transport.write(upgrade_request("/a"))
        yield eventually(lambda: len(self.upstream.connections) == 1)
        # More upgrade requests while the gateway waits for the upstream's 101.
        client.transport.write(upgrade_request("/b") + upgrade_request("/c"))
        yield wait(0.2)
        self.assertEqual(len(self.upstream.connections), 1)  # no upstream per extra head
        self.upstream.connections[0].answer()
        yield client.done
        status, _, rest = split_response(client.data)
        self.assertEqual(status, "HTTP/1.1 101 Switching Protocols")
        # "GET /b ..." read as a frame: RSV1 set, opcode 7, unmasked: the connection fails with 1002
        frames = parse_server_frames(rest)
        self.assertEqual([(opcode, payload[:2]) for opcode, _, payload in frames], [(0x8, b"\x03\xea")])
        self.assertNotIn(b"HTTP/1.1", rest)
        yield eventually(lambda: len(self.upstream.lost) == 1)

    @defer.inlineCallbacks
    def test_a_client_that_leaves_before_the_101_closes_its_upstream_at_once(self):
        client = yield connect_raw(self.port)
        client.transport.write(upgrade_request("/"))
        yield eventually(lambda: len(self.upstream.connections) == 1)
        client.transport.loseConnection()
        yield eventually(lambda: len(self.upstream.lost) == 1, timeout=1)
        yield eventually(lambda: self.ws_server().open_count() == 0, timeout=1)

    @defer.inlineCallbacks
    def test_bytes_before_the_101_are_held_within_a_bound_then_reading_pauses(self):
        client = yield connect_raw(self.port)
        client.transport.write(upgrade_request("/"))
        yield eventually(lambda: len(self.upstream.connections) == 1)
        frame = client_frame(0x2, b"x" * 65000)
        sender = socket.create_connection(("127.0.0.1", self.port))
        self.addCleanup(sender.close)
        sender.sendall(upgrade_request("/"))
        yield eventually(lambda: len(self.upstream.connections) == 2)
        sent = [0]
        rss_before = resident_kib()

        def flood() -> None:
            sender.settimeout(1.0)
            try:
                for _ in range(400):  # 26 MB if nothing held it back
                    sender.sendall(frame)
                    sent[0] += len(frame)
            except OSError:
                pass  # the gateway stopped reading: the kernel buffers are full
        thread = threading.Thread(target=flood)
        thread.start()
        while thread.is_alive():
            yield wait(0.05)
        self.assertLess(sent[0], 400 * len(frame))  # it stopped reading
        # what the client pushed sits in the kernel's socket buffers, not in the gateway
        self.assertLess(resident_kib() - rss_before, 16 * 1024, f"{sent[0]} bytes sent")
        held = [c._held for c in self.ws_server().handshaking if c._held is not None]
        self.assertEqual(len(held), 2)
        self.assertLessEqual(max(len(h) for h in held), ws_binding.PENDING_LIMIT + 256 * 1024)
        # Once the upstream answers, what was held goes up as frames and reading resumes.
        upstream = self.upstream.connections[1]
        upstream.answer()
        yield eventually(lambda: len(upstream.received) > len(frame) * 2, timeout=5)
        client.transport.loseConnection()

    @defer.inlineCallbacks
    def test_the_upstream_gets_the_validated_host_and_path(self):
        client = yield connect_raw(self.port)
        client.transport.write(upgrade_request("/room?id=7", {"Host": "app.example:8080"}))
        yield eventually(lambda: b"\r\n\r\n" in (self.upstream.connections[0].received
                                                 if self.upstream.connections else b""))
        head = self.upstream.connections[0].received.decode("latin-1")
        self.assertTrue(head.startswith("GET /room?id=7 HTTP/1.1\r\n"), head)
        self.assertIn("\r\nHost: app.example:8080\r\n", head)
        self.assertNotIn("AutobahnPython", head)
        client.transport.loseConnection()

    @defer.inlineCallbacks
    def test_an_authority_like_target_opens_no_upstream(self):
        data = yield raw_exchange(self.port, upgrade_request("@evil.example/x"))
        self.assertTrue(data.startswith(b"HTTP/1.1 400 Bad Request\r\n"), data)
        yield wait(0.1)
        self.assertEqual(self.upstream.connections, [])


class UnreachableUpstreamTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_502_is_the_gateways_own_response_without_internal_text(self):
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()  # nothing listens there: connection refused
        gateway, gateway_port = yield start_gateway(self, proxy_config(port))
        data = yield raw_exchange(gateway_port, upgrade_request("/"))
        status, headers, body = split_response(data)
        self.assertEqual(status, "HTTP/1.1 502 Bad Gateway")
        self.assertEqual((headers["connection"], int(headers["content-length"])), ("close", len(body)))
        self.assertEqual(body, b"upstream unreachable\n")
        self.assertNotIn("server", headers)
        events = gateway.events_text.getvalue()
        self.assertIn("BINDING_WS_REQUEST_REJECTED - 502 upstream unreachable (", events)


class CredentialsNotLoggedTests(unittest.TestCase):
    """Finding 6: a token sent as ?access_token= was logged in full and echoed in a 404."""

    @defer.inlineCallbacks
    def setUp(self):
        self.signer = Signer("RSA", "rsa-1")
        self.gateway, self.port = yield start_gateway(self, guarded_config([self.signer.jwk]))

    @defer.inlineCallbacks
    def test_query_tokens_are_redacted_in_events_and_bodies(self):
        good = self.signer.token()
        data = yield raw_exchange(self.port, upgrade_request(f"/?x=1&access_token={good}")
                                  + client_frame(0x8, b"\x03\xe8"))
        self.assertTrue(data.startswith(b"HTTP/1.1 101"), data)
        wrong_scope = self.signer.token(scope="other")
        data = yield raw_exchange(self.port, upgrade_request(f"/?access_token={wrong_scope}"))
        status, _, body = split_response(data)
        self.assertEqual(status, "HTTP/1.1 404 Not Found")
        self.assertIn(b"access_token=REDACTED", body)
        self.assertNotIn(wrong_scope.encode(), body)
        events = self.gateway.events_text.getvalue()
        self.assertIn("GET http://localhost:80/?x=1&access_token=REDACTED", events)
        self.assertIn("GET ws://localhost:80/?x=1&access_token=REDACTED", events)
        for token in (good, wrong_scope):
            for part in token.split("."):
                self.assertNotIn(part, events)


class OpenTimeoutTests(unittest.SynchronousTestCase):
    """Every state has a timeout: an exit that never opens its stream gets a 504."""

    def test_an_exit_that_never_answers_gets_504_at_the_open_timeout(self):
        clock = Clock()
        cancelled: list[defer.Deferred] = []
        never: defer.Deferred = defer.Deferred(canceller=cancelled.append)

        class NeverOpens:
            def open(self, info: Any, peer: Any) -> defer.Deferred:
                return never

        class Recording:  # the ws server's observer (metrics, events): what it was told
            rejections: list[tuple[int, int, str]] = []

            def rejected(self, trace_id: int, status: int, reason: str, identity: str | None = None) -> None:
                self.rejections.append((trace_id, status, reason))

            def opening(self, trace_id: int, info: Any, shown_path: str, exit_: Any) -> Any:
                return exit_

        observer = Recording()
        server = ws_binding.WsServer("ws0", [(Route(0, "test:x"), NeverOpens())], reactor=clock, observer=observer)
        request = RequestHeadParser().feed(upgrade_request("/"))
        request.shown_target = request.target
        connection = server.accept_request(request, pseudo_headers(request, False), None, trace_id=7)
        transport = StringTransport()
        connection.makeConnection(transport)
        connection.take_over(request, b"")
        clock.advance(ws_binding.OPEN_TIMEOUT - 0.1)
        self.assertEqual(transport.value(), b"")
        clock.advance(0.2)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 504 Gateway Timeout\r\n"), transport.value())
        self.assertEqual(cancelled, [never])  # the exit lets go of what it was opening
        self.assertEqual(transport.value().count(b"HTTP/1.1"), 1)  # one answer, not a second for the cancel
        self.assertEqual(observer.rejections,
                         [(7, 504, f"the stream did not open within {ws_binding.OPEN_TIMEOUT:g} s")])


class BareLineFeedOverTlsTests(unittest.TestCase):
    """Finding 1 over TLS: the same head through a tls server binding is upgraded at once."""

    @defer.inlineCallbacks
    def test_bare_lf_head_over_tls_is_upgraded_at_once(self):
        folder = Path(self.mktemp())
        folder.mkdir(parents=True)
        ca = pki.make_ca("hostile test CA")
        server = pki.issue(ca, "localhost", dns=["localhost"])
        store = pki.write(folder / "localhost.p12", server.p12("localhost", PASSWORD))
        config = tls_chain({"keys": {"store": store, "type": "pkcs12", "password": PASSWORD}}, {"keys": ["localhost"]})
        config["bindings"]["http0"]["routes"] = [{"exit": "ws0"}]
        gateway, port = yield start_gateway(self, config)
        head = BARE_LF_UPGRADE + b"\n" + client_frame(0x2, b"ping") + client_frame(0x8, b"\x03\xe8")
        data = yield raw_tls_exchange(port, client_tls(ca), head)
        status, _, rest = split_response(data)
        self.assertEqual(status, "HTTP/1.1 101 Switching Protocols", data)
        self.assertEqual(parse_server_frames(rest)[:2], [(0x2, True, b"ping"), (0x8, True, b"\x03\xe8")])
