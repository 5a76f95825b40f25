"""Load zilla.yaml: parse, resolve `${{env.NAME}}`, validate, cross-check, and model it.

Nothing here knows of sockets, and nothing here imports a binding, guard, catalog or
metrics module: the types served come in a registry (zillatw.config.plugins.Registry; the built-in
ones: zillatw.runtime.standard.standard_registry()), each giving its schema patch, the stream kinds
it accepts and emits, and its checks.
An invalid file raises ConfigError listing every problem as `path: what was expected`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import jsonschema
import yaml

from zillatw.errors import ConfigError, did_you_mean
from zillatw.config.schema import FORBIDDEN, KINDS, engine_schema
from zillatw.config.yamlload import DEFAULT_LIMITS, Limits, read_documents

if TYPE_CHECKING:
    from zillatw.config.plugins import BindingType, Registry

_EXPRESSION = re.compile(r"\$\{\{\s*([a-zA-Z0-9_.\-#]+)\s*\}\}")


@dataclass(frozen=True, slots=True)
class Route:
    index: int
    exit: str | None  # qualified "namespace:binding"
    when: tuple[Mapping[str, Any], ...] = ()
    guarded: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    with_: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class BindingConfig:
    namespace: str
    name: str
    type: str
    kind: str
    options: Mapping[str, Any]
    # Zilla appends the binding-level `exit` as a last unconditional route.
    routes: tuple[Route, ...]
    exit: str | None
    vault: str | None
    telemetry: Mapping[str, Any]
    base_dir: Path

    @property
    def qname(self) -> str:
        return f"{self.namespace}:{self.name}"


@dataclass(frozen=True, slots=True)
class NamespaceConfig:
    name: str
    bindings: Mapping[str, BindingConfig]
    telemetry: Mapping[str, Any]
    guards: Mapping[str, Any] = field(default_factory=dict)
    vaults: Mapping[str, Any] = field(default_factory=dict)
    catalogs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    namespaces: tuple[NamespaceConfig, ...]
    source: str
    base_dir: Path
    documents: tuple[Mapping[str, Any], ...] = field(repr=False, default=())

    def binding(self, qname: str) -> BindingConfig:
        namespace, _, name = qname.partition(":")
        for ns in self.namespaces:
            if ns.name == namespace and name in ns.bindings:
                return ns.bindings[name]
        raise KeyError(qname)

    def bindings(self) -> Iterator[BindingConfig]:
        for ns in self.namespaces:
            yield from ns.bindings.values()

    def dump(self) -> str:
        """The resolved configuration as YAML (for `-v`), secrets written REDACTED: it goes
        to logs, and `${{env.NAME}}` resolves passwords into it."""
        return yaml.safe_dump_all([_redacted(d) for d in self.documents], sort_keys=False)


# Keys whose values are secrets wherever they appear: passwords, and an oct JWK's key `k`
# (RFC 7518 §6.4.1; the jwt guard's schema refuses the private members of other key types).
SECRET_KEYS = frozenset({"password", "secret", "k"})
_URL_PASSWORD = re.compile(r"^([a-z][a-z0-9+.\-]*://[^/@:]*):[^/@]*@", re.IGNORECASE)


def _redacted(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: "REDACTED" if k in SECRET_KEYS and isinstance(v, str) else _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"\1:REDACTED@", value)  # redis://user:password@host
    return value


# ---------------------------------------------------------------------------- loading

def load(source: str | os.PathLike[str] | Mapping[str, Any] | list[Mapping[str, Any]],
         registry: Registry,
         env: Mapping[str, str] | None = None,
         base_dir: str | os.PathLike[str] | None = None,
         limits: Limits = DEFAULT_LIMITS) -> Config:
    """Load a configuration from a file path, a dict, or a list of dicts (namespaces).
    A file is read within `limits` (size, nodes, nesting: zillatw.config.yamlload)."""
    env = os.environ if env is None else env
    if isinstance(source, Mapping):
        documents, origin = [source], "<dict>"
        folder = Path(base_dir or os.getcwd())
    elif isinstance(source, list):
        documents, origin = list(source), "<dict>"
        folder = Path(base_dir or os.getcwd())
    else:
        path = Path(source)
        origin, folder = str(path), Path(base_dir or path.resolve().parent)
        documents = _read_yaml(path, limits)

    problems: list[str] = []
    prefix_names = len(documents) > 1
    resolved: list[Mapping[str, Any]] = []
    for index, document in enumerate(documents):
        where = f"documents[{index}]." if prefix_names else ""
        if not isinstance(document, Mapping):
            problems.append(f"{where.rstrip('.') or 'top level'}: expected a mapping with 'name' and 'bindings', "
                            f"got {_type_name(document)}")
            continue
        document = _resolve(document, env, where.rstrip("."), problems)
        resolved.append(document)
    if problems:
        raise ConfigError(problems)

    validator = jsonschema.Draft202012Validator(engine_schema(
        {t: plugin.schema_patch for t, plugin in registry.bindings.items()},
        {t: plugin.schema_patch for t, plugin in registry.guards.items()},
        {t: plugin.schema_patch for t, plugin in registry.catalogs.items()}))
    for index, document in enumerate(resolved):
        where = f"{document.get('name', f'documents[{index}]')}: " if prefix_names else ""
        errors = sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
        enum_paths = [tuple(e.absolute_path) for e in errors if e.validator == "enum"]
        # The engine's schema and a type's patch both refuse an unknown key: report the
        # patch's, whose list of expected keys is the narrower (the one that applies).
        unknown: dict[tuple[Any, ...], jsonschema.ValidationError] = {}
        for error in errors:
            if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
                known = error.schema.get("properties", {})
                at = (tuple(error.absolute_path), frozenset(k for k in error.instance if k not in known))
                if at not in unknown or _served(known) < _served(unknown[at].schema.get("properties", {})):
                    unknown[at] = error
        chosen = {id(e) for e in unknown.values()}
        # A key the engine refuses with a reason may also be forbidden by the type: the reason.
        refused = {tuple(e.absolute_path) for e in errors if e.validator == "not" and "x-refused" in e.schema}
        for error in errors:
            if error.validator == "additionalProperties" and id(error) not in chosen:
                continue
            if error.validator == "not" and "x-refused" not in error.schema and tuple(error.absolute_path) in refused:
                continue
            # A kind outside Zilla's fails the engine's enum and the type's narrower one: say it once.
            if error.validator == "enum" and error.schema["enum"] == KINDS and \
                    enum_paths.count(tuple(error.absolute_path)) > 1:
                continue
            problem = where + _describe(error, document)
            # The engine's schema and a type's patch may both refuse the same key: say it once.
            if problem not in problems:
                problems.append(problem)
    if problems:
        raise ConfigError(problems)

    config = _model(resolved, origin, folder)
    problems.extend(cross_check(config, registry, prefix_names))
    if problems:
        raise ConfigError(problems)
    return config


def _read_yaml(path: Path, limits: Limits = DEFAULT_LIMITS) -> list[Any]:
    documents = [d for d in read_documents(path, limits) if d is not None]
    if not documents:
        raise ConfigError(f"{path}: the configuration is empty (expected at least 'name' and 'bindings')")
    return documents


def _resolve(value: Any, env: Mapping[str, str], path: str, problems: list[str]) -> Any:
    """Replace `${{env.NAME}}` expressions in every string."""
    if isinstance(value, Mapping):
        return {k: _resolve(v, env, _join(path, k), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, env, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${{" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        expression = match.group(1)
        scope, _, name = expression.partition(".")
        if scope != "env":
            problems.append(f"{path}: the resolver '{scope}' in '${{{{{expression}}}}}' is not supported "
                            "(zillatw resolves ${{env.NAME}})")
            return ""
        if name not in env:
            problems.append(f"{path}: environment variable {name} is not set (used as '${{{{env.{name}}}}}')")
            return ""
        return env[name]

    return _EXPRESSION.sub(substitute, value)


# ---------------------------------------------------------------------------- schema errors

def _join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _path_of(error: jsonschema.ValidationError) -> str:
    path = ""
    for key in error.absolute_path:
        path = _join(path, key)
    return path or "top level"


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "nothing"}.get(type(value), type(value).__name__)


def _binding_of(error: jsonschema.ValidationError, document: Mapping[str, Any]) -> str:
    """'a ws server binding' for errors under bindings.<name>, else ''."""
    path = list(error.absolute_path)
    if len(path) >= 2 and path[0] == "bindings":
        binding = document.get("bindings", {}).get(path[1], {})
        if isinstance(binding, Mapping) and "type" in binding:
            article = "an" if str(binding.get("type"))[:1] in "aeiou" else "a"
            return f"{article} {binding.get('type')} {binding.get('kind', '')}".rstrip() + " binding"
    return ""


def _served(properties: Mapping[str, Any]) -> int:
    """How many of a schema's keys zillatw takes (refused ones are not offered in errors)."""
    return sum(1 for v in properties.values() if not (isinstance(v, Mapping) and "x-refused" in v))


