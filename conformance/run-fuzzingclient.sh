#!/usr/bin/env bash
# Run wstest's fuzzingclient (Autobahn testsuite cases) against the WebSocket server at URL.
#   conformance/run-fuzzingclient.sh ws://127.0.0.1:9001 [CASE ...]     (default: every case)
# Cases are wstest patterns ("1.*", "12.1.*", "6.4.1"). Reports go to conformance/reports/<agent>/.
# Ends with "conformance: N passed, M failed" and exits 1 if any case FAILED.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
url=${1:?usage: run-fuzzingclient.sh URL [CASE ...]}
shift
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=("*")
agent=${ZILLATW_AGENT:-zillatw}
wstest=$(bash "$here/install-wstest.sh")

# ZILLATW_REPORTS: another folder for the reports, so that runs side by side do not collide
work=${ZILLATW_REPORTS:-$here/reports}/$agent
rm -rf "$work"
mkdir -p "$work"
python3 - "$work/spec.json" "$url" "$agent" "$work" "${cases[@]}" <<'PY'
import json, sys
spec_path, url, agent, outdir, *cases = sys.argv[1:]
spec = {"outdir": outdir, "servers": [{"agent": agent, "url": url}],
        "cases": cases, "exclude-cases": [], "exclude-agent-cases": {}}
json.dump(spec, open(spec_path, "w"), indent=2)
PY
echo "wstest fuzzingclient -> $url (${cases[*]})"
(cd "$work" && "$wstest" -m fuzzingclient -s spec.json) >"$work/wstest.log" 2>&1 || {
    echo "wstest failed:"; tail -20 "$work/wstest.log"; exit 1; }
python3 "$here/summarize.py" "$work/index.json"
