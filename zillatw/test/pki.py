"""Keys and certificates made at test time: CAs, servers, clients, the PKCS#12 and PEM files a
filesystem vault reads; the TLS clients and servers the tests use them with; JWT signing keys,
tokens and the guarded configurations that check them. (Plain sockets and configurations:
support.py.)"""

from __future__ import annotations

import base64
import copy
import datetime
import ipaddress
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketServerFactory
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import defer, reactor
from twisted.internet import ssl as tssl
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IReactorSSL, IStreamClientEndpoint
from twisted.trial import unittest

from zillatw.test.support import RawClient, ReactorTimer, RecordingClient, Upstream, chain, when_opened


@dataclass
class Issued:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    chain: list[x509.Certificate] = field(default_factory=list)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def pem(self, password: str | None = None) -> bytes:
        """Certificate, chain, then the key (encrypted with `password` if given)."""
        encryption = (serialization.BestAvailableEncryption(password.encode()) if password
                      else serialization.NoEncryption())
        key = self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
        return self.cert_pem() + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain) + key

    def p12(self, alias: str, password: str) -> bytes:
        return pkcs12.serialize_key_and_certificates(
            alias.encode(), self.key, self.certificate, self.chain or None,
            serialization.BestAvailableEncryption(password.encode()))


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str = "zillatw test CA") -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .sign(key, hashes.SHA256()))
    return Issued(key, certificate)


def issue(ca: Issued, cn: str, dns: list[str] | None = None, ips: list[str] | None = None,
          client: bool = False, emails: list[str] | None = None, uris: list[str] | None = None) -> Issued:
    """A leaf certificate signed by `ca`: a server's (SANs `dns` and `ips`) or a client's."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.certificate.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                                     else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                              critical=False))
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns or []]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips or []]
    names += [x509.RFC822Name(e) for e in emails or []] + [x509.UniformResourceIdentifier(u) for u in uris or []]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return Issued(key, builder.sign(ca.key, hashes.SHA256()), [ca.certificate])


def make_crl(ca: Issued, revoked: Sequence[Issued] = (), expired: bool = False) -> x509.CertificateRevocationList:
    """`ca`'s CRL listing `revoked`; valid for a day, or past its nextUpdate if `expired`."""
    now = datetime.datetime.now(datetime.timezone.utc)
    next_update = now - datetime.timedelta(minutes=1) if expired else now + datetime.timedelta(days=1)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.certificate.subject)
               .last_update(now - datetime.timedelta(hours=1)).next_update(next_update)
               .add_extension(x509.CRLNumber(1), critical=False))
    for issued in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(issued.certificate.serial_number)
            .revocation_date(now - datetime.timedelta(minutes=30)).build())
    return builder.sign(ca.key, hashes.SHA256())


def crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def truststore_p12(certificates: dict[str, x509.Certificate], password: str) -> bytes:
    """A Java-style PKCS#12 truststore: certificates by alias, no keys."""
    return pkcs12.serialize_java_truststore(
        [pkcs12.PKCS12Certificate(c, alias.encode()) for alias, c in certificates.items()],
        serialization.BestAvailableEncryption(password.encode()))


def write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


# ---------------------------------------------------------------------------- TLS clients and servers

PASSWORD = "s3cret"


