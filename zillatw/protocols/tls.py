"""tls server: terminates TLS on the connections a tcp server (or any bytes binding) hands
it, then hands the decrypted connection to the exit its routes choose by `authority` (the
client's SNI), `alpn` (the protocol negotiated) and `port` (the listening port).
tls client: wraps the upstream connection an http client asks for in TLS, and connects it
through its exit (a tcp client).

Keys, trust and signers are aliases in the binding's vault (zillatw.vault). TLS is
OpenSSL's through pyOpenSSL and Twisted's TLSMemoryBIOProtocol; upstream names are checked
with service-identity (RFC 6125). TLS 1.2 is the minimum and only AEAD ciphers with
forward secrecy are offered: what was allowed before is broken or needed by no client
that speaks WebSocket.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterator, Sequence
from typing import Any

from cryptography import x509
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.pyopenssl import verify_hostname, verify_ip_address
from twisted.internet import defer
from twisted.internet.interfaces import (IAddress, IHandshakeListener, IOpenSSLClientConnectionCreator,
                                         IOpenSSLServerConnectionCreator, IProtocolFactory)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from zillatw.config import BindingConfig, Route
from zillatw.errors import ConfigError, did_you_mean
from zillatw.matching import matcher
from zillatw.protocols.tcp import parse_ports
from zillatw.schema import FORBIDDEN, PORT_SPEC, route_schema
from zillatw.stream import StreamRefused
from zillatw.telemetry import Events, next_trace_id
from zillatw.vault import FilesystemVault, KeyEntry

HANDSHAKE_TIMEOUT = 10.0  # seconds, Zilla's zilla.binding.tls.handshake.timeout
# OpenSSL cipher string for TLS 1.2 (TLS 1.3's suites are all AEAD and stay OpenSSL's default).
CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!DSS"
# Zilla's `version` is a Java SSLContext name: the newest version it allows.
VERSIONS = {"TLS": (SSL.TLS1_2_VERSION, 0), "TLSv1.2": (SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION),
            "TLSv1.3": (SSL.TLS1_3_VERSION, SSL.TLS1_3_VERSION)}
MUTUAL = ("required", "requested", "none")

_NAMES = {"type": "array", "items": {"type": "string"}}
SCHEMA_PATCH = {
    "properties": {
        "kind": {"enum": ["server", "client"]},
        "catalog": FORBIDDEN, "entry": FORBIDDEN,
        "options": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "version": {"type": "string"},
                "keys": _NAMES, "trust": _NAMES, "signers": _NAMES, "sni": _NAMES, "alpn": _NAMES,
                "trustcacerts": {"type": "boolean"},
                "mutual": {"enum": list(MUTUAL)},
                "authorization": {"type": "object"},
                # zillatw's
                "handshake-timeout": {"type": "number", "exclusiveMinimum": 0},
                "hostname-verification": {"type": "boolean"},
            },
        },
        "routes": {"type": "array", "items": route_schema(condition={
            "type": "object",
            "additionalProperties": False,
            "properties": {"authority": {"type": "string"}, "alpn": {"type": "string"}, "port": PORT_SPEC},
        })},
    },
}
STREAMS = {"server": ("bytes", "bytes"), "client": ("bytes", "bytes")}

log = Logger()


def check(binding: BindingConfig) -> Iterator[tuple[str, str]]:
    options = binding.options
    if "version" in options and options["version"] not in VERSIONS:
        yield "options.version", (f"'{options['version']}' is not supported "
                                  f"(expected {', '.join(VERSIONS)}; TLS 1.2 is the minimum)")
    if "authorization" in options:
        yield "options.authorization", "not supported by this zillatw yet (the x509 guard)"
    if not binding.routes:
        yield "routes", f"a tls {binding.kind} needs 'exit' or routes with an exit"
    for route in binding.routes:
        for index, condition in enumerate(route.when):
            if binding.kind == "client" and "alpn" in condition:
                yield f"routes[{route.index}].when[{index}].alpn", "a tls client routes on authority and port"
            if "port" in condition:
                try:
                    parse_ports(condition["port"])
                except ValueError as e:
                    yield f"routes[{route.index}].when[{index}].port", str(e)
    if binding.kind == "server":
        if binding.vault is None:
            yield "vault", "a tls server needs a vault (where its keys are)"
        if not options.get("keys") and not options.get("signers"):
            yield "options", "a tls server needs 'keys' (aliases of its vault's keys) or 'signers'"
        if options.get("keys") and options.get("signers"):
            yield "options.signers", "give 'keys' or 'signers', not both"
        if options.get("mutual", "required" if options.get("trust") else "none") != "none" and not options.get("trust"):
            yield "options.mutual", f"'{options['mutual']}' needs 'trust' (the aliases of the client CAs)"
        for key in ("trustcacerts", "hostname-verification"):
            if key in options:
                yield f"options.{key}", "only for a tls client"
    else:
        if "mutual" in options:
            yield "options.mutual", "only for a tls server (a client with 'keys' presents them when asked)"
        if "handshake-timeout" in options:
            yield "options.handshake-timeout", "only for a tls server (the ws client's timeout bounds the upstream's)"
        if options.get("trustcacerts") is False and not options.get("trust"):
            yield "options.trustcacerts", "false with no 'trust': no upstream certificate could be verified"
        for key in ("keys", "trust", "signers"):
            if options.get(key) and binding.vault is None:
                yield f"options.{key}", "needs the binding's 'vault'"


# ---------------------------------------------------------------------------- shared

def _context(min_version: int, max_version: int) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(min_version)
    if max_version:
        context.set_max_proto_version(max_version)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION)
    context.set_cipher_list(CIPHERS)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    return context


def _use_key(context: SSL.Context, entry: KeyEntry) -> None:
    context.use_certificate(entry.certificate)
    context.use_privatekey(entry.key)
    for certificate in entry.chain:
        context.add_extra_chain_cert(certificate)
    context.check_privatekey()


def _trust(context: SSL.Context, certificates: Sequence[x509.Certificate]) -> None:
    from OpenSSL.crypto import X509  # X509Store takes only pyOpenSSL's certificate type
    store = context.get_cert_store()
    for certificate in certificates:
        store.add_cert(X509.from_cryptography(certificate))


def _verify_error(errno: int) -> str:
    try:
        from OpenSSL._util import ffi, lib  # the string OpenSSL has for a verify error code
        return ffi.string(lib.X509_verify_cert_error_string(errno)).decode()
    except Exception:  # a private module: if it moves, the code still says what went wrong
        return f"certificate verify error {errno}"


def _dns_names(certificate: x509.Certificate) -> list[str]:
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return [n.lower() for n in names.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        return [str(a.value).lower() for a in certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]


def _name_matches(pattern: str, name: str) -> bool:
    """RFC 6125 matching of a certificate's DNS name: a wildcard covers one left-most label."""
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == name


