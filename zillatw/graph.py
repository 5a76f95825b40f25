"""The binding graph: one built object per configured binding, wired to its exits.

Bindings are built on first use, so each one can look up the exits it needs while it is
built; config has already rejected unknown names, loops and mismatched stream kinds.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

from zillatw.config import BindingConfig, Config
from zillatw.telemetry import Events


class BindingGraph:
    def __init__(self, config: Config, types: Mapping[str, ModuleType], events: Mapping[str, Events] | None = None):
        self.config = config
        self._types = types
        self._built: dict[str, Any] = {}
        self._events = dict(events or {})
        self._guards: dict[str, Any] = {}

    def events(self, namespace: str) -> Events:
        return self._events.get(namespace) or Events()

    def binding(self, qname: str) -> Any:
        """The built binding (a Twisted factory or a stream exit) for `namespace:name`."""
        built = self._built.get(qname)
        if built is None:
            config = self.config.binding(qname)
            built = self._built[qname] = self._types[config.type].build(config, self)
        return built

    def guard(self, qname: str) -> Any:
        """The built guard for `namespace:name` (a guard of that namespace's `guards`)."""
        built = self._guards.get(qname)
        if built is None:
            from zillatw.guards import build_guard
            namespace, _, name = qname.partition(":")
            config = next(ns for ns in self.config.namespaces if ns.name == namespace).guards[name]
            built = self._guards[qname] = build_guard(config["type"], namespace, name,
                                                      config.get("options") or {}, self)
        return built

    def build_all(self) -> dict[str, Any]:
        for binding in self.config.bindings():
            self.binding(binding.qname)
        return dict(self._built)

    def servers(self, type_: str) -> list[BindingConfig]:
        """Bindings of a type and kind server (the listeners, for tcp)."""
        return [b for b in self.config.bindings() if b.type == type_ and b.kind == "server"]
