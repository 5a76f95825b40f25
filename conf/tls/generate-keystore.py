#!/usr/bin/env python3
"""Make the test keystore of conf/ws.echo.tls.yaml: a self-signed certificate for localhost
(and 127.0.0.1), valid 30 days.

    KEYSTORE_PASSWORD=changeit .venv/bin/python conf/tls/generate-keystore.py [FOLDER]

writes into FOLDER (default: this script's folder):
- localhost.p12: PKCS#12, the key entry's alias `localhost`, encrypted with $KEYSTORE_PASSWORD;
- localhost.crt: the certificate in PEM, for clients to trust
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

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        # a self-signed leaf: clients that trust this file accept it as its own CA
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    keystore = pkcs12.serialize_key_and_certificates(
        b"localhost", key, certificate, None, serialization.BestAvailableEncryption(password.encode()))
    (folder / "localhost.p12").write_bytes(keystore)
    (folder / "localhost.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    print(f"wrote {folder / 'localhost.p12'} (alias localhost) and {folder / 'localhost.crt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
