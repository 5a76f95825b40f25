"""The `x509` guard: authorizes a connection by the client certificate a tls server verified,
as Zilla's guard-x509 does, and grants a Session (identity, roles, expiry).

    guards:
      clients:
        type: x509
        options:
          identity: subject.cn            # default subject.dn
          roles:
            internal:                     # granted if any one match holds,
              - issuer.cn: Internal CA    # a match holding if all its fields do
                san.dns: "*.internal.example.com"

A tls server names the guard in `options.authorization` (`{clients: {credentials:
{certificates: pem}}}`); its routes, and the routes of the http server behind it, can then
be `guarded` by it. The guard never verifies the chain: the tls server's handshake did (trust,
CRLs); an unverified or absent certificate gets no session.

Fields of the leaf certificate: subject.dn and issuer.dn (RFC 4514 strings, as cryptography
writes them: `CN=good client,O=Example`), subject.<attribute> and issuer.<attribute> (cn, o,
ou, c, l, st, dc, uid, ...: the RFC 4514 short name, lower case), san.dns, san.email, san.uri,
san.ip, x5t.s256 (the base64url SHA-256 of the DER). A role match's value is a glob (`*`, `?`),
case-insensitive, against any value of a field that has several.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from zillatw.telemetry.events import Events
from zillatw.guards import Rejected, Session
from zillatw.config.plugins import GuardType

_FIELD = {"type": "string", "pattern": r"^[a-zA-Z]+[a-zA-Z0-9._-]*$"}
SCHEMA_PATCH = {
    "properties": {
        "options": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "identity": _FIELD,
                "attributes": {"type": "object", "additionalProperties": _FIELD},
                "roles": {"type": "object", "additionalProperties": {
                    "type": "array", "minItems": 1,
                    "items": {"type": "object", "minProperties": 1, "additionalProperties": {"type": "string"}},
                }},
            },
        },
    },
}
IDENTITY_DEFAULT = "subject.dn"
SAN_FIELDS: dict[str, type[x509.DNSName | x509.RFC822Name | x509.UniformResourceIdentifier | x509.IPAddress]] = {
    "san.dns": x509.DNSName, "san.email": x509.RFC822Name, "san.uri": x509.UniformResourceIdentifier,
    "san.ip": x509.IPAddress}
_NAME_FIELD = re.compile(r"^(subject|issuer)\.([a-z][a-z0-9]*|[0-9]+(\.[0-9]+)+)$")


def is_field(name: str) -> bool:
    return name in SAN_FIELDS or name in ("subject.dn", "issuer.dn", "x5t.s256") or bool(_NAME_FIELD.match(name))


_EXPECTED = "subject.dn, subject.<attribute> like subject.cn, issuer.dn, issuer.<attribute>, " + \
    ", ".join(SAN_FIELDS) + ", x5t.s256"


def check(name: str, options: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    if "identity" in options and not is_field(options["identity"]):
        yield "options.identity", f"'{options['identity']}' is not a certificate field (expected {_EXPECTED})"
    if "attributes" in options:
        yield "options.attributes", ("not supported by this zillatw yet (nothing reads a guard's attributes: "
                                     "Zilla's ${guarded...} expressions are not implemented)")
    for role, matches in (options.get("roles") or {}).items():
        for index, match in enumerate(matches):
            for field in match:
                if not is_field(field):
                    yield (f"options.roles.{role}[{index}].{field}",
                           f"not a certificate field (expected {_EXPECTED})")


def fields(leaf: x509.Certificate) -> dict[str, list[str]]:
    """The leaf certificate's fields, each with its values in certificate order."""
    found: dict[str, list[str]] = {}
    for prefix, name in (("subject", leaf.subject), ("issuer", leaf.issuer)):
        found[f"{prefix}.dn"] = [name.rfc4514_string()]
        for attribute in name:
            found.setdefault(f"{prefix}.{attribute.rfc4514_attribute_name.lower()}", []).append(str(attribute.value))
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        names = None
    if names is not None:
        for field, kind in SAN_FIELDS.items():
            values = [str(v) for v in names.get_values_for_type(kind)]
            if values:
                found[field] = values
    digest = hashes.Hash(hashes.SHA256())
    digest.update(leaf.public_bytes(serialization.Encoding.DER))
    found["x5t.s256"] = [base64.urlsafe_b64encode(digest.finalize()).rstrip(b"=").decode()]
    return found


def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern),
                      re.IGNORECASE | re.DOTALL)


class X509Guard:
    """One `guards.<name>` of type x509."""

    challenge: float | None = None  # a certificate is not refreshed during a connection

    def __init__(self, namespace: str, name: str, options: Mapping[str, Any], *, events: Events | None = None):
        self.namespace = namespace
        self.local_name = name
        self.name = f"{namespace}:{name}"
        self.identity_field: str = options.get("identity", IDENTITY_DEFAULT)
        self.events = events or Events()
        # role -> matches; a match: (field, compiled glob) pairs that must all hold
        self.roles = [(role, [[(field, _glob(glob)) for field, glob in match.items()] for match in matches])
                      for role, matches in (options.get("roles") or {}).items()]

    def authorize(self, credentials: str | Sequence[x509.Certificate], trace_id: int = 0) -> Session:
        """A Session for a verified chain, leaf first: the certificates themselves (what the
        tls server hands over), or their PEM text (Zilla's `certificates: pem` credentials).
        Rejected if there is no certificate to read."""
        chain = self._chain(credentials, trace_id)
        leaf = chain[0]
        found = fields(leaf)
        identity_values = found.get(self.identity_field)
        identity = identity_values[0] if identity_values else None
        roles = frozenset(role for role, matches in self.roles
                          if any(all(any(glob.fullmatch(value) for value in found.get(field, ()))
                                     for field, glob in match) for match in matches))
        return Session(self.name, identity, roles, leaf.not_valid_after_utc.timestamp())

    def _chain(self, credentials: str | Sequence[x509.Certificate], trace_id: int) -> Sequence[x509.Certificate]:
        if isinstance(credentials, str):
            try:
                chain: Sequence[x509.Certificate] = x509.load_pem_x509_certificates(credentials.encode())
            except ValueError:
                raise self._rejected(trace_id, "Unable to parse certificate chain.") from None
        else:
            chain = credentials
        if not chain:
            raise self._rejected(trace_id, "Empty certificate chain.")
        return chain

    def _rejected(self, trace_id: int, reason: str) -> Rejected:
        self.events.emit(self.namespace, self.local_name, trace_id, "GUARD_X509_AUTHORIZATION_FAILED",
                         f"X509 certificate chain authorization failed for identity (-). {reason}")
        return Rejected(reason)


def build(namespace: str, name: str, options: Mapping[str, Any], graph: Any) -> X509Guard:
    return X509Guard(namespace, name, options, events=graph.events(namespace))


PLUGIN = GuardType("x509", SCHEMA_PATCH, build, check=check)