def _classify(reason: str) -> str:
    """Zilla's event for an OpenSSL handshake error."""
    lowered = reason.lower()
    if "certificate" in lowered and ("verify" in lowered or "did not return" in lowered or "required" in lowered
                                     or "unknown ca" in lowered or "bad certificate" in lowered):
        return "BINDING_TLS_PEER_NOT_VERIFIED"
    if "version" in lowered or "protocol" in lowered and "no application protocol" not in lowered:
        return "BINDING_TLS_PROTOCOL_REJECTED"
    return "BINDING_TLS_HANDSHAKE_FAILED"


def _reason_text(failure: Failure | None) -> str:
    if failure is None:
        return "connection closed"
    value = failure.value
    if isinstance(value, SSL.Error) and value.args and isinstance(value.args[0], list):
        return "; ".join(str(item[-1]) for item in value.args[0] if item) or "TLS error"
    return failure.getErrorMessage()


def _guarded(fallback: Any) -> Any:
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


def _state_of(connection: SSL.Connection) -> "_Handshake":
    return connection.get_app_data().zillatw_handshake


class _Handshake:
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


# ---------------------------------------------------------------------------- server

class _Condition:
    __slots__ = ("authority", "alpn", "ports")

    def __init__(self, when: dict[str, Any]):
        self.authority = matcher(when.get("authority"))
        self.alpn = matcher(when.get("alpn"))
        self.ports = frozenset(parse_ports(when["port"])) if "port" in when else None

    def matches(self, sni: str | None, alpn: str | None, port: int | None) -> bool:
        return self.authority(sni) and self.alpn(alpn) and (self.ports is None or port in self.ports)


