"""The `filesystem` vault: keys, trusted certificates and signers read from files.

    vaults:
      my_servers:
        type: filesystem
        options:
          keys:   { store: tls/localhost.p12, type: pkcs12, password: ${{env.KEYSTORE_PASSWORD}} }
          trust:  { store: tls/truststore.p12 }
          signers: { store: tls/ca.pem, type: pem }
          revocation: crl
          crls: { store: tls/crls }     # zillatw's: where the CRLs are

Bindings name entries by alias, as Zilla does (`keys: [localhost]`):
- pkcs12 (the default): an entry's alias is its friendlyName (what `keytool -alias` and
  `openssl pkcs12 -name` write). cryptography reads one private key per file, so a keys
  store in PKCS#12 holds one key entry; the other certificates are its chain, or, in a
  trust or signers store, entries of their own.
- pem: `store` is a directory of `<alias>.pem` files, or one file whose alias is its name
  without the extension. A file holds certificates (the first one is the entry's, the rest
  its chain) and, in a keys store, the private key (encrypted if `password` is given).

A store's `entries` (Zilla's) keeps only the aliases it lists. `revocation: crl` checks
every certificate a binding verifies with this vault's trust (client certificates at a tls
server, upstream certificates at a tls client) against the CRLs of `crls`, a PEM or DER file
or a folder of them: OpenSSL refuses a revoked certificate, and one whose issuer has no CRL
loaded (distribution points in certificates are not fetched: a handshake never waits on the
network). `type: jks` and `secrets` are refused by name.

Everything is read at startup; a problem is a ConfigError naming the YAML key.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from zillatw.errors import ConfigError, did_you_mean
from zillatw.config.plugins import VaultType

STORES = ("keys", "trust", "signers")
STORE_TYPES = ("pkcs12", "pem")
_STORE_KEYS = ("store", "type", "password", "entries")
_OPTIONS = (*STORES, "revocation", "crls")
REVOCATION = ("crl", "none")  # none: Zilla's docs list it as the default


# The private keys OpenSSL (through pyOpenSSL) can sign a TLS handshake with; a store may
# hold others (ML-DSA, X25519, DH), refused by name when the vault is read.
SigningKey = (rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey
              | dsa.DSAPrivateKey)
_SIGNING_KEYS = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey,
                 dsa.DSAPrivateKey)


@dataclass(frozen=True)
class KeyEntry:
    """A private key with its certificate and the chain that goes with it."""
    alias: str
    key: SigningKey
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()


@dataclass
class FilesystemVault:
    """The entries of one vault, by store and alias."""
    name: str
    keys: dict[str, KeyEntry] = field(default_factory=dict)
    trust: dict[str, tuple[x509.Certificate, ...]] = field(default_factory=dict)
    signers: dict[str, tuple[x509.Certificate, ...]] = field(default_factory=dict)
    revocation: str | None = None  # "crl": certificates verified with this vault's trust are checked
    crls: tuple[x509.CertificateRevocationList, ...] = ()

    def certificates(self, store: str, alias: str) -> tuple[x509.Certificate, ...]:
        """The certificates of a trust or signers entry (a PEM file may hold a bundle)."""
        return self.trust[alias] if store == "trust" else self.signers[alias]

    def aliases(self, store: str) -> list[str]:
        return list(getattr(self, store))


def open_vault(name: str, options: Mapping[str, Any] | None, base_dir: Path, where: str = "") -> FilesystemVault:
    """Read a filesystem vault's stores; `where` prefixes error paths (a namespace)."""
    vault = FilesystemVault(name)
    problems: list[str] = []
    base = f"{where}vaults.{name}.options"
    options = options or {}
    for key in options:
        if key == "secrets":
            problems.append(f"{base}.secrets: not supported by this zillatw (Zilla's incubating secrets store; "
                            "give secrets to zilla.yaml as ${{env.NAME}})")
        elif key not in _OPTIONS:
            problems.append(f"{base}: unknown key '{key}'{did_you_mean(key, _OPTIONS)} "
                            f"(expected one of: {', '.join(_OPTIONS)})")
    revocation = options.get("revocation")
    if revocation is not None and revocation not in REVOCATION:
        problems.append(f"{base}.revocation: '{revocation}' is not a revocation method (expected crl or none)")
    elif revocation == "crl" and "crls" not in options:
        problems.append(f"{base}.revocation: crl needs 'crls' (zillatw's: the CRL files, a file or folder "
                        "relative to the configuration's folder; distribution points are not fetched)")
    elif "crls" in options and revocation != "crl":
        problems.append(f"{base}.crls: needs revocation: crl (else the CRLs would be ignored)")
    for store in STORES:
        if store in options:
            problems.extend(_read_store(vault, store, options[store], base_dir, f"{base}.{store}"))
    if revocation == "crl" and "crls" in options:
        vault.revocation = revocation
        problems.extend(_read_crls(vault, options["crls"], base_dir, f"{base}.crls"))
    if problems:
        raise ConfigError(problems)
    return vault


