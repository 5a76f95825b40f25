"""echo on tcp and tls byte streams (issue 15): conf/tcp.echo.yaml and conf/tls.echo.yaml
driven as Zilla's READMEs do (nc, openssl s_client), Zilla's own tls.echo text unchanged,
flow control on a Clock, metrics and the gateway's stop."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial import unittest

from zillatw.test import pki
from zillatw.test.netns import ExampleNetwork
from zillatw.test.pki import localhost_keystore, tls_connect
from zillatw.test.support import OnAClock, connect_raw, eventually, free_port, start_gateway, value

# aklivity/zilla examples/tls.echo/etc/zilla.yaml (commit 8d5eb0a5), the text as Zilla ships it
ZILLA_TLS_ECHO = """\
---
name: example
vaults:
  my_servers:
    type: filesystem
    options:
      keys:
        store: tls/localhost.p12
        type: pkcs12
        password: ${{env.KEYSTORE_PASSWORD}}
      trust:
        store: tls/client-ca.p12
        type: pkcs12
        password: ${{env.TRUSTSTORE_PASSWORD}}
guards:
  my_clients:
    type: x509
    options:
      identity: subject.cn
      roles:
        client:
          - issuer.cn: Test Client CA
            subject.cn: client-*
bindings:
  north_tcp_server:
    type: tcp
    kind: server
    options:
      host: 0.0.0.0
      port: 23456
    exit: north_tls_server
  north_tls_server:
    type: tls
    kind: server
    vault: my_servers
    options:
      keys:
        - localhost
      trust:
        - client-ca
        - other-ca
      mutual: requested
      sni:
        - localhost
      alpn:
        - echo
        - secure-echo
      authorization:
        my_clients:
          credentials:
            certificates: pem
    routes:
      - when:
          - alpn: secure-echo
        guarded:
          my_clients:
            - client
        exit: north_echo_server
      - when:
          - alpn: echo
        exit: north_echo_server
  north_echo_server:
    type: echo
    kind: server
telemetry:
  exporters:
    stdout_logs_exporter:
      type: stdout
