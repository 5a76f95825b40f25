"""Who a tls binding trusts, on the wire: CRLs (the vault's `revocation: crl`), the system's
CAs (`trustcacerts`), routes by the client certificate (`trust`, `mutual`), and the x509
guard authorizing by the client certificate (the tls server's `authorization`)."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from zillatw import ConfigError, build_gateway
from zillatw.test import pki
from zillatw.test.support import close_ws, eventually, start_gateway
from zillatw.test.test_tls import (PASSWORD, TlsTestCase, client_tls, connect_wss, start_wss_upstream,
                                   tls_chain)


def set_environ(case: unittest.TestCase, name: str, value: str) -> None:
    """Set an environment variable (for OpenSSL, which reads the process's) for one test."""
    old = os.environ.get(name)
    os.environ[name] = value
    case.addCleanup(lambda: os.environ.pop(name) if old is None else os.environ.__setitem__(name, old))


class RevocationTests(TlsTestCase):
    def vault(self, crls: list[Any], revocation: bool = True) -> dict[str, Any]:
        trust = pki.write(self.folder / "trust.p12", pki.truststore_p12({"clients": self.pki.ca.certificate}, PASSWORD))
        crl_folder = self.folder / "crls"
        for index, crl in enumerate(crls):
            pki.write(crl_folder / f"{index}.pem", pki.crl_pem(crl))
        vault: dict[str, Any] = {"keys": {"store": self.keystore(), "password": PASSWORD},
                                 "trust": {"store": trust, "password": PASSWORD}}
        if revocation:
            vault.update({"revocation": "crl", "crls": {"store": str(crl_folder)}})
        return vault

    @defer.inlineCallbacks
    def test_a_client_certificate_revoked_in_the_crl_is_refused_at_the_handshake(self):
        revoked = pki.issue(self.pki.ca, "revoked client", client=True)
        config = tls_chain(self.vault([pki.make_crl(self.pki.ca, [revoked])]),
                           {"keys": ["localhost"], "trust": ["clients"]})
        gateway, port = yield start_gateway(self, config)
        client = yield connect_wss(port, client_tls(self.pki.ca, client=self.pki.client))
        client.sendMessage(b"not revoked")
        self.assertEqual(b"".join((yield client.messages.get())[1]), b"not revoked")
        yield close_ws(client)
        yield self.assertFailure(connect_wss(port, client_tls(self.pki.ca, client=revoked)), Exception)
        yield eventually(lambda: "BINDING_TLS_PEER_NOT_VERIFIED" in gateway.events_text.getvalue())
        self.assertIn("BINDING_TLS_PEER_NOT_VERIFIED - 127.0.0.1 client certificate CN=revoked client: "
                      "certificate revoked", gateway.events_text.getvalue())

    @defer.inlineCallbacks
    def test_without_revocation_the_same_certificate_is_accepted(self):
        revoked = pki.issue(self.pki.ca, "revoked client", client=True)
        config = tls_chain(self.vault([pki.make_crl(self.pki.ca, [revoked])], revocation=False),
                           {"keys": ["localhost"], "trust": ["clients"]})
        gateway, port = yield start_gateway(self, config)
        client = yield connect_wss(port, client_tls(self.pki.ca, client=revoked))
        yield close_ws(client)

    @defer.inlineCallbacks
    def test_an_expired_crl_or_none_for_the_issuer_refuses_every_client(self):
        for crls, reason in [([pki.make_crl(self.pki.ca, expired=True)], "CRL has expired"),
                             ([pki.make_crl(self.pki.rogue_ca)], "unable to get certificate CRL")]:
            config = tls_chain(self.vault(crls), {"keys": ["localhost"], "trust": ["clients"]})
            gateway, port = yield start_gateway(self, config)
            yield self.assertFailure(connect_wss(port, client_tls(self.pki.ca, client=self.pki.client)), Exception)
            yield eventually(lambda: "BINDING_TLS_PEER_NOT_VERIFIED" in gateway.events_text.getvalue())
            self.assertIn(f"client certificate CN=good client: {reason}", gateway.events_text.getvalue())

    @defer.inlineCallbacks
    def test_the_tls_client_refuses_a_revoked_upstream(self):
        upstream, upstream_port = start_wss_upstream(self, self.pki.localhost)
        for revoked, outcome in [([], "upstream"), ([self.pki.localhost], "certificate revoked")]:
            config = tls_chain({"keys": {"store": self.keystore(), "password": PASSWORD}}, {"keys": ["localhost"]})
            truststore = pki.write(self.folder / "backend.p12",
                                   pki.truststore_p12({"backend": self.pki.ca.certificate}, PASSWORD))
            crl = pki.write(self.folder / "upstream.crl", pki.crl_pem(pki.make_crl(self.pki.ca, revoked)))
            config["vaults"]["clients"] = {"type": "filesystem", "options": {
                "trust": {"store": truststore, "password": PASSWORD}, "revocation": "crl", "crls": {"store": crl}}}
            config["bindings"].update({
                "ws0": {"type": "ws", "kind": "server", "exit": "ws_out"},
                "ws_out": {"type": "ws", "kind": "client", "exit": "http_out"},
                "http_out": {"type": "http", "kind": "client", "exit": "tls_out"},
                "tls_out": {"type": "tls", "kind": "client", "vault": "clients",
                            "options": {"trust": ["backend"], "sni": ["localhost"]}, "exit": "tcp_out"},
                "tcp_out": {"type": "tcp", "kind": "client", "options": {"host": "127.0.0.1", "port": upstream_port}},
            })
            gateway, port = yield start_gateway(self, config)
            if not revoked:
                client = yield connect_wss(port, client_tls(self.pki.ca))
                client.sendMessage(b"upstream")
                self.assertEqual(b"".join((yield client.messages.get())[1]), b"upstream")
                yield close_ws(client)
                continue
            yield self.assertFailure(connect_wss(port, client_tls(self.pki.ca)), Exception)
            yield eventually(lambda: "BINDING_TLS_PEER_NOT_VERIFIED" in gateway.events_text.getvalue())
            self.assertIn("certificate CN=localhost: certificate revoked", gateway.events_text.getvalue())


class SystemTrustTests(TlsTestCase):
    @defer.inlineCallbacks
    def test_trustcacerts_adds_the_system_cas_to_the_vaults_trust(self):
        # OpenSSL's default verify paths honour SSL_CERT_FILE: the "system" CAs are the rogue CA
        system = pki.write(self.folder / "system.pem", self.pki.rogue_ca.cert_pem())
        set_environ(self, "SSL_CERT_FILE", system)
        set_environ(self, "SSL_CERT_DIR", str(self.folder / "none"))
        trust = pki.write(self.folder / "trust.p12", pki.truststore_p12({"clients": self.pki.ca.certificate}, PASSWORD))
        vault = {"keys": {"store": self.keystore(), "password": PASSWORD}, "trust": {"store": trust, "password": PASSWORD}}
        for trustcacerts in (False, True):
            config = tls_chain(vault, {"keys": ["localhost"], "trust": ["clients"], "trustcacerts": trustcacerts})
            gateway, port = yield start_gateway(self, config)
            client = yield connect_wss(port, client_tls(self.pki.ca, client=self.pki.client))
            yield close_ws(client)
            rogue = connect_wss(port, client_tls(self.pki.ca, client=self.pki.rogue_client))
            if trustcacerts:
                yield close_ws((yield rogue))
            else:
                yield self.assertFailure(rogue, Exception)
