"""The `jwt` guard: verifies a JSON Web Token (RFC 7519) as Zilla's JwtGuardHandler does,
with PyJWT, and grants a Session (identity, roles, expiry).

A token verifies only if its header names a configured key (`kid`) whose `alg` equals the
token's `alg` (so `alg: none`, or an HMAC token checked against an RSA/EC public key, never
verify; a key without `alg` verifies nothing), its signature holds, `exp`/`nbf` hold (with
our `leeway`, default 0), `iss` equals `issuer` and `aud` contains `audience`.

`keys` is a list of JWKs, or the URL of a JWKS document (default: the issuer's
`/.well-known/jwks.json`), fetched with Twisted's HTTP client on first use, cached, and
fetched again when a token names an unknown `kid` (at most once per MIN_REFRESH seconds).
Verification waits for a fetch without blocking the reactor: authorize() returns a Deferred.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import jwt as pyjwt
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from zillatw import fetch
from zillatw.config.plugins import GuardType
from zillatw.config.schema import NAME
from zillatw.guards import Rejected, Session
from zillatw.telemetry.events import Events

FETCH_TIMEOUT = 10.0   # seconds for a JWKS URL to answer
MIN_REFRESH = 5.0      # seconds between fetches triggered by unknown kids
MAX_JWKS_BYTES = 1024 * 1024
JWKS_ACCEPT = {b"Accept": [b"application/jwk-set+json, application/json"]}

# Which algorithms fit which key type: a key is only ever used with its own `alg`.
ALGORITHMS = {
    "RSA": ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
    "EC": ("ES256", "ES384", "ES512", "ES256K"),
    "OKP": ("EdDSA",),
    "oct": ("HS256", "HS384", "HS512"),
}

JWK = {
    "type": "object",
    "required": ["kty", "kid"],
    "additionalProperties": False,
    "properties": {
        "kty": {"type": "string", "enum": sorted(ALGORITHMS)},
        "kid": {"type": "string"},
        "alg": {"type": "string"},
        "use": {"type": "string"},
        **{k: {"type": "string"} for k in ("n", "e", "crv", "x", "y", "k", "x5u", "x5t", "x5t#S256")},
        # RFC 7517 metadata, allowed so that a JWK can be pasted as an identity provider gives it
        "key_ops": {"type": "array", "items": {"type": "string"}},
        "x5c": {"type": "array", "items": {"type": "string"}},
    },
}
SCHEMA_PATCH = {
    "required": ["options"],
    "properties": {
        "options": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "issuer": {"type": "string"},
                "audience": {"type": "string"},
                "keys": {
                    "x-expect": "a list of JWKs or the URL of a JWKS",
                    "anyOf": [{"type": "array", "items": JWK}, {"type": "string"}],
                },
                "roles": {"type": "string"},
                "identity": {"type": "string"},
                "challenge": {"type": "integer", "minimum": 0},
                "attributes": {"type": "object", "propertyNames": NAME, "additionalProperties": {"type": "string"}},
                # zillatw's addition: seconds of clock skew allowed on exp and nbf
                "leeway": {"type": "number", "minimum": 0},
            },
        },
    },
}

log = Logger()


@dataclass(frozen=True, slots=True)
class Key:
    kid: str
    alg: str
    key: Any  # what PyJWT verifies with (a cryptography public key, or bytes for oct)


def parse_key(jwk: Mapping[str, Any]) -> Key:
    """A verification key from a JWK; ValueError saying what is wrong with it."""
    kty, alg = jwk.get("kty"), jwk.get("alg")
    if not isinstance(jwk.get("kid"), str):
        raise ValueError("a key needs a 'kid'")
    if alg is None:
        raise ValueError("a key needs an 'alg': tokens verify only with a key whose alg equals theirs")
    fitting = ALGORITHMS.get(kty, ()) if isinstance(kty, str) else ()
    if alg not in fitting:
        raise ValueError(f"alg '{alg}' does not fit a key of kty '{kty}' "
                         f"(expected one of {', '.join(fitting)})")
    if kty != "oct" and "d" in jwk:
        raise ValueError("a private key; configure the public key only")
    try:
        return Key(jwk["kid"], alg, pyjwt.PyJWK(dict(jwk), alg).key)
    except (pyjwt.PyJWTError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"not a valid {kty} key ({e or type(e).__name__})") from None


def keys_url(options: Mapping[str, Any]) -> str | None:
    keys = options.get("keys")
    if isinstance(keys, str):
        return keys
    if keys is None and options.get("issuer"):
        return options["issuer"].rstrip("/") + "/.well-known/jwks.json"
    return None


def check(name: str, options: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    for required in ("issuer", "audience"):
        if required not in options:
            yield (f"options.{required}",
                   f"required (Zilla refuses every token when it is missing; tokens must carry '{required[:3]}')")
    if "attributes" in options:
        yield "options.attributes", "not supported by this zillatw yet"
    keys = options.get("keys")
    if isinstance(keys, list):
        for index, jwk in enumerate(keys):
            if "alg" not in jwk:
                continue  # as in Zilla: loads, and never verifies a token
            try:
                parse_key(jwk)
            except ValueError as e:
                yield f"options.keys[{index}]", str(e)
        kids = [k.get("kid") for k in keys]
        for kid in {k for k in kids if kids.count(k) > 1}:
            yield "options.keys", f"kid '{kid}' is used by more than one key"
    elif (url := keys_url(options)) is not None:
        if urlsplit(url).scheme not in ("http", "https"):
            yield "options.keys", f"'{url}' is not an http(s) URL of a JWKS"


class JwksKeys:
    """Keys fetched from a JWKS URL; fetched again when asked for an unknown kid."""

    def __init__(self, url: str, reactor: Any, agent: Any = None, timeout: float = FETCH_TIMEOUT,
                 min_refresh: float = MIN_REFRESH):
        self.url = url
        self.reactor = reactor
        self.agent = agent or fetch.agent(reactor)
        self.timeout = timeout
        self.min_refresh = min_refresh
        self.keys: dict[str, Key] = {}
        self.fetches = 0
        self.error: str | None = None
        self._fetched_at = -math.inf
        self._flight = fetch.SingleFlight()

    def get(self, kid: str) -> Key | None:
        return self.keys.get(kid)

    def can_refresh(self) -> bool:
        return self._flight.in_flight or self.reactor.seconds() - self._fetched_at >= self.min_refresh

    def refresh(self) -> Deferred:
        """Fires (never fails) once a fetch, in flight or new, has ended."""
        return self._flight.join(self._fetch)

    def _fetch(self) -> Deferred:
        self._fetched_at = self.reactor.seconds()
        self.fetches += 1
        fetching = fetch.get(self.agent, self.url, headers=JWKS_ACCEPT,
                             max_bytes=MAX_JWKS_BYTES, timeout=self.timeout, reactor=self.reactor)
        return fetching.addCallbacks(self._loaded, self._failed)

    def _loaded(self, body: bytes) -> None:
        document = json.loads(body)
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError("not a JWKS (no 'keys' list)")
        keys = {}
        for jwk in document["keys"]:
            try:
                key = parse_key(jwk if isinstance(jwk, dict) else {})
            except ValueError as e:
                log.warn("zillatw: JWKS {url}: key skipped: {error}", url=self.url, error=e)
                continue
            keys[key.kid] = key
        self.keys = keys
        self.error = None

    def _failed(self, failure: Any) -> None:
        self.error = failure.getErrorMessage() or failure.type.__name__
        log.warn("zillatw: cannot fetch the JWKS {url}: {error}", url=self.url, error=self.error)


class StaticKeys:
    def __init__(self, keys: list[Mapping[str, Any]]):
        # A key without `alg` never verifies (Zilla compares it with the token's alg).
        self.keys = {key.kid: key for key in map(parse_key, (k for k in keys if "alg" in k))}
        self.error = None

    def get(self, kid: str) -> Key | None:
        return self.keys.get(kid)

    def can_refresh(self) -> bool:
        return False


def _printable(value: Any, limit: int = 64) -> str:
    text = re.sub(r"[^\x21-\x7e]", "?", str(value))
    return text if len(text) <= limit else text[:limit] + "..."


def claim(payload: Mapping[str, Any], path: str) -> Any:
    """A claim by dotted path (`realm_access.roles`), or None."""
    value: Any = payload
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def roles_of(value: Any) -> frozenset[str]:
    """A list claim as it is, a string claim split on whitespace (OAuth's `scope`)."""
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list):
        return frozenset(str(v) for v in value if isinstance(v, (str, int, float)))
    return frozenset()


