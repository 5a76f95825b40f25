"""zillatw: a WebSocket gateway on Twisted that serves Zilla's zilla.yaml.

Embedding::

    from zillatw import build_gateway
    gateway = build_gateway("zilla.yaml")      # or a dict; ConfigError if invalid
    gateway.setServiceParent(application)      # or gateway.startService()
"""

from zillatw.errors import ConfigError
from zillatw.runtime.gateway import Gateway, build_gateway, load_config

__all__ = ["ConfigError", "Gateway", "build_gateway", "load_config"]
__version__ = "0.1.0"
