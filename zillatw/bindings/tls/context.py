"""What the tls server and client bindings (zillatw.bindings.tls.binding, zillatw.bindings.tls.client) share:
the OpenSSL context they start from, loading keys and trust into it, the state a handshake's
callbacks record, and how an OpenSSL failure becomes one of Zilla's events.

TLS 1.2 is the minimum and only AEAD ciphers with forward secrecy are offered: what was
allowed before is broken or needed by no client that speaks WebSocket.
"""

from __future__ import annotations

import enum
import functools
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography import x509
from OpenSSL import SSL
from twisted.logger import Logger
from twisted.python.failure import Failure

from zillatw.config import Route
from zillatw.telemetry.events import next_trace_id
from zillatw.guards import Session, permits
from zillatw.matching import matcher
from zillatw.bindings.tcp.binding import parse_ports
from zillatw.vaults.filesystem import KeyEntry

if TYPE_CHECKING:
    from OpenSSL.crypto import X509Store

# OpenSSL cipher string for TLS 1.2 (TLS 1.3's suites are all AEAD and stay OpenSSL's default).
CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!DSS"
# Zilla's `version` is a Java SSLContext name: the newest version it allows.
VERSIONS = {"TLS": (SSL.TLS1_2_VERSION, 0), "TLSv1.2": (SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION),
            "TLSv1.3": (SSL.TLS1_3_VERSION, SSL.TLS1_3_VERSION)}

log = Logger()


def make_context(min_version: int, max_version: int) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(min_version)
    if max_version:
        context.set_max_proto_version(max_version)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION)
    context.set_cipher_list(CIPHERS)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    return context


def use_key(context: SSL.Context, entry: KeyEntry) -> None:
    context.use_certificate(entry.certificate)
    context.use_privatekey(entry.key)
    for certificate in entry.chain:
        context.add_extra_chain_cert(certificate)
    context.check_privatekey()


def _cert_store(context: SSL.Context) -> X509Store:
    store = context.get_cert_store()
    if store is None:  # pyOpenSSL's None: a context without a store, which SSL_CTX_new never makes
        raise RuntimeError("the TLS context has no certificate store")
    return store


def trust_certificates(context: SSL.Context, certificates: Sequence[x509.Certificate]) -> None:
    from OpenSSL.crypto import X509  # X509Store takes only pyOpenSSL's certificate type
    store = _cert_store(context)
    for certificate in certificates:
        store.add_cert(X509.from_cryptography(certificate))


@dataclass(frozen=True)
class PeerTrust:
    """What a peer's certificate chain is verified against: the vault's trust entries, the
    system's CAs (`trustcacerts`), and, with the vault's `revocation: crl`, its CRLs."""
    certificates: tuple[x509.Certificate, ...] = ()
    system: bool = False
    crls: tuple[x509.CertificateRevocationList, ...] | None = None  # None: revocation not checked

    def apply(self, context: SSL.Context) -> None:
        trust_certificates(context, self.certificates)
        if self.system:
            context.set_default_verify_paths()
        if self.crls is not None:
            check_revocation(context, self.crls)


def check_revocation(context: SSL.Context, crls: Sequence[x509.CertificateRevocationList]) -> None:
    """Every certificate of a peer's chain but the trust anchor must have its issuer's CRL
    here and not be on it, as Java's PKIX revocation checking (Zilla's) asks."""
    from OpenSSL.crypto import X509StoreFlags
    store = _cert_store(context)
    for crl in crls:
        store.add_crl(crl)
    store.set_flags(X509StoreFlags.CRL_CHECK | X509StoreFlags.CRL_CHECK_ALL)


def verify_error(errno: int) -> str:
    try:
        from OpenSSL._util import ffi, lib  # the string OpenSSL has for a verify error code
        return ffi.string(lib.X509_verify_cert_error_string(errno)).decode()
    except Exception:  # a private module: if it moves, the code still says what went wrong
        return f"certificate verify error {errno}"


