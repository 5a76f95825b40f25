#!/bin/sh
# Unpacks redis-server from Debian's packages into build/redis/ without installing it
# system-wide (apt-get download + dpkg -x; no service, no root paths), for the tests and
# bench/fan.py. Idempotent: does nothing when it is already there. Needs no stdin.
# Prints the path to run: the binary, or a wrapper setting LD_LIBRARY_PATH when a shared
# library it needs had to be unpacked beside it. The tests look there (or at
# $ZILLATW_REDIS_SERVER, which wins when set).
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/build/redis"
bin="$dest/usr/bin/redis-server"
wrapper="$dest/redis-server"

if [ -x "$wrapper" ]; then echo "$wrapper"; exit 0; fi
if [ -x "$bin" ] && ! ldd "$bin" | grep -q 'not found'; then echo "$bin"; exit 0; fi

command -v apt-get >/dev/null || { echo "install-redis.sh: needs apt-get (Debian)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
chmod 777 "$tmp"  # apt-get download as root hands the download to the _apt user
download() {
    apt-get download "$@" >/dev/null 2>"$tmp/apt.err" || {
        # a missing or stale package list (a fresh machine): refresh once, then retry
        apt-get update >/dev/null 2>&1 || true
        apt-get download "$@" >/dev/null
    }
}
# redis-server holds the symlink, redis-tools the binary it points to (redis-check-rdb)
download redis-server redis-tools
mkdir -p "$dest"
for deb in ./*.deb; do dpkg -x "$deb" "$dest"; done
[ -x "$bin" ] || { echo "install-redis.sh: no $bin in the packages" >&2; exit 1; }

if ldd "$bin" | grep -q 'not found'; then
    deps=$(ldd "$bin" | awk '/not found/ {print $1}')
    pkgs=$(apt-cache depends redis-tools | awk '/Depends: lib/ {print $2}' | sort -u)
    rm -f ./*.deb
    download $pkgs
    for deb in ./*.deb; do dpkg -x "$deb" "$dest"; done
    libdirs="$dest/lib/x86_64-linux-gnu:$dest/usr/lib/x86_64-linux-gnu:$dest/lib:$dest/usr/lib"
    if LD_LIBRARY_PATH="$libdirs" ldd "$bin" | grep 'not found' >&2; then
        echo "install-redis.sh: libraries still missing (above; wanted: $deps)" >&2; exit 1
    fi
    cat > "$wrapper" <<WRAP
#!/bin/sh
LD_LIBRARY_PATH="$libdirs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$bin" "\$@"
WRAP
    chmod +x "$wrapper"
    echo "$wrapper"
else
    echo "$bin"
fi
