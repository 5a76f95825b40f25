"""`twistd zillaws`: options and the service. Everything about serving is in zilla.yaml."""

from __future__ import annotations

import sys

from twisted.python import usage

from zillatw.errors import ConfigError
from zillatw.service import Gateway, build_gateway


class Options(usage.Options):
    synopsis = "[-c zilla.yaml] [-v]"
    longdesc = "Serve a Zilla configuration (zilla.yaml) with zillatw."
    optParameters = [["config", "c", "zilla.yaml", "the configuration file"],
                     ["ready-file", None, None, "write this file once listening, remove it on stop (health checks)"]]
    optFlags = [["verbose", "v", "print the resolved configuration before serving"]]


def makeService(options: Options) -> Gateway:
    try:
        gateway = build_gateway(options["config"])
    except ConfigError as e:
        raise SystemExit(f"zillaws: {options['config']}: invalid configuration:\n{e}") from None
    gateway.ready_file = options["ready-file"]
    if options["verbose"]:
        sys.stdout.write(gateway.config.dump())
        sys.stdout.flush()
    return gateway