def _describe(error: jsonschema.ValidationError, document: Mapping[str, Any]) -> str:
    path, schema, value = _path_of(error), error.schema, error.instance
    kind = error.validator
    if kind == "additionalProperties" and isinstance(value, Mapping):
        allowed = [k for k, v in schema.get("properties", {}).items()
                   if not (isinstance(v, Mapping) and ("x-refused" in v or v == FORBIDDEN))]
        extra = [k for k in value if k not in allowed]
        if len(extra) == 1 and not allowed:
            return f"{_join(path, extra[0])}: not allowed here"
        names = ", ".join(f"'{k}'" for k in extra)
        hint = did_you_mean(extra[0], allowed) if len(extra) == 1 else ""
        return f"{path}: unknown key {names}{hint} (expected one of: {', '.join(allowed)})"
    if kind == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        return f"{path}: missing required key '{missing}'"
    if kind == "enum":
        options = schema["enum"]
        if path.endswith(".type") and path.startswith("bindings."):
            return (f"{path}: unknown binding type '{value}'{did_you_mean(value, options)} "
                    f"(zillatw serves: {', '.join(options)})")
        if path.endswith(".kind") and (where := _binding_of(error, document)):
            return (f"{path}: {where.rsplit(' ', 2)[0]} binding cannot be of kind '{value}' "
                    f"(expected {' or '.join(options)})")
        return f"{path}: expected one of {', '.join(map(str, options))}, got '{value}'{did_you_mean(value, options)}"
    if kind == "not" and "x-refused" in schema:
        return f"{path}: {schema['x-refused']}"
    if kind == "uniqueItems" and isinstance(value, list):
        for index, item in enumerate(value):
            if item in value[:index]:
                return f"{path}[{index}]: {item!r} is listed twice (also at {path}[{value.index(item)}])"
    if kind == "not" and schema == {"not": {}}:
        where = _binding_of(error, document)
        return f"{path}: not allowed" + (f" for {where}" if where else " here")
    if kind == "type":
        expected = schema["type"]
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        return f"{path}: expected {'an' if expected[0] in 'aeiou' else 'a'} {expected}, got {_type_name(value)}"
    if kind == "pattern":
        if schema["pattern"] == r"^[a-zA-Z]+[a-zA-Z0-9\._\-]*$":
            return f"{path}: '{value}' is not a valid name (a letter first, then letters, digits, '.', '_' or '-')"
        return f"{path}: '{value}' does not match {schema['pattern']}"
    if kind in ("anyOf", "oneOf") and "x-expect" in schema:
        deeper = [e for e in error.context if e.path]  # e.g. one bad item of a list
        if deeper:
            return _describe(max(deeper, key=jsonschema.exceptions.relevance), document)
        return f"{path}: expected {schema['x-expect']}, got {_type_name(value)} {value!r}"
    if kind in ("anyOf", "oneOf") and error.context:
        best = jsonschema.exceptions.best_match(error.context)
        return _describe(best, document)
    if kind in ("minimum", "maximum", "minItems", "maxItems", "exclusiveMinimum"):
        return f"{path}: {error.message}"
    if error.validator == "propertyNames":
        return f"{path}: {error.message}"
    return f"{path}: {error.message}"


