"""The tls server binding and the filesystem vault, end to end over loopback: a CA, server and
client certificates made at run time, real TLS handshakes (Twisted's and the stdlib's
clients, openssl s_client) and real WebSocket clients. (The tls client: test_tls_client.)"""

from __future__ import annotations

import os
import socket
import ssl
from typing import Any, cast

import yaml
from twisted.internet import defer, reactor, threads
from twisted.internet import ssl as tssl
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.utils import getProcessOutputAndValue

from zillatw.test import pki
from zillatw.test.pki import (
    PASSWORD,
    TlsTestCase,
    client_tls,
    connect_wss,
    raw_tls_exchange,
    tls_chain,
)
from zillatw.test.support import (
    RawClient,
    close_ws,
    eventually,
    free_port,
    split_response,
    start_gateway,
    upgrade_request,
)


def stdlib_handshake(port: int, server_name: str | None, cafile: str, alpn: list[str] | None = None,
                     cert: tuple[str, str] | None = None, maximum: ssl.TLSVersion | None = None) -> defer.Deferred:
    """A blocking stdlib TLS handshake in a thread -> (version, cipher, peer subject CN, alpn)."""
    def run() -> tuple[str, str, str, str | None]:
        context = ssl.create_default_context(cafile=cafile)
        context.check_hostname = False  # SNI tests send names the loopback address is not
        if alpn:
            context.set_alpn_protocols(alpn)
        if cert:
            context.load_cert_chain(*cert)
        if maximum:
            context.maximum_version = maximum
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname=server_name) as tls:
                peer, cipher, version = tls.getpeercert(), tls.cipher(), tls.version()
                assert peer is not None and cipher is not None and version is not None, "no handshake"
                rdns = cast(tuple[tuple[tuple[str, str], ...], ...], peer["subject"])
                subject = dict(rdn[0] for rdn in rdns)
                return version, cipher[0], subject["commonName"], tls.selected_alpn_protocol()
    return threads.deferToThread(run)


