"""Count an Autobahn testsuite report (index.json): a case passes when its behaviour and its
close behaviour are OK, NON-STRICT or INFORMATIONAL; anything else (FAILED, UNIMPLEMENTED,
WRONG CODE) fails. Prints each failing case, then "conformance: N passed, M failed"; exits 1
on any failure."""

from __future__ import annotations

import json
import sys
from collections import Counter

PASSING = {"OK", "NON-STRICT", "INFORMATIONAL"}


def case_key(case_id: str) -> tuple[int, ...]:
    return tuple(int(part) for part in case_id.split("."))


def main(index_path: str) -> int:
    with open(index_path) as f:
        index = json.load(f)
    passed, failed = 0, []
    behaviours: Counter[str] = Counter()
    for agent, cases in index.items():
        for case_id in sorted(cases, key=case_key):
            result = cases[case_id]
            behaviours[result["behavior"]] += 1
            if result["behavior"] in PASSING and result["behaviorClose"] in PASSING:
                passed += 1
            else:
                failed.append(f"  {agent} {case_id}: {result['behavior']} (close: {result['behaviorClose']})"
                              f" see {result['reportfile']}")
    print("behaviours: " + ", ".join(f"{name} {count}" for name, count in sorted(behaviours.items())))
    if failed:
        print("failing cases:")
        print("\n".join(failed))
    print(f"conformance: {passed} passed, {len(failed)} failed")
    return 1 if failed or passed == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
