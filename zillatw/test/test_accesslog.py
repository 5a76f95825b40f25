"""The stdout exporter's formats (zillatw.telemetry.accesslog): Zilla's text line by default, one JSON
object per line with `options.format: json`; and the bounded queue an exporter's events wait in."""

from __future__ import annotations

import copy
import json
import re

from twisted.internet import defer
from twisted.trial import unittest

from zillatw import build_gateway
from zillatw.errors import ConfigError
from zillatw.telemetry.accesslog import EventRecord, RecordQueue, format_json, format_text, rfc3339
from zillatw.test.support import chain, close_ws, connect_ws, raw_exchange, start_gateway, upgrade_request

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def json_chain(**ws: object) -> dict:
    config = chain([{"when": [{"protocol": "echo"}], "exit": "echo"}], **ws)  # type: ignore[arg-type]
    config["telemetry"]["exporters"]["stdout"]["options"] = {"format": "json"}
    return config


class JsonLinesTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_every_line_is_an_object_with_the_events_fields(self):
        gateway, port = yield start_gateway(self, json_chain())
        client = yield connect_ws(port, "/room?access_token=s3cret&x=1", protocols=["echo"])
        client.sendMessage(b"hello")
        yield client.messages.get()
        yield close_ws(client)
        yield raw_exchange(port, upgrade_request(headers={"Sec-WebSocket-Protocol": "chat"}))
        text = gateway.events_text.getvalue()
        self.assertNotIn("s3cret", text)  # redacted before the event is made, in every field
        lines = [json.loads(line) for line in text.splitlines()]
        self.assertTrue(lines)
        for line in lines:
            self.assertEqual(list(line)[:6], ["time", "namespace", "binding", "trace", "event", "level"])
            self.assertRegex(line["time"], RFC3339)
            self.assertEqual(line["namespace"], "test")
            self.assertRegex(line["trace"], r"^[0-9a-f]{16}$")
        accepted = next(line for line in lines if line["event"] == "BINDING_WS_REQUEST_ACCEPTED")
        self.assertEqual((accepted["binding"], accepted["level"], accepted["scheme"], accepted["path"],
                          accepted["protocol"], accepted["identity"]),
                         ("ws0", "info", "ws", "/room?access_token=REDACTED&x=1", "echo", None))
        self.assertEqual(accepted["authority"], f"127.0.0.1:{port}")
        rejected = next(line for line in lines if line["event"] == "BINDING_WS_REQUEST_REJECTED")
        self.assertEqual((rejected["level"], rejected["status"]), ("warning", 404))
        self.assertIn("offered subprotocols: chat", rejected["reason"])
        http = next(line for line in lines if line["event"] == "BINDING_HTTP_REQUEST_ACCEPTED")
        self.assertEqual((http["binding"], http["method"], http["scheme"], http["path"], http["trace"]),
                         ("http0", "GET", "http", "/room?access_token=REDACTED&x=1", accepted["trace"]))
        # an event without fields of its own keeps its details line as one key
        started = next(line for line in lines if line["event"] == "ENGINE_STARTED")
        self.assertEqual(started["details"], "Engine Started.")
        session = next(line for line in lines if line["event"] == "BINDING_WS_SESSION_ENDED")
        self.assertEqual((session["messages_received"], session["bytes_received"], session["closed_by"]),
                         (1, 5, "client"))
        self.assertEqual(session["trace"], accepted["trace"])

    @defer.inlineCallbacks
    def test_text_stays_zillas_line(self):
        gateway, port = yield start_gateway(self, chain())
        client = yield connect_ws(port)
        yield close_ws(client)
        for line in gateway.events_text.getvalue().splitlines():
            self.assertRegex(line, r"^test:\w+ \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] \[[0-9a-f]{16}d\] [A-Z_]+ ")


class FormatTests(unittest.TestCase):
    def test_fields_cannot_replace_the_head(self):
        record = EventRecord(0.5, "ns", "b", 1, "X_FAILED", "d", {"time": "forged", "event": "forged", "n": 1})
        line = json.loads(format_json(record))
        self.assertEqual((line["time"], line["event"], line["level"], line["n"]),
                         ("1970-01-01T00:00:00.500Z", "X_FAILED", "warning", 1))

    def test_text_is_the_details_line(self):
        record = EventRecord(0, "ns", "b", 255, "E", "- a b", {"ignored": 1})
        self.assertEqual(format_text(record), "ns:b [01/Jan/1970:00:00:00 +0000] [00000000000000ffd] E - a b")

    def test_rfc3339(self):
        self.assertEqual(rfc3339(1764590400.25), "2025-12-01T12:00:00.250Z")


class RecordQueueTests(unittest.TestCase):
    def test_bounded_the_oldest_dropped_and_counted(self):
        records = RecordQueue(limit=3)
        for n in range(5):
            records(EventRecord(n, "ns", "b", n, "E", "-"))
        self.assertEqual((len(records), records.dropped), (3, 2))
        self.assertEqual([r.trace_id for r in records.take(2)], [2, 3])
        self.assertEqual([r.trace_id for r in records.take(10)], [4])
        self.assertEqual(records.take(1), [])


class ConfigTests(unittest.TestCase):
    def problems(self, options: object) -> list[str]:
        config = copy.deepcopy(chain())
        config["telemetry"]["exporters"]["stdout"]["options"] = options
        with self.assertRaises(ConfigError) as caught:
            build_gateway(config)
        return caught.exception.problems

    def test_unknown_format_and_keys_are_refused_by_name(self):
        self.assertIn("telemetry.exporters.stdout.options.format: expected one of text, json, got 'xml'",
                      self.problems({"format": "xml"}))
        self.assertIn("telemetry.exporters.stdout.options.colour: not allowed here (expected: format)",
                      self.problems({"colour": True}))
