"""tls server: terminates TLS on the connections a tcp server (or any bytes binding) hands
it, then hands the decrypted connection to the exit its routes choose by `authority` (the
client's SNI), `alpn` (the protocol negotiated) and `port` (the listening port).
tls client (zillatw.bindings.tls.client): wraps the upstream connection an http client asks for in
TLS, and connects it through its exit (a tcp client).

Keys, trust and signers are aliases in the binding's vault (zillatw.vaults.filesystem). TLS is
OpenSSL's through pyOpenSSL and Twisted's TLSMemoryBIOProtocol (zillatw.bindings.tls.context).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from cryptography import x509
from OpenSSL import SSL
from twisted.internet.interfaces import IAddress, IHandshakeListener, IOpenSSLServerConnectionCreator, IProtocolFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from zillatw.bindings.tcp.binding import parse_ports
from zillatw.bindings.tls.client import TlsClient
from zillatw.bindings.tls.context import (
    VERSIONS,
    Handshake,
    Peer,
    PeerTrust,
    TlsRoutes,
    classify,
    dns_names,
    guarded,
    make_context,
    name_matches,
    reason_text,
    set_servername_callback,
    state_of,
    use_key,
    verify_error,
)
from zillatw.bytestream import BytesConnection, server_info
from zillatw.config import BindingConfig, Route
from zillatw.config.plugins import BindingType
from zillatw.config.schema import FORBIDDEN, PORT_SPEC, route_schema
from zillatw.errors import ConfigError, did_you_mean
from zillatw.guards import Authorization, Rejected, Session
from zillatw.guards.x509 import X509Guard
from zillatw.matching import matcher
from zillatw.stream import IBytesExit, IUpstreamConnector
from zillatw.telemetry.events import Events
from zillatw.vaults.filesystem import FilesystemVault, KeyEntry

HANDSHAKE_TIMEOUT = 10.0  # seconds, Zilla's zilla.binding.tls.handshake.timeout
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
                "authorization": {
                    "type": "object", "maxProperties": 1, "propertyNames": {"pattern": r"^[a-zA-Z]+[a-zA-Z0-9._-]*$"},
                    "additionalProperties": {
                        "type": "object", "additionalProperties": False,
                        "properties": {"credentials": {
                            "type": "object", "additionalProperties": False,
                            "properties": {"certificates": {"enum": ["pem"]}}}},
                    },
                },
                # zillatw's
                "handshake-timeout": {"type": "number", "exclusiveMinimum": 0},
                "hostname-verification": {"type": "boolean"},
            },
        },
        "routes": {"type": "array", "items": route_schema(condition={
            "type": "object",
            "additionalProperties": False,
            "properties": {"authority": {"type": "string"}, "alpn": {"type": "string"}, "port": PORT_SPEC,
                           "trust": _NAMES, "mutual": {"enum": ["required", "none"]}},
        })},
    },
}
STREAMS = {"server": ("bytes", "bytes"), "client": ("bytes", "bytes")}
GUARDED_KINDS = ("server",)  # routes guarded by the x509 guard (tls `authorization`)


def check(binding: BindingConfig) -> Iterator[tuple[str, str]]:
    options = binding.options
    if "version" in options and options["version"] not in VERSIONS:
        yield "options.version", (f"'{options['version']}' is not supported "
                                  f"(expected {', '.join(VERSIONS)}; TLS 1.2 is the minimum)")
    if "authorization" in options and binding.kind == "client":
        yield "options.authorization", "only for a tls server (it authorizes client certificates)"
    if not binding.routes:
        yield "routes", f"a tls {binding.kind} needs 'exit' or routes with an exit"
    for route in binding.routes:
        for index, condition in enumerate(route.when):
            yield from _check_condition(binding, f"routes[{route.index}].when[{index}]", condition)
    yield from (_check_server(binding) if binding.kind == "server" else _check_client(binding))


def _check_condition(binding: BindingConfig, where: str, condition: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    for key in ("alpn", "trust", "mutual"):
        if binding.kind == "client" and key in condition:
            yield f"{where}.{key}", "a tls client routes on authority and port"
    if condition.get("mutual") == "none" and "trust" in condition:
        yield f"{where}.trust", "trust with mutual: none can never match"
    if "port" in condition:
        try:
            parse_ports(condition["port"])
        except ValueError as e:
            yield f"{where}.port", str(e)


def _check_server(binding: BindingConfig) -> Iterator[tuple[str, str]]:
    options = binding.options
    if binding.vault is None:
        yield "vault", "a tls server needs a vault (where its keys are)"
    if not options.get("keys") and not options.get("signers"):
        yield "options", "a tls server needs 'keys' (aliases of its vault's keys) or 'signers'"
    if options.get("keys") and options.get("signers"):
        yield "options.signers", "give 'keys' or 'signers', not both"
    if "hostname-verification" in options:
        yield "options.hostname-verification", "only for a tls client"
    yield from _check_mutual(binding)
    for route in binding.routes:
        for guard in route.guarded:
            if guard not in (options.get("authorization") or {}):
                yield (f"routes[{route.index}].guarded.{guard}", "not in options.authorization: no session of "
                       "this guard reaches the tls server's routes")


def _check_mutual(binding: BindingConfig) -> Iterator[tuple[str, str]]:
    """A server's client certificates: asked for only with trust (or trustcacerts)."""
    options = binding.options
    mutual = options.get("mutual", "required" if options.get("trust") else "none")
    if mutual != "none" and not options.get("trust") and not options.get("trustcacerts"):
        yield "options.mutual", f"'{mutual}' needs 'trust' (the aliases of the client CAs) or trustcacerts: true"
    if options.get("trustcacerts") and mutual == "none":
        yield "options.trustcacerts", "true, but no client certificate is asked for (give 'trust' or 'mutual')"
    if mutual != "none":
        return
    if "authorization" in options:
        yield "options.authorization", "no client certificate is asked for (give 'trust' or 'mutual')"
    for route in binding.routes:
        for index, condition in enumerate(route.when):
            if condition.get("trust") or condition.get("mutual") == "required":
                yield (f"routes[{route.index}].when[{index}]",
                       "routes by client certificate, but none is asked for (give 'trust' or 'mutual')")


