"""For zillatw.test.test_reference: a configuration each section's keys are tried in (BASES:
(section, kind) -> (factory, where the key goes)), and a valid value of every key of
docs/config-reference.md (SAMPLES: (section, key) -> a value, or a function that puts it
into the configuration and returns the YAML path errors should name)."""

from __future__ import annotations

import copy
from typing import Any, Callable

from zillatw.test.support import echo_chain, proxy_config

JWT = {"type": "jwt", "options": {"issuer": "https://issuer.example", "audience": "api", "keys": []}}
URL = "http://127.0.0.1:8081"


def _chain() -> dict[str, Any]:
    config = echo_chain()
    bindings = config["bindings"]
    bindings["tcp0"]["routes"] = [{"exit": bindings["tcp0"].pop("exit")}]
    bindings["ws0"]["routes"] = [{"exit": bindings["ws0"].pop("exit")}]
    return config


def _proxied() -> dict[str, Any]:
    config = proxy_config(1)
    for name in ("south_ws_client", "south_http_client"):
        binding = config["bindings"][name]
        binding["routes"] = [{"exit": binding.pop("exit")}]
    return config


def _tls_server() -> dict[str, Any]:
    config = _chain()
    config["bindings"]["tcp0"]["routes"] = [{"exit": "tls0"}]
    config["bindings"]["tls0"] = {"type": "tls", "kind": "server", "vault": "v", "options": {"keys": ["localhost"]},
                                  "routes": [{"exit": "http0"}]}
    config["vaults"] = {"v": {"type": "filesystem", "options": {"keys": {"store": "keys.p12"}}}}
    return config


def _tls_client() -> dict[str, Any]:
    config = _proxied()
    config["bindings"]["south_http_client"]["routes"] = [{"exit": "south_tls_client"}]
    config["bindings"]["south_tls_client"] = {"type": "tls", "kind": "client", "routes": [{"exit": "south_tcp_client"}]}
    return config


def _fan() -> dict[str, Any]:
    config = _chain()
    config["bindings"]["ws0"]["routes"] = [{"exit": "fan0"}]
    config["bindings"]["fan0"] = {"type": "fan", "kind": "server", "exit": "echo_server"}
    return config


def _with(section: str, item: dict[str, Any], factory: Callable[[], dict[str, Any]] = _chain) -> Callable[[], Any]:
    def make() -> dict[str, Any]:
        config = factory()
        *parents, name = section.split(".")
        node = config
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = {"x": copy.deepcopy(item)} if not parents else copy.deepcopy(item)
        return config
    return make


BASES: dict[tuple[str, str | None], tuple[Callable[[], dict[str, Any]], list[Any]]] = {
    ("top level", None): (_chain, []),
    ("bindings", "ws server"): (_chain, ["bindings", "ws0"]),
    ("bindings", "tls server"): (_tls_server, ["bindings", "tls0"]),
    ("tcp", "server"): (_chain, ["bindings", "tcp0"]),
    ("tcp", "client"): (_proxied, ["bindings", "south_tcp_client"]),
    ("tls", "server"): (_tls_server, ["bindings", "tls0"]),
    ("tls", "client"): (_tls_client, ["bindings", "south_tls_client"]),
    ("http", "server"): (_chain, ["bindings", "http0"]),
    ("http", "client"): (_proxied, ["bindings", "south_http_client"]),
    ("ws", "server"): (_chain, ["bindings", "ws0"]),
    ("ws", "client"): (_proxied, ["bindings", "south_ws_client"]),
    ("echo", "server"): (_chain, ["bindings", "echo_server"]),
    ("fan", "server"): (_fan, ["bindings", "fan0"]),
    ("guard jwt", None): (_with("guards", JWT), ["guards", "x"]),
    ("guard x509", None): (_with("guards", {"type": "x509"}), ["guards", "x"]),
    ("catalog inline", None): (_with("catalogs", {"type": "inline", "options": {"subjects": {"s": {"schema": "{}"}}}}),
                               ["catalogs", "x"]),
    ("catalog apicurio-registry", None): (_with("catalogs", {"type": "apicurio-registry", "options": {"url": URL}}),
                                          ["catalogs", "x"]),
    ("catalog schema-registry", None): (_with("catalogs", {"type": "schema-registry", "options": {"url": URL}}),
                                        ["catalogs", "x"]),
    ("exporter prometheus", None): (_with("telemetry.exporters", {"p": {"type": "prometheus", "options": {
        "endpoints": [{"scheme": "http", "port": 9090}]}}}), ["telemetry", "exporters", "p"]),
    ("exporter health", None): (_with("telemetry.exporters", {"h": {"type": "health", "options": {"port": 7180}}}),
                                ["telemetry", "exporters", "h"]),
    ("exporter stdout", None): (_with("telemetry.exporters", {"s": {"type": "stdout"}}),
                                ["telemetry", "exporters", "s"]),
    ("exporter otlp", None): (_with("telemetry.exporters", {"o": {"type": "otlp", "options": {
        "endpoint": {"location": "http://127.0.0.1:4318"}}}}), ["telemetry", "exporters", "o"]),
}


