"""The fan's Redis for real deployments (issue 17): rediss:// (TLS, verified against the
fan's vault trust) and Redis 6 ACL users, against the real redis-server the project
installs (scripts/install-redis.sh: Debian's, built with TLS), started with `--tls-port`
and `--user` lines. Passwords never reach an event line or the config dump."""

from __future__ import annotations

import io
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from zillatw import build_gateway
from zillatw.bindings.fan.redis import parse_url, shown_url
from zillatw.config import load
from zillatw.errors import ConfigError
from zillatw.runtime.standard import standard_registry
from zillatw.test import pki
from zillatw.test.process_support import redis_server_binary
from zillatw.test.support import connect_raw, eventually, free_port, start_gateway

PASSWORD = "s3cret-Pa55"
# a user that may publish and subscribe to zillatw's channels only; no default user
ACL = [f"user zillatw on >{PASSWORD} ~* &zillatw:* +@all", "user default off"]


class Redis:
    """redis-server on 127.0.0.1: plain on `port`, or TLS only (`--port 0 --tls-port`)."""

    def __init__(self, case: unittest.TestCase, acl: list[str] | None = None, tls: pki.Issued | None = None,
                 ca: pki.Issued | None = None):
        self.port = free_port()
        self.tls = tls
        folder = Path(case.mktemp())
        folder.mkdir()
        command = [redis_server_binary(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--daemonize", "no", "--loglevel", "warning"]
        if acl is not None:  # `user` lines, as an ACL file has them
            (folder / "users.acl").write_text("".join(f"{line}\n" for line in acl))
            command += ["--aclfile", str(folder / "users.acl")]
        if tls is not None:
            assert ca is not None
            command += ["--port", "0", "--tls-port", str(self.port),
                        "--tls-cert-file", pki.write(folder / "redis.crt", tls.cert_pem()),
                        "--tls-key-file", pki.write(folder / "redis.key", tls.key_pem()),
                        "--tls-ca-cert-file", pki.write(folder / "ca.crt", ca.cert_pem()),
                        "--tls-auth-clients", "no"]
            self.ca_file = str(folder / "ca.crt")
        else:
            command += ["--port", str(self.port)]
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        case.addCleanup(self.stop)
        self._wait()

    def _wait(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"redis-server exited: {self.proc.stdout.read()!r}"  # type: ignore
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw:
                    if self.tls is None:
                        raw.sendall(b"PING\r\n")
                        if raw.recv(64):
                            return
                    else:
                        context = ssl.create_default_context(cafile=self.ca_file)
                        context.check_hostname = False  # up is all this asks
                        with context.wrap_socket(raw, server_hostname="localhost") as wrapped:
                            wrapped.sendall(b"PING\r\n")
                            if wrapped.recv(64):
                                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"redis-server not answering on {self.port}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def reflect(port: int, redis: dict[str, Any], vault: dict[str, Any] | None = None) -> dict[str, Any]:
    """Zilla's tcp.reflect with options.redis (and the fan's vault)."""
    fan: dict[str, Any] = {"type": "fan", "kind": "server", "exit": "north_echo_server",
                           "options": {"redis": {"max-reconnect-delay": 0.2, **redis}}}
    config: dict[str, Any] = {"name": "example", "bindings": {
        "north_tcp_server": {"type": "tcp", "kind": "server", "options": {"host": "127.0.0.1", "port": port},
                             "exit": "north_fan_server"},
        "north_fan_server": fan,
        "north_echo_server": {"type": "echo", "kind": "server"}},
        "telemetry": {"exporters": {"stdout": {"type": "stdout"}}}}
    if vault is not None:
        config["vaults"] = {"redis_trust": {"type": "filesystem", "options": {"trust": vault}}}
        fan["vault"] = "redis_trust"
    return config


class Gateways:
    """Two gateways on one Redis channel, a raw client on each."""

    @defer.inlineCallbacks
    def start_two(self, case: unittest.TestCase, redis: dict[str, Any], vault: dict[str, Any] | None = None) -> Any:
        self.gateways, self.clients = [], []
        for _ in range(2):
            port = free_port()
            gateway, _ = yield start_gateway(case, reflect(port, redis, vault))
            self.gateways.append(gateway)
        links = [self.link(g) for g in self.gateways]
        yield eventually(lambda: all(link.up for link in links))
        for gateway in self.gateways:
            client = yield connect_raw(gateway.generation.servers()[0].bound_ports()[0])
            case.addCleanup(client.transport.loseConnection)
            self.clients.append(client)
        yield eventually(lambda: all(g.generation.bindings["example:north_fan_server"].members() == 1
                                     for g in self.gateways))

    @staticmethod
    def link(gateway: Any) -> Any:
        return gateway.generation.bindings["example:north_fan_server"].redis

    @defer.inlineCallbacks
    def crosses(self, case: unittest.TestCase) -> Any:
        self.clients[0].transport.write(b"across")
        for client in self.clients:
            case.assertEqual((yield client.until(6)), b"across")

    def events(self) -> str:
        return "".join(g.events_text.getvalue() for g in self.gateways)


class RedissTests(unittest.TestCase):
    def setUp(self):
        self.ca = pki.make_ca("Redis CA")
        self.folder = Path(self.mktemp())
        self.folder.mkdir()
        self.trust_store = pki.write(self.folder / "trust.p12",
                                     pki.truststore_p12({"redis-ca": self.ca.certificate}, "trust"))
        self.vault = {"store": self.trust_store, "type": "pkcs12", "password": "trust"}

    @defer.inlineCallbacks
    def test_a_group_across_gateways_over_rediss_with_the_vault_trust(self):
        redis = Redis(self, tls=pki.issue(self.ca, "localhost", dns=["localhost"]), ca=self.ca)
        two = Gateways()
        yield two.start_two(self, {"url": f"rediss://localhost:{redis.port}", "trust": ["redis-ca"]}, self.vault)
        yield two.crosses(self)
        self.assertIn(f"BINDING_FAN_REDIS_CONNECTED - rediss://localhost:{redis.port}", two.events())

    @defer.inlineCallbacks
    def test_a_certificate_the_trust_does_not_know_is_refused(self):
        stranger = pki.make_ca("Someone else")
        redis = Redis(self, tls=pki.issue(stranger, "localhost", dns=["localhost"]), ca=stranger)
        gateway, _ = yield start_gateway(self, reflect(free_port(), {
            "url": f"rediss://localhost:{redis.port}", "trust": ["redis-ca"]}, self.vault))
        yield eventually(lambda: "BINDING_FAN_REDIS_DISCONNECTED" in gateway.events_text.getvalue())
        self.assertFalse(Gateways.link(gateway).up)
        self.assertIn("certificate verify failed", gateway.events_text.getvalue())

    @defer.inlineCallbacks
    def test_a_certificate_for_another_name_is_refused(self):
        redis = Redis(self, tls=pki.issue(self.ca, "redis.example", dns=["redis.example"]), ca=self.ca)
        gateway, _ = yield start_gateway(self, reflect(free_port(), {
            "url": f"rediss://localhost:{redis.port}", "trust": ["redis-ca"]}, self.vault))
        yield eventually(lambda: "BINDING_FAN_REDIS_DISCONNECTED" in gateway.events_text.getvalue())
        self.assertFalse(Gateways.link(gateway).up)
        self.assertIn("DNSMismatch", gateway.events_text.getvalue())  # not for localhost

    @defer.inlineCallbacks
    def test_rediss_with_an_acl_user(self):
        redis = Redis(self, ACL, tls=pki.issue(self.ca, "localhost", dns=["localhost"]), ca=self.ca)
        two = Gateways()
        yield two.start_two(self, {"url": f"rediss://zillatw:{PASSWORD}@localhost:{redis.port}",
                                   "trust": ["redis-ca"]}, self.vault)
        yield two.crosses(self)
        self.assertNotIn(PASSWORD, two.events())


class AclTests(unittest.TestCase):
    def setUp(self):
        self.redis = Redis(self, ACL)

    @defer.inlineCallbacks
    def test_user_and_password_from_the_url(self):
        two = Gateways()
        yield two.start_two(self, {"url": f"redis://zillatw:{PASSWORD}@127.0.0.1:{self.redis.port}"})
        yield two.crosses(self)
        self.assertNotIn(PASSWORD, two.events())
        self.assertNotIn(PASSWORD, two.gateways[0].config.dump())

    @defer.inlineCallbacks
    def test_a_wrong_password_is_reported_without_either_password(self):
        wrong = "not-" + PASSWORD
        gateway, _ = yield start_gateway(self, reflect(free_port(), {
            "url": f"redis://zillatw:{wrong}@127.0.0.1:{self.redis.port}"}))
        yield eventually(lambda: "BINDING_FAN_REDIS_DISCONNECTED" in gateway.events_text.getvalue())
        events = gateway.events_text.getvalue()
        self.assertNotIn(wrong, events)
        self.assertIn(f"redis://127.0.0.1:{self.redis.port}", events)
        self.assertFalse(Gateways.link(gateway).up)

    @defer.inlineCallbacks
    def test_a_user_the_acl_keeps_off_other_channels_is_refused(self):
        gateway, _ = yield start_gateway(self, reflect(free_port(), {
            "url": f"redis://zillatw:{PASSWORD}@127.0.0.1:{self.redis.port}", "channel": "elsewhere"}))
        yield eventually(lambda: "BINDING_FAN_REDIS_DISCONNECTED" in gateway.events_text.getvalue())
        self.assertIn("refused", gateway.events_text.getvalue())
        self.assertFalse(Gateways.link(gateway).up)


class ConfigTests(unittest.TestCase):
    def problems(self, redis: dict[str, Any] | None, vault: bool = False) -> list[str]:
        config = reflect(7000, redis or {"url": "redis://x"}, {"store": "nowhere.p12"} if vault else None)
        if redis is None:
            del config["bindings"]["north_fan_server"]["options"]["redis"]
        try:
            load(config, registry=standard_registry())
        except ConfigError as e:
            return e.problems
        return []

    def test_urls(self):
        self.assertEqual(parse_url("rediss://u:p%40ss@h:6380")["tls"], True)
        self.assertEqual(parse_url("rediss://u:p%40ss@h:6380")["password"], "p@ss")
        self.assertEqual(shown_url("rediss://u:p@h:6380"), "rediss://h:6380")
        with self.assertRaises(ValueError) as raised:
            parse_url("rediss://u:secret@h:port")
        self.assertNotIn("secret", str(raised.exception))
        with self.assertRaises(ValueError):
            parse_url("http://h")

    def test_trust_needs_rediss_and_a_vault(self):
        self.assertEqual(self.problems({"url": "redis://h", "trust": ["a"]}, vault=True), [
            "bindings.north_fan_server.options.redis.trust: trust is for a rediss:// URL (TLS); this one is redis://"])
        self.assertEqual(self.problems({"url": "rediss://h", "trust": ["a"]}), [
            "bindings.north_fan_server.options.redis.trust: names trust entries of the binding's vault, "
            "and it has no 'vault'"])
        self.assertEqual(self.problems({"url": "rediss://h"}, vault=True), [
            "bindings.north_fan_server.vault: unused: give options.redis.trust (the aliases of its trust entries "
            "to verify Redis with)"])
        self.assertEqual(self.problems(None, vault=True), [
            "bindings.north_fan_server.vault: a fan's vault holds the trust for options.redis (rediss://), "
            "which it has not"])
        self.assertEqual(self.problems({"url": "rediss://h"}), [])

    def test_an_unknown_trust_alias_is_named(self):
        folder = Path(self.mktemp())
        folder.mkdir()
        store = pki.write(folder / "t.p12", pki.truststore_p12({"known": pki.make_ca().certificate}, "pw"))
        config = reflect(0, {"url": "rediss://h", "trust": ["known", "unknown"]},
                         {"store": store, "type": "pkcs12", "password": "pw"})
        with self.assertRaises(ConfigError) as raised:
            build_gateway(config, event_stream=io.StringIO())
        self.assertEqual(raised.exception.problems, [
            "bindings.north_fan_server.options.redis.trust[1]: no trust entry 'unknown' in vault 'redis_trust' "
            "(it has: known)"])

