"""Zilla's http.echo and http.proxy examples (conf/http.echo.yaml, conf/http.proxy.yaml)
driven over HTTP/2 as their READMEs do with nghttp: here the `h2` library on a loopback
socket, h2 by ALPN on the https ports and h2c with prior knowledge on http. The files run
unchanged, on their own ports, in a network namespace of the test's own (zillatw.test.netns)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import pkcs12
from twisted.internet import defer, reactor
from twisted.internet import ssl as tssl
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from zillatw.test import pki
from zillatw.test.h2_support import H2Client, connect_h2c
from zillatw.test.http_support import UpstreamFactory
from zillatw.test.netns import ExampleNetwork
from zillatw.test.process_support import generate_keystores
from zillatw.test.support import eventually, resolve_locally, start_gateway


class H2ExampleTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.network = ExampleNetwork(self)
        self.folder = Path(self.mktemp())
        yield generate_keystores(self, self.folder / "tls")

    @defer.inlineCallbacks
    def connect_h2(self, port: int) -> Any:
        ca = tssl.Certificate.loadPEM((self.folder / "tls" / "localhost.crt").read_bytes())
        options = tssl.optionsForClientTLS("localhost", trustRoot=ca, acceptableProtocols=[b"h2", b"http/1.1"])
        client = yield connectProtocol(SSL4ClientEndpoint(reactor, "127.0.0.1", port, options), H2Client())
        self.addCleanup(lambda: client.transport.abortConnection())
        return client

    @defer.inlineCallbacks
    def test_http_echo_over_h2_and_h2c(self):
        http_port, https_port = self.network.port(7114), self.network.port(7143)
        gateway, _ = yield start_gateway(self, self.network.config("http.echo.yaml", self.folder))
        h2c = yield connect_h2c(self, http_port)
        tls = yield self.connect_h2(https_port)
        for client, scheme, port in ((h2c, "http", http_port), (tls, "https", https_port)):
            # nghttp -d body -H "content-type: text/plain" URL (twice: one connection)
            for _ in range(2):
                stream = client.h2.get_next_available_stream_id()
                client.h2.send_headers(stream, [(":method", "POST"), (":scheme", scheme),
                                                (":authority", f"localhost:{port}"), (":path", "/"),
                                                ("content-type", "text/plain")])
                client.send_body(stream, b"Hello, world")
                yield eventually(lambda c=client, s=stream: c.done(s))
                response = client.responses[stream]
                self.assertEqual(response["headers"][":status"], "200")
                self.assertEqual(response["headers"]["content-type"], "text/plain")
                self.assertEqual(response["body"], b"Hello, world")
        self.assertEqual(tls.transport.negotiatedProtocol, b"h2")
        events = gateway.events_text.getvalue()
        self.assertEqual(events.count("BINDING_HTTP_REQUEST_ACCEPTED"), 4)
        self.assertIn(f"POST https://localhost:{https_port}/", events)

    @defer.inlineCallbacks
    def test_http_proxy_from_h2_to_an_http11_upstream(self):
        bundle = pkcs12.load_pkcs12((self.folder / "tls" / "backend.p12").read_bytes(), b"generated")
        backend = pki.Issued(bundle.key, bundle.cert.certificate)  # type: ignore[arg-type, union-attr]
        own = tssl.PrivateCertificate.loadPEM(backend.key_pem() + backend.cert_pem())
        options = tssl.CertificateOptions(privateKey=own.privateKey.original, certificate=own.original,
                                          acceptableProtocols=[b"http/1.1"])
        upstream = UpstreamFactory()
        listening: Any = reactor.listenSSL(self.network.port(443), upstream, options, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(listening.stopListening)
        port = self.network.port(9090)
        resolve_locally(self, "backend")  # the host name as written
        gateway, _ = yield start_gateway(self, self.network.config("http.proxy.yaml", self.folder))
        client = yield self.connect_h2(port)
        # nghttp https://localhost:9090/demo.html, from a page elsewhere: three streams at once
        streams = [client.request("GET", "/demo.html", scheme="https",
                                  authority=f"localhost:{port}", headers={"origin": "https://app.example"})
                   for _ in range(3)]
        yield eventually(lambda: all(client.done(s) for s in streams))
        for stream in streams:
            response = client.responses[stream]
            self.assertEqual(response["headers"][":status"], "200")
            self.assertEqual(response["body"], b"<html>/demo.html</html>")
            self.assertEqual(response["headers"]["access-control-allow-origin"], "*")
        self.assertEqual(len(upstream.requests), 3)
        self.assertEqual(upstream.requests[0]["headers"]["host"], f"localhost:{port}")
        self.assertIn("GET https://localhost:", gateway.events_text.getvalue())
        for connection in upstream.connections:
            connection.transport.loseConnection()
