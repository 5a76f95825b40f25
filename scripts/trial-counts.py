"""Print 'passed failed' from a trial log's closing line, e.g. 'FAILED (failures=1, successes=9)'.

A log without a closing line (trial crashed) counts as one failure."""

import re
import sys

text = open(sys.argv[1], encoding="utf-8", errors="replace").read()
closing = re.findall(r"^(PASSED|FAILED) \((.*)\)\s*$", text, re.M)
if not closing:
    print(0, 1)
    sys.exit(0)
counts = {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", closing[-1][1])}
passed = counts.get("successes", 0)
failed = counts.get("failures", 0) + counts.get("errors", 0) + counts.get("unexpectedSuccesses", 0)
print(passed, failed)