def _store_type_problem(type_: Any, path: str) -> str | None:
    if type_ == "jks":
        return (f"{path}.type: jks is not supported: convert the store with keytool -importkeystore "
                "-deststoretype pkcs12 (Java writes PKCS#12 by default since Java 9; the JKS reader for Python, "
                "pyjks, has had no release since 2020)")
    if type_ not in STORE_TYPES:
        return (f"{path}.type: store type '{type_}' is not supported{did_you_mean(str(type_), STORE_TYPES)} "
                f"(expected {' or '.join(STORE_TYPES)})")
    return None


def _read_store(vault: FilesystemVault, store: str, spec: Any, base_dir: Path, path: str) -> Iterator[str]:
    if not isinstance(spec, Mapping):
        yield f"{path}: expected a mapping with 'store' (and 'type', 'password')"
        return
    for key in spec:
        if key not in _STORE_KEYS:
            yield (f"{path}: unknown key '{key}'{did_you_mean(key, _STORE_KEYS)} "
                   f"(expected one of: {', '.join(_STORE_KEYS)})")
    if not isinstance(spec.get("store"), str):
        yield f"{path}.store: missing required key 'store' (a file path, relative to the configuration's folder)"
        return
    type_ = spec.get("type", "pkcs12")
    type_problem = _store_type_problem(type_, path)
    if type_problem:
        yield type_problem
        return
    password = spec.get("password")
    if password is not None and not isinstance(password, str):
        password = str(password)
    location = (base_dir / spec["store"]).resolve()
    try:
        if type_ == "pkcs12":
            entries = _read_pkcs12(location, password, store, spec["store"], path)
        else:
            entries = _read_pem(location, password, store, spec["store"], path)
    except _StoreProblem as e:
        yield str(e)
        return
    except OSError as e:
        yield f"{path}.store: cannot read '{spec['store']}' ({e.strerror or e})"
        return
    if not entries:
        yield f"{path}.store: '{spec['store']}' has no {'key' if store == 'keys' else 'certificate'} entries"
    if "entries" in spec:
        wanted = spec["entries"]
        if not isinstance(wanted, list) or not all(isinstance(alias, str) for alias in wanted):
            yield f"{path}.entries: expected a list of aliases"
            return
        for index, alias in enumerate(wanted):
            if alias not in entries:
                yield (f"{path}.entries[{index}]: no entry '{alias}' in '{spec['store']}'"
                       f"{did_you_mean(alias, list(entries))} (it has: {', '.join(entries) or 'none'})")
        entries = {alias: entry for alias, entry in entries.items() if alias in wanted}
    getattr(vault, store).update(entries)


_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.*?-----END X509 CRL-----", re.DOTALL)


