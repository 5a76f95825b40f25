"""`twistd zillaws`: options and the service. Everything about serving is in zilla.yaml."""

from __future__ import annotations

import sys

from twisted.python import usage

from zillatw.errors import ConfigError
from zillatw.reactor import install as install_reactor
from zillatw.service import DRAIN_TIMEOUT, Gateway, build_gateway
from zillatw.shutdown import install_when_running


class Options(usage.Options):
    synopsis = "[-c zilla.yaml] [-v]"
    longdesc = "Serve a Zilla configuration (zilla.yaml) with zillatw."
    optParameters = [["config", "c", "zilla.yaml", "the configuration file"],
                     ["ready-file", None, None, "write this file once listening, remove it on stop (health checks)"]]
    optParameters.append(
        # A process setting, like Zilla's engine properties (-P), not a binding's: how long the
        # orchestrator allows between SIGTERM and SIGKILL is the deployment's to say.
        ["drain-timeout", None, DRAIN_TIMEOUT, "on SIGTERM/SIGINT, seconds to wait for connections to close "
                                               "after sending 1001 (a second signal exits at once)", float])
    optFlags = [["verbose", "v", "print the resolved configuration before serving"]]


def makeService(options: Options) -> Gateway:
    install_reactor()  # zillatw's epoll reactor, unless `twistd -r` installed one
    try:
        gateway = build_gateway(options["config"], drain_timeout=options["drain-timeout"])
    except ConfigError as e:
        raise SystemExit(f"zillaws: {options['config']}: invalid configuration:\n{e}") from None
    gateway.ready_file = options["ready-file"]
    if options["verbose"]:
        sys.stdout.write(gateway.config.dump())
        sys.stdout.flush()
    from twisted.internet import reactor
    install_when_running(reactor)
    return gateway
