"""The tls binding's and x509 guard's keys through zillatw.config.load (and build_gateway
where the vault's files are needed): each valid value loads, each invalid one is refused
with a message naming its YAML path."""

from __future__ import annotations

import copy
from typing import Any

from twisted.trial import unittest

from zillatw import ConfigError, build_gateway
from zillatw.config import load
from zillatw.guards import Rejected
from zillatw.guards.x509 import X509Guard, fields
from zillatw.telemetry import Events
from zillatw.protocols import binding_types
from zillatw.test import pki
from zillatw.test.test_tls import PASSWORD, TlsTestCase, tls_chain

TYPES = binding_types()


def server(options: dict[str, Any], routes: list[dict[str, Any]] | None = None,
           guards: dict[str, Any] | None = None) -> dict[str, Any]:
    """tcp -> tls server (vault `server`, not read by load) -> http -> ws -> echo."""
    config = tls_chain({}, options, tls_routes=routes)
    config["guards"] = guards if guards is not None else {"certs": {"type": "x509"}}
    return config


def client(options: dict[str, Any], routes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    config = server({"keys": ["localhost"]})
    tls_out: dict[str, Any] = {"type": "tls", "kind": "client", "vault": "server", "options": options}
    if routes is None:
        tls_out["exit"] = "tcp_out"
    else:
        tls_out["routes"] = routes
    config["bindings"].update({
        "ws0": {"type": "ws", "kind": "server", "exit": "ws_out"},
        "ws_out": {"type": "ws", "kind": "client", "exit": "http_out"},
        "http_out": {"type": "http", "kind": "client", "exit": "tls_out"},
        "tls_out": tls_out,
        "tcp_out": {"type": "tcp", "kind": "client", "options": {"host": "localhost", "port": 1}},
    })
    return config


class LoadTests(unittest.TestCase):
    def loads(self, config: dict[str, Any]) -> None:
        load(copy.deepcopy(config), TYPES, env={})

    def refused(self, config: dict[str, Any], *expected: str) -> None:
        error = self.assertRaises(ConfigError, load, copy.deepcopy(config), TYPES, env={})
        for problem in expected:
            self.assertTrue(any(problem in p for p in error.problems), f"{problem!r} not in {error.problems}")

    def test_authorization(self):
        authorization = {"certs": {"credentials": {"certificates": "pem"}}}
        self.loads(server({"keys": ["localhost"], "trust": ["ca"], "authorization": authorization}))
        self.loads(server({"keys": ["localhost"], "trust": ["ca"], "authorization": {"certs": {}}}))
        self.refused(server({"keys": ["localhost"], "authorization": authorization}),
                     "bindings.tls0.options.authorization: no client certificate is asked for (give 'trust' or 'mutual')")
        self.refused(server({"keys": ["localhost"], "trust": ["ca"], "authorization": {"other": {}}}),
                     "bindings.tls0.options.authorization.other: no guard named 'other'")
        self.refused(server({"keys": ["localhost"], "trust": ["ca"],
                             "authorization": {"certs": {"credentials": {"certificates": "der"}}}}),
                     "bindings.tls0.options.authorization.certs.credentials.certificates")
        self.refused(server({"keys": ["localhost"], "trust": ["ca"], "authorization": {"certs": {}, "more": {}}}),
                     "bindings.tls0.options.authorization")
        self.refused(client({"trust": ["ca"], "authorization": authorization}),
                     "bindings.tls_out.options.authorization: only for a tls server (it authorizes client certificates)")

    def test_route_conditions_on_the_client_certificate(self):
        options = {"keys": ["localhost"], "trust": ["ca"], "mutual": "requested"}
        self.loads(server(options, [{"when": [{"trust": ["ca"]}], "exit": "http0"},
                                    {"when": [{"mutual": "none"}, {"mutual": "required"}], "exit": "http0"}]))
        self.refused(server(options, [{"when": [{"trust": ["ca"], "mutual": "none"}], "exit": "http0"}]),
                     "bindings.tls0.routes[0].when[0].trust: trust with mutual: none can never match")
        self.refused(server(options, [{"when": [{"mutual": "requested"}], "exit": "http0"}]),
                     "bindings.tls0.routes[0].when[0].mutual")
        self.refused(server({"keys": ["localhost"]}, [{"when": [{"trust": ["ca"]}], "exit": "http0"}]),
                     "bindings.tls0.routes[0].when[0]: routes by client certificate, but none is asked for")
        self.refused(client({"trust": ["ca"]}, [{"when": [{"trust": ["ca"]}, {"mutual": "none"}], "exit": "tcp_out"}]),
                     "bindings.tls_out.routes[0].when[0].trust: a tls client routes on authority and port",
                     "bindings.tls_out.routes[0].when[1].mutual: a tls client routes on authority and port")

    def test_with_on_routes_is_refused_by_name(self):
        self.refused(client({"trust": ["ca"]}, [{"with": {"certificate": {"subject.cn": "x"}}, "exit": "tcp_out"}]),
                     "bindings.tls_out.routes[0].with: not allowed for a tls client binding")

    def test_guarded_routes(self):
        options = {"keys": ["localhost"], "trust": ["ca"], "authorization": {"certs": {}}}
        self.loads(server(options, [{"guarded": {"certs": ["operators"]}, "exit": "http0"}]))
        self.refused(server({"keys": ["localhost"], "trust": ["ca"]}, [{"guarded": {"certs": []}, "exit": "http0"}]),
                     "bindings.tls0.routes[0].guarded.certs: not in options.authorization")
        self.refused(client({"trust": ["ca"]}, [{"guarded": {"certs": []}, "exit": "tcp_out"}]),
                     "bindings.tls_out.routes[0].guarded: a tls client has no session to guard routes with")

    def test_trustcacerts_mutual_and_client_keys(self):
        self.loads(server({"keys": ["localhost"], "trust": ["ca"], "trustcacerts": True}))
        self.loads(server({"keys": ["localhost"], "mutual": "required", "trustcacerts": True}))
        self.refused(server({"keys": ["localhost"], "trustcacerts": True}),
                     "bindings.tls0.options.trustcacerts: true, but no client certificate is asked for")
        self.loads(client({"keys": ["client"], "trust": ["ca"]}))
        self.refused(client({"keys": ["a", "b"], "trust": ["ca"]}),
                     "bindings.tls_out.options.keys: a tls client presents one key, got 2")
        self.refused(client({"mutual": "required"}),
                     "bindings.tls_out.options.mutual: only for a tls server")

    def test_x509_guard_options(self):
        options = {"identity": "san.email", "roles": {"ops": [{"issuer.cn": "CA", "san.dns": "*.example"},
                                                              {"x5t.s256": "abc"}, {"subject.2.5.4.10": "Org"}]}}
        self.loads(server({"keys": ["localhost"]}, guards={"certs": {"type": "x509", "options": options}}))
        for bad, expected in [({"identity": "subject"}, "guards.certs.options.identity: 'subject' is not a certificate field"),
                              ({"roles": {"ops": [{"san.dn": "x"}]}}, "guards.certs.options.roles.ops[0].san.dn: not a "
                                                                     "certificate field"),
                              ({"roles": {"ops": []}}, "guards.certs.options.roles.ops"),
                              ({"attributes": {"org": "subject.o"}}, "guards.certs.options.attributes: not supported"),
                              ({"challenge": 3}, "guards.certs.options")]:
            self.refused(server({"keys": ["localhost"]}, guards={"certs": {"type": "x509", "options": bad}}), expected)


class BuildTests(TlsTestCase):
    def vault(self) -> dict[str, Any]:
        trust = pki.write(self.folder / "trust.p12", pki.truststore_p12(
            {"clients": self.pki.ca.certificate, "partners": self.pki.rogue_ca.certificate}, PASSWORD))
        return {"keys": {"store": self.keystore(), "password": PASSWORD}, "trust": {"store": trust, "password": PASSWORD}}

    def refused(self, config: dict[str, Any], *expected: str) -> None:
        error = self.assertRaises(ConfigError, build_gateway, config)
        for problem in expected:
            self.assertIn(problem, error.problems)

    def test_alpn_offers_only_what_an_http_server_behind_serves(self):
        build_gateway(tls_chain(self.vault(), {"keys": ["localhost"], "alpn": ["http/1.1"]}))
        self.refused(tls_chain(self.vault(), {"keys": ["localhost"], "alpn": ["h2", "http/1.1"]}),
                     "bindings.tls0.options.alpn[0]: 'h2' would be negotiated for http server 'http0', which serves "
                     "http/1.1 only (h2 is not served yet)")
        self.refused(tls_chain(self.vault(), {"keys": ["localhost"], "alpn": ["http/1.1"]},
                               tls_routes=[{"when": [{"alpn": "h2"}], "exit": "http0"}]),
                     "bindings.tls0.routes[0].when[0].alpn: 'h2' routes to http server 'http0', which serves "
                     "http/1.1 only (h2 is not served yet)")

    def test_route_trust_names_a_trust_entry_the_handshake_lets_through(self):
        routes = [{"when": [{"trust": ["partner"]}], "exit": "http0"}]
        self.refused(tls_chain(self.vault(), {"keys": ["localhost"], "trust": ["clients"]}, tls_routes=routes),
                     "bindings.tls0.routes[0].when[0].trust[0]: no certificate 'partner' in vault 'server' "
                     "(did you mean 'partners'?) (it has: clients, partners)")
        routes[0]["when"][0]["trust"] = ["partners"]
        self.refused(tls_chain(self.vault(), {"keys": ["localhost"], "trust": ["clients"]}, tls_routes=routes),
                     "bindings.tls0.routes[0].when[0].trust[0]: 'partners' is not in options.trust, so no "
                     "certificate it signed passes the handshake")
        build_gateway(tls_chain(self.vault(), {"keys": ["localhost"], "trust": ["clients", "partners"]},
                                tls_routes=routes))

    def test_authorization_names_an_x509_guard(self):
        config = tls_chain(self.vault(), {"keys": ["localhost"], "trust": ["clients"], "authorization": {"tokens": {}}})
        config["guards"] = {"tokens": {"type": "jwt", "options": {"issuer": "https://issuer.test", "audience": "a",
                                                                  "keys": []}}}
        self.refused(config, "bindings.tls0.options.authorization.tokens: a tls server authorizes with an x509 "
                             "guard, 'tokens' is not one")


class X509FieldsTests(unittest.TestCase):
    def setUp(self) -> None:
        self.ca = pki.make_ca("Internal CA")
        self.leaf = pki.issue(self.ca, "platform.example.com", dns=["a.internal.example.com", "b.internal.example.com"],
                              ips=["127.0.0.1"], client=True, emails=["ops@example.com"],
                              uris=["spiffe://example.com/ns/prod"])

    def test_fields_of_the_leaf(self):
        found = fields(self.leaf.certificate)
        self.assertEqual(found["subject.dn"], ["CN=platform.example.com"])
        self.assertEqual(found["subject.cn"], ["platform.example.com"])
        self.assertEqual(found["issuer.cn"], ["Internal CA"])
        self.assertEqual(found["san.dns"], ["a.internal.example.com", "b.internal.example.com"])
        self.assertEqual(found["san.ip"], ["127.0.0.1"])
        self.assertEqual(found["san.email"], ["ops@example.com"])
        self.assertEqual(found["san.uri"], ["spiffe://example.com/ns/prod"])
        self.assertEqual(len(found["x5t.s256"][0]), 43)  # 32 bytes, base64url without padding

    def test_identity_roles_and_expiry(self):
        guard = X509Guard("ns", "certs", {"roles": {
            "internal": [{"issuer.cn": "internal ca", "san.dns": "b.*.example.com"}],
            "partner": [{"issuer.cn": "Partner CA"}],
            "any-ip": [{"san.ip": "127.0.0.?"}]}})
        session = guard.authorize([self.leaf.certificate, self.ca.certificate])
        self.assertEqual(session.guard, "ns:certs")
        self.assertEqual(session.identity, "CN=platform.example.com")  # subject.dn by default
        self.assertEqual(session.roles, frozenset({"internal", "any-ip"}))
        self.assertEqual(session.expires_at, self.leaf.certificate.not_valid_after_utc.timestamp())
        # Zilla's credentials: the chain as PEM
        pem = (self.leaf.cert_pem() + self.ca.cert_pem()).decode()
        self.assertEqual(guard.authorize(pem), session)

    def test_unreadable_credentials_are_rejected_with_an_event(self):
        lines: list[str] = []
        guard = X509Guard("ns", "certs", {}, events=Events([lines.append]))
        for credentials, reason in (("not a certificate", "Unable to parse certificate chain."),
                                    ([], "Empty certificate chain.")):
            error = self.assertRaises(Rejected, guard.authorize, credentials, 7)
            self.assertEqual(error.reason, reason)
            self.assertIn(f"[0000000000000007d] GUARD_X509_AUTHORIZATION_FAILED X509 certificate chain "
                          f"authorization failed for identity (-). {reason}", lines[-1])
        self.assertEqual(len(lines), 2)