def _set(path: str, change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any], list[Any]], str]:
    """A sample that changes the configuration as a whole; errors name `path`."""
    def apply(config: dict[str, Any], root: list[Any]) -> str:
        change(config)
        return path
    return apply


def _asking_certificates(key: str, value: Any) -> Callable[[dict[str, Any], list[Any]], str]:
    """A tls server key that needs client certificates asked for (options.trust)."""
    def apply(config: dict[str, Any], root: list[Any]) -> str:
        _under("options.trust", ["clients"])(config, root)
        if key.startswith("routes[]"):
            return _route_condition(config, root, key.rpartition(".")[2], value)
        return _under(key, value)(config, root)
    return apply


def _route_condition(config: dict[str, Any], root: list[Any], name: str, value: Any) -> str:
    node: Any = config
    for part in root:
        node = node[part]
    route = node["routes"][0]
    route.setdefault("when", [{}])[0][name] = value
    return ".".join([*map(str, root), "routes[0].when[0]"])


def _x509_authorization(value: Any) -> Callable[[dict[str, Any], list[Any]], str]:
    """A tls server's authorization: it needs a client certificate asked for, and the guard."""
    def apply(config: dict[str, Any], root: list[Any]) -> str:
        config["guards"] = {"x509": {"type": "x509"}}
        _under("options.trust", ["clients"])(config, root)
        return _under("options.authorization", value)(config, root)
    return apply


def _cross_origin(key: str, value: Any) -> Callable[[dict[str, Any], list[Any]], str]:
    """A key of an http server's access-control that only a cross-origin policy takes."""
    def apply(config: dict[str, Any], root: list[Any]) -> str:
        _under("options.access-control.policy", "cross-origin")(config, root)
        return _under(f"options.access-control.{key}", value)(config, root)
    return apply


def _fan_vault(config: dict[str, Any], root: list[Any]) -> str:
    """A fan's vault holds the trust for rediss."""
    config["vaults"] = {"v": {"type": "filesystem", "options": {"trust": {"store": "trust.p12"}}}}
    config["bindings"]["fan0"].update(vault="v", options={"redis": {"url": "rediss://127.0.0.1", "trust": ["ca"]}})
    return "bindings.fan0.vault"


def _under(key: str, value: Any, **siblings: Any) -> Callable[[dict[str, Any], list[Any]], str]:
    """Set a dotted key below the root, with the siblings it needs."""
    def apply(config: dict[str, Any], root: list[Any]) -> str:
        node: Any = config
        for part in root:
            node = node[part]
        *parents, name = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node.update(copy.deepcopy(siblings))
        node[name] = value
        return ".".join([*map(str, root), key])
    return apply


def _pooled(key: str, value: Any) -> Callable[[dict[str, Any], list[Any]], str]:
    """A tcp client key of a pool: `upstreams` instead of host and port (docs/upstreams.md)."""
    def apply(config: dict[str, Any], root: list[Any]) -> str:
        node: Any = config
        for part in root:
            node = node[part]
        options = node.setdefault("options", {})
        options.pop("host", None)
        options.pop("port", None)
        options.setdefault("upstreams", [{"host": "127.0.0.1", "port": 8081}])
        options[key] = copy.deepcopy(value)
        return ".".join([*map(str, root), "options", key])
    return apply


def _guarded_ws_route(config: dict[str, Any]) -> None:
    config["guards"] = {"g": copy.deepcopy(JWT)}
    config["bindings"]["ws0"]["routes"][0]["guarded"] = {"g": ["${method}${path}", "reader"]}


