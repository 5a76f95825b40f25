"""The binding graph: one built object per configured binding, wired to its exits.

Bindings are built on first use, so each one can look up the exits it needs while it is
built; config has already rejected unknown names, loops and mismatched stream kinds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from zillatw.config import BindingConfig, Config
from zillatw.config.plugins import Registry
from zillatw.errors import ConfigError
from zillatw.telemetry.events import Events


class BindingGraph:
    """What a configuration's bindings are built from: the registry of types, the reactor
    every one of them uses (for time and sockets: a test passes a Clock or a
    MemoryReactorClock), each namespace's events, and the metrics that meter them."""

    def __init__(self, config: Config, registry: Registry, events: Mapping[str, Events] | None = None,
                 metrics: Any = None, *, reactor: Any):
        self.config = config
        self.reactor = reactor
        self.metrics = metrics  # zillatw.telemetry.metrics.Metrics: meters the exits it hands out, or None
        self.registry = registry
        self._built: dict[str, Any] = {}
        self._events = dict(events or {})
        self._guards: dict[str, Any] = {}
        self._vaults: dict[str, Any] = {}
        self._catalogs: dict[str, Any] = {}

    def events(self, namespace: str) -> Events:
        return self._events.get(namespace) or Events()

    def binding(self, qname: str) -> Any:
        """The built binding (a Twisted factory or a stream exit) for `namespace:name`; the
        routes of other bindings take it through exit()."""
        built = self._built.get(qname)
        if built is None:
            config = self.config.binding(qname)
            built = self._built[qname] = self.registry.bindings[config.type].build(config, self)
        return built

    def exit(self, qname: str, caller: BindingConfig) -> Any:
        """The binding `qname` as an exit of `caller`'s routes: metered (zillatw.telemetry.metrics)
        when either records metrics, else the built binding itself."""
        built = self.binding(qname)
        if self.metrics is None:
            return built
        return self.metrics.metered_exit(caller, self.config.binding(qname), built)

    def ws_server_observer(self, binding: BindingConfig) -> Any:
        """What a ws server reports each upgrade's outcome to (metrics and events), or None."""
        return None if self.metrics is None else self.metrics.ws_server_observer(binding)

    def guard(self, qname: str) -> Any:
        """The built guard for `namespace:name` (a guard of that namespace's `guards`)."""
        built = self._guards.get(qname)
        if built is None:
            namespace, _, name = qname.partition(":")
            config = next(ns for ns in self.config.namespaces if ns.name == namespace).guards[name]
            built = self._guards[qname] = self.registry.guards[config["type"]].build(
                namespace, name, config.get("options") or {}, self)
        return built

    def vault(self, namespace: str, name: str) -> Any:
        """The opened vault `name` of a namespace, read once (ConfigError if it cannot be)."""
        qname = f"{namespace}:{name}"
        opened = self._vaults.get(qname)
        if opened is None:
            item = next(ns for ns in self.config.namespaces if ns.name == namespace).vaults[name]
            where = f"{namespace}: " if len(self.config.namespaces) > 1 else ""
            opened = self._vaults[qname] = self.registry.vaults[item["type"]].open(
                name, item.get("options"), self.config.base_dir, where)
        return opened

    def catalog(self, namespace: str, name: str) -> Any:
        """The built catalog `name` of a namespace (zillatw.catalogs), shared by its users."""
        qname = f"{namespace}:{name}"
        built = self._catalogs.get(qname)
        if built is None:
            item = next(ns for ns in self.config.namespaces if ns.name == namespace).catalogs[name]
            built = self._catalogs[qname] = self.registry.catalogs[item["type"]].build(
                namespace, name, item.get("options") or {}, self, item["type"])
        return built

    def build_all(self) -> dict[str, Any]:
        """Every vault and binding; their problems (unreadable stores, unknown aliases) together."""
        problems: list[str] = []
        steps: list[Callable[[], Any]] = [
            functools.partial(self.vault, ns.name, name) for ns in self.config.namespaces for name in ns.vaults]
        steps += [functools.partial(self.binding, binding.qname) for binding in self.config.bindings()]
        for step in steps:
            try:
                step()
            except ConfigError as e:  # a binding whose exit failed repeats the exit's problems
                problems.extend(p for p in e.problems if p not in problems)
        if problems:
            raise ConfigError(problems)
        return dict(self._built)

    def servers(self, type_: str) -> list[BindingConfig]:
        """Bindings of a type and kind server (the listeners, for tcp)."""
        return [b for b in self.config.bindings() if b.type == type_ and b.kind == "server"]
