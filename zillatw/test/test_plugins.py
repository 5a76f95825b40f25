"""The plug-in contract (zillatw.config.plugins): a binding type of one's own, registered on a
registry, is validated, checked, built and served like the built-in ones."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest
from zope.interface import implementer

from zillatw import ConfigError, build_gateway
from zillatw.config import BindingConfig
from zillatw.config.plugins import BindingType, Registry
from zillatw.config.schema import FORBIDDEN
from zillatw.runtime.standard import standard_registry
from zillatw.stream import IStreamEnd, IStreamExit, StreamInfo
from zillatw.test.support import chain, close_ws, connect_ws, start_gateway


@implementer(IStreamEnd)
class _Shouting:
    def __init__(self, peer: IStreamEnd):
        self.peer = peer
        self.pauseProducing, self.resumeProducing = peer.pauseProducing, peer.resumeProducing

    def stream_data(self, opcode: int, payload: bytes, fin: bool) -> None:
        self.peer.stream_data(opcode, payload.upper(), fin)

    def stream_end(self, code: int, reason: str) -> None:
        self.peer.stream_end(code, reason)

    def stopProducing(self) -> None:
        pass


@implementer(IStreamExit)
class Shout:
    """Echoes every message in capitals."""

    def __init__(self, reactor: Any):
        self.reactor = reactor

    def open(self, info: StreamInfo, peer: IStreamEnd) -> _Shouting:
        return _Shouting(peer)


def check(binding: BindingConfig) -> Iterator[tuple[str, str]]:
    if binding.name.startswith("quiet"):
        yield "name", "a shout binding cannot be quiet"


SHOUT = BindingType("shout", {"properties": {"kind": {"enum": ["server"]}, "options": FORBIDDEN}},
                    {"server": ("messages", None)}, lambda binding, graph: Shout(graph.reactor), check=check)


def with_shout(name: str = "shout") -> dict[str, Any]:
    return chain(ws_routes=[{"exit": name}], apps={name: {"type": "shout", "kind": "server"}})


class PluginTests(unittest.TestCase):
    def registry(self) -> Registry:
        return standard_registry().register(SHOUT)

    @defer.inlineCallbacks
    def test_a_registered_binding_type_is_served(self):
        gateway = build_gateway(with_shout(), registry=self.registry(), event_stream=io.StringIO())
        self.assertIsInstance(gateway.binding("shout"), Shout)
        self.assertIs(gateway.binding("shout").reactor, gateway.reactor)  # the graph passed its reactor
        gateway.startService()
        self.addCleanup(gateway.stopService)
        port = (yield gateway.listening)[0]
        client = yield connect_ws(port)
        client.sendMessage(b"hello")
        self.assertEqual((yield client.messages.get()), (False, [b"HELLO"]))
        yield close_ws(client)

    def test_its_check_and_schema_patch_apply(self):
        error = self.assertRaises(ConfigError, build_gateway, with_shout("quiet"), registry=self.registry())
        self.assertEqual(error.problems, ["bindings.quiet.name: a shout binding cannot be quiet"])
        config = with_shout()
        config["bindings"]["shout"]["options"] = {"volume": 11}
        error = self.assertRaises(ConfigError, build_gateway, config, registry=self.registry())
        self.assertEqual(error.problems, ["bindings.shout.options: not allowed for a shout server binding"])

    def test_other_registries_do_not_know_it(self):
        self.registry()
        error = self.assertRaises(ConfigError, build_gateway, with_shout())
        self.assertIn("bindings.shout.type: unknown binding type 'shout'", error.problems[0])

    @defer.inlineCallbacks
    def test_the_built_in_types_serve_as_before(self):
        gateway, port = yield start_gateway(self, chain())
        self.assertEqual(sorted(gateway.registry.bindings), ["echo", "fan", "http", "tcp", "tls", "ws"])
        client = yield connect_ws(port)
        client.sendMessage(b"hello")
        self.assertEqual((yield client.messages.get()), (False, [b"hello"]))
        yield close_ws(client)
