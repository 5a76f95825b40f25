"""`twistd zillaws`: options and the service. Everything about serving is in zilla.yaml."""

from __future__ import annotations

import sys

from twisted.python import usage

from zillatw.errors import ConfigError
from zillatw.runtime.reactor import install as install_reactor
from zillatw.runtime.reload import WATCH_INTERVAL, install_sighup
from zillatw.runtime.gateway import DRAIN_TIMEOUT, Gateway, build_gateway
from zillatw.runtime.shutdown import install_when_running
from zillatw.config.yamlload import DEFAULT_LIMITS, FLAGS, HELP, limits_from


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
    # Hot reload and workers: zillatw.runtime.reload, zillatw.runtime.workers.
    optParameters += [["workers", "w", 1, "worker processes accepting on the same sockets (a supervisor restarts them)", int],
                      ["listen-fds", None, None, "(set by the supervisor of -w for its workers)"]]
    optFlags += [["no-watch", None, "do not poll the configuration file for changes (SIGHUP still reloads)"]]
    # Bounds on reading the file, at startup and on every reload (zillatw.config.yamlload).
    optParameters += [[flag, None, getattr(DEFAULT_LIMITS, field), HELP[field], int] for field, flag in FLAGS.items()]

    def postOptions(self) -> None:
        try:
            self["limits"] = limits_from({flag: self[flag] for flag in FLAGS.values()})
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> Gateway:
    install_reactor()  # zillatw's epoll reactor, unless `twistd -r` installed one
    try:
        gateway = build_gateway(options["config"], drain_timeout=options["drain-timeout"], limits=options["limits"])
    except ConfigError as e:
        raise SystemExit(f"zillaws: {options['config']}: invalid configuration:\n{e}") from None
    gateway.ready_file = options["ready-file"]
    if options["verbose"]:
        sys.stdout.write(gateway.config.dump())
        sys.stdout.flush()
    from twisted.internet import reactor
    graceful = install_when_running(reactor)
    if options["workers"] > 1:
        from zillatw.runtime.workers import make_supervisor
        return make_supervisor(reactor, gateway, options, graceful)
    if options["listen-fds"] is not None:
        from zillatw.runtime.workers import become_worker
        become_worker(reactor, options["listen-fds"], gateway)
    gateway.watch_interval = None if options["no-watch"] else WATCH_INTERVAL
    gateway.verbose = options["verbose"]  # print a reloaded configuration too
    install_sighup(reactor, gateway)
    return gateway
