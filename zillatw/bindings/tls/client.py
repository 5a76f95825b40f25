"""The tls client binding: wraps the upstream connection an http client asks for in TLS,
and connects it through its exit (a tcp client). Upstream names are checked with
service-identity (RFC 6125); a key from the vault is presented when the upstream asks for
a client certificate.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from service_identity.pyopenssl import verify_hostname, verify_ip_address
from twisted.internet import defer
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IProtocolFactory
from twisted.internet.protocol import connectionDone
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from zillatw.bindings.tls.context import (
    VERSIONS,
    Handshake,
    PeerTrust,
    TlsRoutes,
    classify,
    guarded,
    make_context,
    pinned_by_common_name,
    reason_text,
    use_key,
    verify_error,
)
from zillatw.config import Route
from zillatw.stream import IUpstreamConnector, StreamRefused
from zillatw.telemetry.events import Events
from zillatw.vaults.filesystem import KeyEntry


class _ClientTLSProtocol(TLSMemoryBIOProtocol):
    """Tells the connect() caller why a handshake failed before the application hears of
    the lost connection, so a proxy answers 502 with the TLS reason."""

    factory: _ClientTLSFactory

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.attempt.lost(getattr(self, "_reason", None) or reason)
        super().connectionLost(reason)


class _ClientTLSFactory(TLSMemoryBIOFactory):
    """Wraps one upstream connection; its protocol (the SSL connection's app data, as Twisted
    sets it) finds the attempt here."""

    protocol = _ClientTLSProtocol
    noisy = False

    def __init__(self, attempt: _Attempt, wrapped: IProtocolFactory):
        super().__init__(attempt, True, wrapped)
        self.attempt = attempt


@implementer(IOpenSSLClientConnectionCreator)
class _Attempt:
    """One upstream connection: its name, its handshake, and the Deferred connect() returns."""

    def __init__(self, client: "TlsClient", server_name: str | None):
        self.client = client
        self.server_name = server_name
        self.state: Handshake | None = None
        self.done: defer.Deferred = defer.Deferred(self._cancel)

    def clientConnectionForTLS(self, tls_protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = SSL.Connection(self.client.context, None)
        self.state = Handshake(tls_protocol)
        name = self.server_name
        if name and self.client.send_sni and not _is_ip(name):
            connection.set_tlsext_host_name(name.encode("idna"))
        return connection

    def handshake_done(self, connection: SSL.Connection) -> None:
        assert self.state is not None
        if self.state.done:
            return  # OpenSSL says "done" again for TLS 1.3 session tickets
        self.state.done = True
        name = self.server_name
        if self.client.verify_hostname and name:
            try:
                (verify_ip_address if _is_ip(name) else verify_hostname)(connection, name)
            except (VerificationError, CertificateError) as e:
                # CertificateError: no subjectAltName at all (Zilla's ws.proxy backend)
                certificate = connection.get_peer_certificate(as_cryptography=True)
                if isinstance(e, CertificateError) and not _is_ip(name) and \
                        pinned_by_common_name(certificate, self.client.trust.certificates, name):
                    pass  # that very certificate is pinned in the trust store, for this CN
                else:
                    self._not_verified(e, certificate, name)
                    return
        if not self.done.called:
            self.done.callback(self.state.transport)

    def _not_verified(self, error: Exception, certificate: x509.Certificate | None, name: str) -> None:
        assert self.state is not None
        names = ", ".join(_all_names(certificate)) if certificate is not None else "no certificate"
        if isinstance(error, CertificateError):
            why = (f"certificate for {names} has no subjectAltName, so it is for no name; a CN alone "
                   f"is accepted only from a certificate pinned in the trust store, for '{name}'")
        else:
            why = f"certificate does not match '{name}' (it is for: {names})"
        self.state.refuse("BINDING_TLS_PEER_NOT_VERIFIED", why)
        self.state.done = False
        self.state.transport.failVerification(Failure(error))

    def lost(self, reason: Failure) -> None:
        if self.done.called:
            return
        state = self.state
        text = (state.problem if state else None) or reason_text(reason)
        event = (state.event if state else None) or classify(text)
        self.client.emit(state.trace_id if state else 0, event, f"{self.server_name or '-'} {text}")
        self.done.errback(StreamRefused(502, "upstream TLS failed", f"with {self.server_name or '-'}: {text}"))

    def _cancel(self, d: defer.Deferred) -> None:
        if self.state is not None:
            self.state.transport.abortConnection()


def _all_names(certificate: x509.Certificate) -> list[str]:
    """The names a certificate is valid for (its SAN DNS names and IP addresses)."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        common_names = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return [f"CN={_text(a.value)}" for a in common_names]
    return names.get_values_for_type(x509.DNSName) + [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _split_authority(authority: str | None) -> tuple[str | None, int | None]:
    """'host:port', '[v6]:port' or 'host' -> (host, port or None)."""
    if not authority:
        return None, None
    host, port = authority, None
    if authority.rfind(":") > authority.rfind("]"):
        host, _, digits = authority.rpartition(":")
        port = int(digits) if digits.isdigit() else None
    return host.strip("[]") or None, port


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
        return True
    except ValueError:
        return False


@guarded(False)
def _verify_server(connection: SSL.Connection, certificate: Any, errno: int, depth: int, ok: int) -> bool:
    if not ok:
        attempt: _Attempt = connection.get_app_data().factory.attempt
        if attempt.state is not None:
            subject = certificate.to_cryptography().subject.rfc4514_string() if certificate is not None else "?"
            attempt.state.refuse("BINDING_TLS_PEER_NOT_VERIFIED", f"certificate {subject}: {verify_error(errno)}")
    return bool(ok)


@guarded(None)
def _client_info(connection: SSL.Connection, where: int, ret: int) -> None:
    if where & SSL.SSL_CB_HANDSHAKE_DONE:
        connection.get_app_data().factory.attempt.handshake_done(connection)


# The default when the client binding names no vault trust: the system's CAs.
SYSTEM_TRUST = PeerTrust(system=True)


@implementer(IUpstreamConnector)
class TlsClient:
    """The tls client binding: `connect(factory, authority, timeout)` like a tcp client; the
    Deferred fires once the TLS handshake is done and the upstream's name verified."""

    host = None  # its upstream is its exit's: a tls client in front of it names the authority's host

    def __init__(self, name: str, routes: list[tuple[Route, Any]], *, keys: Sequence[KeyEntry] = (),
                 trust: PeerTrust = SYSTEM_TRUST,
                 sni: Sequence[str] = (), alpn: Sequence[str] = (), version: str = "TLS",
                 verify_hostname: bool = True, send_sni: bool = True, namespace: str = "default",
                 events: Events | None = None):
        self.name = name
        self.namespace = namespace
        self.events = events or Events()
        self.sni = list(sni)
        self.trust = trust  # its certificates: the pinned ones a CN-only certificate may be
        self.verify_hostname = verify_hostname
        self.send_sni = send_sni
        self.routes = TlsRoutes(routes)
        context = make_context(*VERSIONS[version])
        trust.apply(context)
        context.set_verify(SSL.VERIFY_PEER, _verify_server)
        if keys:
            use_key(context, keys[0])  # presented when the upstream asks for a certificate
        if alpn:
            context.set_alpn_protos([p.encode() for p in alpn])
        context.set_info_callback(_client_info)
        self.context = context

    def server_name(self, exit_: Any, host: str | None) -> str | None:
        """The name to send (SNI) and verify: options.sni, else the tcp client's configured
        host, else the host of the stream's authority."""
        if self.sni:
            return self.sni[0]
        return exit_.host or host

    def connect(self, factory: IProtocolFactory, authority: str | None, timeout: float) -> defer.Deferred:
        host, port = _split_authority(authority)
        # Routes choose the exit by the name the upstream is asked for, and the port.
        exit_ = self.routes.resolve(self.sni[0] if self.sni else host, None, port)
        if exit_ is None:
            return defer.fail(StreamRefused(502, f"tls client {self.name} has no route for {authority}"))
        attempt = _Attempt(self, self.server_name(exit_, host))
        connecting = exit_.connect(_ClientTLSFactory(attempt, factory), authority, timeout)

        def connected(_: Any) -> defer.Deferred:
            return attempt.done

        def cancel(d: defer.Deferred) -> None:
            connecting.cancel()
            if not attempt.done.called:
                attempt.done.cancel()

        result: defer.Deferred = defer.Deferred(cancel)
        connecting.addCallback(connected).chainDeferred(result)
        return result

    def emit(self, trace_id: int, event: str, details: str) -> None:
        self.events.emit(self.namespace, self.name, trace_id, event, f"- {details}")

