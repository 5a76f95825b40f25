"""The tls client binding, end to end over loopback: ws server -> ws client -> http client -> tls
client -> an Autobahn wss upstream (Twisted's TLS) with certificates made at run time: the
upstream verified (its name, with or without SNI, its chain), ALPN offered, a client
certificate presented. (The tls server: test_tls.)"""

from __future__ import annotations

import os

from twisted.internet import defer

from zillatw.test import pki
from zillatw.test.pki import (
    PASSWORD,
    TlsTestCase,
    client_tls,
    connect_wss,
    raw_tls_exchange,
    start_wss_upstream,
)
from zillatw.test.support import (
    close_ws,
    eventually,
    split_response,
    start_gateway,
    upgrade_request,
)


class ProxyOverTlsTests(TlsTestCase):
    @defer.inlineCallbacks
    def test_wss_to_wss_upstream_with_verification(self):
        upstream, upstream_port = start_wss_upstream(self, self.pki.localhost)
        config = self.tls_proxy_config(upstream_port, {"trust": ["backend"], "sni": ["localhost"]},
                                   {"trust": {"store": self.backend_truststore(), "password": PASSWORD}})
        gateway, port = yield start_gateway(self, config)
        client = yield connect_wss(port, client_tls(self.pki.ca), path="/chat", protocols=["echo"])
        self.assertEqual(client.websocket_protocol_in_use, "echo")
        for payload in (b"to the upstream and back", os.urandom(100_000)):
            client.sendMessage(payload, isBinary=True)
            self.assertEqual(b"".join((yield client.messages.get())[1]), payload)
        self.assertEqual(upstream.requests[0].path, "/chat")
        self.assertTrue(upstream.connections[0].transport.getHandle().get_protocol_version_name().startswith("TLSv1."))
        yield close_ws(client)
        yield eventually(lambda: upstream.closes)

    @defer.inlineCallbacks
    def test_alpn_offered_to_the_upstream(self):
        upstream, upstream_port = start_wss_upstream(self, self.pki.localhost, alpn=[b"x-other", b"http/1.1"])
        config = self.tls_proxy_config(upstream_port,
                                       {"trust": ["backend"], "sni": ["localhost"], "alpn": ["http/1.1"]},
                                   {"trust": {"store": self.backend_truststore(), "password": PASSWORD}})
        gateway, port = yield start_gateway(self, config)
        client = yield connect_wss(port, client_tls(self.pki.ca))
        client.sendMessage(b"alpn upstream")
        self.assertEqual(b"".join((yield client.messages.get())[1]), b"alpn upstream")
        self.assertEqual(upstream.connections[0].transport.negotiatedProtocol, b"http/1.1")
        yield close_ws(client)
        yield eventually(lambda: upstream.closes)

    @defer.inlineCallbacks
    def test_without_sni_the_tcp_clients_host_is_verified(self):
        """host 127.0.0.1: no SNI is sent (RFC 6066 has none for addresses) and the
        certificate must name the address, which the upstream's does (IP SAN)."""
        upstream, upstream_port = start_wss_upstream(self, self.pki.localhost)
        config = self.tls_proxy_config(upstream_port, {"trust": ["backend"]},
                                   {"trust": {"store": self.backend_truststore(), "password": PASSWORD}})
        gateway, port = yield start_gateway(self, config)
        client = yield connect_wss(port, client_tls(self.pki.ca))
        client.sendMessage(b"by address")
        self.assertEqual(b"".join((yield client.messages.get())[1]), b"by address")
        self.assertIsNone(upstream.connections[0].transport.getHandle().get_servername())
        yield close_ws(client)
        yield eventually(lambda: upstream.closes)

    @defer.inlineCallbacks
    def test_upstream_name_mismatch_is_502(self):
        upstream, upstream_port = start_wss_upstream(self, self.pki.localhost)
        config = self.tls_proxy_config(upstream_port, {"trust": ["backend"], "sni": ["backend.test"]},
                                   {"trust": {"store": self.backend_truststore(), "password": PASSWORD}})
        gateway, port = yield start_gateway(self, config)
        data = yield raw_tls_exchange(port, client_tls(self.pki.ca), upgrade_request("/", {"Host": "localhost"}))
        status, headers, body = split_response(data)
        # the client is told what failed, the event log why
        self.assertEqual((status, body), ("HTTP/1.1 502 Bad Gateway", b"upstream TLS failed\n"))
        self.assertIn("BINDING_WS_REQUEST_REJECTED - 502 upstream TLS failed (with backend.test: certificate does "
                      "not match 'backend.test' (it is for: localhost, 127.0.0.1))", gateway.events_text.getvalue())
        self.assertEqual(upstream.requests, [])  # nothing was sent to an unverified upstream
        self.assertIn("test:south_tls_client", gateway.events_text.getvalue())
        self.assertIn("BINDING_TLS_PEER_NOT_VERIFIED - backend.test certificate does not match 'backend.test'",
                      gateway.events_text.getvalue())

    @defer.inlineCallbacks
    def test_hostname_verification_false_still_checks_the_chain(self):
        upstream, upstream_port = start_wss_upstream(self, self.pki.localhost)
        config = self.tls_proxy_config(upstream_port, {"trust": ["backend"], "sni": ["backend.test"],
                                                   "hostname-verification": False},
                                   {"trust": {"store": self.backend_truststore(), "password": PASSWORD}})
        gateway, port = yield start_gateway(self, config)
        client = yield connect_wss(port, client_tls(self.pki.ca))  # the name does not match: allowed
        yield close_ws(client)
        yield eventually(lambda: upstream.closes)
        rogue, rogue_port = start_wss_upstream(self, pki.issue(self.pki.rogue_ca, "backend.test", dns=["backend.test"]))
        config["bindings"]["south_tcp_client"]["options"]["port"] = rogue_port
        gateway, port = yield start_gateway(self, config)
        data = yield raw_tls_exchange(port, client_tls(self.pki.ca), upgrade_request("/"))
        self.assertEqual(split_response(data)[0], "HTTP/1.1 502 Bad Gateway")
        self.assertIn("unable to get local issuer certificate", gateway.events_text.getvalue())
        self.assertEqual(rogue.requests, [])

    @defer.inlineCallbacks
    def test_untrusted_upstream_is_502(self):
        rogue_server = pki.issue(self.pki.rogue_ca, "localhost", dns=["localhost"])
        upstream, upstream_port = start_wss_upstream(self, rogue_server)
        config = self.tls_proxy_config(upstream_port, {"trust": ["backend"]},
                                   {"trust": {"store": self.backend_truststore(), "password": PASSWORD}})
        gateway, port = yield start_gateway(self, config)
        data = yield raw_tls_exchange(port, client_tls(self.pki.ca), upgrade_request("/"))
        self.assertEqual(split_response(data)[0], "HTTP/1.1 502 Bad Gateway")
        self.assertNotIn(b"issuer", data)  # the why is for the event log, not the client
        self.assertEqual(upstream.requests, [])
        self.assertIn("BINDING_TLS_PEER_NOT_VERIFIED - 127.0.0.1 certificate CN=localhost: "
                      "unable to get local issuer certificate", gateway.events_text.getvalue())

    @defer.inlineCallbacks
    def test_client_certificate_for_an_upstream_that_requires_one(self):
        upstream, upstream_port = start_wss_upstream(self, self.pki.localhost, client_ca=self.pki.ca)
        client_keys = pki.write(self.folder / "client.pem", self.pki.client.pem(password=PASSWORD))
        config = self.tls_proxy_config(upstream_port, {"trust": ["backend"], "keys": ["client"], "sni": ["localhost"]},
                                   {"trust": {"store": self.backend_truststore(), "password": PASSWORD},
                                    "keys": {"store": client_keys, "type": "pem", "password": PASSWORD}})
        gateway, port = yield start_gateway(self, config)
        client = yield connect_wss(port, client_tls(self.pki.ca))
        client.sendMessage(b"with a client certificate")
        self.assertEqual(b"".join((yield client.messages.get())[1]), b"with a client certificate")
        peer = upstream.connections[0].transport.getPeerCertificate()
        self.assertEqual(peer.get_subject().commonName, "good client")
        yield close_ws(client)
        yield eventually(lambda: upstream.closes)
