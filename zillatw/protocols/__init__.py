"""One module per binding type. Each module gives:

- SCHEMA_PATCH: the JSON Schema its bindings must satisfy (on top of zillatw.schema's);
- STREAMS: kind -> (the stream kind it accepts, the kind it hands to its exits or None),
  where stream kinds are "bytes" (a connection), "http" (a request) and "messages" (ws);
- check(binding) (optional): extra checks yielding (sub-path, message);
- build(binding, graph): the binding's Twisted factory or stream exit.
"""

from __future__ import annotations

import importlib
from types import ModuleType

BINDING_TYPES = {
    "tcp": "zillatw.protocols.tcp",
    "http": "zillatw.protocols.http",
    "ws": "zillatw.protocols.ws",
    "echo": "zillatw.protocols.echo",
    "fan": "zillatw.protocols.fan",
    "tls": "zillatw.protocols.tls",
}


def binding_types() -> dict[str, ModuleType]:
    return {name: importlib.import_module(module) for name, module in BINDING_TYPES.items()}
