"""Who a tls binding trusts, on the wire: CRLs (the vault's `revocation: crl`), the system's
CAs (`trustcacerts`), routes by the client certificate (`trust`, `mutual`), and the x509
guard authorizing by the client certificate (the tls server's `authorization`)."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from zillatw.test import pki
from zillatw.test.pki import PASSWORD, TlsTestCase, client_tls, connect_wss, start_wss_upstream, tls_chain
from zillatw.test.support import RawClient, close_ws, eventually, start_gateway, upgrade_request


def set_environ(case: unittest.TestCase, name: str, value: str) -> None:
    """Set an environment variable (for OpenSSL, which reads the process's) for one test."""
    old = os.environ.get(name)
    os.environ[name] = value
    case.addCleanup(lambda: os.environ.pop(name) if old is None else os.environ.__setitem__(name, old))


def event_logged(gateway: Any, event: str) -> Any:
    """A predicate for eventually(): the gateway has logged that event."""
    return lambda: event in gateway.events_text.getvalue()


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
            yield eventually(event_logged(gateway, "BINDING_TLS_PEER_NOT_VERIFIED"))
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
                client.sendMessage(outcome.encode())
                self.assertEqual(b"".join((yield client.messages.get())[1]), outcome.encode())
                yield close_ws(client)
                continue
            yield self.assertFailure(connect_wss(port, client_tls(self.pki.ca)), Exception)
            yield eventually(event_logged(gateway, "BINDING_TLS_PEER_NOT_VERIFIED"))
            self.assertIn(f"certificate CN=localhost: {outcome}", gateway.events_text.getvalue())


class SystemTrustTests(TlsTestCase):
    @defer.inlineCallbacks
    def test_trustcacerts_adds_the_system_cas_to_the_vaults_trust(self):
        # OpenSSL's default verify paths honour SSL_CERT_FILE: the "system" CAs are the rogue CA
        system = pki.write(self.folder / "system.pem", self.pki.rogue_ca.cert_pem())
        set_environ(self, "SSL_CERT_FILE", system)
        set_environ(self, "SSL_CERT_DIR", str(self.folder / "none"))
        trust = pki.write(self.folder / "trust.p12", pki.truststore_p12({"clients": self.pki.ca.certificate}, PASSWORD))
        vault = {"keys": {"store": self.keystore(), "password": PASSWORD},
                 "trust": {"store": trust, "password": PASSWORD}}
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


def only_path(path: str) -> dict[str, Any]:
    """An http server that upgrades `path` only (to tell which exit a connection reached)."""
    return {"type": "http", "kind": "server", "routes": [
        {"when": [{"headers": {":path": path, "upgrade": "websocket"}}], "exit": "ws0"}]}


@defer.inlineCallbacks
def upgrade_status(case: TlsTestCase, port: int, path: str, client: pki.Issued | None = None) -> Any:
    """The status line an upgrade of `path` gets over TLS with the client certificate
    `client`, or "closed" if the connection closes first."""
    endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port, client_tls(case.pki.ca, client=client))
    raw = yield connectProtocol(endpoint, RawClient())
    raw.transport.write(upgrade_request(path))
    got: defer.Deferred[str] = defer.Deferred()

    def answer(text: str) -> None:
        if not got.called:
            got.callback(text)
    raw.dataReceived = lambda data: answer(data.partition(b"\r\n")[0].decode())
    raw.connectionLost = lambda reason=None: answer("closed")
    status = yield got
    raw.transport.abortConnection()
    return status


class ClientCertificateTests(TlsTestCase):
    """Two client CAs (ours, and the 'rogue' one standing for a partner's) behind one port."""

    def vault(self) -> dict[str, Any]:
        trust = pki.write(self.folder / "trust.p12", pki.truststore_p12(
            {"clients": self.pki.ca.certificate, "partners": self.pki.rogue_ca.certificate}, PASSWORD))
        return {"keys": {"store": self.keystore(), "password": PASSWORD},
                "trust": {"store": trust, "password": PASSWORD}}

    @defer.inlineCallbacks
    def test_routes_by_the_ca_that_signed_the_client_certificate_or_by_its_absence(self):
        config = tls_chain(self.vault(), {"keys": ["localhost"], "trust": ["clients", "partners"],
                                          "mutual": "requested"},
                           tls_routes=[{"when": [{"trust": ["partners"]}], "exit": "http_partners"},
                                       {"when": [{"trust": ["clients"]}], "exit": "http_clients"},
                                       {"when": [{"mutual": "none"}], "exit": "http_anonymous"}],
                           apps={"http_partners": only_path("/partners"), "http_clients": only_path("/clients"),
                                 "http_anonymous": only_path("/anonymous")})
        gateway, port = yield start_gateway(self, config)
        # each connection reaches the one http server that upgrades the path named after its route
        reached = {"/partners": self.pki.rogue_client, "/clients": self.pki.client, "/anonymous": None}
        for path in reached:
            for name, client in (("partner", self.pki.rogue_client), ("client", self.pki.client), ("none", None)):
                expected = "HTTP/1.1 101 Switching Protocols" if reached[path] is client else "HTTP/1.1 404 Not Found"
                self.assertEqual((yield upgrade_status(self, port, path, client)), expected, f"{path} by {name}")

    @defer.inlineCallbacks
    def test_mutual_required_condition_without_a_certificate_finds_no_route(self):
        config = tls_chain(self.vault(), {"keys": ["localhost"], "trust": ["clients"], "mutual": "requested"},
                           tls_routes=[{"when": [{"mutual": "required"}], "exit": "http0"}])
        gateway, port = yield start_gateway(self, config)
        self.assertEqual((yield upgrade_status(self, port, "/", self.pki.client)), "HTTP/1.1 101 Switching Protocols")
        self.assertEqual((yield upgrade_status(self, port, "/")), "closed")  # no route: closed after the handshake


