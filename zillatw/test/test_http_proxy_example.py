"""Zilla's http.proxy example (conf/http.proxy.yaml) over HTTP/1.1 (treq for curl;
test_h2_examples drives it over h2 as its README does), its host names as written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import treq
from cryptography.hazmat.primitives.serialization import pkcs12
from twisted.internet import defer, reactor
from twisted.internet import ssl as tssl
from twisted.trial import unittest
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from zillatw.test import pki
from zillatw.test.http_support import UpstreamFactory
from zillatw.test.netns import ExampleNetwork
from zillatw.test.process_support import generate_keystores
from zillatw.test.support import CONF, eventually, resolve_locally, start_gateway


class HttpProxyExampleTests(unittest.TestCase):
    """conf/http.proxy.yaml as its README drives it (curl --http1.1 here: h2 is not served),
    unchanged on its ports (9090; the backend on 443) in a namespace of the test's own, the
    backend on 127.0.0.1 with the keystores generate-keystore.py makes."""

    @defer.inlineCallbacks
    def test_http_proxy_example(self):
        network = ExampleNetwork(self)
        folder = Path(self.mktemp())
        yield generate_keystores(self, folder / "tls")
        bundle = pkcs12.load_pkcs12((folder / "tls" / "backend.p12").read_bytes(), b"generated")
        backend = pki.Issued(bundle.key, bundle.cert.certificate)
        own = tssl.PrivateCertificate.loadPEM(backend.key_pem() + backend.cert_pem())
        options = tssl.CertificateOptions(privateKey=own.privateKey.original, certificate=own.original,
                                          acceptableProtocols=[b"http/1.1"])
        upstream = UpstreamFactory()
        listening: Any = reactor.listenSSL(network.port(443), upstream, options, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(listening.stopListening)
        port = network.port(9090)
        resolve_locally(self, "backend")  # the host name as written
        self.assertIn("host: backend", Path(CONF, "http.proxy.yaml").read_text())
        gateway, _ = yield start_gateway(self, network.config("http.proxy.yaml", folder))
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        ca = tssl.Certificate.loadPEM((folder / "tls" / "localhost.crt").read_bytes())
        agent = Agent(reactor, BrowserLikePolicyForHTTPS(trustRoot=ca), pool=pool)
        for _ in range(3):
            # curl --cacert localhost.crt --http1.1 https://localhost:9090/demo.html (from a page elsewhere)
            response = yield treq.get(f"https://localhost:{port}/demo.html", agent=agent,
                                      headers={"Origin": "https://app.example"})
            self.assertEqual(response.code, 200)
            self.assertEqual((yield treq.content(response)), b"<html>/demo.html</html>")
            self.assertEqual(response.headers.getRawHeaders("access-control-allow-origin"), ["*"])
        self.assertEqual(len(upstream.connections), 1)  # kept alive upstream too
        self.assertEqual(upstream.requests[0]["headers"]["host"], f"localhost:{port}")
        handle = upstream.connections[0].transport.getHandle()
        self.assertEqual(handle.get_servername(), b"backend")  # SNI and verification: `backend`
        for connection in upstream.connections:
            connection.transport.loseConnection()
        yield eventually(lambda: upstream.lost == 1)
        self.assertIn(f"GET https://localhost:{port}/demo.html", gateway.events_text.getvalue())
