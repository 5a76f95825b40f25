#!/bin/sh
# Unpacks nginx from Debian's packages into bench/.nginx/ (see scripts/unpack-debs.sh);
# prints the path to run.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
exec sh "$here/../scripts/unpack-debs.sh" "$here/.nginx" usr/sbin/nginx nginx nginx-common