def _read_crls(vault: FilesystemVault, spec: Any, base_dir: Path, path: str) -> Iterator[str]:
    """`crls: {store: file or folder}`: PEM (any number of CRLs a file) or DER (one a file)."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("store"), str):
        yield f"{path}: expected {{store: a CRL file or folder, relative to the configuration's folder}}"
        return
    for key in spec:
        if key != "store":
            yield f"{path}: unknown key '{key}' (expected: store)"
    location = (base_dir / spec["store"]).resolve()
    files = sorted(p for p in location.iterdir() if p.is_file()) if location.is_dir() else [location]
    crls: list[x509.CertificateRevocationList] = []
    for file in files:
        shown = file.name if location.is_dir() else spec["store"]
        try:
            data = file.read_bytes()
        except OSError as e:
            yield f"{path}.store: cannot read '{shown}' ({e.strerror or e})"
            continue
        try:
            blocks = _PEM_CRL.findall(data)
            if blocks:
                crls.extend(x509.load_pem_x509_crl(block) for block in blocks)
            else:
                crls.append(x509.load_der_x509_crl(data))
        except ValueError:
            yield f"{path}.store: '{shown}' is not a CRL (PEM or DER)"
    if not crls and location.is_dir():
        yield f"{path}.store: no CRL in folder '{spec['store']}'"
    vault.crls = tuple(crls)


def _signing_key(key: Any, path: str, name: str) -> SigningKey:
    if not isinstance(key, _SIGNING_KEYS):
        raise _StoreProblem(f"{path}.store: in '{name}', the private key is a {type(key).__name__}, which cannot "
                            "sign a TLS handshake (expected an RSA, EC, Ed25519, Ed448 or DSA key)")
    return key


class _StoreProblem(Exception):
    pass


_PEM_KEY = re.compile(rb"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.*?-----END \1PRIVATE KEY-----", re.DOTALL)


def _public_der(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _alias_of(certificate: x509.Certificate, friendly_name: bytes | None) -> str:
    """A PKCS#12 entry's alias: its friendlyName; else the certificate's CN."""
    if friendly_name:
        return friendly_name.decode("utf-8", "replace")
    names = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else certificate.subject.rfc4514_string()


def _read_pkcs12(location: Path, password: str | None, store: str, shown: str, path: str) -> dict[str, Any]:
    data = location.read_bytes()
    try:
        bundle = pkcs12.load_pkcs12(data, password.encode() if password is not None else None)
    except ValueError:
        # A DER SEQUENCE that does not open is, in practice, a PKCS#12 file with another password.
        if data[:1] == b"\x30":
            raise _StoreProblem(f"{path}.password: cannot open '{shown}': wrong password"
                                + (" (none given)" if password is None else "")) from None
        raise _StoreProblem(f"{path}.store: '{shown}' is not a PKCS#12 file (set type: pem for PEM files)") from None
    others = [(c.certificate, c.friendly_name) for c in bundle.additional_certs]
    if store == "keys":
        if bundle.key is None or bundle.cert is None:
            raise _StoreProblem(f"{path}.store: '{shown}' has no private key entry")
        entry = bundle.cert
        alias = _alias_of(entry.certificate, entry.friendly_name)
        key = _signing_key(bundle.key, path, shown)
        return {alias: KeyEntry(alias, key, entry.certificate, tuple(c for c, _ in others))}
    everything = ([(bundle.cert.certificate, bundle.cert.friendly_name)] if bundle.cert else []) + others
    return {_alias_of(c, name): (c,) for c, name in everything}


def _read_pem(location: Path, password: str | None, store: str, shown: str, path: str) -> dict[str, Any]:
    files = sorted(location.glob("*.pem")) if location.is_dir() else [location]
    entries: dict[str, Any] = {}
    for file in files:
        data = file.read_bytes()
        name = file.name if location.is_dir() else shown
        try:
            certificates = tuple(x509.load_pem_x509_certificates(data))
        except ValueError:
            raise _StoreProblem(f"{path}.store: '{name}' holds no PEM certificate") from None
        alias = file.stem
        if store != "keys":
            entries[alias] = certificates
            continue
        block = _PEM_KEY.search(data)
        if block is None:
            raise _StoreProblem(f"{path}.store: '{name}' holds no private key (a keys entry needs one)")
        try:
            key = serialization.load_pem_private_key(block.group(0), password.encode() if password else None)
        except (TypeError, ValueError) as e:
            problem = "wrong password" if "password" in str(e).lower() or "decrypt" in str(e).lower() else str(e)
            raise _StoreProblem(f"{path}.password: cannot read the private key in '{name}': {problem}") from None
        if _public_der(key.public_key()) != _public_der(certificates[0].public_key()):
            raise _StoreProblem(f"{path}.store: in '{name}', the private key does not match the first certificate")
        entries[alias] = KeyEntry(alias, _signing_key(key, path, name), certificates[0], certificates[1:])
    return entries


PLUGIN = VaultType("filesystem", open_vault)