def dns_names(certificate: x509.Certificate) -> list[str]:
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return [n.lower() for n in names.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        return [str(a.value).lower() for a in certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]


def name_matches(pattern: str, name: str) -> bool:
    """RFC 6125 matching of a certificate's DNS name: a wildcard covers one left-most label."""
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == name


def classify(reason: str) -> str:
    """Zilla's event for an OpenSSL handshake error."""
    lowered = reason.lower()
    if "certificate" in lowered and ("verify" in lowered or "did not return" in lowered or "required" in lowered
                                     or "unknown ca" in lowered or "bad certificate" in lowered):
        return "BINDING_TLS_PEER_NOT_VERIFIED"
    if "version" in lowered or "protocol" in lowered and "no application protocol" not in lowered:
        return "BINDING_TLS_PROTOCOL_REJECTED"
    return "BINDING_TLS_HANDSHAKE_FAILED"


def reason_text(failure: Failure | None) -> str:
    if failure is None:
        return "connection closed"
    value = failure.value
    if isinstance(value, SSL.Error) and value.args and isinstance(value.args[0], list):
        return "; ".join(str(item[-1]) for item in value.args[0] if item) or "TLS error"
    return failure.getErrorMessage()


def guarded(fallback: Any) -> Any:
    """For OpenSSL callbacks: an exception in one would surface from the handshake as an
    error Twisted does not expect, so log it, abort the connection and answer `fallback`."""
    def decorate(callback: Any) -> Any:
        @functools.wraps(callback)
        def wrapper(*args: Any) -> Any:
            try:
                return callback(*args)
            except Exception:
                log.failure("tls: {callback} failed", callback=callback.__name__)
                connection = next(a for a in args if isinstance(a, SSL.Connection))
                connection.get_app_data().abortConnection()
                return fallback
        return wrapper
    return decorate


class Alert(enum.IntEnum):
    """TLS alert descriptions (RFC 8446 §6.2) the servername callback answers with."""
    INTERNAL_ERROR = 80
    UNRECOGNIZED_NAME = 112


# Each context's cffi servername callback, alive as long as the context is.
_servername_callbacks: weakref.WeakKeyDictionary[SSL.Context, Any] = weakref.WeakKeyDictionary()


def set_servername_callback(context: SSL.Context, accept: Callable[[SSL.Connection], bool]) -> None:
    """Call `accept(connection)` when a client sends a server name (SNI); False refuses the
    name with the fatal unrecognized_name alert, as RFC 6066 §3 says a server should.

    pyOpenSSL's set_tlsext_servername_callback cannot send that alert: its callback only
    accepts, or raises and has the exception printed. So the callback is registered with
    OpenSSL through the cffi bindings pyOpenSSL itself uses; should those move, refused
    names fall back to closing the connection (a reset, not an alert)."""
    try:
        from OpenSSL._util import ffi, lib
        connections = SSL.Connection._reverse_mapping
        fatal, ok = lib.SSL_TLSEXT_ERR_ALERT_FATAL, lib.SSL_TLSEXT_ERR_OK
        register = lib.SSL_CTX_set_tlsext_servername_callback
        handle_of = context._context
    except (ImportError, AttributeError):
        def public(connection: SSL.Connection) -> None:
            if not accept(connection):
                connection.get_app_data().abortConnection()
        context.set_tlsext_servername_callback(public)
        return

    def servername(ssl: Any, alert: Any, _arg: Any) -> int:
        # Nothing may escape a cffi callback: OpenSSL would read its default answer, OK.
        try:
            if accept(connections[ssl]):
                return ok
            alert[0] = Alert.UNRECOGNIZED_NAME
        except Exception:
            log.failure("tls: the servername callback failed")
            alert[0] = Alert.INTERNAL_ERROR
        return fatal

    callback = ffi.callback("int (*)(SSL *, int *, void *)", servername)
    _servername_callbacks[context] = callback  # OpenSSL keeps only the pointer: keep the callback alive
    register(handle_of, callback)


def state_of(connection: SSL.Connection) -> "Handshake":
    return connection.get_app_data().zillatw_handshake


class Handshake:
    """What the OpenSSL callbacks learn about one connection's handshake."""

    __slots__ = ("transport", "trace_id", "problem", "event", "done", "sni")

    def __init__(self, transport: Any):
        self.transport = transport
        self.trace_id = next_trace_id()
        self.problem: str | None = None  # set by a callback that refused the peer
        self.event: str | None = None
        self.done = False
        self.sni: str | None = None

    def refuse(self, event: str, problem: str) -> None:
        if self.problem is None:
            self.event, self.problem = event, problem


@dataclass(frozen=True)
class Peer:
    """The client certificate a tls server verified, for routes' `trust` and `mutual`."""
    leaf: x509.Certificate | None = None
    intermediates: tuple[x509.Certificate, ...] = ()

    @classmethod
    def of(cls, connection: SSL.Connection) -> "Peer":
        leaf = connection.get_peer_certificate(as_cryptography=True)
        # On the server side OpenSSL's peer chain leaves the leaf out (but for some versions).
        sent = connection.get_peer_cert_chain(as_cryptography=True) or []
        return cls(leaf, tuple(c for c in sent if leaf is None or c != leaf))

    def signed_by(self, anchors: Any) -> bool:
        """Whether the certificate chains up to one of `anchors` (an X509Store)."""
        from OpenSSL.crypto import X509, X509StoreContext, X509StoreContextError
        if self.leaf is None:
            return False
        try:
            X509StoreContext(anchors, X509.from_cryptography(self.leaf),
                             [X509.from_cryptography(c) for c in self.intermediates]).verify_certificate()
        except X509StoreContextError:
            return False
        return True


def anchor_store(certificates: Sequence[x509.Certificate]) -> Any:
    """An X509Store trusting exactly `certificates`, intermediates CAs included (a route's
    `trust` may name the CA that signed client certificates, whatever signed that CA)."""
    from OpenSSL.crypto import X509, X509Store, X509StoreFlags
    store = X509Store()
    for certificate in certificates:
        store.add_cert(X509.from_cryptography(certificate))
    store.set_flags(X509StoreFlags.PARTIAL_CHAIN)
    return store


class _Condition:
    __slots__ = ("authority", "alpn", "ports", "mutual", "anchors")

    def __init__(self, when: dict[str, Any], trusted: Callable[[Sequence[str]], Sequence[x509.Certificate]]):
        self.authority = matcher(when.get("authority"))
        self.alpn = matcher(when.get("alpn"))
        self.ports = frozenset(parse_ports(when["port"])) if "port" in when else None
        # Zilla: `trust` implies `mutual: required`
        self.mutual: str | None = when.get("mutual", "required" if "trust" in when else None)
        self.anchors = anchor_store(trusted(when["trust"])) if "trust" in when else None

    def matches(self, sni: str | None, alpn: str | None, port: int | None, peer: Peer | None) -> bool:
        if not (self.authority(sni) and self.alpn(alpn) and (self.ports is None or port in self.ports)):
            return False
        if peer is None:  # before the handshake's end (choosing ALPN): the certificate is not known yet
            return True
        present = peer.leaf is not None
        if self.mutual == "required" and not present or self.mutual == "none" and present:
            return False
        return self.anchors is None or peer.signed_by(self.anchors)


class TlsRoutes:
    """A tls binding's routes: the first whose conditions (any one of its `when`) and guards
    hold. `peer` None skips what needs the client certificate (and the session it grants)."""

    def __init__(self, routes: list[tuple[Route, Any]], namespace: str = "default",
                 trusted: Callable[[Sequence[str]], Sequence[x509.Certificate]] = lambda aliases: ()):
        self.namespace = namespace
        self._routes = [([_Condition(dict(w), trusted) for w in route.when], route.guarded, exit_)
                        for route, exit_ in routes]

    def resolve(self, sni: str | None, alpn: str | None, port: int | None, peer: Peer | None = None,
                session: Session | None = None) -> Any | None:
        for conditions, guarded, exit_ in self._routes:
            if guarded and peer is not None and not permits(guarded, session, self.namespace):
                continue  # as at the http server: a failing guard falls through to the next route
            if not conditions or any(c.matches(sni, alpn, port, peer) for c in conditions):
                return exit_
        return None
