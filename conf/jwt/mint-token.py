#!/usr/bin/env python3
"""Mint a test JWT for conf/ws.echo.jwt.yaml (RS256, kid "example", 1 hour, scope echo:stream).

    python conf/jwt/mint-token.py                        # prints a token for sub "alice"
    python conf/jwt/mint-token.py --sub bob --ttl 30     # expires in 30 s: watch the 1008 close
    python conf/jwt/mint-token.py --scope other          # lacks echo:stream: the gateway says 404
    python conf/jwt/mint-token.py --jwk                  # the public JWK to put under guards.*.keys

It signs with conf/jwt/test-key.pem, a throwaway key checked in so that the example works
out of the box: anyone can mint tokens with it, so never configure its public key outside a
test. For your own key: `--key my-key.pem --new-key` writes a new RSA key (if the file does
not exist yet), then `--key my-key.pem --jwk` prints the public JWK for your zilla.yaml.
Needs PyJWT with cryptography (`pip install 'pyjwt[crypto]'`; zillatw depends on it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--key", default=os.path.join(HERE, "test-key.pem"), help="RSA private key (PEM)")
    parser.add_argument("--kid", default="example")
    parser.add_argument("--iss", default="https://auth.example.com")
    parser.add_argument("--aud", default="https://api.example.com")
    parser.add_argument("--sub", default="alice")
    parser.add_argument("--scope", default="echo:stream", help="space-separated roles")
    parser.add_argument("--ttl", type=int, default=3600, help="seconds until exp")
    parser.add_argument("--jwk", action="store_true", help="print the public JWK instead of a token")
    parser.add_argument("--new-key", action="store_true", help="create --key first if it does not exist")
    args = parser.parse_args(argv)

    if args.new_key and not os.path.exists(args.key):
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        fd = os.open(args.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
        print(f"wrote a new RSA key to {args.key}", file=sys.stderr)
    with open(args.key, "rb") as f:
        private = serialization.load_pem_private_key(f.read(), password=None)

    if args.jwk:
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
        print(json.dumps({"kty": "RSA", "n": jwk["n"], "e": jwk["e"], "alg": "RS256", "kid": args.kid}, indent=2))
        return 0
    now = int(time.time())
    claims = {"iss": args.iss, "aud": args.aud, "sub": args.sub, "scope": args.scope,
              "iat": now, "exp": now + args.ttl}
    print(jwt.encode(claims, private, algorithm="RS256", headers={"kid": args.kid}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
