"""The tcp server's `options.proxy-protocol`: PROXY v1 and v2 headers, read by Twisted's
parser, state the client address the ws server's limits count and its events name, under
TLS too; no header or a bad one closes the connection; the header has a deadline."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import struct
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from zillatw import build_gateway
from zillatw.bindings.tcp.proxyprotocol import PROXY_HEADER_TIMEOUT, _AwaitingHeader
from zillatw.bindings.ws import ratelimits as admission
from zillatw.errors import ConfigError
from zillatw.test import pki
from zillatw.test.http_support import Refused, attempt, in_thread
from zillatw.test.pki import PASSWORD, Pki, tls_chain
from zillatw.test.process_support import GatewayOnAFile, write
from zillatw.test.support import (
    OnAClock,
    chain,
    eventually,
    metered,
    proxy_config,
    raw_exchange,
    split_response,
    start_gateway,
    upgrade_request,
)

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
CLOSE = b"\x88\x80\x00\x00\x00\x00"  # a client's close frame (masked, empty)


def v1(source: str, port: int = 5555) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    destination = "::1" if family == "TCP6" else "127.0.0.1"
    return f"PROXY {family} {source} {destination} {port} 7114\r\n".encode()


def v2(source: str | None, port: int = 5555) -> bytes:
    """A v2 PROXY header for TCP from `source`; None: the LOCAL command (a health check)."""
    if source is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    ip = ipaddress.ip_address(source)
    destination = ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")
    addresses = ip.packed + destination.packed + struct.pack("!HH", port, 7114)
    family = 0x21 if ip.version == 6 else 0x11  # AF_INET6 or AF_INET, STREAM
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(addresses)) + addresses


def proxied(config: dict[str, Any], **ws_options: Any) -> dict[str, Any]:
    config["bindings"]["tcp0"]["options"]["proxy-protocol"] = True
    config["bindings"]["ws0"]["options"] = ws_options or {"max-connections-per-client": 1}
    return config


async def through_proxy(port: int, header: bytes, secure: ssl.SSLContext | None = None, **kwargs: Any) -> Any:
    """A `websockets` connection on a socket whose first bytes were `header`, as a load
    balancer's would be (wss: TLS after the header, as the balancer passes TLS through)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(header)
    sock.setblocking(False)
    if secure is not None:
        return await attempt(f"wss://localhost:{port}/", sock=sock, ssl=secure, server_hostname="localhost", **kwargs)
    return await attempt(f"ws://127.0.0.1:{port}/", sock=sock, **kwargs)


