#!/bin/sh
# Unpacks nginx from Debian's packages into bench/.nginx/ without installing it
# system-wide (apt-get download + dpkg -x; no root paths, no service).
# Idempotent: does nothing when it is already there. Prints the path to run.
# If a shared library nginx needs is missing, its Debian package is unpacked too and
# the printed path is a wrapper that sets LD_LIBRARY_PATH.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
dest="$here/.nginx"
bin="$dest/usr/sbin/nginx"
wrapper="$dest/nginx"

if [ -x "$wrapper" ]; then echo "$wrapper"; exit 0; fi
if [ -x "$bin" ] && ! ldd "$bin" | grep -q 'not found'; then echo "$bin"; exit 0; fi

command -v apt-get >/dev/null || { echo "install-nginx.sh: needs apt-get (Debian)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
# apt-get download as root writes unsandboxed; let the _apt user write here anyway
chmod 777 "$tmp"
download() {
    apt-get download "$@" >/dev/null 2>"$tmp/apt.err" || {
        # a stale or missing package list: refresh once, then retry
        apt-get update >/dev/null 2>&1 || true
        apt-get download "$@" >/dev/null
    }
}
download nginx nginx-common
mkdir -p "$dest"
for deb in ./*.deb; do dpkg -x "$deb" "$dest"; done

if ldd "$bin" | grep -q 'not found'; then
    # unpack nginx's library dependencies next to it
    deps=$(apt-cache depends nginx | awk '/Depends: lib|Depends: zlib/ {print $2}' | sort -u)
    rm -f ./*.deb
    download $deps
    for deb in ./*.deb; do dpkg -x "$deb" "$dest"; done
    libdirs="$dest/lib/x86_64-linux-gnu:$dest/usr/lib/x86_64-linux-gnu:$dest/lib:$dest/usr/lib"
    if LD_LIBRARY_PATH="$libdirs" ldd "$bin" | grep 'not found' >&2; then
        echo "install-nginx.sh: libraries still missing (above)" >&2; exit 1
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
