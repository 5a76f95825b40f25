#!/usr/bin/env bash
# Run wstest's fuzzingserver on PORT and the echoing driver (echo-client.py) through the
# gateway at URL, whose ws client proxies to the fuzzingserver: the tested client is the
# gateway's. The gateway must already run with its upstream at ws://127.0.0.1:PORT.
#   conformance/run-fuzzingserver.sh PORT ws://127.0.0.1:GATEWAY [CASE ...]   (default: every case)
# Ends with "conformance: N passed, M failed" and exits 1 if any case FAILED.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
port=${1:?usage: run-fuzzingserver.sh PORT GATEWAY_URL [CASE ...]}
gateway=${2:?usage: run-fuzzingserver.sh PORT GATEWAY_URL [CASE ...]}
shift 2
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=("*")
agent=${ZILLATW_AGENT:-zillatw-client}
python=${PYTHON:-python3}
wstest=$(bash "$here/install-wstest.sh")

# ZILLATW_REPORTS: another folder for the reports, so that runs side by side do not collide
work=${ZILLATW_REPORTS:-$here/reports}/$agent
rm -rf "$work"
mkdir -p "$work"
"$python" - "$work/spec.json" "ws://127.0.0.1:$port" "$work" "${cases[@]}" <<'PY'
import json, sys
spec_path, url, outdir, *cases = sys.argv[1:]
json.dump({"url": url, "outdir": outdir, "cases": cases, "exclude-cases": [],
           "exclude-agent-cases": {}}, open(spec_path, "w"), indent=2)
PY
(cd "$work" && exec "$wstest" -m fuzzingserver -s spec.json --webport 0) >"$work/wstest.log" 2>&1 &
fuzzingserver=$!
trap 'kill $fuzzingserver 2>/dev/null || true; wait $fuzzingserver 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    "$python" -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null && break
    kill -0 $fuzzingserver 2>/dev/null || { echo "fuzzingserver did not start:"; cat "$work/wstest.log"; exit 1; }
    sleep 0.1
done

echo "wstest fuzzingserver on $port, driven through $gateway (${cases[*]})"
"$python" "$here/echo-client.py" "ws://127.0.0.1:$port" "$agent" "${gateway#ws://}" >"$work/driver.log" 2>&1 || {
    echo "the driver failed:"; tail -20 "$work/driver.log"; exit 1; }
"$python" "$here/summarize.py" "$work/index.json"
