"""The tls binding's and x509 guard's keys through zillatw.config.loading.load (and build_gateway
where the vault's files are needed): each valid value loads, each invalid one is refused
with a message naming its YAML path."""

from __future__ import annotations

import copy
import datetime
import sys
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mldsa
from twisted.trial import unittest

from zillatw import ConfigError, build_gateway
from zillatw.__main__ import main as check_main
from zillatw.config import load
from zillatw.guards import Rejected
from zillatw.guards.x509 import X509Guard, fields
from zillatw.runtime.standard import standard_registry
from zillatw.telemetry.events import Events
from zillatw.test import pki
from zillatw.test.pki import PASSWORD, TlsTestCase, tls_chain

TYPES = standard_registry()


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
                     "bindings.tls0.options.authorization: no client certificate is asked for "
                     "(give 'trust' or 'mutual')")
        self.refused(server({"keys": ["localhost"], "trust": ["ca"], "authorization": {"other": {}}}),
                     "bindings.tls0.options.authorization.other: no guard named 'other'")
        self.refused(server({"keys": ["localhost"], "trust": ["ca"],
                             "authorization": {"certs": {"credentials": {"certificates": "der"}}}}),
                     "bindings.tls0.options.authorization.certs.credentials.certificates")
        self.refused(server({"keys": ["localhost"], "trust": ["ca"], "authorization": {"certs": {}, "more": {}}}),
                     "bindings.tls0.options.authorization")
        self.refused(client({"trust": ["ca"], "authorization": authorization}),
                     "bindings.tls_out.options.authorization: only for a tls server "
                     "(it authorizes client certificates)")

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
        for bad, expected in [({"identity": "subject"},
                               "guards.certs.options.identity: 'subject' is not a certificate field"),
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
        return {"keys": {"store": self.keystore(), "password": PASSWORD},
                "trust": {"store": trust, "password": PASSWORD}}

    def refused(self, config: dict[str, Any], *expected: str) -> None:
        error = self.assertRaises(ConfigError, build_gateway, config)
        for problem in expected:
            self.assertIn(problem, error.problems)

    def test_alpn_offers_only_what_an_http_server_behind_serves(self):
        build_gateway(tls_chain(self.vault(), {"keys": ["localhost"], "alpn": ["http/1.1"]}))
        build_gateway(tls_chain(self.vault(), {"keys": ["localhost"], "alpn": ["h2", "http/1.1"]}))
        http11_only = tls_chain(self.vault(), {"keys": ["localhost"], "alpn": ["h2", "http/1.1"]})
        http11_only["bindings"]["http0"]["options"] = {"versions": ["http/1.1"]}
        self.refused(http11_only, "bindings.tls0.options.alpn[0]: 'h2' would be negotiated for http server "
                     "'http0', which speaks http/1.1 only (its options.versions)")
        self.refused(tls_chain(self.vault(), {"keys": ["localhost"], "alpn": ["spdy/3", "http/1.1"]}),
                     "bindings.tls0.options.alpn[0]: 'spdy/3' would be negotiated for http server 'http0', which "
                     "speaks http/1.1, h2 only (its options.versions)")
        h2_only = tls_chain(self.vault(), {"keys": ["localhost"], "alpn": ["h2"]},
                            tls_routes=[{"when": [{"alpn": "http/1.1"}], "exit": "http0"}])
        h2_only["bindings"]["http0"]["options"] = {"versions": ["h2"]}
        self.refused(h2_only, "bindings.tls0.routes[0].when[0].alpn: 'http/1.1' routes to http server 'http0', "
                     "which speaks h2 only (its options.versions)")

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


class VaultErrorTests(TlsTestCase):
    def config(self, vault: dict[str, Any], tls_options: dict[str, Any] | None = None) -> dict[str, Any]:
        return tls_chain(vault, tls_options or {"keys": ["localhost"]})

    def assertProblems(self, config: Any, *expected: str) -> ConfigError:
        error = self.assertRaises(ConfigError, build_gateway, config)
        for problem in expected:
            self.assertIn(problem, error.problems)
        return error

    def test_wrong_password(self):
        store = self.keystore()
        self.assertProblems(self.config({"keys": {"store": store, "password": "nope"}}),
                            f"vaults.server.options.keys.password: cannot open '{store}': wrong password")

    def test_missing_alias(self):
        store = self.keystore()
        self.assertProblems(self.config({"keys": {"store": store, "password": PASSWORD}},
                                        {"keys": ["localhots"], "trust": ["ca"], "mutual": "required"}),
                            "bindings.tls0.options.keys[0]: no key 'localhots' in vault 'server' "
                            "(did you mean 'localhost'?) (it has: localhost)",
                            "bindings.tls0.options.trust[0]: no certificate 'ca' in vault 'server' "
                            "(it has: no trust store)")

    def test_unreadable_file_relative_to_the_config_folder(self):
        config = self.config({"keys": {"store": "tls/missing.p12", "password": PASSWORD}})
        path = self.folder / "zilla.yaml"
        path.write_text(yaml.safe_dump(config))
        self.assertProblems(str(path), "vaults.server.options.keys.store: cannot read 'tls/missing.p12' "
                                       "(No such file or directory)")

    def test_not_a_keystore_and_pem_problems(self):
        junk = pki.write(self.folder / "junk.p12", b"not a keystore")
        # a PEM entry whose key belongs to another certificate
        pki.write(self.folder / "keys/other.pem", self.pki.alpha.cert_pem() + self.pki.beta.key_pem())
        encrypted = pki.write(self.folder / "enc/localhost.pem", self.pki.localhost.pem(password=PASSWORD))
        config = self.config({"keys": {"store": junk, "password": "x"},
                              "trust": {"store": str(self.folder / "keys"), "type": "pem", "passwrd": "x"},
                              "signers": {"store": encrypted, "type": "jks"}})
        self.assertProblems(config,
                            f"vaults.server.options.keys.store: '{junk}' is not a PKCS#12 file "
                            "(set type: pem for PEM files)",
                            "vaults.server.options.trust: unknown key 'passwrd' (did you mean 'password'?) "
                            "(expected one of: store, type, password, entries)",
                            "vaults.server.options.signers.type: jks is not supported: convert the store with "
                            "keytool -importkeystore -deststoretype pkcs12 (Java writes PKCS#12 by default since "
                            "Java 9; the JKS reader for Python, pyjks, has had no release since 2020)")
        self.assertProblems(self.config({"keys": {"store": str(self.folder / "keys"), "type": "pem"}}),
                            "vaults.server.options.keys.store: in 'other.pem', the private key does not match "
                            "the first certificate")
        self.assertProblems(self.config({"keys": {"store": encrypted, "type": "pem", "password": "wrong"}}),
                            f"vaults.server.options.keys.password: cannot read the private key in '{encrypted}': "
                            "wrong password")

    def test_a_key_tls_cannot_sign_with_is_refused_by_its_type(self):
        # An ML-DSA key with its own certificate: a well-formed PEM entry OpenSSL cannot serve TLS with.
        key = mldsa.MLDSA44PrivateKey.generate()
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "post-quantum")])
        now = datetime.datetime.now(datetime.timezone.utc)
        certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                       .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                       .sign(key, None))
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        pem = pki.write(self.folder / "pq.pem", certificate.public_bytes(serialization.Encoding.PEM) + key_pem)
        self.assertProblems(self.config({"keys": {"store": pem, "type": "pem"}}),
                            f"vaults.server.options.keys.store: in '{pem}', the private key is a MLDSA44PrivateKey, "
                            "which cannot sign a TLS handshake (expected an RSA, EC, Ed25519, Ed448 or DSA key)")

    def test_binding_checks_name_the_yaml_path(self):
        config = self.config({"keys": {"store": self.keystore(), "password": PASSWORD}},
                             {"keys": ["localhost"], "mutual": "required", "version": "TLSv1.1",
                              "hostname-verification": True})
        config["bindings"]["tls1"] = {"type": "tls", "kind": "server", "exit": "http0",
                                      "options": {"sni": ["x"], "trustcacerts": True}}
        config["bindings"]["tls2"] = {"type": "tls", "kind": "client", "vault": "nowhere",
                                      "routes": [{"when": [{"alpn": "h2"}], "exit": "tcp_out"}],
                                      "options": {"trustcacerts": False, "handshake-timeout": 1}}
        config["bindings"]["tcp_out"] = {"type": "tcp", "kind": "client", "options": {"host": "localhost", "port": 1}}
        error = self.assertProblems(
            config,
            "bindings.tls0.options.version: 'TLSv1.1' is not supported "
            "(expected TLS, TLSv1.2, TLSv1.3; TLS 1.2 is the minimum)",
            "bindings.tls0.options.mutual: 'required' needs 'trust' (the aliases of the client CAs) "
            "or trustcacerts: true",
            "bindings.tls0.options.hostname-verification: only for a tls client",
            "bindings.tls1.options.trustcacerts: true, but no client certificate is asked for "
            "(give 'trust' or 'mutual')",
            "bindings.tls1.vault: a tls server needs a vault (where its keys are)",
            "bindings.tls1.options: a tls server needs 'keys' (aliases of its vault's keys) or 'signers'",
            "bindings.tls2.vault: no vault named 'nowhere'",
            "bindings.tls2.options.trustcacerts: false with no 'trust': no upstream certificate could be verified",
            "bindings.tls2.routes[0].when[0].alpn: a tls client routes on authority and port",
            "bindings.tls2.options.handshake-timeout: only for a tls server (the ws client's timeout bounds "
            "the upstream's)")
        self.assertEqual(len(error.problems), 10, error.problems)

    def test_exits_that_cannot_carry_tls(self):
        config = self.config({"keys": {"store": self.keystore(), "password": PASSWORD}})
        config["bindings"]["tls0"]["exit"] = "tcp_out"
        config["bindings"]["tcp_out"] = {"type": "tcp", "kind": "client", "options": {"host": "localhost", "port": 1}}
        self.assertProblems(config, "bindings.tls0.exit: 'tcp_out' is a tcp client, which connects upstream for the "
                                    "bindings before it; the connections a tls server accepts are taken by a server "
                                    "binding (a tcp or tls proxy is not served by this zillatw)")

    def test_an_invalid_vault_never_starts_a_listener_and_check_reports_it(self):
        config = self.config({"keys": {"store": "tls/missing.p12"}})
        path = self.folder / "zilla.yaml"
        path.write_text(yaml.safe_dump(config))
        self.assertRaises(ConfigError, build_gateway, str(path))
        err = self.folder / "stderr"
        with open(err, "w") as stream:
            self.patch(sys, "stderr", stream)
            self.assertEqual(check_main(["check", str(path)]), 1)
        self.assertIn("vaults.server.options.keys.store: cannot read 'tls/missing.p12'", err.read_text())

    def test_unsupported_vault_options_are_refused_by_name(self):
        keys = {"store": self.keystore(), "password": PASSWORD}
        self.assertProblems(self.config({"keys": keys, "revocation": "ocsp", "secrets": {}, "crl": {}}),
                            "vaults.server.options.revocation: 'ocsp' is not a revocation method "
                            "(expected crl or none)",
                            "vaults.server.options.secrets: not supported by this zillatw (Zilla's incubating "
                            "secrets store; give secrets to zilla.yaml as ${{env.NAME}})",
                            "vaults.server.options: unknown key 'crl' (did you mean 'crls'?) (expected one of: "
                            "keys, trust, signers, revocation, crls)")
        self.assertProblems(self.config({"keys": keys, "revocation": "crl"}),
                            "vaults.server.options.revocation: crl needs 'crls' (zillatw's: the CRL files, a file "
                            "or folder relative to the configuration's folder; distribution points are not fetched)")
        crl = pki.write(self.folder / "ca.crl", pki.crl_pem(pki.make_crl(self.pki.ca)))
        self.assertProblems(self.config({"keys": keys, "crls": {"store": crl}}),
                            "vaults.server.options.crls: needs revocation: crl (else the CRLs would be ignored)")
        self.assertProblems(self.config({"keys": keys, "revocation": "crl", "crls": {"store": self.pki.ca_pem}}),
                            f"vaults.server.options.crls.store: '{self.pki.ca_pem}' is not a CRL (PEM or DER)")
        self.assertProblems(self.config({"keys": keys, "revocation": "crl", "crls": {"store": "nowhere.crl"}}),
                            "vaults.server.options.crls.store: cannot read 'nowhere.crl' (No such file or directory)")
        # valid: PEM and DER CRLs, a file or a folder
        der = pki.write(self.folder / "crls" / "ca.der", pki.make_crl(self.pki.ca).public_bytes(
            serialization.Encoding.DER))
        for store in (crl, der, str(self.folder / "crls")):
            build_gateway(self.config({"keys": keys, "revocation": "crl", "crls": {"store": store}}))
        build_gateway(self.config({"keys": keys, "revocation": "none"}))
        self.assertProblems(self.config({"keys": keys, "revocation": "none", "crls": {"store": crl}}),
                            "vaults.server.options.crls: needs revocation: crl (else the CRLs would be ignored)")

    def test_entries_keep_only_the_aliases_they_list(self):
        trust = pki.write(self.folder / "trust.p12", pki.truststore_p12(
            {"clients": self.pki.ca.certificate, "others": self.pki.rogue_ca.certificate}, PASSWORD))
        vault = {"keys": {"store": self.keystore(), "password": PASSWORD, "entries": ["localhost"]},
                 "trust": {"store": trust, "password": PASSWORD, "entries": ["clients"]}}
        build_gateway(self.config(vault, {"keys": ["localhost"], "trust": ["clients"]}))
        self.assertProblems(self.config(vault, {"keys": ["localhost"], "trust": ["others"]}),
                            "bindings.tls0.options.trust[0]: no certificate 'others' in vault 'server' "
                            "(it has: clients)")
        vault["trust"]["entries"] = ["client"]
        vault["keys"]["entries"] = "localhost"
        self.assertProblems(self.config(vault),
                            f"vaults.server.options.trust.entries[0]: no entry 'client' in '{trust}' "
                            "(did you mean 'clients'?) (it has: clients, others)",
                            "vaults.server.options.keys.entries: expected a list of aliases")
