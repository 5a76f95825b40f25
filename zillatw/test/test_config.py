"""zillatw.config.loading.load with zillatw.config.schema and zillatw.errors, without sockets: the example
configs load; YAML documents are namespaces; `${{env.NAME}}` is resolved; and every invalid
configuration raises ConfigError whose .problems name each problem's YAML path, all of them."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from twisted.trial import unittest

from zillatw.config import Config, load
from zillatw.errors import ConfigError, did_you_mean
from zillatw.runtime.standard import standard_registry
from zillatw.telemetry.metrics import SUPPORTED_EXPORTERS
from zillatw.test.support import CONF, echo_chain

TYPES = standard_registry()


def changed(change) -> dict[str, Any]:
    """echo_chain() after `change(config)`."""
    config = copy.deepcopy(echo_chain())
    change(config)
    return config


class ConfigTestCase(unittest.SynchronousTestCase):
    def problems(self, source: Any, **kwargs: Any) -> list[str]:
        with self.assertRaises(ConfigError) as caught:
            load(source, TYPES, **kwargs)
        return caught.exception.problems

    def assertProblems(self, source: Any, expected: list[str], **kwargs: Any) -> None:
        self.assertEqual(self.problems(source, **kwargs), expected)


class ExampleConfigTests(ConfigTestCase):
    def test_ws_echo(self):
        config = load(os.path.join(CONF, "ws.echo.yaml"), TYPES, env={})
        self.assertEqual([ns.name for ns in config.namespaces], ["example"])
        self.assertEqual(list(config.namespaces[0].bindings),
                         ["north_tcp_server", "north_http_server", "north_ws_server", "north_echo_server"])
        ws = config.binding("example:north_ws_server")
        self.assertEqual((ws.type, ws.kind, ws.exit), ("ws", "server", None))
        self.assertEqual(len(ws.routes), 1)
        self.assertEqual(ws.routes[0].exit, "example:north_echo_server")
        self.assertEqual(dict(ws.routes[0].when[0]), {"protocol": "echo"})
        self.assertEqual(config.binding("example:north_tcp_server").options["port"], [7114])
        self.assertEqual(dict(config.namespaces[0].telemetry),
                         {"exporters": {"stdout_logs_exporter": {"type": "stdout"}}})

    def test_ws_reflect(self):
        config = load(os.path.join(CONF, "ws.reflect.yaml"), TYPES, env={})
        fan = config.binding("example:north_fan_server")
        self.assertEqual((fan.type, fan.exit), ("fan", "example:north_echo_server"))
        self.assertEqual(config.binding("example:north_ws_server").routes[0].exit, "example:north_fan_server")

    def test_ws_proxy(self):
        config = load(os.path.join(CONF, "ws.proxy.yaml"), TYPES, env={})
        chain = [(b.name, b.type, b.kind, b.exit) for b in config.bindings()]
        self.assertEqual(chain[2:], [
            ("north_ws_server", "ws", "server", "example:south_ws_client"),
            ("south_ws_client", "ws", "client", "example:south_http_client"),
            ("south_http_client", "http", "client", "example:south_tcp_client"),
            ("south_tcp_client", "tcp", "client", None),
        ])
        self.assertEqual(dict(config.binding("example:south_tcp_client").options), {"host": "localhost", "port": 8080})

    def test_file_source_and_base_dir(self):
        path = os.path.join(CONF, "ws.echo.yaml")
        config = load(path, TYPES, env={})
        self.assertEqual(config.source, path)
        self.assertEqual(config.base_dir, Path(CONF).resolve())
        self.assertEqual(config.binding("example:north_ws_server").base_dir, Path(CONF).resolve())

    def test_explicit_base_dir(self):
        config = load(echo_chain(), TYPES, env={}, base_dir="/srv/zilla")
        self.assertEqual(config.source, "<dict>")
        self.assertEqual(config.binding("test:ws0").base_dir, Path("/srv/zilla"))

    def test_binding_exit_becomes_the_last_unconditional_route(self):
        config = load(changed(lambda c: c["bindings"]["ws0"].update(
            routes=[{"when": [{"protocol": "chat"}], "exit": "echo_server"}])), TYPES, env={})
        routes = config.binding("test:ws0").routes
        self.assertEqual([(r.index, r.exit, len(r.when)) for r in routes],
                         [(0, "test:echo_server", 1), (1, "test:echo_server", 0)])

    def test_unknown_qualified_name_is_a_key_error(self):
        config = load(echo_chain(), TYPES, env={})
        self.assertRaises(KeyError, config.binding, "test:nope")
        self.assertRaises(KeyError, config.binding, "other:ws0")

    def test_dump_is_the_resolved_yaml(self):
        source = changed(lambda c: c["bindings"]["tcp0"]["options"].update(host="${{env.HOST}}"))
        dumped = load(source, TYPES, env={"HOST": "127.0.0.2"}).dump()
        self.assertIn("      host: 127.0.0.2\n", dumped)
        self.assertNotIn("env.HOST", dumped)
        self.assertTrue(dumped.startswith("name: test\nbindings:\n  tcp0:\n"))

    def test_dump_writes_secrets_redacted(self):
        # -v prints the resolved configuration: passwords come in from ${{env.NAME}}
        def secrets(config):
            config["vaults"] = {"v": {"type": "filesystem", "options": {
                "keys": {"store": "k.p12", "type": "pkcs12", "password": "${{env.KEYSTORE_PASSWORD}}"}}}}
            config["guards"] = {"g": {"type": "jwt", "options": {"issuer": "i", "audience": "a", "keys": [
                {"kty": "oct", "kid": "o", "k": "c2VjcmV0LWtleS1ieXRlcw"},
                {"kty": "RSA", "kid": "r", "n": "public-modulus", "e": "AQAB"}]}}}
            config["bindings"]["fan0"] = {"type": "fan", "kind": "server", "exit": "echo_server",
                                          "options": {"redis": {"url": "redis://alice:pa55word@redis:6379/0"}}}
        dumped = load(changed(secrets), TYPES, env={"KEYSTORE_PASSWORD": "hunter2"}).dump()
        for secret in ("hunter2", "c2VjcmV0LWtleS1ieXRlcw", "pa55word"):
            self.assertNotIn(secret, dumped)
        self.assertIn("password: REDACTED", dumped)
        self.assertIn("redis://alice:REDACTED@redis:6379/0", dumped)
        self.assertIn("n: public-modulus", dumped)  # what is public stays readable


class NamespaceTests(ConfigTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        Path(path).write_text(text)
        return path

    def test_yaml_documents_are_namespaces(self):
        path = self.write("name: north\nbindings:\n"
                          "  ws0: {type: ws, kind: server, exit: 'south:echo'}\n"
                          "---\n"
                          "name: south\nbindings:\n"
                          "  echo: {type: echo, kind: server}\n")
        config = load(path, TYPES, env={})
        self.assertEqual([(ns.name, list(ns.bindings)) for ns in config.namespaces],
                         [("north", ["ws0"]), ("south", ["echo"])])
        self.assertEqual(config.binding("north:ws0").exit, "south:echo")
        self.assertEqual(config.binding("south:echo").namespace, "south")

    def test_unqualified_exit_stays_in_its_namespace(self):
        north = {"name": "north", "bindings": {"ws0": {"type": "ws", "kind": "server", "exit": "echo"}}}
        south = {"name": "south", "bindings": {"echo": {"type": "echo", "kind": "server"}}}
        self.assertProblems([north, south], ["north: bindings.ws0.exit: no binding named 'echo'"])

    def test_unknown_qualified_exit(self):
        north = {"name": "north", "bindings": {"ws0": {"type": "ws", "kind": "server", "exit": "south:echo2"}}}
        south = {"name": "south", "bindings": {"echo": {"type": "echo", "kind": "server"}}}
        self.assertProblems([north, south], ["north: bindings.ws0.exit: no binding named 'south:echo2'"])

    def test_namespace_defined_twice(self):
        self.assertProblems([echo_chain(), echo_chain()], ["name: namespace 'test' is defined twice"])

    def test_problems_prefixed_with_their_namespace(self):
        north = changed(lambda c: c["bindings"]["ws0"].update(exit="nope"))
        south = {"name": "south", "bindings": {"echo": {"type": "echo", "kind": "server", "exit": "x"}}}
        # Schema problems are reported first (cross-checks need a valid shape).
        self.assertProblems([north, south], ["south: bindings.echo.exit: not allowed for an echo server binding"])
        south["bindings"]["echo"].pop("exit")
        self.assertProblems([north, south], ["test: bindings.ws0.exit: no binding named 'nope'"])

    def test_documents_that_are_not_mappings(self):
        self.assertProblems([echo_chain(), "oops", 3], [
            "documents[1]: expected a mapping with 'name' and 'bindings', got a string",
            "documents[2]: expected a mapping with 'name' and 'bindings', got an integer",
        ])

    def test_single_document_that_is_a_list(self):
        self.assertProblems(self.write("- 1\n- 2\n"),
                            ["top level: expected a mapping with 'name' and 'bindings', got a list"])

    def test_empty_file(self):
        path = self.write("---\n---\n")
        self.assertProblems(path, [f"{path}: the configuration is empty (expected at least 'name' and 'bindings')"])

    def test_missing_file(self):
        path = self.mktemp()
        self.assertProblems(path, [f"{path}: cannot read the configuration (No such file or directory)"])

    def test_invalid_yaml_names_line_and_column(self):
        path = self.write("name: t\nbindings:\n  a: [1\n")
        # The words are libyaml's (PyYAML's own parser, used without it, says it otherwise).
        [problem] = self.problems(path)
        self.assertTrue(problem.startswith(f"{path}:4:1: invalid YAML: "), problem)
        self.assertIn("expected ',' or ']'", problem)

    def test_missing_name(self):
        self.assertProblems({"bindings": {}}, ["top level: missing required key 'name'"])

    def test_invalid_names(self):
        config = changed(lambda c: c.update(name="1bad"))
        config["bindings"]["bad name"] = config["bindings"].pop("echo_server")
        config["bindings"]["ws0"]["exit"] = "bad name"
        rule = "is not a valid name (a letter first, then letters, digits, '.', '_' or '-')"
        self.assertProblems(config, [f"bindings: 'bad name' {rule}", f"name: '1bad' {rule}"])


class EnvironmentTests(ConfigTestCase):
    def test_env_expression_resolved_anywhere_in_a_string(self):
        source = changed(lambda c: c["bindings"]["tcp0"]["options"].update(host="${{ env.PREFIX }}.${{env.HOST}}"))
        config = load(source, TYPES, env={"PREFIX": "127.0", "HOST": "0.1"})
        self.assertEqual(config.binding("test:tcp0").options["host"], "127.0.0.1")

    def test_env_expression_in_a_file(self):
        path = self.mktemp()
        Path(path).write_text(Path(CONF, "ws.echo.yaml").read_text().replace("0.0.0.0", "${{env.ZILLA_HOST}}"))
        config = load(path, TYPES, env={"ZILLA_HOST": "::1"})
        self.assertEqual(config.binding("example:north_tcp_server").options["host"], "::1")

    def test_env_resolved_before_validation(self):
        # A port from the environment is a string; 'N' strings are valid ports.
        source = changed(lambda c: c["bindings"]["tcp0"]["options"].update(port="${{env.PORT}}"))
        self.assertEqual(load(source, TYPES, env={"PORT": "8080"}).binding("test:tcp0").options["port"], "8080")
        self.assertProblems(source, ["bindings.tcp0.options.port: expected a port number, a string 'N' or 'N-M', "
                                     "or a list of those, got a string 'http'"], env={"PORT": "http"})

    def test_missing_env_var_named_with_its_path(self):
        source = changed(lambda c: c["bindings"]["tcp0"]["options"].update(host="${{env.ZILLA_HOST}}"))
        self.assertProblems(source, ["bindings.tcp0.options.host: environment variable ZILLA_HOST is not set "
                                     "(used as '${{env.ZILLA_HOST}}')"], env={})

    def test_every_missing_env_var_listed(self):
        def change(c):
            c["bindings"]["tcp0"]["options"]["host"] = "${{env.A}}:${{env.B}}"
            c["bindings"]["http0"]["routes"][0]["when"][0]["headers"][":authority"] = "${{env.C}}"
        self.assertProblems(changed(change), [
            "bindings.tcp0.options.host: environment variable A is not set (used as '${{env.A}}')",
            "bindings.tcp0.options.host: environment variable B is not set (used as '${{env.B}}')",
            "bindings.http0.routes[0].when[0].headers.:authority: environment variable C is not set "
            "(used as '${{env.C}}')",
        ], env={})

    def test_other_resolvers_refused(self):
        source = changed(lambda c: c["bindings"]["tcp0"]["options"].update(host="${{ secrets.HOST }}"))
        self.assertProblems(source, ["bindings.tcp0.options.host: the resolver 'secrets' in '${{secrets.HOST}}' "
                                     "is not supported (zillatw resolves ${{env.NAME}})"], env={})

    def test_process_environment_is_the_default(self):
        source = changed(lambda c: c["bindings"]["tcp0"]["options"].update(host="${{env.ZILLATW_TEST_HOST}}"))
        self.patch(os, "environ", {**os.environ, "ZILLATW_TEST_HOST": "10.1.2.3"})
        self.assertEqual(load(source, TYPES).binding("test:tcp0").options["host"], "10.1.2.3")

    def test_text_without_expressions_untouched(self):
        source = changed(lambda c: c["bindings"]["tcp0"]["options"].update(host="${notanexpression}"))
        self.assertEqual(load(source, TYPES, env={}).binding("test:tcp0").options["host"], "${notanexpression}")


class ExitTests(ConfigTestCase):
    def test_misspelt_exit_suggests_the_close_name(self):
        self.assertProblems(changed(lambda c: c["bindings"]["ws0"].update(exit="echo_sever")),
                            ["bindings.ws0.exit: no binding named 'echo_sever' (did you mean 'echo_server'?)"])

    def test_unknown_exit_without_a_close_name(self):
        self.assertProblems(changed(lambda c: c["bindings"]["ws0"].update(exit="zzz")),
                            ["bindings.ws0.exit: no binding named 'zzz'"])

    def test_unknown_route_exit_named_by_route_index(self):
        def change(c):
            c["bindings"]["http0"]["routes"].insert(0, {"when": [{"headers": {":path": "/a"}}], "exit": "ws1"})
        self.assertProblems(changed(change),
                            ["bindings.http0.routes[0].exit: no binding named 'ws1' (did you mean 'ws0'?)"])

    def test_wrong_stream_kind_explained(self):
        self.assertProblems(changed(lambda c: c["bindings"]["tcp0"].update(exit="ws0")), [
            "bindings.tcp0.exit: 'ws0' is a ws server, which cannot take the connections "
            "a tcp server hands on (bindings that can: echo_server, http0)"])

    def test_wrong_stream_kind_for_messages(self):
        def change(c):
            c["bindings"]["fan0"] = {"type": "fan", "kind": "server", "exit": "http0"}
        self.assertProblems(changed(change), [
            "bindings.fan0.exit: 'http0' is a http server, which cannot take the WebSocket messages "
            "a fan server hands on (bindings that can: echo_server)"])  # not fan0 itself

    def test_wrong_stream_kind_for_http_requests(self):
        def change(c):
            c["bindings"]["http0"]["routes"][0]["exit"] = "fan0"
            c["bindings"]["fan0"] = {"type": "fan", "kind": "server", "exit": "echo_server"}
        self.assertProblems(changed(change), [
            "bindings.http0.routes[0].exit: 'fan0' is a fan server, which cannot take the HTTP requests "
            "a http server hands on (bindings that can: echo_server, ws0)"])

    def test_exit_loop(self):
        def change(c):
            c["bindings"]["ws0"]["exit"] = "fan_a"
            c["bindings"]["fan_a"] = {"type": "fan", "kind": "server", "exit": "fan_b"}
            c["bindings"]["fan_b"] = {"type": "fan", "kind": "server", "exit": "fan_a"}
        self.assertProblems(changed(change), ["bindings.fan_a: exits form a loop (fan_a -> fan_b -> fan_a)"])

    def test_exit_to_itself(self):
        def change(c):
            c["bindings"]["ws0"]["routes"] = [{"when": [{"protocol": "x"}], "exit": "fan0"}]
            c["bindings"]["fan0"] = {"type": "fan", "kind": "server", "exit": "fan0"}
        self.assertProblems(changed(change), ["bindings.fan0: exits form a loop (fan0 -> fan0)"])

    def test_server_without_exit(self):
        self.assertProblems(changed(lambda c: c["bindings"]["ws0"].pop("exit")), [
            "bindings.ws0: expected 'exit' or 'routes', got a mapping {'type': 'ws', 'kind': 'server'}"])

    def test_fan_without_exit_refused(self):
        self.assertProblems(changed(lambda c: c["bindings"].update(fan0={"type": "fan", "kind": "server"})),
                            ["bindings.fan0: missing required key 'exit'"])

    def test_tcp_server_without_exit(self):
        self.assertProblems(changed(lambda c: c["bindings"]["tcp0"].pop("exit")),
                            ["bindings.tcp0.routes: a tcp server needs 'exit' or routes with an exit"])


class BindingSchemaTests(ConfigTestCase):
    def test_echo_with_options_refused_naming_the_key(self):
        self.assertProblems(changed(lambda c: c["bindings"]["echo_server"].update(options={"x": 1})),
                            ["bindings.echo_server.options: not allowed for an echo server binding"])

    def test_echo_with_exit_refused(self):
        self.assertProblems(changed(lambda c: c["bindings"]["echo_server"].update(exit="ws0")),
                            ["bindings.echo_server.exit: not allowed for an echo server binding"])

    def test_unknown_binding_type(self):
        self.assertProblems(changed(lambda c: c["bindings"]["ws0"].update(type="mqtt")), [
            "bindings.ws0.type: unknown binding type 'mqtt' (zillatw serves: "
            + ", ".join(sorted(TYPES.bindings)) + ")"])

    def test_misspelt_binding_type_suggests_one(self):
        problems = self.problems(changed(lambda c: c["bindings"]["echo_server"].update(type="ech")))
        self.assertEqual(len(problems), 1)
        self.assertTrue(problems[0].startswith(
            "bindings.echo_server.type: unknown binding type 'ech' (did you mean 'echo'?) (zillatw serves: "), problems)

    def test_kind_the_type_does_not_have(self):
        self.assertProblems(changed(lambda c: c["bindings"]["echo_server"].update(kind="client")),
                            ["bindings.echo_server.kind: an echo binding cannot be of kind 'client' (expected server)"])

    def test_kind_zilla_does_not_have(self):
        # Reported once, with the type's kinds (not also with every kind Zilla knows).
        self.assertProblems(changed(lambda c: c["bindings"]["ws0"].update(kind="sever")),
                            ["bindings.ws0.kind: a ws binding cannot be of kind 'sever' (expected client or server)"])

    def test_unknown_key_lists_the_allowed_ones(self):
        problems = self.problems(changed(lambda c: c["bindings"]["tcp0"].update(exits="http0")))
        self.assertEqual(len(problems), 1)
        self.assertTrue(problems[0].startswith("bindings.tcp0: unknown key 'exits' (did you mean 'exit'?) "
                                               "(expected one of: type, kind, "), problems)

    def test_misspelt_option_suggests_one(self):
        problems = self.problems(changed(lambda c: c["bindings"]["ws0"].update(options={"max-message-sise": 5})))
        self.assertEqual(len(problems), 1)
        prefix = ("bindings.ws0.options: unknown key 'max-message-sise' (did you mean 'max-message-size'?) "
                  "(expected one of: ")
        self.assertTrue(problems[0].startswith(prefix) and problems[0].endswith(")"), problems)
        self.assertIn("max-message-size", problems[0][len(prefix):-1].split(", "))

    def test_wrong_value_type(self):
        self.assertProblems(changed(lambda c: c["bindings"]["ws0"].update(options={"max-message-size": "big"})),
                            ["bindings.ws0.options.max-message-size: expected an integer, got a string"])

    def test_unsupported_exporter_refused_by_name(self):
        self.assertProblems(changed(lambda c: c.update(telemetry={"exporters": {"p": {"type": "syslog"}}})), [
            "telemetry.exporters.p.type: exporter type 'syslog' is not supported by this zillatw yet "
            "(supported: " + ", ".join(SUPPORTED_EXPORTERS) + ")"])

    def test_unsupported_guard_vault_and_catalog_refused_by_name(self):
        def change(c):
            c["guards"] = {"my_guard": {"type": "oauth2-introspection"}}
            c["vaults"] = {"my_vault": {"type": "hashicorp-vault"}}
            c["catalogs"] = {"my_catalog": {"type": "aws-glue"}}

        def supported(names):
            return f" (supported: {', '.join(names)})" if names else ""
        self.assertProblems(changed(change), [
            "guards.my_guard.type: guard type 'oauth2-introspection' is not supported by this zillatw yet"
            + supported(TYPES.guards),
            "vaults.my_vault.type: vault type 'hashicorp-vault' is not supported by this zillatw yet"
            + supported(TYPES.vaults),
            "catalogs.my_catalog.type: catalog type 'aws-glue' is not supported by this zillatw yet"
            + supported(TYPES.catalogs),
        ])

    def test_guard_vault_and_catalog_need_a_type(self):
        def change(c):
            c["guards"] = {"g": {}}
            c["vaults"] = {"v": {"options": {}}}
        self.assertProblems(changed(change), ["guards.g: missing required key 'type'",
                                              "vaults.v: missing required key 'type'"])


class PortTests(ConfigTestCase):
    def port(self, spec: Any) -> Any:
        return changed(lambda c: c["bindings"]["tcp0"]["options"].update(port=spec))

    def test_port_forms_accepted(self):
        for spec in (7114, "7114", "7000-7010", [7114], ["7114", 7115, "8000-8002"], "0", 65535, "65530-65535"):
            self.assertEqual(load(self.port(spec), TYPES, env={}).binding("test:tcp0").options["port"], spec)

    def test_reversed_range_refused(self):
        self.assertProblems(self.port("7010-7000"),
                            ["bindings.tcp0.options.port: range '7010-7000' ends before it starts"])

    def test_reversed_range_in_a_list_refused(self):
        self.assertProblems(self.port([7114, "7010-7000"]),
                            ["bindings.tcp0.options.port: range '7010-7000' ends before it starts"])

    def test_port_above_65535_refused(self):
        self.assertProblems(self.port(70000), [
            "bindings.tcp0.options.port: expected a port number, a string 'N' or 'N-M', or a list of those, "
            "got an integer 70000"])
        self.assertProblems(self.port("70000"), ["bindings.tcp0.options.port: port 70000 is above 65535"])
        self.assertProblems(self.port("65535-65537"), ["bindings.tcp0.options.port: port 65537 is above 65535"])

    def test_negative_port_refused(self):
        problems = self.problems(self.port(-1))
        self.assertEqual(len(problems), 1)
        self.assertTrue(problems[0].startswith("bindings.tcp0.options.port: expected a port number"), problems)

    def test_malformed_port_strings_refused(self):
        for spec in ("abc", "7000-", "-7000", "7000-7010-7020", "7 000", ""):
            self.assertProblems(self.port(spec), [
                "bindings.tcp0.options.port: expected a port number, a string 'N' or 'N-M', or a list of those, "
                f"got a string {spec!r}"])

    def test_bad_item_in_a_port_list_named_by_index(self):
        self.assertProblems(self.port([7114, "x"]), [
            "bindings.tcp0.options.port[1]: expected a port number or a string 'N' or 'N-M', got a string 'x'"])

    def test_empty_port_list_refused(self):
        self.assertProblems(self.port([]), [
            "bindings.tcp0.options.port: expected a port number, a string 'N' or 'N-M', or a list of those, "
            "got a list []"])

    def test_too_many_ports_refused(self):
        self.assertProblems(self.port("7000-8100"), ["bindings.tcp0.options.port: more than 1024 ports"])

    def test_route_port_conditions_checked(self):
        def change(c):
            c["bindings"]["tcp0"]["routes"] = [{"when": [{"port": "7200-7100"}], "exit": "http0"},
                                               {"when": [{"port": "70000"}], "exit": "http0"}]
        self.assertProblems(changed(change), [
            "bindings.tcp0.routes[0].when[0].port: range '7200-7100' ends before it starts",
            "bindings.tcp0.routes[1].when[0].port: port 70000 is above 65535",
        ])


class AllProblemsTests(ConfigTestCase):
    def test_every_schema_problem_listed(self):
        def change(c):
            c["bindings"]["echo_server"]["options"] = {}
            c["bindings"]["ws0"]["kind"] = "proxy"
            c["bindings"]["tcp0"]["options"]["port"] = "x"
        self.assertProblems(changed(change), [
            "bindings.echo_server.options: not allowed for an echo server binding",
            "bindings.tcp0.options.port: expected a port number, a string 'N' or 'N-M', or a list of those, "
            "got a string 'x'",
            "bindings.ws0.kind: a ws binding cannot be of kind 'proxy' (expected client or server)",
        ])

    def test_every_cross_check_problem_listed(self):
        def change(c):
            c["bindings"]["ws0"]["exit"] = "echo_sever"
            c["bindings"]["tcp0"]["options"]["port"] = "9-1"
            c["bindings"]["http0"]["routes"][0]["exit"] = "fan0"
            c["bindings"]["fan0"] = {"type": "fan", "kind": "server", "exit": "echo_server"}
            c["telemetry"] = {"exporters": {"p": {"type": "syslog"}}}
        problems = self.problems(changed(change))
        self.assertEqual(sorted(problems), sorted([
            "telemetry.exporters.p.type: exporter type 'syslog' is not supported by this zillatw yet "
            "(supported: " + ", ".join(SUPPORTED_EXPORTERS) + ")",
            "bindings.tcp0.options.port: range '9-1' ends before it starts",
            "bindings.http0.routes[0].exit: 'fan0' is a fan server, which cannot take the HTTP requests "
            "a http server hands on (bindings that can: echo_server, ws0)",
            "bindings.ws0.exit: no binding named 'echo_sever' (did you mean 'echo_server'?)",
        ]))

    def test_message_counts_and_indents_several_problems(self):
        with self.assertRaises(ConfigError) as caught:
            load(changed(lambda c: c["bindings"]["ws0"].update(exit="a", kind="b")) | {"name": "9"}, TYPES, env={})
        error = caught.exception
        self.assertEqual(len(error.problems), 2)
        self.assertEqual(str(error), "2 problems:\n" + "\n".join(f"  {p}" for p in error.problems))

    def test_one_problem_is_the_message(self):
        error = ConfigError("bindings.x: wrong")
        self.assertEqual((error.problems, str(error)), (["bindings.x: wrong"], "bindings.x: wrong"))

    def test_problems_copied_from_any_iterable(self):
        error = ConfigError(iter(["a", "b", "c"]))
        self.assertEqual(error.problems, ["a", "b", "c"])
        self.assertEqual(str(error), "3 problems:\n  a\n  b\n  c")

    def test_valid_config_is_a_config(self):
        self.assertIsInstance(load(echo_chain(), TYPES, env={}), Config)


class DidYouMeanTests(unittest.SynchronousTestCase):
    def test_close_candidate_suggested(self):
        self.assertEqual(did_you_mean("echo_sever", ["ws0", "echo_server"]), " (did you mean 'echo_server'?)")

    def test_nothing_close(self):
        self.assertEqual(did_you_mean("zzz", ["ws0", "echo_server"]), "")
        self.assertEqual(did_you_mean("echo", []), "")

    def test_closest_of_several(self):
        self.assertEqual(did_you_mean("ws1", ["tcp0", "ws0", "http0"]), " (did you mean 'ws0'?)")