# ---------------------------------------------------------------------------- model

def _qualify(reference: str, namespace: str) -> str:
    return reference if ":" in reference else f"{namespace}:{reference}"


def _model(documents: list[Mapping[str, Any]], origin: str, folder: Path) -> Config:
    namespaces = []
    for document in documents:
        ns = document["name"]
        bindings = {}
        for name, raw in (document.get("bindings") or {}).items():
            routes = []
            for index, r in enumerate(raw.get("routes") or []):
                routes.append(Route(
                    index=index,
                    exit=_qualify(r["exit"], ns) if r.get("exit") else None,
                    when=tuple(MappingProxyType(dict(w)) for w in r.get("when") or ()),
                    guarded=MappingProxyType({g: tuple(roles) for g, roles in (r.get("guarded") or {}).items()}),
                    with_=r.get("with"),
                ))
            exit_ = _qualify(raw["exit"], ns) if raw.get("exit") else None
            if exit_:
                routes.append(Route(index=len(routes), exit=exit_))
            bindings[name] = BindingConfig(
                namespace=ns, name=name, type=raw["type"], kind=raw["kind"],
                options=MappingProxyType(dict(raw.get("options") or {})),
                routes=tuple(routes), exit=exit_, vault=raw.get("vault"),
                telemetry=MappingProxyType(dict(raw.get("telemetry") or {})), base_dir=folder)
        namespaces.append(NamespaceConfig(
            name=ns, bindings=MappingProxyType(bindings),
            telemetry=MappingProxyType(dict(document.get("telemetry") or {})),
            guards=MappingProxyType(dict(document.get("guards") or {})),
            vaults=MappingProxyType(dict(document.get("vaults") or {})),
            catalogs=MappingProxyType(dict(document.get("catalogs") or {}))))
    return Config(tuple(namespaces), origin, folder, tuple(documents))


