"""The plug-in contract: what a binding, guard, catalog or vault type gives zillatw.

A type is one module that describes itself with one record, its `PLUGIN`:

    PLUGIN = BindingType("echo", schema_patch=SCHEMA_PATCH, streams=STREAMS, build=build)

Every hook is a field of that record, with a default that does nothing, so nothing is ever
looked up by name on a module (no `hasattr`/`getattr` probing). A `Registry` holds the
records; it is passed to config loading (zillatw.config.loading.load) and to the binding graph
(zillatw.runtime.graph), so an embedder serves a type of its own with `registry.register(PLUGIN)`
on a copy of `zillatw.runtime.standard.standard_registry()`.

What a built binding may also do is declared with the zope interfaces below, tested with
`providedBy` by the gateway (zillatw.runtime.gateway): connections to drain on shutdown, background
work (a fan's Redis link) to start and stop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zope.interface import Interface

if TYPE_CHECKING:
    from zillatw.config.model import BindingConfig, NamespaceConfig

# (sub-path under the checked entry, what is wrong there)
Problem = tuple[str, str]


def _no_problems(*_: Any) -> Iterator[Problem]:
    return iter(())


def _no_reference_problem(options: Mapping[str, Any], ref: Mapping[str, Any]) -> str | None:
    return None


def _no_schema_text(options: Mapping[str, Any], ref: Mapping[str, Any]) -> str | None:
    return None


@dataclass(frozen=True)
class BindingType:
    """A binding type (zillatw.bindings.*).

    - schema_patch: the JSON Schema its bindings must satisfy, on top of zillatw.config.schema's;
    - streams: kind -> (the stream kind it accepts, or a tuple of kinds, the kind it hands
      its exits, or None); stream kinds are "bytes" (a connection), "http" (a request),
      "messages" (WebSocket);
    - build(binding, graph): the binding's Twisted factory or stream exit; `graph.reactor`
      is the reactor it must use for time and sockets;
    - check(binding): extra problems of one binding;
    - guard_references(binding): (sub-path, guard name) of guards its options name;
    - check_in_namespace(binding, namespace, registry): problems that need the rest of the
      namespace (the catalogs a ws server's models name);
    - guarded_kinds: the kinds whose routes may be `guarded`; unguarded_why says why the
      others may not (in the error).
    """

    name: str
    schema_patch: Mapping[str, Any]
    streams: Mapping[str, tuple[str | tuple[str, ...] | None, str | None]]
    build: Callable[["BindingConfig", Any], Any]
    check: Callable[["BindingConfig"], Iterable[Problem]] = _no_problems
    guard_references: Callable[["BindingConfig"], Iterable[tuple[str, str]]] = _no_problems
    check_in_namespace: Callable[["BindingConfig", "NamespaceConfig", "Registry"], Iterable[Problem]] = _no_problems
    guarded_kinds: frozenset[str] = frozenset()
    unguarded_why: str = "no session reaches it; guard the routes of the http or ws server in front of it"


@dataclass(frozen=True)
class GuardType:
    """A guard type (zillatw.guards.*): build(namespace, name, options, graph) gives the
    guard (its `authorize(credentials, trace_id)` grants a Session); check(name, options)."""

    name: str
    schema_patch: Mapping[str, Any]
    build: Callable[[str, str, Mapping[str, Any], Any], Any]
    check: Callable[[str, Mapping[str, Any]], Iterable[Problem]] = _no_problems


@dataclass(frozen=True)
class CatalogType:
    """A catalog type (zillatw.catalogs.*), under each of its `names` (aliases Zilla accepts).

    - build(namespace, name, options, graph, type_): the catalog (hands out SchemaHandles);
    - check(name, options): problems of the catalog entry;
    - check_reference(options, ref): why a model's schema reference cannot work here, or None;
    - schema_text(options, ref): the schema's text when known without fetching (inline)."""

    names: tuple[str, ...]
    schema_patch: Mapping[str, Any]
    build: Callable[[str, str, Mapping[str, Any], Any, str], Any]
    check: Callable[[str, Mapping[str, Any]], Iterable[Problem]] = _no_problems
    check_reference: Callable[[Mapping[str, Any], Mapping[str, Any]], str | None] = _no_reference_problem
    schema_text: Callable[[Mapping[str, Any], Mapping[str, Any]], str | None] = _no_schema_text


@dataclass(frozen=True)
class VaultType:
    """A vault type: open(name, options, base_dir, where) reads it once (ConfigError if not)."""

    name: str
    open: Callable[[str, Mapping[str, Any] | None, Path, str], Any]


Plugin = BindingType | GuardType | CatalogType | VaultType


@dataclass
class Registry:
    """The types a gateway serves, by the name zilla.yaml gives them, plus checks of a
    namespace as a whole (`namespace_checks`: (namespace, where) -> problem strings, e.g.
    zillatw.telemetry.metrics.check for `telemetry`)."""

    bindings: dict[str, BindingType] = field(default_factory=dict)
    guards: dict[str, GuardType] = field(default_factory=dict)
    catalogs: dict[str, CatalogType] = field(default_factory=dict)
    vaults: dict[str, VaultType] = field(default_factory=dict)
    namespace_checks: list[Callable[["NamespaceConfig", str], Iterable[str]]] = field(default_factory=list)

    def register(self, plugin: Plugin) -> "Registry":
        """Add (or replace) a type; returns the registry, for chaining."""
        if isinstance(plugin, BindingType):
            self.bindings[plugin.name] = plugin
        elif isinstance(plugin, GuardType):
            self.guards[plugin.name] = plugin
        elif isinstance(plugin, CatalogType):
            for name in plugin.names:
                self.catalogs[name] = plugin
        elif isinstance(plugin, VaultType):
            self.vaults[plugin.name] = plugin
        else:
            raise TypeError(f"not a zillatw plug-in record: {plugin!r}")
        return self

    def copy(self) -> "Registry":
        return Registry(dict(self.bindings), dict(self.guards), dict(self.catalogs), dict(self.vaults),
                        list(self.namespace_checks))


# ---------------------------------------------------------------------------- built bindings

class IHoldsConnections(Interface):
    """A built binding with connections of its own, which the gateway waits for on stop."""

    def open_count() -> int:
        """Connections not yet closed (open or opening)."""

    def drop_all() -> None:
        """Drop every connection now (the drain timeout has passed)."""


class IDrainsGracefully(IHoldsConnections):
    """A binding that can ask its connections to close first (WebSocket 1001, http 503)."""

    def going_away() -> None:
        """The gateway is stopping: close every connection cleanly."""


class IRunsInBackground(Interface):
    """A binding with work besides its connections (a fan's Redis link)."""

    def start_service() -> None:
        """The gateway serves this binding from now on."""

    def stop_service() -> Any:
        """The binding is retired or the gateway stops; a Deferred (or None) when done."""
