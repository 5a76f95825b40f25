"""The types zillatw serves out of the box, as one registry (see zillatw.config.plugins)."""

from __future__ import annotations

from zillatw.telemetry import metrics

from zillatw.vaults import filesystem as vault
from zillatw.catalogs import apicurio, inline, schema_registry
from zillatw.guards import jwt, x509
from zillatw.config.plugins import Plugin, Registry
from zillatw.bindings.echo import binding as echo
from zillatw.bindings.fan import binding as fan
from zillatw.bindings.http import binding as http
from zillatw.bindings.tcp import binding as tcp
from zillatw.bindings.tls import binding as tls
from zillatw.bindings.ws import binding as ws

BUILT_IN: tuple[Plugin, ...] = (
    tcp.PLUGIN, tls.PLUGIN, http.PLUGIN, ws.PLUGIN, echo.PLUGIN, fan.PLUGIN,
    jwt.PLUGIN, x509.PLUGIN,
    inline.PLUGIN, apicurio.PLUGIN, schema_registry.PLUGIN,
    vault.PLUGIN,
)


def standard_registry() -> Registry:
    """A new registry of the built-in types (a copy each time: registering a type of one's
    own on it changes no other gateway's)."""
    registry = Registry(namespace_checks=[metrics.check])
    for plugin in BUILT_IN:
        registry.register(plugin)
    return registry
