#!/usr/bin/env python3
"""Make the test keystores of conf/ws.echo.tls.yaml and conf/ws.proxy.tls.yaml: self-signed
certificates for localhost (and 127.0.0.1) and for backend, valid 30 days.

    KEYSTORE_PASSWORD=changeit .venv/bin/python conf/tls/generate-keystore.py [FOLDER]

writes into FOLDER (default: this script's folder), each PKCS#12 file encrypted with
$KEYSTORE_PASSWORD:
- localhost.p12: the gateway's key, alias `localhost` (mode 0600, as is backend.p12);
- truststore.p12: the backend's certificate, alias `backend` (what ws.proxy's tls client trusts);
- backend.p12: the backend's key, alias `backend`, for a wss server to proxy to;
- localhost.crt, backend.crt: the certificates in PEM, for clients to trust
  (`curl --cacert`, `openssl s_client -CAfile`, `ssl.create_default_context(cafile=...)`).

Only for trying the example: the key is made on this machine and nobody else trusts it.
Needs `cryptography` (installed with zillatw, through pyOpenSSL).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def main(argv: list[str]) -> int:
    password = os.environ.get("KEYSTORE_PASSWORD")
    if not password:
        print("generate-keystore: set KEYSTORE_PASSWORD (the config reads it as ${{env.KEYSTORE_PASSWORD}})",
              file=sys.stderr)
        return 2
    folder = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent
    folder.mkdir(parents=True, exist_ok=True)

    localhost = _self_signed("localhost", ["localhost"], ["127.0.0.1"])
    backend = _self_signed("backend", ["backend"], [])
    encryption = serialization.BestAvailableEncryption(password.encode())
    for name, (key, certificate) in (("localhost", localhost), ("backend", backend)):
        _write_private(folder / f"{name}.p12",
                       pkcs12.serialize_key_and_certificates(name.encode(), key, certificate, None, encryption))
        (folder / f"{name}.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    # what ws.proxy's tls client trusts: the backend's certificate, alias backend
    (folder / "truststore.p12").write_bytes(pkcs12.serialize_java_truststore(
        [pkcs12.PKCS12Certificate(backend[1], b"backend")], encryption))
    print(f"wrote localhost.p12, backend.p12 (aliases localhost, backend), truststore.p12 (alias backend), "
          f"localhost.crt and backend.crt in {folder}")
    return 0


def _write_private(path: Path, data: bytes) -> None:
    """A file holding a private key: readable by its owner only (0600), even if it was
    there before with a wider mode (open's mode applies only to a file it creates)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        os.fchmod(descriptor, 0o600)  # before the key is written
        file.write(data)


def _self_signed(name: str, dns: list[str], ips: list[str]) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        # a self-signed leaf: clients that trust this certificate accept it as its own CA
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


if __name__ == "__main__":
    sys.exit(main(sys.argv))
