"""Certificates made at test time with cryptography: CAs, servers, clients, and the
PKCS#12 and PEM files a filesystem vault reads."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


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