class TlsRoutes:
    def __init__(self, routes: list[tuple[Route, Any]]):
        self._routes = [([_Condition(dict(w)) for w in route.when], exit_) for route, exit_ in routes]

    def resolve(self, sni: str | None, alpn: str | None, port: int | None) -> Any | None:
        for conditions, exit_ in self._routes:
            if not conditions or any(c.matches(sni, alpn, port) for c in conditions):
                return exit_
        return None


@implementer(IOpenSSLServerConnectionCreator)
class TlsServer:
    """The tls server binding: an IProtocolFactory that terminates TLS and routes."""

    noisy = False

    def __init__(self, name: str, keys: Sequence[KeyEntry], routes: list[tuple[Route, Any]], *,
                 sni: Sequence[str] = (), alpn: Sequence[str] = (), mutual: str = "none",
                 trust: Sequence[x509.Certificate] = (), version: str = "TLS",
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, namespace: str = "default",
                 events: Events | None = None, reactor: Any = None):
        if reactor is None:
            from twisted.internet import reactor
        self.name = name
        self.namespace = namespace
        self.events = events or Events()
        self.reactor = reactor
        self.handshake_timeout = handshake_timeout
        self.sni = frozenset(n.lower() for n in sni)
        self.alpn = [p.encode() for p in alpn]
        self.routes = TlsRoutes(routes)
        # One context per key; the SNI callback moves a connection to the key its name asks for.
        self._contexts = [(_dns_names(entry.certificate), self._context_for(entry, mutual, trust, version))
                          for entry in keys]
        self._tls = TLSMemoryBIOFactory(self, False, _DispatchFactory(self))
        self._tls.noisy = False

    def _context_for(self, entry: KeyEntry, mutual: str, trust: Sequence[x509.Certificate], version: str) -> SSL.Context:
        context = _context(*VERSIONS[version])
        _use_key(context, entry)
        # Every context gets the same checks: after an SNI switch OpenSSL uses the new one's.
        if mutual != "none":
            _trust(context, trust)
            mode = SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if mutual == "required" else 0)
            context.set_verify(mode, _verify_client)
        context.set_session_id(f"zillatw:{self.namespace}:{self.name}".encode()[:32])
        context.set_tlsext_servername_callback(self._servername)
        if self.alpn:
            context.set_alpn_select_callback(self._select_alpn)
        return context

    # ---- OpenSSL callbacks

    def serverConnectionForTLS(self, tls_protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        # Twisted makes the TLS protocol the connection's app data; our state rides on it.
        tls_protocol.zillatw_handshake = _Handshake(tls_protocol)
        return SSL.Connection(self._contexts[0][1], None)

    @_guarded(None)
    def _servername(self, connection: SSL.Connection) -> None:
        state = _state_of(connection)
        raw = connection.get_servername()
        if raw is None:
            return  # no SNI (an IP address): the first key, as Zilla's key manager does
        name = raw.decode("ascii", "replace").lower()
        state.sni = name
        if self.sni and name not in self.sni:
            state.refuse("BINDING_TLS_KEY_REJECTED", f"server name '{name}' is not one of this server's sni")
            state.transport.abortConnection()
            return
        for names, context in self._contexts:
            if any(_name_matches(pattern, name) for pattern in names):
                if context is not self._contexts[0][1]:
                    connection.set_context(context)
                return

    @_guarded(SSL.NO_OVERLAPPING_PROTOCOLS)
    def _select_alpn(self, connection: SSL.Connection, offered: list[bytes]) -> Any:
        """Zilla's choice: the first protocol the client offers that options.alpn lists and a
        route allows; none (the handshake goes on without ALPN) if there is no such one."""
        state = _state_of(connection)
        port = getattr(state.transport.getHost(), "port", None)
        for protocol in offered:
            if protocol in self.alpn and self.routes.resolve(state.sni, protocol.decode("ascii", "replace"), port):
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS

    # ---- the factory the tcp server hands connections to

    def buildProtocol(self, addr: IAddress) -> TLSMemoryBIOProtocol:
        return self._tls.buildProtocol(addr)

    def emit(self, trace_id: int, event: str, details: str) -> None:
        self.events.emit(self.namespace, self.name, trace_id, event, f"- {details}")


@_guarded(False)
def _verify_client(connection: SSL.Connection, certificate: Any, errno: int, depth: int, ok: int) -> bool:
    if not ok:
        state = _state_of(connection)
        subject = certificate.to_cryptography().subject.rfc4514_string() if certificate is not None else "?"
        state.refuse("BINDING_TLS_PEER_NOT_VERIFIED", f"client certificate {subject}: {_verify_error(errno)}")
    return bool(ok)


class _DispatchFactory(Factory):
    noisy = False

    def __init__(self, server: TlsServer):
        self.server = server

    def buildProtocol(self, addr: IAddress) -> "_Dispatch":
        return _Dispatch(self.server, addr)


@implementer(IHandshakeListener)
class _Dispatch(Protocol):
    """Inside the TLS layer until the handshake is done; then the chosen exit's protocol
    takes its place."""

    def __init__(self, server: TlsServer, addr: IAddress):
        self.server = server
        self.addr = addr
        self._early: list[bytes] = []
        self._timer: Any = None

    def connectionMade(self) -> None:
        self._timer = self.server.reactor.callLater(self.server.handshake_timeout, self._timed_out)

    def _state(self) -> _Handshake:
        return self.transport.zillatw_handshake

    def dataReceived(self, data: bytes) -> None:
        self._early.append(data)  # TLS 1.3 data that arrived with the client's Finished

    def handshakeCompleted(self) -> None:
        self._cancel_timer()
        state = self._state()
        state.done = True
        connection = self.transport.getHandle()
        alpn = connection.get_alpn_proto_negotiated() or None
        port = getattr(self.transport.getHost(), "port", None)
        exit_ = self.server.routes.resolve(state.sni, alpn.decode("ascii", "replace") if alpn else None, port)
        protocol = exit_.buildProtocol(self.addr) if exit_ is not None else None
        if protocol is None:
            self.transport.loseConnection()
            return
        # The TLS layer calls its wrappedProtocol: make that the exit's, so it (and anything
        # it hands the connection to, like the http server) is called directly from now on.
        self.transport.wrappedProtocol = protocol
        protocol.makeConnection(self.transport)
        if self._early:
            protocol.dataReceived(b"".join(self._early))
        self._early = []

    def _timed_out(self) -> None:
        self._timer = None
        self._state().refuse("BINDING_TLS_HANDSHAKE_FAILED",
                             f"handshake not completed within {self.server.handshake_timeout:g} s")
        self.transport.abortConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason: Failure = None) -> None:
        self._cancel_timer()
        try:
            state = self._state()
        except Exception:
            return
        if state.done:
            return
        text = state.problem or _reason_text(reason)
        event = state.event or _classify(text)
        peer = getattr(self.addr, "host", "?")
        self.server.emit(state.trace_id, event, f"{peer} {text}")


