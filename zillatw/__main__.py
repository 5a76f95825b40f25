"""`python -m zillatw check FILE`: validate a configuration without serving it."""

from __future__ import annotations

import argparse
import sys

from zillatw.errors import ConfigError
from zillatw.runtime.graph import BindingGraph
from zillatw.runtime.gateway import load_config
from zillatw.runtime.standard import standard_registry
from zillatw.config.yamlload import DEFAULT_LIMITS, FLAGS, HELP, limits_from


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zillatw")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate a zilla.yaml and print its errors")
    check.add_argument("file")
    check.add_argument("-v", "--verbose", action="store_true", help="print the resolved configuration")
    for field, flag in FLAGS.items():
        check.add_argument(f"--{flag}", type=int, metavar="N",
                           help=f"{HELP[field]} (default {getattr(DEFAULT_LIMITS, field):,})")
    args = parser.parse_args(argv)
    try:
        limits = limits_from({flag: getattr(args, flag.replace("-", "_")) for flag in FLAGS.values()})
    except ValueError as e:
        check.error(str(e))
    try:
        registry = standard_registry()
        config = load_config(args.file, limits=limits, registry=registry)
        # Building the bindings (no sockets: nothing listens or connects, so the reactor is
        # only held) also reads vault files and resolves their aliases.
        from twisted.internet import reactor
        BindingGraph(config, registry, reactor=reactor).build_all()
    except ConfigError as e:
        print(f"{args.file}: invalid configuration:\n{e}", file=sys.stderr)
        return 1
    if args.verbose:
        sys.stdout.write(config.dump())
    count = sum(len(ns.bindings) for ns in config.namespaces)
    names = ", ".join(ns.name for ns in config.namespaces)
    print(f"{args.file}: valid ({count} bindings in {names})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
