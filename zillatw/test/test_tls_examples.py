"""conf/ws.*.tls.yaml and conf/tls/generate-keystore.py: the examples serve wss with the
keystores the script makes, and the script keeps private keys private."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12
from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from zillatw.test import pki
from zillatw.test.netns import ExampleNetwork
from zillatw.test.pki import client_tls, connect_wss, start_wss_upstream
from zillatw.test.process_support import generate_keystores
from zillatw.test.support import CONF, close_ws, eventually, resolve_locally, start_gateway


class ConfExampleTests(unittest.TestCase):
    """conf/ws.*.tls.yaml (spec §4.3, §4.4) unchanged, on their own ports in a network namespace
    of the test's own (zillatw.test.netns), with the keystores their script makes."""

    @defer.inlineCallbacks
    def setUp(self):
        self.network = ExampleNetwork(self)
        self.folder = Path(self.mktemp())
        yield generate_keystores(self, self.folder / "tls")

    @defer.inlineCallbacks
    def test_keystores_holding_keys_are_readable_by_their_owner_only(self):
        folder = self.folder / "again"
        folder.mkdir()
        (folder / "backend.p12").write_bytes(b"an old keystore")
        os.chmod(folder / "backend.p12", 0o644)  # a rewritten file loses its old mode too
        for where in (self.folder / "tls", folder):
            if where is folder:
                out, err, code = yield getProcessOutputAndValue(
                    sys.executable, [os.path.join(CONF, "tls", "generate-keystore.py"), str(folder)],
                    env={**os.environ, "KEYSTORE_PASSWORD": "generated"}, reactor=reactor)
                self.assertEqual(code, 0, err)
            for name in ("localhost.p12", "backend.p12"):
                self.assertEqual(stat.S_IMODE((where / name).stat().st_mode), 0o600, f"{where / name}")
        bundle = pkcs12.load_pkcs12((folder / "backend.p12").read_bytes(), b"generated")
        self.assertIsNotNone(bundle.key)

    @defer.inlineCallbacks
    def serve(self, name: str) -> Any:
        """The example, its relative paths found in this test's folder."""
        gateway, _ = yield start_gateway(self, self.network.config(name, self.folder))
        return gateway

    def trusted(self, name: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate((self.folder / "tls" / f"{name}.crt").read_bytes())

    @defer.inlineCallbacks
    def test_ws_echo_tls_serves_wss_and_ws_from_one_config(self):
        wss_port, ws_port = self.network.port(7143), self.network.port(7114)
        gateway = yield self.serve("ws.echo.tls.yaml")
        for port, tls in [(wss_port, True), (ws_port, False)]:
            client = yield connect_wss(port, client_tls(self.trusted("localhost")), protocols=["echo"], tls=tls)
            client.sendMessage(b"example")
            self.assertEqual(b"".join((yield client.messages.get())[1]), b"example")
            yield close_ws(client)
        events = gateway.events_text.getvalue()
        self.assertIn(f"GET https://localhost:{wss_port}/", events)
        self.assertIn(f"GET http://localhost:{ws_port}/", events)

    @defer.inlineCallbacks
    def test_ws_proxy_tls_reaches_a_backend_it_verifies_as_backend(self):
        bundle = pkcs12.load_pkcs12((self.folder / "tls" / "backend.p12").read_bytes(), b"generated")
        upstream, _ = start_wss_upstream(self, pki.Issued(bundle.key, bundle.cert.certificate),
                                         port=self.network.port(8443))
        wss_port = self.network.port(7143)
        # `backend` resolves to 127.0.0.1; the tls client sends and verifies `backend`
        resolve_locally(self, "backend")
        yield self.serve("ws.proxy.tls.yaml")
        client = yield connect_wss(wss_port, client_tls(self.trusted("localhost")), path="/chat",
                                   protocols=["echo"])
        client.sendMessage(b"to the backend")
        self.assertEqual(b"".join((yield client.messages.get())[1]), b"to the backend")
        self.assertEqual(upstream.requests[0].path, "/chat")
        self.assertEqual(upstream.connections[0].transport.getHandle().get_servername(), b"backend")
        yield close_ws(client)
        yield eventually(lambda: upstream.closes)
