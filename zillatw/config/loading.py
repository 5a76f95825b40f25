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
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import jsonschema
import yaml

from zillatw.config.checks import cross_check
from zillatw.config.model import BindingConfig, Config, NamespaceConfig, Route
from zillatw.errors import ConfigError, did_you_mean
from zillatw.config.schema import FORBIDDEN, KINDS, engine_schema
from zillatw.config.yamlload import DEFAULT_LIMITS, Limits, read_documents

if TYPE_CHECKING:
    from zillatw.config.plugins import BindingType, Registry

_EXPRESSION = re.compile(r"\$\{\{\s*([a-zA-Z0-9_.\-#]+)\s*\}\}")




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