"""






class TcpEchoTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        network = ExampleNetwork(self)
        self.port = network.port(12345)
        self.gateway, _ = yield start_gateway(self, network.config("tcp.echo.yaml"))

    @defer.inlineCallbacks
    def test_nc_gets_every_line_back(self):
        client = yield connect_raw(self.port)
        client.transport.write(b"Hello, Zilla!\n")
        self.assertEqual((yield client.until(14)), b"Hello, Zilla!\n")
        client.transport.write(b"second\n")
        self.assertEqual((yield client.until(21)), b"Hello, Zilla!\nsecond\n")
        client.transport.loseConnection()
        yield client.done

    @defer.inlineCallbacks
    def test_eof_after_the_input_still_returns_all_of_it(self):
        """`nc -N`: the client half-closes after its input; the echo arrives, then the close."""
        client = yield connect_raw(self.port)
        payload = os.urandom(256 * 1024)
        client.transport.write(payload)
        client.transport.loseWriteConnection()
        self.assertEqual((yield client.done), payload)

    @defer.inlineCallbacks
    def test_stop_closes_the_connections(self):
        client = yield connect_raw(self.port)
        client.transport.write(b"x")
        yield client.until(1)
        self.assertEqual(self.gateway.generation.bindings["example:north_echo_server"].open_count(), 1)
        yield self.gateway.stopService()
        self.assertEqual((yield client.done), b"x")


class TlsEchoTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_s_client_with_alpn_echo_gets_every_line_back(self):
        network = ExampleNetwork(self)
        folder = Path(self.mktemp())
        ca = localhost_keystore(folder)
        os.environ["KEYSTORE_PASSWORD"] = "generated"
        self.addCleanup(os.environ.pop, "KEYSTORE_PASSWORD")
        port = network.port(23456)
        yield start_gateway(self, network.config("tls.echo.yaml", folder))
        client = yield tls_connect(port, ca, alpn=["echo"])
        client.transport.write(b"Hello, world\n")
        self.assertEqual((yield client.until(13)), b"Hello, world\n")
        client.transport.loseConnection()
        yield client.done
        # and the README's own client
        ca_file = pki.write(folder / "test-ca.crt", ca.cert_pem())
        out, err, code = yield getProcessOutputAndValue(
            "/bin/sh", ["-c", f"{{ echo 'Hello, Zilla!'; sleep 1; }} | openssl s_client -connect 127.0.0.1:{port} "
                              f"-servername localhost -CAfile {ca_file} -quiet -alpn echo -no_ign_eof"],
            reactor=reactor)
        self.assertEqual(out, b"Hello, Zilla!\n", err)


class ZillaTlsEchoUnchangedTests(unittest.TestCase):
    """Zilla's examples/tls.echo/etc/zilla.yaml as shipped, on its port: x509-guarded
    `secure-echo` next to open `echo`, mutual TLS requested, keystores made at run time
    with the aliases the example names."""

    @defer.inlineCallbacks
    def setUp(self):
        network = ExampleNetwork(self)
        folder = Path(self.mktemp())
        self.ca = localhost_keystore(folder, "keys")
        client_ca, other_ca = pki.make_ca("Test Client CA"), pki.make_ca("Test Other CA")
        pki.write(folder / "tls" / "client-ca.p12", pki.truststore_p12(
            {"client-ca": client_ca.certificate, "other-ca": other_ca.certificate}, "trust"))
        self.client = pki.issue(client_ca, "client-1", client=True)
        self.other = pki.issue(other_ca, "client-1", client=True)
        for name, password in (("KEYSTORE_PASSWORD", "keys"), ("TRUSTSTORE_PASSWORD", "trust")):
            os.environ[name] = password
            self.addCleanup(os.environ.pop, name)
        self.port = network.port(23456)
        self.gateway, _ = yield start_gateway(self, network.write(ZILLA_TLS_ECHO, folder))

    @defer.inlineCallbacks
    def exchange(self, alpn: str, client: pki.Issued | None = None) -> Any:
        connection = yield tls_connect(self.port, self.ca, alpn=[alpn], client=client)
        connection.transport.write(b"Hello, world\n")
        try:
            yield connection.until(13)
        except ConnectionError:
            return connection.data
        connection.transport.loseConnection()
        yield connection.done
        return connection.data

    @defer.inlineCallbacks
    def test_echo_without_a_client_certificate(self):
        self.assertEqual((yield self.exchange("echo")), b"Hello, world\n")

    @defer.inlineCallbacks
    def test_secure_echo_needs_a_certificate_the_guard_names(self):
        self.assertEqual((yield self.exchange("secure-echo")), b"")
        self.assertEqual((yield self.exchange("secure-echo", self.other)), b"")
        got = yield self.exchange("secure-echo", self.client)
        self.assertEqual(got, b"Hello, world\n", self.gateway.events_text.getvalue())


class FlowTests(unittest.TestCase):
    """Back-pressure on a Clock: echo pauses its source, which is the connection itself."""

    CONFIG = {"name": "t", "bindings": {
        "tcp0": {"type": "tcp", "kind": "server", "options": {"host": "127.0.0.1", "port": 7000}, "exit": "echo0"},
        "echo0": {"type": "echo", "kind": "server"}}}

    def test_a_full_socket_stops_reading_until_it_drains(self):
        gateway = OnAClock(self.CONFIG)
        protocol, transport = gateway.connect()
        protocol.dataReceived(b"ping")
        self.assertEqual(transport.value(), b"ping")
        self.assertEqual(transport.producerState, "producing")
        transport.producer.pauseProducing()  # what a full socket buffer does
        self.assertEqual(transport.producerState, "paused")
        transport.producer.resumeProducing()
        self.assertEqual(transport.producerState, "producing")

    def test_a_connection_closed_on_stop_is_no_longer_counted_once_gone(self):
        gateway = OnAClock(self.CONFIG)
        protocol, transport = gateway.connect()
        echo = gateway.gateway.generation.bindings["t:echo0"]
        echo.going_away()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(echo.open_count(), 1)  # until its last bytes are written
        protocol.dataReceived(b"late")          # read after the close: for no one
        self.assertEqual(transport.value(), b"")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(echo.open_count(), 0)

    def test_drop_all_at_the_drain_timeout_aborts(self):
        gateway = OnAClock(self.CONFIG)
        protocol, transport = gateway.connect()
        echo = gateway.gateway.generation.bindings["t:echo0"]
        self.assertEqual(echo.open_count(), 1)
        echo.going_away()
        self.assertTrue(transport.disconnecting)
        echo.drop_all()
        self.assertEqual(echo.open_count(), 0)


class BackPressureTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_client_that_does_not_read_is_not_read_either(self):
        """16 MiB sent by a client that reads nothing: once the gateway's socket buffer is
        full, echo stops reading the client; the gateway holds a bounded amount; all of it
        comes back, in order, once the client reads."""
        port = free_port()
        gateway, _ = yield start_gateway(self, {"name": "bp", "bindings": {
            "tcp0": {"type": "tcp", "kind": "server", "options": {"host": "127.0.0.1", "port": port}, "exit": "echo0"},
            "echo0": {"type": "echo", "kind": "server"}}})
        client = yield connect_raw(port)
        client.transport.pauseProducing()  # reads nothing
        chunk, count = os.urandom(64 * 1024), 256
        for _ in range(count):
            client.transport.write(chunk)
        echo = gateway.generation.bindings["bp:echo0"]
        yield eventually(lambda: echo.open_count() == 1)
        server_side = next(iter(echo.byte_streams.peers)).transport
        yield eventually(lambda: server_side not in reactor.getReaders())  # the client is not read
        held = len(server_side.dataBuffer) + server_side._tempDataLen
        self.assertLess(held, 512 * 1024)  # Twisted's 64 KiB buffer plus what one read brought
        client.transport.resumeProducing()
        received = yield client.until(len(chunk) * count)
        self.assertEqual(received, chunk * count)
        client.transport.loseConnection()
        yield client.done


class MetricsTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_byte_streams_are_counted_for_echo_and_the_tcp_server(self):
        port = free_port()
        config = {"name": "test", "bindings": {
            "tcp0": {"type": "tcp", "kind": "server", "options": {"host": "127.0.0.1", "port": port},
                     "exit": "echo0", "telemetry": {"metrics": ["stream.*"]}},
            "echo0": {"type": "echo", "kind": "server", "telemetry": {"metrics": ["stream.*"]}}},
            "telemetry": {"metrics": ["stream.opens.received", "stream.data.received", "stream.data.sent",
                                      "stream.active.received", "stream.closes.received"],
                          "exporters": {"prom": {"type": "prometheus", "options": {"endpoints": [
                              {"scheme": "http", "port": 0, "path": "/metrics"}]}}}}}
        gateway, _ = yield start_gateway(self, config)
        client = yield connect_raw(port)
        client.transport.write(b"12345")
        yield client.until(5)
        for binding in ("tcp0", "echo0"):
            self.assertEqual(value(gateway, "stream_opens_received_total", binding), 1)
            self.assertEqual(value(gateway, "stream_data_received_bytes_total", binding), 5)
            self.assertEqual(value(gateway, "stream_active_received", binding), 1)
        client.transport.loseConnection()
        yield client.done
        yield eventually(lambda: all(value(gateway, "stream_closes_received_total", b) == 1 for b in ("tcp0", "echo0")))
        self.assertEqual(value(gateway, "stream_active_received", "echo0"), 0)