_REASONS = [
    (pyjwt.ExpiredSignatureError, "token expired"),
    (pyjwt.ImmatureSignatureError, "token not yet valid"),
    (pyjwt.InvalidIssuerError, "issuer does not match"),
    (pyjwt.InvalidAudienceError, "audience does not match"),
    (pyjwt.InvalidSignatureError, "signature does not verify"),
]


class JwtGuard:
    """One `guards.<name>` of type jwt."""

    def __init__(self, namespace: str, name: str, options: Mapping[str, Any], *, events: Events | None = None,
                 reactor: Any, agent: Any = None):
        self.namespace = namespace
        self.local_name = name
        self.name = f"{namespace}:{name}"
        self.issuer: str = options["issuer"]
        self.audience: str = options["audience"]
        self.roles_claim: str = options.get("roles", "scope")
        self.identity_claim: str = options.get("identity", "sub")
        self.challenge: float | None = options.get("challenge")
        self.leeway: float = options.get("leeway", 0)
        self.events = events or Events()
        url = keys_url(options)
        self.keys: JwksKeys | StaticKeys = (JwksKeys(url, reactor, agent) if url is not None
                                            else StaticKeys(list(options.get("keys") or [])))

    def authorize(self, credentials: str, trace_id: int = 0) -> "Session | Deferred[Session]":
        """A Session, or a Deferred of one while the JWKS is fetched; Rejected otherwise."""
        try:
            header = pyjwt.get_unverified_header(credentials)
        except pyjwt.PyJWTError:
            raise self._rejected(trace_id, credentials, "malformed token") from None
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise self._rejected(trace_id, credentials, "token has no kid")
        if self.keys.get(kid) is None and isinstance(self.keys, JwksKeys) and self.keys.can_refresh():
            refreshed = self.keys.refresh()
            return refreshed.addCallback(lambda _: self._verify(credentials, header, trace_id))
        return self._verify(credentials, header, trace_id)

    def _verify(self, credentials: str, header: Mapping[str, Any], trace_id: int) -> Session:
        kid, alg = header["kid"], header.get("alg")
        key = self.keys.get(kid)
        if key is None:
            fetch = f" (JWKS fetch failed: {self.keys.error})" if self.keys.error else ""
            raise self._rejected(trace_id, credentials, f"unknown kid '{_printable(kid)}'{fetch}")
        if alg != key.alg:
            raise self._rejected(trace_id, credentials,
                                 f"alg '{_printable(alg)}' is not the alg of key '{key.kid}' ({key.alg})")
        try:
            payload = pyjwt.decode(
                credentials, key.key, algorithms=[key.alg], issuer=self.issuer, audience=self.audience,
                leeway=self.leeway,
                # Zilla does not check iat; an issuer's clock a second ahead must not refuse tokens.
                options={"verify_iat": False, "require": ["iss", "aud"]})
        except pyjwt.PyJWTError as e:
            reason = next((text for kind, text in _REASONS if isinstance(e, kind)), None)
            if reason is None:
                reason = (f"missing claim '{e.claim}'" if isinstance(e, pyjwt.MissingRequiredClaimError)
                          else f"invalid token ({type(e).__name__})")
            raise self._rejected(trace_id, credentials, reason) from None
        identity = claim(payload, self.identity_claim)
        exp = payload.get("exp")
        return Session(
            guard=self.name,
            identity=None if identity is None else str(identity),
            roles=roles_of(claim(payload, self.roles_claim)),
            expires_at=math.inf if exp is None else float(exp) + self.leeway,
        )

    def _rejected(self, trace_id: int, credentials: str, reason: str) -> Rejected:
        """GUARD_JWT_AUTHORIZATION_FAILED with the unverified identity (never the token)."""
        try:
            unverified = pyjwt.decode(credentials, options={"verify_signature": False})
            identity = claim(unverified, self.identity_claim)
        except (pyjwt.PyJWTError, ValueError, TypeError):
            identity = None
        shown = "-" if identity is None else _printable(identity)
        self.events.emit(self.namespace, self.local_name, trace_id, "GUARD_JWT_AUTHORIZATION_FAILED",
                         f"JWT token authorization failed for identity ({shown}). {reason}")
        return Rejected(reason, shown)


def build(namespace: str, name: str, options: Mapping[str, Any], graph: Any) -> JwtGuard:
    return JwtGuard(namespace, name, options, events=graph.events(namespace), reactor=graph.reactor)


PLUGIN = GuardType("jwt", SCHEMA_PATCH, build, check=check)