class Pki:
    """One CA with server certificates for localhost and two other names, a client
    certificate, and a second CA nobody trusts (with its own client certificate)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.ca = make_ca()
        self.localhost = issue(self.ca, "localhost", dns=["localhost"], ips=["127.0.0.1"])
        self.alpha = issue(self.ca, "alpha.test", dns=["alpha.test"])
        self.beta = issue(self.ca, "beta.test", dns=["beta.test", "*.beta.test"])
        self.client = issue(self.ca, "good client", client=True)
        self.rogue_ca = make_ca("rogue CA")
        self.rogue_client = issue(self.rogue_ca, "rogue client", client=True)
        self.ca_pem = write(folder / "ca.pem", self.ca.cert_pem())

    def path(self, name: str) -> str:
        return str(self.folder / name)


def tls_chain(vault: dict[str, Any], tls_options: dict[str, Any], tls_routes: list[dict[str, Any]] | None = None,
              http_routes: list[dict[str, Any]] | None = None, apps: dict[str, Any] | None = None) -> dict[str, Any]:
    """tcp (port 0) -> tls (vault `server`) -> http -> ws -> echo."""
    tls: dict[str, Any] = {"type": "tls", "kind": "server", "vault": "server", "options": tls_options}
    if tls_routes is None:
        tls["exit"] = "http0"
    else:
        tls["routes"] = tls_routes
    bindings = {
        "tcp0": {"type": "tcp", "kind": "server", "options": {"host": "127.0.0.1", "port": 0}, "exit": "tls0"},
        "tls0": tls,
        "http0": {"type": "http", "kind": "server",
                  "routes": http_routes or [{"when": [{"headers": {"upgrade": "websocket"}}], "exit": "ws0"}]},
        "ws0": {"type": "ws", "kind": "server", "exit": "echo"},
        "echo": {"type": "echo", "kind": "server"},
    }
    bindings.update(apps or {})
    return {"name": "test", "vaults": {"server": {"type": "filesystem", "options": vault}},
            "bindings": bindings, "telemetry": {"exporters": {"stdout": {"type": "stdout"}}}}


def client_tls(ca: Issued | x509.Certificate | None = None, name: str = "localhost",
               client: Issued | None = None, alpn: list[str] | None = None) -> Any:
    """Twisted client TLS options: trust `ca`, send SNI `name`, verify the name."""
    ca_pem = ca.public_bytes(serialization.Encoding.PEM) if isinstance(ca, x509.Certificate) else ca and ca.cert_pem()
    trust = tssl.Certificate.loadPEM(ca_pem) if ca_pem else None
    own = tssl.PrivateCertificate.loadPEM(client.key_pem() + client.cert_pem()) if client else None
    return tssl.optionsForClientTLS(name, trustRoot=trust, clientCertificate=own,
                                    acceptableProtocols=[p.encode() for p in alpn] if alpn else None)


def connect_wss(port: int, options: Any, host: str = "localhost", path: str = "/",
                protocols: list[str] | None = None, tls: bool = True) -> defer.Deferred:
    """An open RecordingClient over TLS (or plain TCP if tls is false); fails if refused."""
    scheme = "wss" if tls else "ws"
    factory = WebSocketClientFactory(f"{scheme}://{host}:{port}{path}", protocols=protocols or [])
    factory.protocol = RecordingClient
    factory._batched_timer = ReactorTimer()
    factory.setProtocolOptions(autoFragmentSize=0, openHandshakeTimeout=5)
    endpoint: IStreamClientEndpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    if tls:
        endpoint = wrapClientTLS(options, endpoint)
    return endpoint.connect(factory).addCallback(when_opened)


@defer.inlineCallbacks
def raw_tls_exchange(port: int, options: Any, request: bytes) -> Any:
    """Send bytes over TLS, return what came back until the server closed."""
    client = yield connectProtocol(SSL4ClientEndpoint(reactor, "127.0.0.1", port, options), RawClient())
    client.transport.write(request)
    data = yield client.done
    return data


class TlsTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.folder = Path(self.mktemp())
        self.folder.mkdir(parents=True)
        self.pki = Pki(self.folder)

    def keystore(self, name: str = "localhost.p12", alias: str = "localhost",
                 issued: Issued | None = None) -> str:
        return write(self.folder / name, (issued or self.pki.localhost).p12(alias, PASSWORD))

    def pem_keys(self, entries: dict[str, Issued]) -> str:
        folder = self.folder / "keys"
        for alias, issued in entries.items():
            write(folder / f"{alias}.pem", issued.pem())
        return str(folder)

    def tls_proxy_config(self, upstream_port: int, client_options: dict[str, Any],
                         client_vault: dict[str, Any]) -> dict:
        config = tls_chain({"keys": {"store": self.keystore(), "password": PASSWORD}}, {"keys": ["localhost"]})
        config["vaults"]["clients"] = {"type": "filesystem", "options": client_vault}
        config["bindings"].update({
            "ws0": {"type": "ws", "kind": "server", "exit": "south_ws_client"},
            "south_ws_client": {"type": "ws", "kind": "client", "exit": "south_http_client"},
            "south_http_client": {"type": "http", "kind": "client", "exit": "south_tls_client"},
            "south_tls_client": {"type": "tls", "kind": "client", "vault": "clients", "options": client_options,
                                 "exit": "south_tcp_client"},
            "south_tcp_client": {"type": "tcp", "kind": "client",
                                 "options": {"host": "127.0.0.1", "port": upstream_port}},
        })
        return config

    def backend_truststore(self) -> str:
        return write(self.folder / "truststore.p12",
                         truststore_p12({"backend": self.pki.ca.certificate}, PASSWORD))


class UpstreamFactory(WebSocketServerFactory):
    """What support.Upstream records and is told: the first offered subprotocol, echo on."""
    protocol = Upstream

    def __init__(self) -> None:
        super().__init__()
        self._batched_timer = ReactorTimer()
        self.requests: list[Any] = []
        self.closes: list[tuple[int | None, str | None]] = []
        self.connections: list[Upstream] = []
        self.echo = True
        self.received = 0

    def select(self, offered: list[str]) -> str | None:
        return offered[0] if offered else None


def start_wss_upstream(case: unittest.TestCase, issued: Issued, client_ca: Issued | None = None,
                       alpn: list[bytes] | None = None, port: int = 0) -> Any:
    """An Autobahn echo server over TLS (Twisted's own TLS), optionally requiring client certs,
    on 127.0.0.1 and `port` (0: one the system picks)."""
    factory = UpstreamFactory()
    factory.setProtocolOptions(echoCloseCodeReason=True, autoFragmentSize=0)
    own = tssl.PrivateCertificate.loadPEM(issued.key_pem() + issued.cert_pem())
    if client_ca is not None:
        options = own.options(tssl.Certificate.loadPEM(client_ca.cert_pem()))
    else:
        options = own.options()
    if alpn:
        options = tssl.CertificateOptions(privateKey=own.privateKey.original, certificate=own.original,
                                          acceptableProtocols=alpn)
    listening = IReactorSSL(reactor).listenSSL(port, factory, options, interface="127.0.0.1")
    case.addCleanup(listening.stopListening)
    address = listening.getHost()
    assert isinstance(address, IPv4Address)
    return factory, address.port


# ---------------------------------------------------------------------------- JWT keys, tokens, guarded configurations

ISSUER = "https://auth.example.com"


AUDIENCE = "https://api.example.com"


ROLE = "echo:stream"


CREDENTIALS = {
    "headers": {"authorization": "Bearer {credentials}"},
    "query": {"access_token": "{credentials}"},
    "cookies": {"access_token": "{credentials}"},
}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Signer:
    """A private key, its public JWK (as configured) and tokens signed with it."""

    def __init__(self, kind: str = "RSA", kid: str = "rsa-1"):
        self.kid = kid
        self.private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | bytes
        jwk: dict[str, Any]
        if kind == "RSA":
            rsa_key = self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.alg = "RS256"
            jwk = jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True)
        elif kind == "EC":
            ec_key = self.private = ec.generate_private_key(ec.SECP256R1())
            self.alg = "ES256"
            jwk = jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True)
        elif kind == "OKP":
            okp_key = self.private = ed25519.Ed25519PrivateKey.generate()
            self.alg = "EdDSA"
            jwk = jwt.algorithms.OKPAlgorithm.to_jwk(okp_key.public_key(), as_dict=True)
        else:  # oct
            secret = self.private = os.urandom(32)
            self.alg = "HS256"
            jwk = {"kty": "oct", "k": b64(secret)}
        self.jwk = {**jwk, "kid": kid, "alg": self.alg}

    def token(self, **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "scope": f"{ROLE} other",
                   "iat": now, "exp": now + 300}
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, self.private, algorithm=self.alg, headers={"kid": self.kid})


def guarded_config(keys: Any, roles: list[str] | None = None, guard_options: dict[str, Any] | None = None,
                   ws_routes: list[dict[str, Any]] | None = None, apps: dict[str, Any] | None = None,
                   http_guarded: bool = True) -> dict[str, Any]:
    """tcp -> http (authorization by jwt0; route guarded by ROLE) -> ws -> echo."""
    config = chain(ws_routes=ws_routes, apps=apps)
    http = config["bindings"]["http0"]
    http["options"] = {"authorization": {"jwt0": {"credentials": copy.deepcopy(CREDENTIALS)}}}
    route: dict[str, Any] = {"when": [{"headers": {"upgrade": "websocket"}}], "exit": "ws0"}
    if http_guarded:
        route["guarded"] = {"jwt0": roles if roles is not None else [ROLE]}
    http["routes"] = [route]
    options = {"issuer": ISSUER, "audience": AUDIENCE, "keys": keys}
    options.update(guard_options or {})
    config["guards"] = {"jwt0": {"type": "jwt", "options": options}}
    return config


def localhost_keystore(folder: Path, password: str = "generated") -> Issued:
    """tls/localhost.p12 (alias localhost), signed by the CA returned."""
    ca = make_ca("Test CA")
    (folder / "tls").mkdir(parents=True, exist_ok=True)
    server = issue(ca, "localhost", dns=["localhost"])
    write(folder / "tls" / "localhost.p12", server.p12("localhost", password))
    return ca


@defer.inlineCallbacks
def tls_connect(port: int, ca: Issued, alpn: list[str] | None = None, client: Issued | None = None) -> Any:
    endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port, client_tls(ca, "localhost", client=client, alpn=alpn))
    protocol = yield connectProtocol(endpoint, RawClient())
    return protocol
