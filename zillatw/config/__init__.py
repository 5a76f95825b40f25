"""zilla.yaml as data: the model (model.py, a leaf), loading (loading.py: parse, resolve,
validate), the checks no schema can make (checks.py), the JSON Schema (schema.py), bounded YAML
(yamlload.py) and the plug-in contract (plugins.py). Nothing here knows of sockets."""

from zillatw.config.checks import ROLE_PLACEHOLDERS, check_roles
from zillatw.config.loading import load
from zillatw.config.model import SECRET_KEYS, BindingConfig, Config, NamespaceConfig, Route

__all__ = ["ROLE_PLACEHOLDERS", "SECRET_KEYS", "BindingConfig", "Config", "NamespaceConfig", "Route",
           "check_roles", "load"]
