"""A configuration `check` accepts does not crash at run time (issue 15).

Every pairing of binding kinds the registry allows by stream kind (a binding handing on
`bytes`, `http` or `messages` to one that accepts them) is enumerated from the registry
and must appear in one of the chains below; a new type or stream kind fails
`test_every_pairing_has_a_chain` until a chain covers it. Each chain is checked as
`python -m zillatw check` does (load, then build every binding): one check accepts is
served and a stream opened through it, end to end, with a real client (and a real
upstream); one it refuses must be refused by the path of the pairing's exit, never by a
crash."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from twisted.internet import defer, reactor
from twisted.internet import ssl as tssl
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest
from twisted.web import resource, server

from zillatw.config import load
from zillatw.errors import ConfigError
from zillatw.runtime.graph import BindingGraph
from zillatw.runtime.standard import standard_registry
from zillatw.test import pki
from zillatw.test.pki import client_tls, connect_wss, start_wss_upstream, tls_connect
from zillatw.test.support import RawClient, close_ws, connect_raw, connect_ws, start_gateway, start_upstream

PASSWORD = "pairings"

# name -> (type, kind); each binding's exit is the next one in its chain
NODES = {
    "tcp": ("tcp", "server"), "tls": ("tls", "server"), "tls2": ("tls", "server"),
    "http": ("http", "server"), "ws": ("ws", "server"), "ws2": ("ws", "server"),
    "echo": ("echo", "server"), "fan": ("fan", "server"), "fan2": ("fan", "server"),
    "wsc": ("ws", "client"), "httpc": ("http", "client"),
    "tlsc": ("tls", "client"), "tlsc2": ("tls", "client"), "tcpc": ("tcp", "client"),
}
UP = ["tcp", "http", "ws", "wsc", "httpc"]  # a ws proxy, up to its http client


class Chain(NamedTuple):
    nodes: list[str]
    drive: str              # how a client opens a stream through it (Drivers.<drive>)
    must_work: bool = True  # False: check may refuse it (by the path of `pairing`'s exit)
    pairing: tuple[str, str] | None = None  # the pairing a refusal must name


CHAINS = [
    Chain(["tcp", "echo"], "raw"),                                   # Zilla's tcp.echo
    Chain(["tcp", "fan", "echo"], "raw"),                            # tcp.reflect
    Chain(["tcp", "tls", "echo"], "tls_raw"),                        # tls.echo
    Chain(["tcp", "tls", "fan", "echo"], "tls_raw"),                 # tls.reflect
    Chain(["tcp", "tls", "tls2", "echo"], "tls_in_tls_raw"),
    Chain(["tcp", "http", "ws", "echo"], "ws"),                      # ws.echo
    Chain(["tcp", "tls", "http", "ws", "echo"], "wss"),
    Chain(["tcp", "http", "ws", "fan", "echo"], "ws"),               # ws.reflect
    Chain(["tcp", "http", "ws", "fan", "fan2", "echo"], "ws"),
    Chain([*UP, "tcpc"], "ws_upstream"),                             # ws.proxy, plain
    Chain([*UP, "tlsc", "tcpc"], "ws_upstream"),                     # ws.proxy
    Chain([*UP, "tlsc", "tlsc2", "tcpc"], "ws_upstream"),
    Chain(["tcp", "http", "ws", "fan", "wsc", "httpc", "tcpc"], "ws_upstream"),
    # no tcp or tls proxy: a server's connection goes to a server binding
    Chain(["tcp", "tcpc"], "none", False, ("tcp", "tcpc")),
    Chain(["tcp", "tlsc", "tcpc"], "none", False, ("tcp", "tlsc")),
    Chain(["tcp", "tls", "tcpc"], "none", False, ("tls", "tcpc")),
    Chain(["tcp", "tls", "tlsc", "tcpc"], "none", False, ("tls", "tlsc")),
    # a client's exit carries its upstream connection: a client
    *[Chain([*UP, "tlsc", *after], "none", False, ("tlsc", after[0]))
      for after in (["tls", "echo"], ["http", "ws", "echo"], ["echo"], ["fan", "echo"])],
    *[Chain([*UP, *after], "none", False, ("httpc", after[0]))
      for after in (["tls", "echo"], ["http", "ws", "echo"], ["echo"], ["fan", "echo"])],
    Chain(["tcp", "http", "ws", "wsc", "ws2", "echo"], "none", False, ("wsc", "ws2")),
    # plain HTTP: proxied through an http client, or answered by echo (Zilla's http.echo)
    Chain(["tcp", "http", "httpc", "tcpc"], "plain_http"),
    Chain(["tcp", "http", "echo"], "plain_echo"),
    # a ws client's exit carries its upstream connection: echo is no client
    Chain(["tcp", "http", "ws", "wsc", "echo"], "none", False, ("wsc", "echo")),
]


def enumerated_pairings() -> set[tuple[tuple[str, str], tuple[str, str]]]:
    """(type, kind) -> (type, kind) for every pair the registry's stream kinds allow."""
    kinds = [(name, kind, streams) for name, plugin in standard_registry().bindings.items()
             for kind, streams in plugin.streams.items()]
    pairs = set()
    for a_type, a_kind, (_, emits) in kinds:
        for b_type, b_kind, (accepts, _) in kinds:
            accepted = accepts if isinstance(accepts, tuple) else (accepts,)
            if emits is not None and emits in accepted:
                pairs.add(((a_type, a_kind), (b_type, b_kind)))
    return pairs