def _binding_metrics(config: dict[str, Any]) -> None:
    config["telemetry"] = {"metrics": ["stream.opens.received"]}
    config["bindings"]["ws0"]["telemetry"] = {"metrics": ["stream.*"]}


def _http_authorization(credentials: dict[str, Any]) -> Callable[[dict[str, Any], list[Any]], str]:
    def change(config: dict[str, Any]) -> None:
        config["guards"] = {"g": copy.deepcopy(JWT)}
        config["bindings"]["http0"]["options"] = {"authorization": {"g": {"credentials": credentials}}}
    return _set("bindings.http0.options.authorization.g", change)


def _top(key: str, value: Any) -> Callable[[dict[str, Any], list[Any]], str]:
    return _set(key.split(".")[0], lambda config: config.update({key.split(".")[0]: value}))


SAMPLES: dict[tuple[str, ...], Any] = {
    # top level
    ("top level", "name"): "other",
    ("top level", "bindings"): _set("bindings", lambda config: None),
    ("top level", "guards"): {"g": JWT},
    ("top level", "guards.<name>.type"): _top("guards", {"g": JWT}),
    ("top level", "guards.<name>.options"): _top("guards", {"g": JWT}),
    ("top level", "guards.<name>.kind"): _set("guards.g.kind", lambda c: c.update(guards={"g": {**JWT, "kind": "x"}})),
    ("top level", "guards.<name>.store"): _set("guards.g.store",
                                               lambda c: c.update(guards={"g": {**JWT, "store": "s"}})),
    ("top level", "vaults"): {"v": {"type": "filesystem"}},
    ("top level", "vaults.<name>.type"): "filesystem",
    ("top level", "vaults.<name>.options"): _top("vaults", {"v": {"type": "filesystem", "options": {}}}),
    ("top level", "catalogs"): {"c": {"type": "inline", "options": {"subjects": {"s": {"schema": "{}"}}}}},
    ("top level", "catalogs.<name>.type"): _top("catalogs", {"c": {"type": "apicurio", "options": {"url": URL}}}),
    ("top level", "catalogs.<name>.options"): _top("catalogs", {"c": {"type": "schema-registry",
                                                                      "options": {"url": URL}}}),
    ("top level", "catalogs.<name>.vault"): _set("catalogs.c.vault", lambda c: c.update(catalogs={"c": {
        "type": "schema-registry", "options": {"url": URL}, "vault": "v"}})),
    ("top level", "stores"): "bogus",
    ("top level", "stores.<name>"): {"type": "memory"},
    ("top level", "telemetry"): {"metrics": ["stream.opens.received"]},
    ("top level", "telemetry.attributes"): {"service.namespace": "x"},
    ("top level", "telemetry.metrics"): ["stream.opens.received", "stream.active.received"],
    ("top level", "telemetry.exporters"): {"e": {"type": "stdout"}},
    ("top level", "telemetry.exporters.<name>.type"): "stdout",
    ("top level", "telemetry.exporters.<name>.options"): _top("telemetry", {"exporters": {"p": {
        "type": "prometheus", "options": {"endpoints": [{"scheme": "http", "port": 9090}]}}}}),
    ("top level", "telemetry.exporters.<name>.vault"): _set("telemetry.exporters.e.vault", lambda c: c.update(
        telemetry={"exporters": {"e": {"type": "stdout", "vault": "v"}}})),
    # every binding
    ("bindings", "type"): "ws",
    ("bindings", "kind"): "server",
    ("bindings", "vault"): "v",
    ("bindings", "options"): {"max-message-size": 4096},
    ("bindings", "routes"): [{"exit": "echo_server"}],
    ("bindings", "routes[].exit"): "echo_server",
    ("bindings", "routes[].when"): [{"protocol": "echo"}],
    ("bindings", "routes[].with"): {"headers": {}},
    ("bindings", "routes[].guarded"): _set("bindings.ws0.routes[0].guarded", _guarded_ws_route),
    ("bindings", "exit"): "echo_server",
    ("bindings", "telemetry"): {"metrics": []},
    ("bindings", "telemetry.metrics"): _set("bindings.ws0.telemetry.metrics", _binding_metrics),
    ("bindings", "telemetry.attributes"): {"method": "x"},
    ("bindings", "catalog"): {},
    ("bindings", "entry"): "x",
    # tcp
    ("tcp", "options.host"): "127.0.0.1",
    ("tcp", "options.port"): 7115,
    ("tcp", "options.backlog"): 128,
    ("tcp", "options.endpoint"): _under("options", {"endpoint": "tcp:0"}),
    ("tcp", "options.upstreams"): _pooled("upstreams", [{"host": "127.0.0.1", "port": 8081}]),
    ("tcp", "options.upstreams[].host"): _pooled("upstreams", [{"host": "localhost", "port": 8081}]),
    ("tcp", "options.upstreams[].port"): _pooled("upstreams", [{"host": "127.0.0.1", "port": 8082}]),
    ("tcp", "options.upstreams[].weight"): _pooled("upstreams", [{"host": "127.0.0.1", "port": 8081, "weight": 2}]),
    ("tcp", "options.balance"): _pooled("balance", "least-connections"),
    ("tcp", "options.retries"): _pooled("retries", 0),
    ("tcp", "options.health"): _pooled("health", {"interval": 2, "timeout": 1, "fails": 2, "passes": 1}),
    ("tcp", "options.health.interval"): _pooled("health", {"interval": 2}),
    ("tcp", "options.health.timeout"): _pooled("health", {"timeout": 1}),
    ("tcp", "options.health.fails"): _pooled("health", {"fails": 3}),
    ("tcp", "options.health.passes"): _pooled("health", {"passes": 2}),
    ("tcp", "options.proxy-protocol"): True,
    ("tcp", "routes[].when[].authority"): "localhost",
    ("tcp", "routes[].when[].cidr"): "127.0.0.0/8",
    ("tcp", "routes[].when[].port"): 7114,
    ("tcp", "routes[].with"): {},
    ("tcp", "vault"): "v",
    ("tcp", "catalog"): {},
    ("tcp", "exit"): "x",
    # tls
    ("tls", "options.version"): "TLSv1.3",
    ("tls", "options.keys"): ["localhost"],
    ("tls", "options.trust"): ["clients"],
    ("tls", "options.signers"): _under("options", {"signers": ["ca"]}),
    ("tls", "options.sni"): ["localhost"],
    ("tls", "options.alpn"): ["http/1.1"],
    ("tls", "options.trustcacerts", "server"): _asking_certificates("options.trustcacerts", True),
    ("tls", "options.trustcacerts", "client"): True,
    ("tls", "options.mutual"): "none",
    ("tls", "options.authorization"): _x509_authorization({"x509": {}}),
    ("tls", "options.authorization.<name>.credentials"): _x509_authorization(
        {"x509": {"credentials": {"certificates": "pem"}}}),
    ("tls", "options.authorization.<name>.credentials.certificates"): _x509_authorization(
        {"x509": {"credentials": {"certificates": "pem"}}}),
    ("tls", "routes[].when[].trust"): _asking_certificates("routes[].when[].trust", ["clients"]),
    ("tls", "routes[].when[].mutual"): _asking_certificates("routes[].when[].mutual", "required"),
    ("tls", "options.handshake-timeout"): 5,
    ("tls", "options.hostname-verification"): True,
    ("tls", "routes[].when[].authority"): "localhost",
    ("tls", "routes[].when[].alpn"): "http/1.1",
    ("tls", "routes[].when[].port"): 7114,
    ("tls", "routes[].with"): {},
    ("tls", "catalog"): {},
    ("tls", "entry"): "x",
    # http
    ("http", "options.versions"): ["http/1.1"],
    ("http", "options.access-control"): {"policy": "same-origin"},
    ("http", "options.access-control.policy"): "cross-origin",
    ("http", "options.access-control.allow"): _cross_origin("allow", {}),
    ("http", "options.access-control.allow.origins"): _cross_origin("allow.origins", ["https://*.example.com"]),
    ("http", "options.access-control.allow.methods"): _cross_origin("allow.methods", ["GET"]),
    ("http", "options.access-control.allow.headers"): _cross_origin("allow.headers", ["x-a"]),
    ("http", "options.access-control.allow.credentials"): _cross_origin("allow.credentials", True),
    ("http", "options.access-control.max-age"): _cross_origin("max-age", 600),
    ("http", "options.access-control.expose"): _cross_origin("expose", {}),
    ("http", "options.access-control.expose.headers"): _cross_origin("expose.headers", ["x-b"]),
    ("http", "options.authorization"): _http_authorization({"headers": {"authorization": "Bearer {credentials}"}}),
    ("http", "options.authorization.<name>.credentials"): _http_authorization({"query": {"t": "{credentials}"}}),
    ("http", "options.authorization.<name>.credentials.headers"): _http_authorization(
        {"headers": {"authorization": "Bearer {credentials}"}}),
    ("http", "options.authorization.<name>.credentials.query"): _http_authorization(
        {"query": {"access_token": "{credentials}"}}),
    ("http", "options.authorization.<name>.credentials.cookies"): _http_authorization(
        {"cookies": {"access_token": "{credentials}"}}),
    ("http", "options.overrides", "server"): {":authority": "example.com:443", ":path": "/echo"},
    ("http", "options.overrides", "client"): {":path": "/upstream", "x-tenant": "blue"},
    ("http", "options.requests", "server"): [{"path": "/", "content": "string"}],
    ("http", "options.requests", "client"): [{"path": "/", "responses": [{"status": 200, "content": "string"}]}],
    ("http", "options.head-timeout"): 5,
    ("http", "options.trusted-proxies"): ["10.0.0.0/8", "2001:db8::1"],
    ("http", "options.idle-timeout"): 15,
    ("http", "options.body-timeout"): 20,
    ("http", "options.max-request-body"): 1048576,
    ("http", "options.max-connections"): 8,
    ("http", "options.response-timeout"): 12.5,
    ("http", "routes[].when[].headers"): {":path": "/echo*"},
    ("http", "routes[].with"): {"headers": {"overrides": {":path": "/"}}},
    ("http", "vault"): "v",
    ("http", "catalog"): {},
    # ws
    ("ws", "options.defaults"): {"protocol": "echo", "path": "/echo"},
    ("ws", "options.defaults.protocol"): "echo",
    ("ws", "options.defaults.scheme"): "http",
    ("ws", "options.defaults.authority"): "localhost:8080",
    ("ws", "options.defaults.path"): "/echo",
    ("ws", "options.timeout"): 5,
    ("ws", "options.max-message-size"): 4096,
    ("ws", "options.permessage-deflate"): False,
    ("ws", "options.max-frame-size"): 1024,
    ("ws", "options.close-timeout"): 1,
    ("ws", "options.ping-interval"): 0,
    ("ws", "options.ping-timeout"): 5,
    ("ws", "options.max-connections"): 100,
    ("ws", "options.max-connections-per-client"): 50,
    ("ws", "options.handshake-rate"): {"per-client": 10, "burst": 20},
    ("ws", "options.handshake-rate.per-client"): 0.5,
    ("ws", "options.handshake-rate.burst"): _under("options.handshake-rate.burst", 20, **{"per-client": 10}),
    ("ws", "options.message-rate"): {"rate": 200, "burst": 400},
    ("ws", "options.message-rate.rate"): 200,
    ("ws", "options.message-rate.burst"): _under("options.message-rate.burst", 400, rate=200),
    ("ws", "options.allowed-origins"): ["https://*.example.com"],
    ("ws", "options.messages"): [{"content": "string"}],
    ("ws", "routes[].when[].protocol"): "echo",
    ("ws", "routes[].when[].scheme"): "https",
    ("ws", "routes[].when[].authority"): "localhost:*",
    ("ws", "routes[].when[].path"): "/echo*",
    ("ws", "routes[].with"): {},
    ("ws", "vault"): "v",
    ("ws", "catalog"): {},
    ("ws", "entry"): "x",
    # echo
    ("echo", "options"): {},
    ("echo", "routes"): [],
    ("echo", "exit"): "ws0",
    ("echo", "vault"): "v",
    ("echo", "catalog"): {},
    # fan
    ("fan", "options.redis"): {"url": "redis://127.0.0.1:6379"},
    ("fan", "options.redis.url"): "redis://127.0.0.1:6379/0",
    ("fan", "options.redis.channel"): _under("options.redis", {"url": "redis://127.0.0.1", "channel": "room"}),
    ("fan", "options.redis.max-reconnect-delay"): _under("options.redis", {"url": "redis://127.0.0.1",
                                                                           "max-reconnect-delay": 5}),
    ("fan", "options.max-lag"): 1024 * 1024,
    ("fan", "options.max-lag-messages"): 100,
    ("fan", "options.drain-timeout"): 5,
    ("fan", "routes"): [],
    ("fan", "options.redis.trust"): lambda config, root: (_fan_vault(config, root)
                                                          and "bindings.fan0.options.redis.trust"),
    ("fan", "vault"): _fan_vault,
    ("fan", "catalog"): {},
    # guard x509
    ("guard x509", "options"): {"identity": "subject.cn"},
    ("guard x509", "options.identity"): "san.email",
    ("guard x509", "options.roles"): {"internal": [{"issuer.cn": "Internal CA"}]},
    ("guard x509", "options.attributes"): {"team": "subject.ou"},
    # guard jwt
    ("guard jwt", "options"): {"issuer": "https://other.example", "audience": "api", "keys": []},
    ("guard jwt", "options.issuer"): "https://other.example",
    ("guard jwt", "options.audience"): "other",
    ("guard jwt", "options.keys"): [],
    ("guard jwt", "options.roles"): "realm_access.roles",
    ("guard jwt", "options.identity"): "email",
    ("guard jwt", "options.challenge"): 30,
    ("guard jwt", "options.attributes"): {"tenant": "tid"},
    ("guard jwt", "options.leeway"): 5,
    # catalogs
    ("catalog inline", "options"): {"subjects": {"s": {"schema": "{}", "version": "1"}}},
    ("catalog inline", "options.subjects"): {"t": {"schema": "{}"}},
    ("catalog inline", "options.subjects.<name>.schema"): "{\"type\": \"object\"}",
    ("catalog inline", "options.subjects.<name>.version"): _under("options.subjects", {"n": {"schema": "{}",
                                                                                           "version": "2"}}),
    ("catalog apicurio-registry", "options"): {"url": URL, "group-id": "g"},
    ("catalog apicurio-registry", "options.url"): "https://registry.example",
    ("catalog apicurio-registry", "options.group-id"): "g",
    ("catalog apicurio-registry", "options.use-id"): "contentId",
    ("catalog apicurio-registry", "options.id-encoding"): "legacy",
    ("catalog apicurio-registry", "options.max-age"): 10,
    ("catalog schema-registry", "options"): {"url": URL, "context": "c"},
    ("catalog schema-registry", "options.url"): "https://registry.example",
    ("catalog schema-registry", "options.context"): "c",
    ("catalog schema-registry", "options.max-age"): 10,
    ("catalog schema-registry", "options.credentials"): {"headers": {"authorization": "Basic eDp5"}},
    ("catalog schema-registry", "options.credentials.headers"): {"authorization": "Basic eDp5"},
    ("catalog schema-registry", "options.credentials.headers.authorization"): "Basic eDp5",
    ("catalog schema-registry", "options.tls"): {},
    # exporter prometheus
    ("exporter prometheus", "options.endpoints"): [{"scheme": "http", "port": 9091, "path": "/m"}],
    # exporter health
    ("exporter health", "options.host"): "127.0.0.1",
    ("exporter health", "options.port"): 7181,
    # exporter stdout
    ("exporter stdout", "options.format"): "json",
    # exporter otlp
    ("exporter otlp", "options.interval"): 10,
    ("exporter otlp", "options.signals"): ["logs"],
    ("exporter otlp", "options.endpoint"): {"location": "https://collector.example:4318", "protocol": "http"},
    ("exporter otlp", "options.endpoint.protocol"): "http",
    ("exporter otlp", "options.endpoint.location"): "http://collector.example:4318/otlp/",
    ("exporter otlp", "options.endpoint.overrides"): {"metrics": "/m", "logs": "http://other.example/l"},
    ("exporter otlp", "options.endpoint.overrides.metrics"): "v2/metrics",
    ("exporter otlp", "options.endpoint.overrides.logs"): "/v2/logs",
    ("exporter otlp", "options.credentials"): {"headers": {"authorization": "Bearer x"}},
    ("exporter otlp", "options.credentials.headers"): {"authorization": "Bearer x"},
    ("exporter otlp", "options.credentials.headers.authorization"): "Basic eDp5",
    ("exporter otlp", "options.tls"): {"trust": ["ca"]},
}