# ---------------------------------------------------------------------------- cross-checks

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
    types = registry.bindings
    names = [ns.name for ns in config.namespaces]
    if len(set(names)) != len(names):
        yield f"name: namespace '{next(n for n in names if names.count(n) > 1)}' is defined twice"
    everything = {b.qname: b for b in config.bindings()}
    for ns in config.namespaces:
        where = f"{ns.name}: " if prefix else ""
        # Names the schema admits (Zilla's) but this registry does not serve are refused by
        # name, so that a guard, vault or catalog is never silently ignored.
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
        for check_namespace in registry.namespace_checks:  # telemetry: metrics names, exporters, globs
            yield from check_namespace(ns, where)
        for binding in ns.bindings.values():
            base = f"{where}bindings.{binding.name}"
            plugin = types[binding.type]
            emits = plugin.streams.get(binding.kind, (None, None))[1]
            if binding.vault and binding.vault not in ns.vaults:
                yield f"{base}.vault: no vault named '{binding.vault}'{did_you_mean(binding.vault, ns.vaults)}"
            has_binding_exit = binding.exit is not None
            for route in binding.routes:
                is_binding_exit = has_binding_exit and route is binding.routes[-1]
                rpath = f"{base}.exit" if is_binding_exit else f"{base}.routes[{route.index}]"
                if route.exit is not None:
                    epath = rpath if is_binding_exit else f"{rpath}.exit"
                    yield from _check_exit(epath, route.exit, binding, everything, types, emits, ns.name)
                if route.guarded and binding.kind not in plugin.guarded_kinds:
                    yield (f"{rpath}.guarded: the routes of {_a(binding.type)} {binding.kind} cannot be guarded "
                           f"in this zillatw ({plugin.unguarded_why})")
                for guard, roles in route.guarded.items():
                    if guard not in ns.guards:
                        yield f"{rpath}.guarded: no guard named '{guard}'{did_you_mean(guard, ns.guards)}"
                    for index, problem in check_roles(roles):
                        yield f"{rpath}.guarded.{guard}[{index}]: {problem}"
            for subpath, message in plugin.check(binding):
                yield f"{base}.{subpath}: {message}"
            for subpath, guard in plugin.guard_references(binding):
                if guard not in ns.guards:
                    yield f"{base}.{subpath}: no guard named '{guard}'{did_you_mean(guard, ns.guards)}"
            for subpath, message in plugin.check_in_namespace(binding, ns, registry):
                yield f"{base}.{subpath}: {message}"  # e.g. models and the catalogs they name
    yield from _check_cycles(everything, prefix)


_STREAM_WORDS = {"bytes": "connections", "http": "HTTP requests", "messages": "WebSocket messages"}


def _check_exit(path: str, exit_: str, binding: BindingConfig, everything: Mapping[str, BindingConfig],
                types: Mapping[str, BindingType], emits: str | None, namespace: str) -> Iterable[str]:
    target = everything.get(exit_)
    if target is None:
        local = [q.partition(":")[2] for q in everything if q.startswith(namespace + ":")]
        shown = exit_.partition(":")[2] if exit_.startswith(namespace + ":") else exit_
        yield f"{path}: no binding named '{shown}'{did_you_mean(shown, local)}"
        return
    if emits is not None and not _accepts(types[target.type], target.kind, emits):
        fitting = sorted(q.partition(":")[2] for q, b in everything.items()
                         if _accepts(types[b.type], b.kind, emits))
        words = _STREAM_WORDS.get(emits, emits)
        yield (f"{path}: '{target.name}' is {_a(target.type)} {target.kind}, which cannot take the {words} "
               f"{_a(binding.type)} {binding.kind} hands on" + (f" (bindings that can: {', '.join(fitting)})" if fitting else ""))


def _accepts(plugin: "BindingType", kind: str, stream: str) -> bool:
    """Whether a binding of this type and kind takes `stream` (it may take several kinds)."""
    accepts = plugin.streams.get(kind, (None, None))[0]
    return accepts == stream if not isinstance(accepts, tuple) else stream in accepts


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