class AddressTests(unittest.TestCase):
    @defer.inlineCallbacks
    def cap_by_stated_address(self, config: dict[str, Any], header: Any, same: str, other: str,
                              secure: ssl.SSLContext | None = None) -> Any:
        """Two connections stating `same`, one stating `other`: the second is refused."""
        gateway, port = yield start_gateway(self, config)

        async def script() -> Any:
            first = await through_proxy(port, header(same), secure)
            second = await through_proxy(port, header(same), secure)
            third = await through_proxy(port, header(other), secure)
            await first.close()
            await third.close()
            return first, second, third

        first, second, third = yield in_thread(script())
        self.assertNotIsInstance(first, Refused)
        self.assertNotIsInstance(third, Refused)
        self.assertEqual(second.status, 503)
        shown = str(ipaddress.ip_address(same))
        self.assertEqual(second.body, f"too many WebSocket connections from {shown} (limit 1)\n".encode())
        self.assertIn(f"BINDING_WS_REQUEST_REJECTED - 503 too many WebSocket connections from {shown} (limit 1)",
                      gateway.events_text.getvalue())
        return gateway

    def test_v1_tcp4(self):
        return self.cap_by_stated_address(proxied(chain()), v1, "203.0.113.7", "203.0.113.8")

    def test_v1_tcp6(self):
        return self.cap_by_stated_address(proxied(chain()), v1, "2001:db8::7", "2001:db8::8")

    def test_v2_tcp4(self):
        return self.cap_by_stated_address(proxied(chain()), v2, "203.0.113.7", "198.51.100.7")

    def test_v2_tcp6(self):
        return self.cap_by_stated_address(proxied(chain()), v2, "2001:db8:0:0::7", "2001:db8::8")

    def test_v2_under_tls(self):
        folder = Path(self.mktemp())
        folder.mkdir(parents=True)
        keys = Pki(folder)
        store = pki.write(folder / "localhost.p12", keys.localhost.p12("localhost", PASSWORD))
        config = proxied(tls_chain({"keys": {"store": store, "password": PASSWORD}}, {"keys": ["localhost"]}))
        context = ssl.create_default_context(cafile=keys.ca_pem)
        return self.cap_by_stated_address(config, v2, "203.0.113.7", "203.0.113.8", context)

    @defer.inlineCallbacks
    def test_a_local_header_keeps_the_real_peer(self):
        gateway, port = yield start_gateway(self, proxied(chain()))

        async def script() -> Any:
            first = await through_proxy(port, v2(None))
            second = await through_proxy(port, v1("203.0.113.7"))
            # (Twisted's parser wants something after UNKNOWN, which the spec says to ignore)
            third = await through_proxy(port, b"PROXY UNKNOWN ignored\r\n")
            await second.close()
            await first.close()
            return third

        third = yield in_thread(script())
        self.assertEqual(third.status, 503)
        self.assertIn("503 too many WebSocket connections from 127.0.0.1 (limit 1)", gateway.events_text.getvalue())

    @defer.inlineCallbacks
    def test_the_stated_address_chooses_the_tcp_route(self):
        config = proxied(chain())
        config["bindings"]["tcp0"]["routes"] = [{"when": [{"cidr": "203.0.113.0/24"}], "exit": "http0"}]
        del config["bindings"]["tcp0"]["exit"]
        _, port = yield start_gateway(self, config)
        data = yield raw_exchange(port, v1("203.0.113.7") + upgrade_request() + CLOSE)
        self.assertTrue(data.startswith(b"HTTP/1.1 101 "), data)
        data = yield raw_exchange(port, v1("198.51.100.7") + upgrade_request())
        self.assertEqual(data, b"")  # no route for that client: closed

    @defer.inlineCallbacks
    def test_a_trusted_proxy_behind_the_header_names_the_client(self):
        config = proxied(chain())
        config["bindings"]["http0"]["options"] = {"trusted-proxies": ["10.0.0.0/8"]}
        gateway, port = yield start_gateway(self, config)

        async def script() -> Any:
            first = await through_proxy(port, v1("10.0.0.9"), additional_headers={"X-Forwarded-For": "203.0.113.5"})
            second = await through_proxy(port, v1("10.0.0.10"), additional_headers={"X-Forwarded-For": "203.0.113.5"})
            await first.close()
            return second

        second = yield in_thread(script())
        self.assertEqual(second.status, 503)
        self.assertIn("from 203.0.113.5 (limit 1)", gateway.events_text.getvalue())


class MeteredTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_metered_bindings_count_the_proxied_connection(self):
        config = proxied(metered(bindings={"tcp0": ["stream.*"], "http0": ["stream.*"], "ws0": ["stream.*"]}))
        config["bindings"]["ws0"]["options"] = {"message-rate": {"rate": 100}}
        gateway, port = yield start_gateway(self, config)

        async def script() -> Any:
            ws = await through_proxy(port, v2("203.0.113.7"), subprotocols=["echo"])
            await ws.send("counted")
            echoed = await ws.recv()
            await ws.close()
            return echoed

        self.assertEqual((yield in_thread(script())), "counted")
        metrics = gateway.generation.metrics
        tcp = metrics.metrics(gateway.config.binding("test:tcp0"))
        yield eventually(lambda: tcp.closes_received == 1)
        self.assertEqual((tcp.opens_received, tcp.active), (1, 0))
        self.assertGreater(tcp.data_received, len(b"counted"))
        self.assertIn("BINDING_WS_REQUEST_ACCEPTED", gateway.events_text.getvalue())


class ManyClientsTests(unittest.TestCase):
    def test_many_stated_addresses_never_grow_the_table_beyond_its_bound(self):
        self.patch(admission, "MAX_CLIENTS", 50)
        on = OnAClock(proxied(chain(), **{"max-connections-per-client": 2, "handshake-rate": {"per-client": 1}}))
        table = on.gateway.binding("ws0").admission.admission
        self.assertEqual(table.max_clients, 50)
        held = []
        for n in range(1000):  # each from its own address; one in 20 stays open, the 50th last
            protocol, transport = on.connect(client_port=10000 + n)
            protocol.dataReceived(v1(f"198.51.{n >> 8}.{n & 255}") + upgrade_request())
            self.assertEqual(split_response(transport.value())[0], "HTTP/1.1 101 Switching Protocols", n)
            if n % 20 != 19:
                protocol.connectionLost(None)
            else:
                held.append((protocol, f"198.51.{n >> 8}.{n & 255}"))
            self.assertLessEqual(len(table), 50)
            on.clock.advance(0.001)
        self.assertEqual(len(table), 50)
        # the 50 held are all there (never dropped); the rest came and went through the room left
        self.assertEqual(sorted(table.clients()), sorted(address for _, address in held))
        protocol, transport = on.connect(client_port=20000)
        protocol.dataReceived(v1("203.0.113.1") + upgrade_request())
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 503 "), transport.value())
        self.assertIn("503 too many clients (limit 50 addresses)", on.events.getvalue())
        held[0][0].connectionLost(None)
        protocol, transport = on.connect(client_port=20001)
        protocol.dataReceived(v1("203.0.113.1") + upgrade_request())
        self.assertEqual(split_response(transport.value())[0], "HTTP/1.1 101 Switching Protocols")
        self.assertNotIn(held[0][1], table.clients())  # the idle entry made room


