"""The ws server's admission control end to end: real `websockets` clients (asyncio, in a
thread) against a gateway on a loopback port, and a gateway on a Clock where time matters.

Per-client cap (503), handshake rate (429 with Retry-After), message rate (close 1008), each
with its REJECTED (or MESSAGE_RATE_EXCEEDED) event naming the client address; counts that
return to zero on every way a connection ends; the client address a trusted proxy states."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from zillatw.bindings.ws.admission import MESSAGE_RATE_EXCEEDED, MessageRateLimit
from zillatw.bindings.ws.ratelimits import Refusal
from zillatw.test.http_support import Refused, attempt, in_thread
from zillatw.test.support import (
    OnAClock,
    chain,
    client_frame,
    connect_raw,
    connect_ws,
    eventually,
    parse_server_frames,
    proxy_config,
    split_response,
    start_gateway,
    start_upstream,
    upgrade_request,
)


async def attempt_until_open(url: str, **kwargs: Any) -> Any:
    """A connection once the server has counted a close it just saw (its connectionLost
    runs a moment after the client sees the close): retried while refused, for at most 5 s."""
    for _ in range(250):
        result = await attempt(url, **kwargs)
        if not isinstance(result, Refused):
            return result
        await asyncio.sleep(0.02)
    raise AssertionError(f"still refused: {result}")




def admission_of(gateway: Any) -> Any:
    return gateway.binding("ws0").admission.admission


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PerClientCapTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_beyond_the_cap_is_503_with_its_event_and_a_close_frees_a_place(self):
        gateway, port = yield start_gateway(self, chain(ws_options={"max-connections-per-client": 2}))
        url = f"ws://127.0.0.1:{port}/"

        async def script() -> Any:
            first, second = await attempt(url), await attempt(url)
            third = await attempt(url)
            await first.close()
            fourth = await attempt_until_open(url)
            await fourth.send("still served")
            echoed = await fourth.recv()
            await second.close()
            await fourth.close()
            return third, echoed

        third, echoed = yield in_thread(script())
        self.assertEqual((third.status, third.body),
                         (503, b"too many WebSocket connections from 127.0.0.1 (limit 2)\n"))
        self.assertEqual(echoed, "still served")
        self.assertIn("BINDING_WS_REQUEST_REJECTED - 503 too many WebSocket connections from 127.0.0.1 (limit 2)",
                      gateway.events_text.getvalue())
        admission = admission_of(gateway)
        yield eventually(lambda: len(admission) == 0)  # every close counted: no rate, so no entry is kept
        self.assertEqual(admission.refused[Refusal.CONNECTIONS], 1)

    @defer.inlineCallbacks
    def test_refusals_failures_and_aborts_never_leak_a_count(self):
        config = chain(ws_routes=[{"when": [{"path": "/echo"}], "exit": "echo"}],
                       ws_options={"max-connections-per-client": 1})
        gateway, port = yield start_gateway(self, config)
        admission = admission_of(gateway)
        url = f"ws://127.0.0.1:{port}"

        async def script() -> Any:
            from websockets.exceptions import ConnectionClosed
            no_route = await attempt(f"{url}/nowhere")  # admitted, then no route: 404
            broken = await attempt(f"{url}/echo")
            broken.transport.write(b"\x83\x80\x00\x00\x00\x00")  # a frame with a reserved opcode, by hand
            try:
                await broken.recv()
            except ConnectionClosed as e:  # the server fails the connection with 1002
                code = e.rcvd.code if e.rcvd is not None else None
            after = await attempt_until_open(f"{url}/echo")
            await after.close()
            return no_route, code

        no_route, code = yield in_thread(script())
        self.assertEqual(no_route.status, 404)
        self.assertEqual(code, 1002)
        yield eventually(lambda: admission.open_count("127.0.0.1") == 0)
        # a client that drops its TCP connection without a close frame
        raw = yield connect_raw(port)
        raw.transport.write(upgrade_request("/echo"))
        yield raw.until(12)
        self.assertEqual(admission.open_count("127.0.0.1"), 1)
        raw.transport.abortConnection()
        yield raw.done
        yield eventually(lambda: admission.open_count("127.0.0.1") == 0 and not gateway.binding("ws0").connections)

    @defer.inlineCallbacks
    def test_an_exit_that_refuses_the_stream_gives_the_place_back(self):
        config = proxy_config(closed_port())  # the ws client's upstream refuses connections: 502
        config["bindings"]["ws0"]["options"] = {"max-connections-per-client": 1}
        gateway, port = yield start_gateway(self, config)
        url = f"ws://127.0.0.1:{port}/"

        async def script() -> Any:
            return [await attempt(url) for _ in range(3)]

        refusals = yield in_thread(script())
        self.assertEqual([r.status for r in refusals], [502, 502, 502])  # never 503: each 502 was uncounted
        yield eventually(lambda: admission_of(gateway).open_count("127.0.0.1") == 0)


    @defer.inlineCallbacks
    def test_a_client_leaving_before_its_101_gives_the_place_back(self):
        from twisted.internet import reactor
        from twisted.internet.protocol import Factory, Protocol
        silent = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")  # never answers
        self.addCleanup(silent.stopListening)
        config = proxy_config(silent.getHost().port)
        config["bindings"]["ws0"]["options"] = {"max-connections-per-client": 1}
        gateway, port = yield start_gateway(self, config)
        ws = gateway.binding("ws0")
        raw = yield connect_raw(port)
        raw.transport.write(upgrade_request())
        yield eventually(lambda: ws.handshaking)  # waiting for the upstream's 101
        self.assertEqual(ws.admission.admission.open_count("127.0.0.1"), 1)
        raw.transport.abortConnection()
        yield raw.done
        yield eventually(lambda: ws.admission.admission.open_count("127.0.0.1") == 0 and not ws.handshaking)


class HandshakeRateTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_beyond_the_burst_is_429_with_retry_after(self):
        # one handshake per 100 s after a burst of 2: the third is refused however slow the test runs
        gateway, port = yield start_gateway(self, chain(ws_options={"handshake-rate": {"per-client": 0.01,
                                                                                        "burst": 2}}))
        url = f"ws://127.0.0.1:{port}/"

        async def script() -> Any:
            results = []
            for _ in range(3):
                result = await attempt(url)
                if not isinstance(result, Refused):
                    await result.close()
                results.append(result)
            return results

        results = yield in_thread(script())
        self.assertFalse(any(isinstance(r, Refused) for r in results[:2]))
        refused = results[2]
        self.assertEqual(refused.status, 429)
        self.assertTrue(refused.retry_after.isdigit(), refused.retry_after)  # whole seconds
        self.assertTrue(1 <= int(refused.retry_after) <= 100, refused.retry_after)
        self.assertIn(f"retry after {refused.retry_after} s".encode(), refused.body)
        self.assertIn("BINDING_WS_REQUEST_REJECTED - 429 too many WebSocket handshakes from 127.0.0.1",
                      gateway.events_text.getvalue())

    def test_retry_after_on_a_clock(self):
        on = OnAClock(chain(ws_options={"handshake-rate": {"per-client": 0.5, "burst": 1}}))

        def handshake() -> tuple[str, dict[str, str]]:
            protocol, transport = on.connect()
            protocol.dataReceived(upgrade_request())
            status, headers, _ = split_response(transport.value())
            return status, headers

        self.assertEqual(handshake()[0], "HTTP/1.1 101 Switching Protocols")
        status, headers = handshake()
        self.assertEqual((status, headers["retry-after"]), ("HTTP/1.1 429 Too Many Requests", "2"))
        self.assertEqual(headers["connection"], "close")
        self.assertNotIn("server", headers)
        on.clock.advance(1.0)
        self.assertEqual(handshake()[1]["retry-after"], "1")
        on.clock.advance(1.0)
        self.assertEqual(handshake()[0], "HTTP/1.1 101 Switching Protocols")
        self.assertEqual(on.events.getvalue().count("BINDING_WS_REQUEST_REJECTED - 429 "), 2)


class MessageRateTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_beyond_the_rate_the_connection_closes_with_1008(self):
        gateway, port = yield start_gateway(self, chain(ws_options={"message-rate": {"rate": 0.001, "burst": 3}}))

        async def script() -> Any:
            from websockets.exceptions import ConnectionClosed
            ws = await attempt(f"ws://127.0.0.1:{port}/")
            for n in range(6):
                await ws.send(f"message {n}")
            echoed = []
            try:
                while True:
                    echoed.append(await ws.recv())
            except ConnectionClosed as e:
                assert e.rcvd is not None, "closed without a close frame"
                return echoed, e.rcvd.code, e.rcvd.reason

        echoed, code, reason = yield in_thread(script())
        self.assertEqual(echoed, ["message 0", "message 1", "message 2"])
        self.assertEqual((code, reason), (1008, "message rate exceeded"))
        self.assertRegex(gateway.events_text.getvalue(),
                         f"test:ws0 .* {MESSAGE_RATE_EXCEEDED} - 127.0.0.1 1008 more than 0.001 messages per second")
        self.assertEqual(gateway.binding("ws0").admission.rate_closes, 1)

    @defer.inlineCallbacks
    def test_a_proxied_upstream_is_told_1008_too(self):
        upstream, upstream_port = start_upstream(self)
        config = proxy_config(upstream_port)
        config["bindings"]["ws0"]["options"] = {"message-rate": {"rate": 0.001, "burst": 1}}
        gateway, port = yield start_gateway(self, config)
        client = yield connect_ws(port, protocols=["echo"])
        client.sendMessage(b"one")
        self.assertEqual((yield client.messages.get())[1], [b"one"])
        client.sendMessage(b"two")
        _, code, reason = yield client.closed
        self.assertEqual((code, reason), (1008, "message rate exceeded"))
        yield eventually(lambda: upstream.closes)
        self.assertEqual(upstream.closes[0], (1008, "message rate exceeded"))
        self.assertEqual(upstream.received, len(b"one"))  # the message beyond the rate never went upstream

    def open_on_a_clock(self, options: dict[str, Any]) -> tuple[OnAClock, Any, Any, int]:
        on = OnAClock(chain(ws_options=options))
        protocol, transport = on.connect()
        protocol.dataReceived(upgrade_request())
        self.assertIn(b" 101 ", transport.value())
        return on, protocol, transport, len(transport.value())

    def test_the_rate_refills_with_time_and_fragments_count_once(self):
        on, protocol, transport, start = self.open_on_a_clock({"message-rate": {"rate": 2, "burst": 1}})
        protocol.dataReceived(client_frame(0x1, b"one"))
        on.clock.advance(0.5)
        # one message in three frames: one token
        protocol.dataReceived(client_frame(0x1, b"t", fin=False) + client_frame(0x0, b"w", fin=False)
                              + client_frame(0x0, b"o"))
        on.clock.advance(0.5)
        protocol.dataReceived(client_frame(0x1, b"three"))
        frames = parse_server_frames(transport.value()[start:])
        self.assertEqual([f[2] for f in frames], [b"one", b"t", b"w", b"o", b"three"])
        protocol.dataReceived(client_frame(0x1, b"too soon"))
        frames = parse_server_frames(transport.value()[start:])
        self.assertEqual(frames[-1][0], 0x8)
        self.assertEqual(int.from_bytes(frames[-1][2][:2], "big"), 1008)
        self.assertEqual(frames[-1][2][2:], b"message rate exceeded")
        self.assertNotIn(b"too soon", transport.value())
        self.assertIn(MESSAGE_RATE_EXCEEDED, on.events.getvalue())

    def test_off_the_message_path_is_unchanged(self):
        for options in ({}, {"max-connections-per-client": 5, "handshake-rate": {"per-client": 5}}):
            on, _, _, _ = self.open_on_a_clock(options)
            [connection] = on.gateway.binding("ws0").connections
            self.assertNotIsInstance(connection.stream_peer, MessageRateLimit)
        on, _, _, _ = self.open_on_a_clock({"message-rate": {"rate": 5}})
        [connection] = on.gateway.binding("ws0").connections
        self.assertIsInstance(connection.stream_peer, MessageRateLimit)
        self.assertEqual(on.gateway.binding("ws0").admission.message_rate, (5, 5))  # burst: a second's worth


class TrustedProxiesTests(unittest.TestCase):
    def config(self, trusted: list[str]) -> dict[str, Any]:
        config = chain(ws_options={"max-connections-per-client": 1})
        config["bindings"]["http0"]["options"] = {"trusted-proxies": trusted}
        return config

    @defer.inlineCallbacks
    def test_the_rightmost_untrusted_address_is_the_client(self):
        gateway, port = yield start_gateway(self, self.config(["127.0.0.0/8", "10.0.0.0/8"]))
        url = f"ws://127.0.0.1:{port}/"

        async def script() -> Any:
            a = await attempt(url, additional_headers={"X-Forwarded-For": "198.51.100.1, 203.0.113.1, 10.0.0.2"})
            b = await attempt(url, additional_headers={"X-Forwarded-For": "203.0.113.2"})
            c = await attempt(url, additional_headers={"X-Forwarded-For": "203.0.113.1"})
            d = await attempt(url, additional_headers={"Forwarded": 'for="[2001:db8::5]:4711";proto=http'})
            e = await attempt(url, additional_headers={"Forwarded": "for=_hidden, for=10.0.0.3"})
            for ws in (a, b, d, e):
                await ws.close()
            return [type(x).__name__ for x in (a, b, d, e)], c

        opened, refused = yield in_thread(script())
        self.assertNotIn("Refused", opened)
        self.assertEqual(refused.status, 503)
        self.assertIn(b"from 203.0.113.1 ", refused.body)
        self.assertIn("503 too many WebSocket connections from 203.0.113.1 (limit 1)", gateway.events_text.getvalue())

    @defer.inlineCallbacks
    def test_a_spoofed_x_forwarded_for_from_an_untrusted_peer_is_ignored(self):
        gateway, port = yield start_gateway(self, self.config(["10.0.0.0/8"]))  # 127.0.0.1 is not trusted
        url = f"ws://127.0.0.1:{port}/"

        async def script() -> Any:
            a = await attempt(url, additional_headers={"X-Forwarded-For": "203.0.113.1"})
            b = await attempt(url, additional_headers={"X-Forwarded-For": "203.0.113.2",
                                                       "Forwarded": "for=203.0.113.2"})
            await a.close()
            return b

        refused = yield in_thread(script())
        self.assertEqual(refused.status, 503)
        self.assertIn("503 too many WebSocket connections from 127.0.0.1 (limit 1)", gateway.events_text.getvalue())
        self.assertNotIn("203.0.113", gateway.events_text.getvalue())

    def test_trusted_proxies_are_checked_as_configuration(self):
        from zillatw import build_gateway
        from zillatw.errors import ConfigError
        config = self.config(["10.0.0.0/8", "10.0.0.0/99"])
        with self.assertRaises(ConfigError) as raised:
            build_gateway(config)
        self.assertIn("bindings.http0.options.trusted-proxies[1]: not an address or CIDR block",
                      "\n".join(raised.exception.problems))


class OverTlsTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_behind_the_tls_server_the_client_is_the_socket_peer(self):
        import ssl
        from pathlib import Path

        from zillatw.test import pki
        from zillatw.test.pki import PASSWORD, Pki, tls_chain
        folder = Path(self.mktemp())
        folder.mkdir(parents=True)
        keys = Pki(folder)
        store = pki.write(folder / "localhost.p12", keys.localhost.p12("localhost", PASSWORD))
        config = tls_chain({"keys": {"store": store, "password": PASSWORD}}, {"keys": ["localhost"]})
        config["bindings"]["ws0"]["options"] = {"max-connections-per-client": 1}
        gateway, port = yield start_gateway(self, config)
        context = ssl.create_default_context(cafile=keys.ca_pem)

        async def script() -> Any:
            first = await attempt(f"wss://localhost:{port}/", ssl=context)
            second = await attempt(f"wss://localhost:{port}/", ssl=context)
            await first.close()
            return second

        second = yield in_thread(script())
        self.assertEqual(second.status, 503)
        self.assertIn("503 too many WebSocket connections from 127.0.0.1 (limit 1)", gateway.events_text.getvalue())
