"""Events: the lines the ws server writes for each request it accepts or rejects (sharing the
connection's trace id with the http server's), and the event writer on its own.
(Metrics and the prometheus exporter: test_metrics.)"""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from zillatw.test.support import chain, close_ws, connect_ws, raw_exchange, start_gateway, upgrade_request


class WsEventTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_ws_server_reports_accepted_and_rejected(self):
        gateway, port = yield start_gateway(self, chain([{"when": [{"protocol": "echo"}], "exit": "echo"}]))
        client = yield connect_ws(port, "/room?x=1", protocols=["echo"])
        yield close_ws(client)
        yield raw_exchange(port, upgrade_request(headers={"Sec-WebSocket-Protocol": "chat"}))
        events = gateway.events_text.getvalue()
        self.assertRegex(events, r"(?m)^test:ws0 \[[^]]+\] \[[0-9a-f]{16}d\] BINDING_WS_REQUEST_ACCEPTED "
                                 r"- GET ws://127\.0\.0\.1:\d+/room\?x=1 echo$")
        self.assertRegex(events, r"(?m)^test:ws0 .* BINDING_WS_REQUEST_REJECTED - 404 no WebSocket route "
                                 r"for this request \(offered subprotocols: chat\)$")
        # The http server's accept and the ws server's share the connection's trace id.
        http_trace = next(line.split()[3] for line in events.splitlines() if "HTTP_REQUEST_ACCEPTED" in line)
        ws_trace = next(line.split()[3] for line in events.splitlines() if "WS_REQUEST_ACCEPTED" in line)
        self.assertEqual(http_trace, ws_trace)

    def test_binding_events_helper(self):
        import io

        from zillatw.telemetry.events import Events
        out = io.StringIO()
        events = Events.from_telemetry({"exporters": {"s": {"type": "stdout"}}}, out).binding("ns", "b0", "ws")
        events.accepted(1, "- GET ws://h/ echo")
        events.rejected(2, 403, "origin x is not allowed")
        events.guard_failed(3, "jwt", "alice token expired")
        events.validation_failed(4, "json", "not an object")
        events.engine("ENGINE_RELOADED", "Engine Reloaded.")
        lines = [line.split(" ", 3)[0] + " " + line.split("] ", 2)[2] for line in out.getvalue().splitlines()]
        self.assertEqual(lines, [
            "ns:b0 BINDING_WS_REQUEST_ACCEPTED - GET ws://h/ echo",
            "ns:b0 BINDING_WS_REQUEST_REJECTED - 403 origin x is not allowed",
            "ns:b0 GUARD_JWT_AUTHORIZATION_FAILED alice token expired",
            "ns:b0 MODEL_JSON_VALIDATION_FAILED not an object",
            "ns:engine ENGINE_RELOADED Engine Reloaded.",
        ])
        silent = Events().binding("ns", "b0", "ws")
        self.assertFalse(silent.enabled)
        silent.accepted(1, "nothing written")