class WssTests(TlsTestCase):
    @defer.inlineCallbacks
    def test_wss_echo_with_a_pkcs12_keystore_from_the_config_folder(self):
        self.keystore("tls/localhost.p12")
        os.environ["ZILLATW_TEST_KEYSTORE_PASSWORD"] = PASSWORD
        self.addCleanup(os.environ.pop, "ZILLATW_TEST_KEYSTORE_PASSWORD")
        config = tls_chain({"keys": {"store": "tls/localhost.p12", "type": "pkcs12",
                                     "password": "${{env.ZILLATW_TEST_KEYSTORE_PASSWORD}}"}},
                           {"keys": ["localhost"], "sni": ["localhost"]},
                           http_routes=[{"when": [{"headers": {":scheme": "https", "upgrade": "websocket"}}],
                                         "exit": "ws0"}])
        path = self.folder / "zilla.yaml"
        path.write_text(yaml.safe_dump(config))
        gateway, port = yield start_gateway(self, str(path))
        client = yield connect_wss(port, client_tls(self.pki.ca))
        self.assertEqual(client.transport.getHandle().get_protocol_version_name(), "TLSv1.3")
        for payload, binary in [(b"hello over TLS", False), (os.urandom(200_000), True)]:
            client.sendMessage(payload, isBinary=binary)
            got, frames = yield client.messages.get()
            self.assertEqual((got, b"".join(frames)), (binary, payload))
        result = yield close_ws(client)
        self.assertEqual(result[:2], (True, 1000))
        # the http server saw :scheme https (its only route asks for it)
        self.assertIn(f"BINDING_HTTP_REQUEST_ACCEPTED - GET https://localhost:{port}/", gateway.events_text.getvalue())

    @defer.inlineCallbacks
    def test_websockets_client_with_an_ssl_context(self):
        """Another client implementation: `websockets` (asyncio) in a thread, stdlib ssl."""
        config = tls_chain({"keys": {"store": self.keystore(), "password": PASSWORD}}, {"keys": ["localhost"]})
        gateway, port = yield start_gateway(self, config)

        def run() -> tuple[str | bytes, Any]:
            import asyncio

            from websockets.asyncio.client import connect

            async def talk() -> tuple[str | bytes, Any]:
                context = ssl.create_default_context(cafile=self.pki.ca_pem)
                async with connect(f"wss://localhost:{port}/", ssl=context) as ws:
                    await ws.send("hello from websockets")
                    reply = await ws.recv()
                    return reply, ws.transport.get_extra_info("ssl_object").version()
            return asyncio.run(talk())

        reply, version = yield threads.deferToThread(run)
        self.assertEqual(reply, "hello from websockets")
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))

    @defer.inlineCallbacks
    def test_plain_http_on_the_tls_port_fails_the_handshake(self):
        config = tls_chain({"keys": {"store": self.keystore(), "password": PASSWORD}}, {"keys": ["localhost"]})
        gateway, port = yield start_gateway(self, config)
        client = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), RawClient())
        client.transport.write(upgrade_request())
        data = yield client.done
        self.assertNotIn(b"HTTP/1.1", data)
        yield eventually(lambda: "BINDING_TLS_" in gateway.events_text.getvalue())
        self.assertRegex(gateway.events_text.getvalue(),
                         r"test:tls0 .* BINDING_TLS_(HANDSHAKE_FAILED|PROTOCOL_REJECTED) - 127\.0\.0\.1 ")

    @defer.inlineCallbacks
    def test_handshake_timeout_closes_a_silent_client(self):
        config = tls_chain({"keys": {"store": self.keystore(), "password": PASSWORD}},
                           {"keys": ["localhost"], "handshake-timeout": 0.2})
        gateway, port = yield start_gateway(self, config)
        client = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), RawClient())
        started = reactor.seconds()
        yield client.done
        self.assertLess(reactor.seconds() - started, 3)
        self.assertIn("BINDING_TLS_HANDSHAKE_FAILED - 127.0.0.1 handshake not completed within 0.2 s",
                      gateway.events_text.getvalue())

    @defer.inlineCallbacks
    def test_tls_12_minimum_and_modern_ciphers(self):
        config = tls_chain({"keys": {"store": self.keystore(), "password": PASSWORD}}, {"keys": ["localhost"]})
        gateway, port = yield start_gateway(self, config)

        def handshake(maximum: Any, ciphers: str | None = None) -> Any:
            def run():
                context = ssl.create_default_context(cafile=self.pki.ca_pem)
                context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
                context.maximum_version = maximum
                if ciphers:
                    context.set_ciphers(ciphers)
                with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                    with context.wrap_socket(raw, server_hostname="localhost") as tls:
                        return tls.version(), tls.cipher()[0]
            return threads.deferToThread(run)

        version, cipher = yield handshake(ssl.TLSVersion.TLSv1_2)
        self.assertEqual(version, "TLSv1.2")
        self.assertTrue(cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher), cipher)
        # a CBC suite without forward secrecy, which OpenSSL's defaults would still allow
        yield self.assertFailure(handshake(ssl.TLSVersion.TLSv1_2, "AES128-SHA"), ssl.SSLError)
        yield self.assertFailure(handshake(ssl.TLSVersion.TLSv1_1, "DEFAULT:@SECLEVEL=0"), ssl.SSLError, OSError)
        yield eventually(lambda: "BINDING_TLS_PROTOCOL_REJECTED" in gateway.events_text.getvalue())
        self.assertRegex(gateway.events_text.getvalue(),
                         r"test:tls0 .* BINDING_TLS_PROTOCOL_REJECTED - 127\.0\.0\.1 .*(unsupported protocol|version)")

    @defer.inlineCallbacks
    def test_version_tls13_refuses_tls12(self):
        config = tls_chain({"keys": {"store": self.keystore(), "password": PASSWORD}},
                           {"keys": ["localhost"], "version": "TLSv1.3"})
        gateway, port = yield start_gateway(self, config)
        version, *_ = yield stdlib_handshake(port, "localhost", self.pki.ca_pem)
        self.assertEqual(version, "TLSv1.3")

        def tls12():
            context = ssl.create_default_context(cafile=self.pki.ca_pem)
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                context.wrap_socket(raw, server_hostname="localhost").close()
        yield self.assertFailure(threads.deferToThread(tls12), ssl.SSLError)
        yield eventually(lambda: "BINDING_TLS_PROTOCOL_REJECTED" in gateway.events_text.getvalue())

    @defer.inlineCallbacks
    def test_openssl_s_client_sees_tls_12_or_13_and_the_certificate(self):
        config = tls_chain({"keys": {"store": self.keystore(), "password": PASSWORD}},
                           {"keys": ["localhost"], "sni": ["localhost"]})
        gateway, port = yield start_gateway(self, config)
        out, err, code = yield getProcessOutputAndValue(
            "openssl", ["s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
                        "-CAfile", self.pki.ca_pem], env=os.environ, reactor=reactor)
        text = out.decode()
        self.assertEqual(code, 0, err)
        # OpenSSL 3 prints "Protocol : ..." in the session block, which for TLS 1.3 it may skip
        # when stdin ends before the session ticket arrives; "New, TLSv1.x, Cipher is" is always there.
        self.assertRegex(text, r"New, TLSv1\.[23], Cipher is (TLS_AES_|TLS_CHACHA20_|ECDHE-)")
        self.assertRegex(text, r"subject=CN ?= ?localhost")
        self.assertIn("Verify return code: 0 (ok)", text)
        out, err, code = yield getProcessOutputAndValue(
            "openssl", ["s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost", "-tls1_2",
                        "-CAfile", self.pki.ca_pem], env=os.environ, reactor=reactor)
        self.assertEqual(code, 0, err)
        self.assertRegex(out.decode(), r"Protocol\s*: TLSv1\.2\n\s*Cipher\s*: ECDHE-ECDSA-(AES\d+-GCM-SHA\d+|CHACHA20)")

    @defer.inlineCallbacks
    def test_twisted_ssl_endpoint_string_on_the_tcp_binding(self):
        key = pki.write(self.folder / "key.pem", self.pki.localhost.key_pem())
        cert = pki.write(self.folder / "cert.pem", self.pki.localhost.cert_pem())
        config = tls_chain({}, {}, http_routes=[
            {"when": [{"headers": {":scheme": "https", "upgrade": "websocket"}}], "exit": "ws0"}])
        del config["vaults"], config["bindings"]["tls0"]
        config["bindings"]["tcp0"] = {"type": "tcp", "kind": "server", "exit": "http0", "options": {
            "endpoint": f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"}}
        gateway, port = yield start_gateway(self, config)
        client = yield connect_wss(port, client_tls(self.pki.ca))
        client.sendMessage(b"through ssl:")
        got, frames = yield client.messages.get()
        self.assertEqual(b"".join(frames), b"through ssl:")
        yield close_ws(client)
        self.assertIn("GET https://localhost:", gateway.events_text.getvalue())


class SniAndAlpnTests(TlsTestCase):
    @defer.inlineCallbacks
    def test_sni_picks_the_certificate_among_several(self):
        store = self.pem_keys({"alpha": self.pki.alpha, "beta": self.pki.beta})
        config = tls_chain({"keys": {"store": store, "type": "pem"}}, {"keys": ["alpha", "beta"]})
        gateway, port = yield start_gateway(self, config)
        for name, expected in [("alpha.test", "alpha.test"), ("beta.test", "beta.test"),
                               ("www.beta.test", "beta.test"), (None, "alpha.test"), ("other.test", "alpha.test")]:
            version, cipher, subject, _ = yield stdlib_handshake(port, name, self.pki.ca_pem)
            self.assertEqual(subject, expected, f"SNI {name}")
        # and a WebSocket through the second key, its name verified by the client
        client = yield connect_wss(port, client_tls(self.pki.ca, "beta.test"), host="beta.test")
        client.sendMessage(b"beta")
        self.assertEqual(b"".join((yield client.messages.get())[1]), b"beta")
        yield close_ws(client)

    @defer.inlineCallbacks
    def test_sni_allow_list_refuses_other_names_with_the_unrecognized_name_alert(self):
        store = self.pem_keys({"alpha": self.pki.alpha, "beta": self.pki.beta})
        config = tls_chain({"keys": {"store": store, "type": "pem"}},
                           {"keys": ["alpha", "beta"], "sni": ["beta.test"]})
        gateway, port = yield start_gateway(self, config)
        _, _, subject, _ = yield stdlib_handshake(port, "beta.test", self.pki.ca_pem)
        self.assertEqual(subject, "beta.test")
        # RFC 6066 §3: a fatal unrecognized_name alert (112), not a reset; in TLS 1.3 and 1.2
        for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
            error = yield self.assertFailure(stdlib_handshake(port, "alpha.test", self.pki.ca_pem, maximum=version),
                                             ssl.SSLError)
            self.assertEqual(error.reason, "TLSV1_UNRECOGNIZED_NAME", f"{version}: {error}")
        out, err, code = yield getProcessOutputAndValue(
            "openssl", ["s_client", "-connect", f"127.0.0.1:{port}", "-servername", "alpha.test",
                        "-CAfile", self.pki.ca_pem], env=os.environ, reactor=reactor)
        self.assertNotEqual(code, 0)
        self.assertRegex(err.decode(), r"tlsv1 unrecognized name.*SSL alert number 112")
        yield eventually(lambda: gateway.events_text.getvalue().count("KEY_REJECTED") == 3)
        self.assertIn("BINDING_TLS_KEY_REJECTED - 127.0.0.1 server name 'alpha.test' is not one of this server's sni",
                      gateway.events_text.getvalue())

    @defer.inlineCallbacks
    def test_routes_by_authority_choose_the_exit(self):
        store = self.pem_keys({"alpha": self.pki.alpha, "beta": self.pki.beta})
        apps = {"http1": {"type": "http", "kind": "server", "routes": [
            {"when": [{"headers": {":path": "/only-beta"}}], "exit": "ws0"}]}}
        config = tls_chain({"keys": {"store": store, "type": "pem"}}, {"keys": ["alpha", "beta"]},
                           tls_routes=[{"when": [{"authority": "*.beta.test"}, {"authority": "beta.test"}],
                                        "exit": "http1"},
                                       {"when": [{"authority": "alpha.test"}], "exit": "http0"}], apps=apps)
        gateway, port = yield start_gateway(self, config)
        # beta goes to http1, which serves /only-beta and nothing else
        client = yield connect_wss(port, client_tls(self.pki.ca, "beta.test"), host="beta.test", path="/only-beta")
        yield close_ws(client)
        data = yield raw_tls_exchange(port, client_tls(self.pki.ca, "beta.test"), upgrade_request("/"))
        self.assertEqual(split_response(data)[0], "HTTP/1.1 404 Not Found")
        client = yield connect_wss(port, client_tls(self.pki.ca, "alpha.test"), host="alpha.test")
        yield close_ws(client)
        # no route for a connection without SNI: closed after the handshake, before any HTTP
        data = yield raw_tls_exchange(port, tssl.CertificateOptions(verify=False), upgrade_request("/"))
        self.assertEqual(data, b"")

    @defer.inlineCallbacks
    def test_signers_choose_the_keys_their_ca_issued(self):
        rogue = pki.issue(self.pki.rogue_ca, "rogue.test", dns=["rogue.test"])
        store = self.pem_keys({"rogue": rogue, "alpha": self.pki.alpha})
        config = tls_chain({"keys": {"store": store, "type": "pem"},
                            "signers": {"store": self.pki.ca_pem, "type": "pem"}}, {"signers": ["ca"]})
        gateway, port = yield start_gateway(self, config)
        for name in ("rogue.test", "alpha.test", None):
            _, _, subject, _ = yield stdlib_handshake(port, name, self.pki.ca_pem)
            self.assertEqual(subject, "alpha.test", f"SNI {name}")

    @defer.inlineCallbacks
    def test_routes_by_port(self):
        config = tls_chain({"keys": {"store": self.keystore(), "password": PASSWORD}}, {"keys": ["localhost"]},
                           tls_routes=[{"when": [{"port": 1}], "exit": "http0"}])
        gateway, port = yield start_gateway(self, config)
        data = yield raw_tls_exchange(port, client_tls(self.pki.ca), upgrade_request("/"))
        self.assertEqual(data, b"")  # the listener's port is not 1
        listening = free_port()
        config["bindings"]["tcp0"]["options"]["port"] = listening
        config["bindings"]["tls0"]["routes"][0]["when"][0]["port"] = [1, listening]
        gateway, port = yield start_gateway(self, config)
        self.assertEqual(port, listening)
        client = yield connect_wss(port, client_tls(self.pki.ca))
        yield close_ws(client)

    @defer.inlineCallbacks
    def test_alpn_selects_the_first_offered_protocol_the_server_allows(self):
        config = tls_chain({"keys": {"store": self.keystore(), "password": PASSWORD}},
                           {"keys": ["localhost"], "alpn": ["echo", "http/1.1"]},
                           tls_routes=[{"when": [{"alpn": "http/1.1"}], "exit": "http0"}])
        gateway, port = yield start_gateway(self, config)
        for offered, selected in [(["x-other", "http/1.1", "echo"], "http/1.1"), (["x-other"], None), (None, None)]:
            *_, alpn = yield stdlib_handshake(port, "localhost", self.pki.ca_pem, alpn=offered)
            self.assertEqual(alpn, selected, f"offered {offered}")
        # echo is configured but no route takes it: not selected, as in Zilla
        *_, alpn = yield stdlib_handshake(port, "localhost", self.pki.ca_pem, alpn=["echo", "http/1.1"])
        self.assertEqual(alpn, "http/1.1")
        client = yield connect_wss(port, client_tls(self.pki.ca, alpn=["http/1.1"]))
        self.assertEqual(client.transport.negotiatedProtocol, b"http/1.1")
        client.sendMessage(b"alpn")
        self.assertEqual(b"".join((yield client.messages.get())[1]), b"alpn")
        yield close_ws(client)
        # without ALPN the only route (alpn: http/1.1) does not match: closed after the handshake
        data = yield raw_tls_exchange(port, client_tls(self.pki.ca), upgrade_request("/"))
        self.assertEqual(data, b"")


    @defer.inlineCallbacks
    def test_without_options_alpn_nothing_is_negotiated_not_even_for_a_client_offering_h2(self):
        config = tls_chain({"keys": {"store": self.keystore(), "password": PASSWORD}}, {"keys": ["localhost"]})
        gateway, port = yield start_gateway(self, config)
        *_, alpn = yield stdlib_handshake(port, "localhost", self.pki.ca_pem, alpn=["h2", "http/1.1"])
        self.assertIsNone(alpn)


class MutualTlsTests(TlsTestCase):
    @defer.inlineCallbacks
    def serve(self, mutual: str | None = None) -> Any:
        trust = pki.write(self.folder / "trust.p12", pki.truststore_p12({"clients": self.pki.ca.certificate}, PASSWORD))
        options: dict[str, Any] = {"keys": ["localhost"], "trust": ["clients"]}
        if mutual:
            options["mutual"] = mutual
        config = tls_chain({"keys": {"store": self.keystore(), "password": PASSWORD},
                            "trust": {"store": trust, "password": PASSWORD}}, options)
        self.gateway, self.port = yield start_gateway(self, config)

    @defer.inlineCallbacks
    def test_required_accepts_a_trusted_client_certificate(self):
        yield self.serve()  # mutual defaults to required when trust is given
        client = yield connect_wss(self.port, client_tls(self.pki.ca, client=self.pki.client))
        client.sendMessage(b"mutual")
        self.assertEqual(b"".join((yield client.messages.get())[1]), b"mutual")
        yield close_ws(client)

    @defer.inlineCallbacks
    def test_required_refuses_no_certificate_and_an_untrusted_one(self):
        yield self.serve("required")
        yield self.assertFailure(connect_wss(self.port, client_tls(self.pki.ca)), Exception)
        yield self.assertFailure(connect_wss(self.port, client_tls(self.pki.ca, client=self.pki.rogue_client)),
                                 Exception)
        yield eventually(lambda: self.gateway.events_text.getvalue().count("BINDING_TLS_PEER_NOT_VERIFIED") == 2)
        events = self.gateway.events_text.getvalue()
        self.assertIn("client certificate CN=rogue client: unable to get local issuer certificate", events)
        self.assertNotIn("BINDING_HTTP_REQUEST_ACCEPTED", events)

    @defer.inlineCallbacks
    def test_requested_accepts_no_certificate_but_not_an_untrusted_one(self):
        yield self.serve("requested")
        client = yield connect_wss(self.port, client_tls(self.pki.ca))
        yield close_ws(client)
        client = yield connect_wss(self.port, client_tls(self.pki.ca, client=self.pki.client))
        yield close_ws(client)
        yield self.assertFailure(connect_wss(self.port, client_tls(self.pki.ca, client=self.pki.rogue_client)),
                                 Exception)
        yield eventually(lambda: "BINDING_TLS_PEER_NOT_VERIFIED" in self.gateway.events_text.getvalue())