# ---------------------------------------------------------------------------- client

class _ClientTLSProtocol(TLSMemoryBIOProtocol):
    """Tells the connect() caller why a handshake failed before the application hears of
    the lost connection, so a proxy answers 502 with the TLS reason."""

    def connectionLost(self, reason: Failure) -> None:
        self.factory.attempt.lost(getattr(self, "_reason", None) or reason)
        super().connectionLost(reason)


@implementer(IOpenSSLClientConnectionCreator)
class _Attempt:
    """One upstream connection: its name, its handshake, and the Deferred connect() returns."""

    def __init__(self, client: "TlsClient", server_name: str | None):
        self.client = client
        self.server_name = server_name
        self.state: _Handshake | None = None
        self.done: defer.Deferred = defer.Deferred(self._cancel)

    def clientConnectionForTLS(self, tls_protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = SSL.Connection(self.client.context, None)
        self.state = _Handshake(tls_protocol)
        tls_protocol.zillatw_attempt = self  # Twisted makes the protocol the connection's app data
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
            except VerificationError as e:
                certificate = connection.get_peer_certificate(as_cryptography=True)
                names = ", ".join(_all_names(certificate)) if certificate is not None else "no certificate"
                self.state.refuse("BINDING_TLS_PEER_NOT_VERIFIED",
                                  f"certificate does not match '{name}' (it is for: {names})")
                self.state.done = False
                self.state.transport.failVerification(Failure(e))
                return
        if not self.done.called:
            self.done.callback(self.state.transport)

    def lost(self, reason: Failure) -> None:
        if self.done.called:
            return
        state = self.state
        text = (state.problem if state else None) or _reason_text(reason)
        event = (state.event if state else None) or _classify(text)
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
        return [f"CN={a.value}" for a in certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    return names.get_values_for_type(x509.DNSName) + [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]


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


@_guarded(False)
def _verify_server(connection: SSL.Connection, certificate: Any, errno: int, depth: int, ok: int) -> bool:
    if not ok:
        attempt: _Attempt = connection.get_app_data().zillatw_attempt
        if attempt.state is not None:
            subject = certificate.to_cryptography().subject.rfc4514_string() if certificate is not None else "?"
            attempt.state.refuse("BINDING_TLS_PEER_NOT_VERIFIED", f"certificate {subject}: {_verify_error(errno)}")
    return bool(ok)


@_guarded(None)
def _client_info(connection: SSL.Connection, where: int, ret: int) -> None:
    if where & SSL.SSL_CB_HANDSHAKE_DONE:
        connection.get_app_data().zillatw_attempt.handshake_done(connection)


class TlsClient:
    """The tls client binding: `connect(factory, authority, timeout)` like a tcp client; the
    Deferred fires once the TLS handshake is done and the upstream's name verified."""

    def __init__(self, name: str, routes: list[tuple[Route, Any]], *, keys: Sequence[KeyEntry] = (),
                 trust: Sequence[x509.Certificate] = (), trustcacerts: bool = True,
                 sni: Sequence[str] = (), alpn: Sequence[str] = (), version: str = "TLS",
                 verify_hostname: bool = True, send_sni: bool = True, namespace: str = "default",
                 events: Events | None = None):
        self.name = name
        self.namespace = namespace
        self.events = events or Events()
        self.sni = list(sni)
        self.verify_hostname = verify_hostname
        self.send_sni = send_sni
        self.routes = TlsRoutes(routes)
        context = _context(*VERSIONS[version])
        _trust(context, trust)
        if trustcacerts:
            context.set_default_verify_paths()
        context.set_verify(SSL.VERIFY_PEER, _verify_server)
        if keys:
            _use_key(context, keys[0])  # presented when the upstream asks for a certificate
        if alpn:
            context.set_alpn_protos([p.encode() for p in alpn])
        context.set_info_callback(_client_info)
        self.context = context

    def server_name(self, exit_: Any, host: str | None) -> str | None:
        """The name to send (SNI) and verify: options.sni, else the tcp client's configured
        host, else the host of the stream's authority."""
        if self.sni:
            return self.sni[0]
        return getattr(exit_, "host", None) or host

    def connect(self, factory: IProtocolFactory, authority: str | None, timeout: float) -> defer.Deferred:
        host, port = _split_authority(authority)
        # Routes choose the exit by the name the upstream is asked for, and the port.
        exit_ = self.routes.resolve(self.sni[0] if self.sni else host, None, port)
        if exit_ is None:
            return defer.fail(StreamRefused(502, f"tls client {self.name} has no route for {authority}"))
        attempt = _Attempt(self, self.server_name(exit_, host))
        tls_factory = TLSMemoryBIOFactory(attempt, True, factory)
        tls_factory.protocol = _ClientTLSProtocol
        tls_factory.attempt = attempt
        tls_factory.noisy = False
        connecting = exit_.connect(tls_factory, authority, timeout)

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


# ---------------------------------------------------------------------------- build

def _entries(binding: BindingConfig, vault: FilesystemVault | None, store: str, where: str,
             problems: list[str]) -> list[Any]:
    found: list[Any] = []
    for index, alias in enumerate(binding.options.get(store) or ()):
        available = vault.aliases(store) if vault is not None else []
        if alias not in available:
            shown = ", ".join(available) if available else f"no {store} store"
            problems.append(f"{where}.options.{store}[{index}]: no {'key' if store == 'keys' else 'certificate'} "
                            f"'{alias}' in vault '{binding.vault}'{did_you_mean(alias, available)} (it has: {shown})")
        elif store == "keys":
            found.append(vault.keys[alias])  # type: ignore[union-attr]
        else:
            found.extend(vault.certificates(store, alias))  # type: ignore[union-attr]
    return found


def _signed_keys(vault: FilesystemVault | None, signers: Sequence[x509.Certificate]) -> list[KeyEntry]:
    """Keys whose certificate a signer issued: Zilla's `signers` pick keys by their CA."""
    subjects = {s.subject for s in signers}
    return [entry for entry in (vault.keys.values() if vault else ()) if entry.certificate.issuer in subjects]


def build(binding: BindingConfig, graph: Any) -> TlsServer | TlsClient:
    options = binding.options
    where = (f"{binding.namespace}: " if len(graph.config.namespaces) > 1 else "") + f"bindings.{binding.name}"
    vault = graph.vault(binding.namespace, binding.vault) if binding.vault else None
    problems: list[str] = []
    keys = _entries(binding, vault, "keys", where, problems)
    trust = _entries(binding, vault, "trust", where, problems)
    signers = _entries(binding, vault, "signers", where, problems)
    if signers and not problems:
        keys = _signed_keys(vault, signers)
        if not keys:
            problems.append(f"{where}.options.signers: no key in vault '{binding.vault}' is issued by these signers")
    if problems:
        raise ConfigError(problems)
    routes = [(route, graph.binding(route.exit)) for route in binding.routes]
    # Both kinds pass bytes on, but a server's exit takes connections (a factory) and a
    # client's makes them (connect): the stream kinds alone do not tell a tcp client apart.
    needed, role = ("connect", "connect upstream") if binding.kind == "client" else ("buildProtocol", "take connections")
    for route, exit_ in routes:
        if not hasattr(exit_, needed):
            path = f"{where}.exit" if binding.exit and route is binding.routes[-1] else f"{where}.routes[{route.index}].exit"
            raise ConfigError(f"{path}: '{route.exit.partition(':')[2]}' cannot {role} for a tls {binding.kind}")
    events = graph.events(binding.namespace)
    version = options.get("version", "TLS")
    if binding.kind == "client":
        return TlsClient(binding.name, routes, keys=keys, trust=trust,
                         trustcacerts=options.get("trustcacerts", not trust),
                         sni=options.get("sni") or (), alpn=options.get("alpn") or (), version=version,
                         verify_hostname=options.get("hostname-verification", True),
                         namespace=binding.namespace, events=events)
    mutual = options.get("mutual", "required" if trust else "none")
    return TlsServer(binding.name, keys, routes, sni=options.get("sni") or (), alpn=options.get("alpn") or (),
                     mutual=mutual, trust=trust, version=version,
                     handshake_timeout=options.get("handshake-timeout", HANDSHAKE_TIMEOUT),
                     namespace=binding.namespace, events=events)