class Keys:
    """A CA, a localhost key for the tls servers and upstreams, a trust store for the clients."""

    def __init__(self, folder: Path):
        self.ca = pki.make_ca("pairings CA")
        self.localhost = pki.issue(self.ca, "localhost", dns=["localhost"], ips=["127.0.0.1"])
        self.keys = pki.write(folder / "keys.p12", self.localhost.p12("localhost", PASSWORD))
        self.trust = pki.write(folder / "trust.p12", pki.truststore_p12({"ca": self.ca.certificate}, PASSWORD))


def config_of(chain: Chain, keys: Keys, upstream_port: int = 1) -> dict[str, Any]:
    bindings: dict[str, Any] = {}
    for index, name in enumerate(chain.nodes):
        type_, kind = NODES[name]
        binding: dict[str, Any] = {"type": type_, "kind": kind}
        following = chain.nodes[index + 1] if index + 1 < len(chain.nodes) else None
        if following is not None:
            binding["exit"] = following
        if name == "tcp":
            binding["options"] = {"host": "127.0.0.1", "port": 0}
        elif type_ == "tls" and kind == "server":
            binding.update(vault="server", options={"keys": ["localhost"]})
        elif type_ == "tls":
            binding.update(vault="clients", options={"trust": ["ca"], "sni": ["localhost"]})
        elif name == "tcpc":
            binding["options"] = {"host": "127.0.0.1", "port": upstream_port}
        bindings[name] = binding
    return {"name": "test", "bindings": bindings,
            "vaults": {"server": {"type": "filesystem",
                                  "options": {"keys": {"store": keys.keys, "password": PASSWORD}}},
                       "clients": {"type": "filesystem",
                                   "options": {"trust": {"store": keys.trust, "password": PASSWORD}}}},
            "telemetry": {"exporters": {"stdout": {"type": "stdout"}}}}


def checked(config: dict[str, Any]) -> list[str]:
    """What `python -m zillatw check` says: [] if accepted, else the problems."""
    registry = standard_registry()
    try:
        loaded = load(config, registry=registry)
        BindingGraph(loaded, registry, reactor=reactor).build_all()
    except ConfigError as e:
        return list(e.problems)
    return []


class PairingTests(unittest.TestCase):
    def test_every_pairing_has_a_chain(self):
        covered = {(NODES[a], NODES[b]) for chain in CHAINS for a, b in zip(chain.nodes, chain.nodes[1:], strict=False)}
        self.assertEqual(sorted(enumerated_pairings() - covered), [], "pairings no chain covers: add a chain")
        self.assertEqual(sorted(covered - enumerated_pairings()), [], "chains with pairings of no stream kind")

    @defer.inlineCallbacks
    def test_every_chain_check_accepts_carries_a_stream(self):
        folder = Path(self.mktemp())
        folder.mkdir()
        keys = Keys(folder)
        drivers = Drivers(self, keys)
        for chain in CHAINS:
            upstream_port = drivers.upstream_for(chain)
            config = config_of(chain, keys, upstream_port)
            problems = checked(config)
            if problems:
                self.assertFalse(chain.must_work, f"{chain.nodes}: refused: {problems}")
                assert chain.pairing is not None
                exit_path = f"bindings.{chain.pairing[0]}.exit: "
                self.assertTrue(any(p.startswith(exit_path) for p in problems),
                                f"{chain.nodes}: refused, but not by {exit_path}...: {problems}")
                continue
            self.assertNotEqual(chain.drive, "none", f"{chain.nodes}: accepted: give it a driver")
            gateway, port = yield start_gateway(self, config)
            yield getattr(drivers, chain.drive)(port, chain)
            yield gateway.stopService()