def _check_client(binding: BindingConfig) -> Iterator[tuple[str, str]]:
    options = binding.options
    for route in binding.routes:
        if route.guarded:
            yield f"routes[{route.index}].guarded", "a tls client has no session to guard routes with"
    if "mutual" in options:
        yield "options.mutual", "only for a tls server (a client with 'keys' presents them when asked)"
    if len(options.get("keys") or ()) > 1:
        yield "options.keys", (f"a tls client presents one key, got {len(options['keys'])} (zillatw does not "
                               "choose among keys by the CAs an upstream names)")
    if "handshake-timeout" in options:
        yield "options.handshake-timeout", "only for a tls server (the ws client's timeout bounds the upstream's)"
    if options.get("trustcacerts") is False and not options.get("trust"):
        yield "options.trustcacerts", "false with no 'trust': no upstream certificate could be verified"
    for key in ("keys", "trust", "signers"):
        if options.get(key) and binding.vault is None:
            yield f"options.{key}", "needs the binding's 'vault'"


def guard_references(binding: BindingConfig) -> Iterator[tuple[str, str]]:
    """The guards a tls server's authorization names (config checks they exist)."""
    for guard in binding.options.get("authorization") or {}:
        yield f"options.authorization.{guard}", guard


# ---------------------------------------------------------------------------- server

# A server's default: no client certificates trusted (mutual: none)
NO_TRUST = PeerTrust()


