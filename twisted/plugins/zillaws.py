# The twistd plugin: `twistd -n zillaws -c zilla.yaml`. All logic lives in zillatw.tap.
from twisted.application.service import ServiceMaker

zillaws = ServiceMaker(
    "zillatw WebSocket gateway",
    "zillatw.tap",
    "Serve a Zilla zilla.yaml (tcp, http, ws, echo, fan bindings) on Twisted.",
    "zillaws",
)