class ReloadTests(GatewayOnAFile):
    @defer.inlineCallbacks
    def test_a_reload_turns_the_option_on_and_off_on_the_socket_it_keeps(self):
        gateway, port = yield self.start(chain())
        plain, with_header = upgrade_request() + CLOSE, v1("203.0.113.7") + upgrade_request() + CLOSE
        self.assertTrue((yield raw_exchange(port, plain)).startswith(b"HTTP/1.1 101 "))
        write(self.path, proxied(chain(), **{"max-connections": 10}))
        self.assertTrue((yield gateway.reload()))
        self.assertEqual(gateway.ports(), [port])
        self.assertEqual((yield raw_exchange(port, plain)), b"")
        self.assertTrue((yield raw_exchange(port, with_header)).startswith(b"HTTP/1.1 101 "))
        write(self.path, chain())
        self.assertTrue((yield gateway.reload()))
        self.assertTrue((yield raw_exchange(port, plain)).startswith(b"HTTP/1.1 101 "))


class RefusedTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_without_a_header_or_with_a_bad_one_the_connection_is_closed(self):
        _, port = yield start_gateway(self, proxied(chain()))
        for first_bytes in (upgrade_request(), b"PROXY TCP4 nonsense\r\n" + upgrade_request(),
                            b"PROXY TCP4 203.0.113.7 127.0.0.1 5555\r\n" + upgrade_request(),
                            V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4 + upgrade_request(),  # short addresses
                            V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\x00" * 12 + upgrade_request(),  # version 3
                            b"PROXY " + b"9" * 200 + b"\r\n"):  # past v1's 107 bytes
            data = yield raw_exchange(port, first_bytes)
            self.assertEqual(data, b"", first_bytes)

    def test_the_header_has_a_deadline(self):
        on = OnAClock(proxied(chain()))
        silent, silent_transport = on.connect()
        header_only, header_only_transport = on.connect()
        header_only.dataReceived(v1("203.0.113.7"))
        prompt, prompt_transport = on.connect()
        on.clock.advance(PROXY_HEADER_TIMEOUT - 0.1)
        prompt.dataReceived(v2("203.0.113.8") + upgrade_request())
        self.assertEqual(split_response(prompt_transport.value())[0], "HTTP/1.1 101 Switching Protocols")
        self.assertFalse(silent_transport.disconnecting)
        on.clock.advance(0.1)
        self.assertTrue(silent_transport.disconnected)  # aborted: nothing is owed to a silent peer
        self.assertTrue(header_only_transport.disconnected)  # the client's first bytes are due by then too
        self.assertFalse(prompt_transport.disconnecting)
        waiting = [c for c in on.clock.getDelayedCalls()
                   if isinstance(getattr(c.func, "__self__", None), _AwaitingHeader)]
        self.assertEqual(waiting, [])  # the prompt one's timer went when its bytes came
        self.assertEqual(PROXY_HEADER_TIMEOUT, 5.0)

    def test_a_tcp_client_refuses_the_option(self):
        config = proxy_config(7000)
        config["bindings"]["south_tcp_client"]["options"]["proxy-protocol"] = True
        with self.assertRaises(ConfigError) as raised:
            build_gateway(config)
        self.assertIn("bindings.south_tcp_client.options.proxy-protocol: a tcp server option",
                      "\n".join(raised.exception.problems))

    def test_the_option_is_a_boolean(self):
        config = proxied(chain())
        config["bindings"]["tcp0"]["options"]["proxy-protocol"] = "v2"
        with self.assertRaises(ConfigError) as raised:
            build_gateway(config)
        self.assertIn("bindings.tcp0.options.proxy-protocol", "\n".join(raised.exception.problems))

