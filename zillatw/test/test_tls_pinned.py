"""Zilla's ws.proxy as shipped (issue 15): its backend's certificate has a CN and no
subjectAltName, and the tls client's trust store holds that very certificate. Accepted
there, for that CN only; everywhere else the RFC 6125/9525 checks stay, and a refused
upstream certificate is a 502 with a body plus an event saying why, never a traceback.

conf/ws.proxy.tls.yaml is Zilla's examples/ws.proxy/etc/zilla.yaml, unchanged; the tests
run it on its own ports (7143; the backend on 8443) in a network namespace of their own
(zillatw.test.netns) and resolve `backend` to 127.0.0.1 (a name resolver on the reactor),
with keystores made at run time as Zilla's are: a self-signed CA:TRUE `CN=backend`, no SAN.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import defer
from twisted.trial import unittest

from zillatw.bindings.tls.context import pinned_by_common_name
from zillatw.test import pki
from zillatw.test.netns import ExampleNetwork
from zillatw.test.pki import client_tls, connect_wss, start_wss_upstream, tls_connect
from zillatw.test.support import CONF, close_ws, resolve_locally, start_gateway, upgrade_request

PASSWORD = "generated"


def cn_only(cn: str, issuer: pki.Issued | None = None, san: list[str] | None = None) -> pki.Issued:
    """A certificate as Zilla's ws.proxy backend has: CN only, no subjectAltName, no key
    usage; self-signed (CA:TRUE) unless an issuer is given; with `san`, DNS names after all."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer.certificate.subject if issuer else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in san]), critical=False)
    certificate = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    return pki.Issued(key, certificate, [issuer.certificate] if issuer else [])


class WsProxyAsShipped(unittest.TestCase):
    def setUp(self):
        self.network = ExampleNetwork(self)
        resolve_locally(self, "backend")  # the compose service's name, as Zilla's example has it
        os.environ["KEYSTORE_PASSWORD"] = PASSWORD
        self.addCleanup(os.environ.pop, "KEYSTORE_PASSWORD")
        self.folder = Path(self.mktemp())
        (self.folder / "tls").mkdir(parents=True)
        self.ca = pki.make_ca("localhost CA")
        pki.write(self.folder / "tls" / "localhost.p12",
                  pki.issue(self.ca, "localhost", dns=["localhost"]).p12("localhost", PASSWORD))

    @defer.inlineCallbacks
    def serve(self, backend: pki.Issued, pinned: x509.Certificate) -> Any:
        """Zilla's config, with `pinned` as the trust store's `backend` entry, proxying to
        a wss echo server presenting `backend`."""
        pki.write(self.folder / "tls" / "truststore.p12", pki.truststore_p12({"backend": pinned}, PASSWORD))
        self.upstream, _ = start_wss_upstream(self, backend, port=self.network.port(8443))
        self.port = self.network.port(7143)
        self.assertIn("host: backend", Path(CONF, "ws.proxy.tls.yaml").read_text())  # resolved, not edited
        self.gateway, _ = yield start_gateway(self, self.network.config("ws.proxy.tls.yaml", self.folder))

    @defer.inlineCallbacks
    def refused(self) -> Any:
        """The client's handshake through the proxy: (the response, the events)."""
        client = yield tls_connect(self.port, self.ca)
        client.transport.write(upgrade_request("/", {"Host": f"localhost:{self.port}",
                                                     "Sec-WebSocket-Protocol": "echo"}))
        response = yield client.done
        return response, self.gateway.events_text.getvalue()

    def assertRefusedWithBody(self, response: bytes, events: str, why: str) -> None:
        head, _, body = response.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 502 "), response)
        self.assertEqual(body, b"upstream TLS failed\n")
        self.assertIn(b"Content-Length: 20", head)
        self.assertIn("BINDING_TLS_PEER_NOT_VERIFIED", events)
        self.assertIn(why, events)
        self.assertEqual(self.upstream.requests, [], "no request reached the backend")

    @defer.inlineCallbacks
    def test_the_pinned_cn_only_backend_is_reached(self):
        backend = cn_only("backend")
        yield self.serve(backend, backend.certificate)
        client = yield connect_wss(self.port, client_tls(self.ca), protocols=["echo"])
        client.sendMessage(b"Hello, backend")
        self.assertEqual(b"".join((yield client.messages.get())[1]), b"Hello, backend")
        self.assertEqual(self.upstream.connections[0].transport.getHandle().get_servername(), b"backend")
        yield close_ws(client)

    @defer.inlineCallbacks
    def test_a_cn_only_certificate_whose_issuer_is_trusted_is_not_pinned(self):
        issuer = cn_only("backend CA")
        yield self.serve(cn_only("backend", issuer=issuer), issuer.certificate)
        response, events = yield self.refused()
        self.assertRefusedWithBody(response, events, "CN=backend has no subjectAltName")

    @defer.inlineCallbacks
    def test_a_pinned_certificate_for_another_cn_is_refused(self):
        other = cn_only("other")
        yield self.serve(other, other.certificate)
        response, events = yield self.refused()
        self.assertRefusedWithBody(response, events, "for 'backend'")

    @defer.inlineCallbacks
    def test_a_pinned_certificate_with_a_subject_alt_name_gets_the_rfc_check(self):
        """CN=backend but SAN other: the SAN is what it is for, the CN is not looked at."""
        pinned = cn_only("backend", san=["other"])
        yield self.serve(pinned, pinned.certificate)
        response, events = yield self.refused()
        self.assertRefusedWithBody(response, events, "certificate does not match 'backend' (it is for: other)")


class PinnedByCommonNameTests(unittest.TestCase):
    """The rule itself: the very certificate in trust, no SAN, its one CN the name."""

    def test_the_rule(self):
        pinned = cn_only("backend").certificate
        self.assertTrue(pinned_by_common_name(pinned, [pinned], "backend"))
        self.assertTrue(pinned_by_common_name(pinned, [pinned], "BACKEND."))
        self.assertFalse(pinned_by_common_name(pinned, [], "backend"))
        self.assertFalse(pinned_by_common_name(pinned, [cn_only("backend").certificate], "backend"))
        self.assertFalse(pinned_by_common_name(pinned, [pinned], "backend.example"))
        self.assertFalse(pinned_by_common_name(None, [pinned], "backend"))
        wildcard = cn_only("*.example").certificate
        self.assertFalse(pinned_by_common_name(wildcard, [wildcard], "a.example"))
        with_san = cn_only("backend", san=["backend"]).certificate
        self.assertFalse(pinned_by_common_name(with_san, [with_san], "backend"))