class X509GuardTests(TlsTestCase):
    def config(self, http_routes: list[dict[str, Any]] | None = None, tls_routes: list[dict[str, Any]] | None = None,
               apps: dict[str, Any] | None = None) -> dict[str, Any]:
        trust = pki.write(self.folder / "trust.p12", pki.truststore_p12({"clients": self.pki.ca.certificate}, PASSWORD))
        vault = {"keys": {"store": self.keystore(), "password": PASSWORD},
                 "trust": {"store": trust, "password": PASSWORD}}
        config = tls_chain(vault, {"keys": ["localhost"], "trust": ["clients"], "mutual": "requested",
                                   "authorization": {"certs": {"credentials": {"certificates": "pem"}}}},
                           tls_routes=tls_routes, apps=apps,
                           http_routes=http_routes or [{"when": [{"headers": {"upgrade": "websocket"}}],
                                                        "guarded": {"certs": ["operators"]}, "exit": "ws0"}])
        config["guards"] = {"certs": {"type": "x509", "options": {
            "identity": "subject.cn",
            "roles": {"operators": [{"issuer.cn": "zillatw test CA", "subject.cn": "operator *"},
                                    {"san.email": "*@ops.example"}]}}}}
        return config

    @defer.inlineCallbacks
    def test_http_routes_guarded_by_the_client_certificate(self):
        gateway, port = yield start_gateway(self, self.config())
        operator = pki.issue(self.pki.ca, "operator alice", client=True)
        by_email = pki.issue(self.pki.ca, "bob", client=True, emails=["bob@ops.example"])
        for issued in (operator, by_email):
            client = yield connect_wss(port, client_tls(self.pki.ca, client=issued))
            client.sendMessage(b"operator")
            self.assertEqual(b"".join((yield client.messages.get())[1]), b"operator")
            yield close_ws(client)
        events = gateway.events_text.getvalue()
        # the identity (subject.cn) is the session's, as a jwt guard's subject is
        self.assertIn(f"BINDING_HTTP_REQUEST_ACCEPTED operator alice GET https://localhost:{port}/", events)
        self.assertIn(f"BINDING_HTTP_REQUEST_ACCEPTED bob GET https://localhost:{port}/", events)
        # a trusted certificate without the role: authorized, but no route (404, as for a jwt
        # without the role); no certificate: no session (403)
        self.assertEqual((yield upgrade_status(self, port, "/", self.pki.client)), "HTTP/1.1 404 Not Found")
        self.assertEqual((yield upgrade_status(self, port, "/")), "HTTP/1.1 403 Forbidden")

    @defer.inlineCallbacks
    def test_tls_routes_guarded_by_the_client_certificate(self):
        config = self.config(http_routes=[{"when": [{"headers": {"upgrade": "websocket"}}], "exit": "ws0"}],
                             tls_routes=[{"guarded": {"certs": ["operators"]}, "exit": "http0"},
                                         {"exit": "http_others"}], apps={"http_others": only_path("/others")})
        gateway, port = yield start_gateway(self, config)
        operator = pki.issue(self.pki.ca, "operator carol", client=True)
        for issued, path, status in [(operator, "/", "HTTP/1.1 101 Switching Protocols"),
                                     (self.pki.client, "/", "HTTP/1.1 404 Not Found"),
                                     (self.pki.client, "/others", "HTTP/1.1 101 Switching Protocols")]:
            self.assertEqual((yield upgrade_status(self, port, path, issued)), status,
                             f"{issued.certificate.subject} {path}")