class Drivers:
    """One way per front end to open a stream through a chain, and check what comes back."""

    def __init__(self, case: unittest.TestCase, keys: Keys):
        self.case = case
        self.keys = keys

    def upstream_for(self, chain: Chain) -> int:
        """Start what the chain's tcp client connects to: a ws echo server, over TLS once
        or twice as the chain's tls clients ask, or a plain HTTP server."""
        if "tcpc" not in chain.nodes or chain.drive == "none":
            return 1
        if chain.drive == "plain_http":
            return self.http_upstream()
        layers = sum(1 for name in chain.nodes if NODES[name] == ("tls", "client"))
        if layers == 0:
            return start_upstream(self.case)[1]
        if layers == 1:
            return start_wss_upstream(self.case, self.keys.localhost)[1]
        return self.tls_in_tls_upstream()

    def tls_in_tls_upstream(self) -> int:
        factory, _ = start_upstream(self.case)  # its own listener stays unused
        own = tssl.PrivateCertificate.loadPEM(self.keys.localhost.key_pem() + self.keys.localhost.cert_pem())
        inner = TLSMemoryBIOFactory(own.options(), False, factory)
        port = reactor.listenSSL(0, inner, own.options(), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.case.addCleanup(port.stopListening)
        return port.getHost().port

    def http_upstream(self) -> int:
        class Answer(resource.Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                return b"from the upstream"
        the_reactor: Any = reactor
        port = the_reactor.listenTCP(0, server.Site(Answer()), interface="127.0.0.1")
        self.case.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def raw(self, port: int, chain: Chain) -> Any:
        client = yield connect_raw(port)
        yield self.round_trip(client, chain)

    @defer.inlineCallbacks
    def tls_raw(self, port: int, chain: Chain) -> Any:
        client = yield tls_connect(port, self.keys.ca)
        yield self.round_trip(client, chain)

    @defer.inlineCallbacks
    def tls_in_tls_raw(self, port: int, chain: Chain) -> Any:
        options = client_tls(self.keys.ca, "localhost")
        endpoint = wrapClientTLS(options, wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port)))
        client = yield connectProtocol(endpoint, RawClient())
        yield self.round_trip(client, chain)

    @defer.inlineCallbacks
    def round_trip(self, client: Any, chain: Chain) -> Any:
        client.transport.write(b"through " + " ".join(chain.nodes).encode())
        expected = b"through " + " ".join(chain.nodes).encode()
        self.case.assertEqual((yield client.until(len(expected))), expected, chain.nodes)
        client.transport.loseConnection()
        yield client.done

    @defer.inlineCallbacks
    def ws(self, port: int, chain: Chain) -> Any:
        client = yield connect_ws(port)
        yield self.message_round_trip(client, chain)

    @defer.inlineCallbacks
    def wss(self, port: int, chain: Chain) -> Any:
        client = yield connect_wss(port, client_tls(self.keys.ca))
        yield self.message_round_trip(client, chain)

    ws_upstream = ws

    @defer.inlineCallbacks
    def message_round_trip(self, client: Any, chain: Chain) -> Any:
        payload = " ".join(chain.nodes).encode()
        client.sendMessage(payload, isBinary=True)
        self.case.assertEqual(b"".join((yield client.messages.get())[1]), payload, chain.nodes)
        yield close_ws(client)

    @defer.inlineCallbacks
    def plain_echo(self, port: int, chain: Chain) -> Any:
        client = yield connect_raw(port)
        client.transport.write(b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\n"
                               b"Content-Length: 5\r\nConnection: close\r\n\r\nhello")
        response = yield client.done
        self.case.assertTrue(response.startswith(b"HTTP/1.1 200 "), response)
        self.case.assertTrue(response.endswith(b"hello"), response)

    @defer.inlineCallbacks
    def plain_http(self, port: int, chain: Chain) -> Any:
        client = yield connect_raw(port)
        client.transport.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        response = yield client.done
        self.case.assertTrue(response.startswith(b"HTTP/1.1 200 "), response)
        self.case.assertTrue(response.endswith(b"from the upstream"), response)


class HintTests(unittest.TestCase):
    def test_the_hint_never_names_the_binding_itself(self):
        """A tls server takes connections, but not from itself (it named itself before)."""
        folder = Path(self.mktemp())
        folder.mkdir()
        config = config_of(Chain(["tcp", "tls", "ws", "echo"], "none"), Keys(folder))
        self.assertEqual(checked(config), [
            "bindings.tls.exit: 'ws' is a ws server, which cannot take the connections a tls server hands on "
            "(bindings that can: echo)"])
