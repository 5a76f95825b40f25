#!/usr/bin/env bash
# Install the Autobahn testsuite (wstest, Python 2.7 only) into conformance/.wstest, from
# packages alone and without touching the system: Python 2.7 from Debian bullseye's archive
# (downloaded with a private apt state and extracted with dpkg -x), pip 20.3.4 from PyPI,
# then autobahntestsuite and its pinned Python 2 dependencies.
# Idempotent: does nothing when conformance/.wstest/bin/wstest already runs.
# Prints the path of the wstest wrapper.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
prefix=$here/.wstest
wstest=$prefix/bin/wstest

if [ -x "$wstest" ] && "$wstest" --help >/dev/null 2>&1; then
    echo "$wstest"
    exit 0
fi
rm -rf "$prefix"
mkdir -p "$prefix/apt/lists/partial" "$prefix/apt/cache/archives/partial" "$prefix/debs" "$prefix/root" "$prefix/bin"

# --- Python 2.7 from Debian bullseye, in a private prefix ------------------------------------
cat >"$prefix/apt/sources.list" <<'EOF'
deb [signed-by=/usr/share/keyrings/debian-archive-bullseye-stable.gpg] http://deb.debian.org/debian bullseye main
EOF
apt_opts=(
    -o "Dir::Etc::SourceList=$prefix/apt/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$prefix/apt/lists"
    -o "Dir::Cache=$prefix/apt/cache"
    -o "Debug::NoLocking=1"
    -o "APT::Get::List-Cleanup=0"
    -o "APT::Sandbox::User=root"  # private dirs: no _apt user to drop to
)
echo "wstest: fetching Python 2.7 from Debian bullseye" >&2
apt-get "${apt_opts[@]}" -qq update >&2
# the interpreter, its stdlib and headers (wsaccel and Twisted compile against them), and the
# libraries bullseye's stdlib links that bookworm no longer has (OpenSSL 1.1, libffi 7)
packages=(python2.7-minimal libpython2.7-minimal python2.7 libpython2.7-stdlib
          libpython2.7 libpython2.7-dev python2.7-dev libssl1.1 libffi7)
(cd "$prefix/debs" && apt-get "${apt_opts[@]}" -qq download "${packages[@]}" >&2)
for deb in "$prefix"/debs/*.deb; do
    dpkg -x "$deb" "$prefix/root"
done

root=$prefix/root
libs=$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu
cat >"$prefix/bin/python2" <<EOF
#!/bin/sh
# Python 2.7 from Debian bullseye, run from its private prefix
export PYTHONHOME="$root/usr"
export LD_LIBRARY_PATH="$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export PYTHONNOUSERSITE=1
exec "$root/usr/bin/python2.7" "\$@"
EOF
chmod +x "$prefix/bin/python2"
python2=$prefix/bin/python2
"$python2" -c 'import ssl, ctypes, zlib, sqlite3' >&2

# --- pip 20.3.4, then the testsuite with pinned dependencies --------------------------------
site=$prefix/site
mkdir -p "$site" "$prefix/wheels"
export PYTHONPATH=$site
py3=${PYTHON:-python3}
"$py3" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$prefix/wheels" pip==20.3.4 setuptools==44.1.1 wheel==0.37.1 >&2
pipwheel=$(ls "$prefix"/wheels/pip-20.3.4-*.whl)
"$python2" "$pipwheel/pip" install -q --no-index --target "$site" \
    "$pipwheel" "$prefix"/wheels/setuptools-44.1.1-*.whl "$prefix"/wheels/wheel-0.37.1-*.whl >&2
pip2() { "$python2" -m pip --disable-pip-version-check --no-python-version-warning "$@"; }

export CFLAGS="-I$root/usr/include -I$root/usr/include/python2.7 -I$root/usr/include/x86_64-linux-gnu/python2.7"
export LDFLAGS="-L$root/usr/lib/x86_64-linux-gnu"
echo "wstest: installing autobahntestsuite and its Python 2 dependencies" >&2
pip2 install -q --target "$site" --upgrade \
    Twisted==19.10.0 autobahn==0.10.9 txaio==2.1.0 cryptography==3.3.2 pyOpenSSL==19.1.0 \
    klein==17.10.0 Werkzeug==1.0.1 jinja2==2.11.3 markupsafe==1.1.1 service_identity==18.1.0 \
    unittest2 six zope.interface==4.6.0 incremental==16.10.1 wsaccel==0.6.2 \
    attrs==21.4.0 pyasn1==0.4.8 pyasn1-modules==0.2.8 idna==2.10 enum34 ipaddress \
    cffi==1.15.1 pycparser==2.21 constantly==15.1.0 Automat==0.8.0 hyperlink==21.0.0 \
    PyHamcrest==1.10.1 traceback2 linecache2 typing==3.10.0.0 >&2

# autobahntestsuite 0.8.2 (the last release of the classic suite), as its universal wheel: its
# sdist's setup.py reads a requirements.txt it does not ship, and its pins are already above
pip2 install -q --no-deps --only-binary=:all: --target "$site" autobahntestsuite==0.8.2 >&2

cat >"$wstest" <<EOF
#!/bin/sh
# wstest (Autobahn testsuite) on the private Python 2.7
# addsitedir, not PYTHONPATH: it runs the .pth files that make zope a namespace package
exec "$python2" -c 'import site, sys; site.addsitedir(sys.argv.pop(1)); sys.argv[0] = "wstest"
from autobahntestsuite.wstest import run; run()' "$site" "\$@"
EOF
chmod +x "$wstest"
"$wstest" --help >/dev/null
echo "$wstest"
