#!/bin/sh
# Unpack a program from Debian's packages into a folder of the project's, without installing
# anything system-wide (apt-get download + dpkg -x; no service, no root paths, no stdin):
#   scripts/unpack-debs.sh DEST BIN PACKAGE...
# BIN is the program's path inside DEST (e.g. usr/bin/redis-server). Idempotent: does nothing
# when BIN already runs. If a shared library BIN needs is missing from this machine, the
# packages' library dependencies are unpacked beside it and DEST/<name> becomes a wrapper
# setting LD_LIBRARY_PATH. Prints the path to run: the binary, or that wrapper.
set -eu
dest=$1 bin=$1/$2
shift 2
name=$(basename "$bin")
wrapper="$dest/$name"

if [ -x "$wrapper" ] && [ "$wrapper" != "$bin" ]; then echo "$wrapper"; exit 0; fi
if [ -x "$bin" ] && ! ldd "$bin" | grep -q 'not found'; then echo "$bin"; exit 0; fi

command -v apt-get >/dev/null || { echo "unpack-debs.sh: needs apt-get (Debian)" >&2; exit 1; }
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
download "$@"
mkdir -p "$dest"
for deb in ./*.deb; do dpkg -x "$deb" "$dest"; done
[ -x "$bin" ] || { echo "unpack-debs.sh: no $bin in the packages $*" >&2; exit 1; }

if ldd "$bin" | grep -q 'not found'; then
    wanted=$(ldd "$bin" | awk '/not found/ {print $1}')
    libs=$(for p in "$@"; do apt-cache depends "$p"; done | awk '/Depends: lib|Depends: zlib/ {print $2}' | sort -u)
    rm -f ./*.deb
    download $libs
    for deb in ./*.deb; do dpkg -x "$deb" "$dest"; done
    libdirs="$dest/lib/x86_64-linux-gnu:$dest/usr/lib/x86_64-linux-gnu:$dest/lib:$dest/usr/lib"
    if LD_LIBRARY_PATH="$libdirs" ldd "$bin" | grep 'not found' >&2; then
        echo "unpack-debs.sh: libraries still missing (above; wanted: $wanted)" >&2; exit 1
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
