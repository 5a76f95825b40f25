#!/bin/sh
# Unpacks redis-server from Debian's packages into build/redis/ (see unpack-debs.sh), for the
# tests and bench/fan.py; prints the path to run. The tests look there (or at
# $ZILLATW_REDIS_SERVER, which wins when set).
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
# redis-server holds the symlink, redis-tools the binary it points to (redis-check-rdb)
exec sh "$root/scripts/unpack-debs.sh" "$root/build/redis" usr/bin/redis-server redis-server redis-tools
