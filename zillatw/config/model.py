"""zilla.yaml as values: namespaces, bindings and routes, frozen once loaded.

A leaf: it imports nothing else of zillatw, so every layer may use it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


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


# Keys whose values are secrets wherever they appear: passwords, an oct JWK's key `k`
# (RFC 7518 §6.4.1; the jwt guard's schema refuses the private members of other key types),
# and the `authorization` header an exporter or a catalog sends (credentials.headers).
SECRET_KEYS = frozenset({"password", "secret", "k", "authorization"})
_URL_PASSWORD = re.compile(r"^([a-z][a-z0-9+.\-]*://[^/@:]*):[^/@]*@", re.IGNORECASE)


def _redacted(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: "REDACTED" if k in SECRET_KEYS and isinstance(v, str) else _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"\1:REDACTED@", value)  # redis://user:password@host
    return value


