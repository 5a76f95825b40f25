"""The checks no JSON Schema can make: exits that exist and take what their binding hands
on, guards, vaults and catalogs that are named and served, roles, and exit loops. Each plug-in
type adds its own (zillatw.config.plugins)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from zillatw.config.model import BindingConfig, Config, NamespaceConfig
from zillatw.errors import did_you_mean

if TYPE_CHECKING:
    from zillatw.config.plugins import BindingType, Registry

# The placeholders of a dynamic role (zillatw.guards.resolve_role), and the request header
# each is replaced with.
ROLE_PLACEHOLDERS = {"${method}": ":method", "${path}": ":path"}
_PLACEHOLDER = re.compile(r"\$\{[^}]*\}")


def check_roles(roles: tuple[str, ...] | list[str]) -> Iterator[tuple[int, str]]:
    """(index, problem) for each role with a placeholder Zilla does not resolve."""
    for index, role in enumerate(roles):
        for placeholder in _PLACEHOLDER.findall(role):
            if placeholder not in ROLE_PLACEHOLDERS:
                yield index, (f"unknown placeholder '{placeholder}'{did_you_mean(placeholder, ROLE_PLACEHOLDERS)} "
                              f"(a dynamic role may use {' and '.join(ROLE_PLACEHOLDERS)})")


def cross_check(config: Config, registry: Registry, prefix: bool) -> Iterable[str]:
    """Every problem of `config` that its schema cannot see, each as `path: what is wrong`."""
    names = [ns.name for ns in config.namespaces]
    if len(set(names)) != len(names):
        yield f"name: namespace '{next(n for n in names if names.count(n) > 1)}' is defined twice"
    everything = {b.qname: b for b in config.bindings()}
    for ns in config.namespaces:
        where = f"{ns.name}: " if prefix else ""
        yield from _check_sections(ns, registry, where)
        for check_namespace in registry.namespace_checks:  # telemetry: metrics names, exporters, globs
            yield from check_namespace(ns, where)
        for binding in ns.bindings.values():
            yield from _check_binding(binding, ns, registry, everything, f"{where}bindings.{binding.name}")
    yield from _check_cycles(everything, prefix)


def _check_sections(ns: NamespaceConfig, registry: Registry, where: str) -> Iterable[str]:
    """Names the schema admits (Zilla's) but this registry does not serve are refused by
    name, so that a guard, vault or catalog is never silently ignored."""
    sections: tuple[tuple[str, Mapping[str, Any], Mapping[str, Any]], ...] = (
        ("guards", ns.guards, registry.guards), ("vaults", ns.vaults, registry.vaults),
        ("catalogs", ns.catalogs, registry.catalogs))
    for section, items, supported in sections:
        for name, item in items.items():
            if item["type"] not in supported:
                yield (f"{where}{section}.{name}.type: {section[:-1]} type '{item['type']}' is not supported "
                       f"by this zillatw yet" + (f" (supported: {', '.join(supported)})" if supported else ""))
            elif section != "vaults":
                for subpath, message in supported[item["type"]].check(name, item.get("options") or {}):
                    yield f"{where}{section}.{name}.{subpath}: {message}"


def _check_binding(binding: BindingConfig, ns: NamespaceConfig, registry: Registry,
                   everything: Mapping[str, BindingConfig], base: str) -> Iterable[str]:
    plugin = registry.bindings[binding.type]
    if binding.vault and binding.vault not in ns.vaults:
        yield f"{base}.vault: no vault named '{binding.vault}'{did_you_mean(binding.vault, ns.vaults)}"
    yield from _check_routes(binding, ns, registry, everything, base)
    for subpath, message in plugin.check(binding):
        yield f"{base}.{subpath}: {message}"
    for subpath, guard in plugin.guard_references(binding):
        if guard not in ns.guards:
            yield f"{base}.{subpath}: no guard named '{guard}'{did_you_mean(guard, ns.guards)}"
    for subpath, message in plugin.check_in_namespace(binding, ns, registry):
        yield f"{base}.{subpath}: {message}"  # e.g. models and the catalogs they name


def _check_routes(binding: BindingConfig, ns: NamespaceConfig, registry: Registry,
                  everything: Mapping[str, BindingConfig], base: str) -> Iterable[str]:
    plugin = registry.bindings[binding.type]
    emits = plugin.streams.get(binding.kind, (None, None))[1]
    has_binding_exit = binding.exit is not None
    for route in binding.routes:
        is_binding_exit = has_binding_exit and route is binding.routes[-1]
        rpath = f"{base}.exit" if is_binding_exit else f"{base}.routes[{route.index}]"
        if route.exit is not None:
            epath = rpath if is_binding_exit else f"{rpath}.exit"
            yield from _check_exit(epath, route.exit, binding, everything, registry.bindings, emits, ns.name)
        if route.guarded and binding.kind not in plugin.guarded_kinds:
            yield (f"{rpath}.guarded: the routes of {_a(binding.type)} {binding.kind} cannot be guarded "
                   f"in this zillatw ({plugin.unguarded_why})")
        for guard, roles in route.guarded.items():
            if guard not in ns.guards:
                yield f"{rpath}.guarded: no guard named '{guard}'{did_you_mean(guard, ns.guards)}"
            for index, problem in check_roles(roles):
                yield f"{rpath}.guarded.{guard}[{index}]: {problem}"


_STREAM_WORDS = {"bytes": "connections", "http": "HTTP requests", "messages": "WebSocket messages"}


def _check_exit(path: str, exit_: str, binding: BindingConfig, everything: Mapping[str, BindingConfig],
                types: Mapping[str, BindingType], emits: str | None, namespace: str) -> Iterable[str]:
    target = everything.get(exit_)
    if target is None:
        local = [q.partition(":")[2] for q in everything if q.startswith(namespace + ":")]
        shown = exit_.partition(":")[2] if exit_.startswith(namespace + ":") else exit_
        yield f"{path}: no binding named '{shown}'{did_you_mean(shown, local)}"
        return
    if emits is not None and emits not in _accepted(types, target):
        # never the binding itself (a tls server takes connections, but not from itself)
        fitting = sorted(q.partition(":")[2] for q, b in everything.items()
                         if emits in _accepted(types, b) and q != binding.qname)
        words = _STREAM_WORDS.get(emits, emits)
        can = f" (bindings that can: {', '.join(fitting)})" if fitting else ""
        yield (f"{path}: '{target.name}' is {_a(target.type)} {target.kind}, which cannot take the {words} "
               f"{_a(binding.type)} {binding.kind} hands on{can}")
    elif emits is not None and target.kind == "client" and binding.kind == "server" and emits == "bytes":
        # A server's connection is for a server binding to take; a client opens its own
        # (there is no tcp or tls proxy)
        yield (f"{path}: '{target.name}' is {_a(target.type)} client, which connects upstream for the bindings "
               f"before it; the connections {_a(binding.type)} server accepts are taken by a server binding "
               f"(a tcp or tls proxy is not served by this zillatw)")
    elif emits is not None and binding.kind == "client" and target.kind != "client":
        yield (f"{path}: '{target.name}' is {_a(target.type)} {target.kind}; {_a(binding.type)} client's exit "
               f"carries its upstream connection, so it must be a client binding")


def _accepted(types: Mapping[str, BindingType], binding: BindingConfig) -> tuple[str | None, ...]:
    """The stream kinds a binding takes: one, or several (echo takes messages and bytes)."""
    accepts = types[binding.type].streams.get(binding.kind, (None, None))[0]
    return accepts if isinstance(accepts, tuple) else (accepts,)


def _a(word: str) -> str:
    """'an echo', 'a ws' (the same vowel rule as _binding_of's)."""
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def _check_cycles(everything: Mapping[str, BindingConfig], prefix: bool) -> Iterable[str]:
    """A chain of exits that comes back to itself would never reach an application."""
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(qname: str, trail: list[str]) -> list[str] | None:
        if state.get(qname) == 2 or qname not in everything:
            return None
        if state.get(qname) == 1:
            return trail[trail.index(qname):] + [qname]
        state[qname] = 1
        for route in everything[qname].routes:
            if route.exit and (found := visit(route.exit, trail + [qname])):
                return found
        state[qname] = 2
        return None

    for qname in everything:
        if (loop := visit(qname, [])) is not None:
            first = everything[loop[0]]  # a binding in the loop, not where the search began
            where = f"{first.namespace}: " if prefix else ""
            yield f"{where}bindings.{first.name}: exits form a loop ({' -> '.join(q.partition(':')[2] for q in loop)})"
            return