@implementer(IOpenSSLServerConnectionCreator, IProtocolFactory)
class TlsServer:
    """The tls server binding: an IProtocolFactory that terminates TLS and routes."""

    noisy = False

    def __init__(self, name: str, keys: Sequence[KeyEntry], routes: list[tuple[Route, Any]], *,
                 sni: Sequence[str] = (), alpn: Sequence[str] = (), mutual: str = "none",
                 trust: PeerTrust = NO_TRUST, version: str = "TLS",
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, namespace: str = "default",
                 guard: Any = None, route_trust: Callable[[Sequence[str]], Sequence[x509.Certificate]] = lambda a: (),
                 events: Events | None = None, reactor: Any):
        self.name = name
        self.guard = guard  # the x509 guard of options.authorization
        self.namespace = namespace
        self.events = events or Events()
        self.reactor = reactor
        self.handshake_timeout = handshake_timeout
        self.sni = frozenset(n.lower() for n in sni)
        self.alpn = [p.encode() for p in alpn]
        self.routes = TlsRoutes(routes, namespace, route_trust)
        # One context per key; the SNI callback moves a connection to the key its name asks for.
        self._contexts = [(dns_names(entry.certificate), self._context_for(entry, mutual, trust, version))
                          for entry in keys]
        self._tls = TLSMemoryBIOFactory(self, False, _DispatchFactory(self))
        self._tls.noisy = False

    def _context_for(self, entry: KeyEntry, mutual: str, trust: PeerTrust, version: str) -> SSL.Context:
        context = make_context(*VERSIONS[version])
        use_key(context, entry)
        # Every context gets the same checks: after an SNI switch OpenSSL uses the new one's.
        if mutual != "none":
            trust.apply(context)
            mode = SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if mutual == "required" else 0)
            context.set_verify(mode, _verify_client)
        context.set_session_id(f"zillatw:{self.namespace}:{self.name}".encode()[:32])
        set_servername_callback(context, self._servername)
        if self.alpn:
            context.set_alpn_select_callback(self._select_alpn)
        return context

    # IProtocolFactory: a tls server is the exit of a tcp server's listener, not a listener
    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass

    # ---- OpenSSL callbacks

    def serverConnectionForTLS(self, tls_protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        # Twisted makes the TLS protocol the connection's app data; our state rides on it.
        tls_protocol.zillatw_handshake = Handshake(tls_protocol)  # type: ignore[attr-defined]
        return SSL.Connection(self._contexts[0][1], None)

    def _servername(self, connection: SSL.Connection) -> bool:
        """Whether the client's server name is served; on the way, move the connection to the
        key for that name."""
        state = state_of(connection)
        raw = connection.get_servername()
        if raw is None:
            return True  # no SNI (an IP address): the first key, as Zilla's key manager does
        name = raw.decode("ascii", "replace").lower()
        state.sni = name
        if self.sni and name not in self.sni:
            state.refuse("BINDING_TLS_KEY_REJECTED", f"server name '{name}' is not one of this server's sni")
            return False
        for names, context in self._contexts:
            if any(name_matches(pattern, name) for pattern in names):
                if context is not self._contexts[0][1]:
                    connection.set_context(context)
                return True
        return True

    @guarded(SSL.NO_OVERLAPPING_PROTOCOLS)
    def _select_alpn(self, connection: SSL.Connection, offered: list[bytes]) -> Any:
        """Zilla's choice: the first protocol the client offers that options.alpn lists and a
        route allows; none (the handshake goes on without ALPN) if there is no such one."""
        state = state_of(connection)
        port = getattr(state.transport.getHost(), "port", None)
        for protocol in offered:
            if protocol in self.alpn and self.routes.resolve(state.sni, protocol.decode("ascii", "replace"), port):
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS

    def authorize(self, peer: Peer, trace_id: int) -> Session | None:
        """The guard's session for a verified client certificate, if there is a guard and a
        certificate (an unverified one never gets this far: the handshake failed)."""
        if self.guard is None or peer.leaf is None:
            return None
        try:
            return self.guard.authorize((peer.leaf, *peer.intermediates), trace_id)
        except Rejected:
            return None

    # ---- the factory the tcp server hands connections to

    def buildProtocol(self, addr: IAddress) -> TLSMemoryBIOProtocol:
        return self._tls.buildProtocol(addr)

    def emit(self, trace_id: int, event: str, details: str) -> None:
        self.events.emit(self.namespace, self.name, trace_id, event, f"- {details}")


@guarded(False)
def _verify_client(connection: SSL.Connection, certificate: Any, errno: int, depth: int, ok: int) -> bool:
    if not ok:
        state = state_of(connection)
        subject = certificate.to_cryptography().subject.rfc4514_string() if certificate is not None else "?"
        state.refuse("BINDING_TLS_PEER_NOT_VERIFIED", f"client certificate {subject}: {verify_error(errno)}")
    return bool(ok)


class _DispatchFactory(Factory):
    noisy = False

    def __init__(self, server: TlsServer):
        self.server = server

    def buildProtocol(self, addr: IAddress) -> "_Dispatch":  # type: ignore[override]  # never None here
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

    @property
    def _tls(self) -> Any:
        """The TLSMemoryBIOProtocol this protocol sits in (it carries our Handshake)."""
        return self.transport

    def _state(self) -> Handshake:
        handshake: Handshake = self._tls.zillatw_handshake
        return handshake

    def dataReceived(self, data: bytes) -> None:
        self._early.append(data)  # TLS 1.3 data that arrived with the client's Finished

    def handshakeCompleted(self) -> None:
        self._cancel_timer()
        state = self._state()
        state.done = True
        tls = self._tls
        connection = tls.getHandle()
        alpn = connection.get_alpn_proto_negotiated() or None
        port = getattr(tls.getHost(), "port", None)
        peer = Peer.of(connection)
        session = self.server.authorize(peer, state.trace_id)
        if self.server.guard is not None:
            # for the http server behind (zillatw.guards.connection_authorization): 403 without a session
            tls.zillatw_authorization = Authorization(session=session, credentials_found=True)
        exit_ = self.server.routes.resolve(state.sni, alpn.decode("ascii", "replace") if alpn else None, port,
                                           peer, session)
        protocol: Any
        if exit_ is not None and IBytesExit.providedBy(exit_):  # echo, fan: the decrypted bytes
            protocol = BytesConnection(exit_, server_info("tls", state.sni))
        else:
            protocol = exit_.buildProtocol(self.addr) if exit_ is not None else None
        if protocol is None:
            tls.loseConnection()
            return
        # The TLS layer calls its wrappedProtocol: make that the exit's, so it (and anything
        # it hands the connection to, like the http server) is called directly from now on.
        tls.wrappedProtocol = protocol
        protocol.makeConnection(tls)
        if self._early:
            protocol.dataReceived(b"".join(self._early))
        self._early = []

    def _timed_out(self) -> None:
        self._timer = None
        self._state().refuse("BINDING_TLS_HANDSHAKE_FAILED",
                             f"handshake not completed within {self.server.handshake_timeout:g} s")
        self._tls.abortConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._cancel_timer()
        try:
            state = self._state()
        except Exception:
            return
        if state.done:
            return
        text = state.problem or reason_text(reason)
        event = state.event or classify(text)
        peer = getattr(self.addr, "host", "?")
        self.server.emit(state.trace_id, event, f"{peer} {text}")


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
    routes = [(route, graph.exit(route.exit, binding)) for route in binding.routes]
    # Both kinds pass bytes on, but a server's exit takes connections (a factory) and a
    # client's makes them (connect): the stream kinds alone do not tell a tcp client apart.
    needed, role = (IUpstreamConnector, "connect upstream") if binding.kind == "client" \
        else (IProtocolFactory, "take connections")
    for route, exit_ in routes:
        if not needed.providedBy(exit_) and not (binding.kind == "server" and IBytesExit.providedBy(exit_)):
            is_exit = binding.exit and route is binding.routes[-1]
            path = f"{where}.exit" if is_exit else f"{where}.routes[{route.index}].exit"
            name = (route.exit or "").partition(":")[2]
            raise ConfigError(f"{path}: '{name}' cannot {role} for a tls {binding.kind}")
    events = graph.events(binding.namespace)
    version = options.get("version", "TLS")
    crls = vault.crls if vault is not None and vault.revocation == "crl" else None
    if binding.kind == "client":
        peer_trust = PeerTrust(tuple(trust), options.get("trustcacerts", not trust), crls)
        return TlsClient(binding.name, routes, keys=keys, trust=peer_trust,
                         sni=options.get("sni") or (), alpn=options.get("alpn") or (), version=version,
                         verify_hostname=options.get("hostname-verification", True),
                         namespace=binding.namespace, events=events)
    _check_alpn(binding, graph.config, where)
    mutual = options.get("mutual", "required" if trust else "none")
    guard = None
    for name in options.get("authorization") or {}:
        guard = graph.guard(f"{binding.namespace}:{name}")
        if not isinstance(guard, X509Guard):
            raise ConfigError(f"{where}.options.authorization.{name}: a tls server authorizes with an x509 guard, "
                              f"'{name}' is not one")
    route_trust = _route_trust(binding, vault, trust, where)
    return TlsServer(binding.name, keys, routes, sni=options.get("sni") or (), alpn=options.get("alpn") or (),
                     mutual=mutual, trust=PeerTrust(tuple(trust), options.get("trustcacerts", False), crls),
                     version=version,
                     handshake_timeout=options.get("handshake-timeout", HANDSHAKE_TIMEOUT),
                     namespace=binding.namespace, guard=guard, route_trust=route_trust, events=events,
                     reactor=graph.reactor)


HTTP_VERSIONS = ("http/1.1", "h2")  # an http server's default `versions` (Zilla's: both)


def _check_alpn(binding: BindingConfig, config: Any, where: str) -> None:
    """ALPN offers only what the http server behind speaks (its `versions`): a client told
    h2 would speak HTTP/2 to a server that reads HTTP/1.1 only."""
    problems = []
    for route in binding.routes:
        target = config.binding(route.exit)
        if (target.type, target.kind) != ("http", "server"):
            continue
        served = tuple(target.options.get("versions") or HTTP_VERSIONS)
        speaks = f"which speaks {', '.join(served)} only (its options.versions)"
        path = f"{where}.exit" if binding.exit and route is binding.routes[-1] else f"{where}.routes[{route.index}]"
        for index, condition in enumerate(route.when):
            if "alpn" in condition and condition["alpn"] not in served:
                problems.append(f"{path}.when[{index}].alpn: '{condition['alpn']}' routes to http server "
                                f"'{target.name}', {speaks}")
        for index, protocol in enumerate(binding.options.get("alpn") or ()):
            negotiated_here = not route.when or any(matcher(c.get("alpn"))(protocol) for c in route.when)
            if protocol not in served and negotiated_here:
                problems.append(f"{where}.options.alpn[{index}]: '{protocol}' would be negotiated for http server "
                                f"'{target.name}', {speaks}")
    if problems:
        raise ConfigError(sorted(set(problems)))


def _route_trust(binding: BindingConfig, vault: FilesystemVault | None, trust: Sequence[x509.Certificate],
                 where: str) -> Callable[[Sequence[str]], Sequence[x509.Certificate]]:
    """Routes' `trust` aliases -> certificates, checked first: each must be a trust entry
    of the vault that the binding's own trust (or the system's) lets through the handshake."""
    problems = []
    for route in binding.routes:
        for index, condition in enumerate(route.when):
            for number, alias in enumerate(condition.get("trust") or ()):
                path = f"{where}.routes[{route.index}].when[{index}].trust[{number}]"
                available = vault.aliases("trust") if vault is not None else []
                if alias not in available:
                    problems.append(f"{path}: no certificate '{alias}' in vault '{binding.vault}'"
                                    f"{did_you_mean(alias, available)} (it has: {', '.join(available) or 'none'})")
                elif not binding.options.get("trustcacerts") and \
                        not set(vault.certificates("trust", alias)) <= set(trust):  # type: ignore[union-attr]
                    problems.append(f"{path}: '{alias}' is not in options.trust, so no certificate it signed "
                                    "passes the handshake")
    if problems:
        raise ConfigError(problems)
    return lambda aliases: [c for alias in aliases for c in vault.certificates("trust", alias)]  # type: ignore


PLUGIN = BindingType("tls", SCHEMA_PATCH, STREAMS, build, check=check, guard_references=guard_references,
                     guarded_kinds=frozenset(GUARDED_KINDS))
