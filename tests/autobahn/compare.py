#!/usr/bin/env python3
"""Compares an Autobahn (kosoku) index.json with the committed expected results.

A case fails when its behaviour is worse than expected or when it is missing. OK, NON-STRICT and
INFORMATIONAL are all passing verdicts of the suite (which one a case gets can depend on how
the kernel splits frames into reads), then UNIMPLEMENTED, then FAILED and the rest. Better-than-expected cases are reported so the
expectations can be raised. Exit 0 only when nothing regressed.
"""
import json
import sys

RANK = {"OK": 3, "NON-STRICT": 3, "INFORMATIONAL": 3, "UNIMPLEMENTED": 2}


def rank(value):
    return RANK.get(value, 0)


def main(expected_path, actual_path):
    expected = json.load(open(expected_path))
    actual_all = json.load(open(actual_path))
    actual = next(iter(actual_all.values())) if actual_all else {}
    passed, failed, improved = 0, [], []
    for case, want in expected.items():
        got = actual.get(case)
        if got is None:
            failed.append(f"{case}: missing from the run")
            continue
        worse = [f for f in ("behavior", "behaviorClose") if rank(got[f]) < rank(want[f])]
        if worse:
            failed.append(f"{case}: " + ", ".join(f"{f} {got[f]} (expected {want[f]})" for f in worse))
        else:
            passed += 1
            if any(rank(got[f]) > rank(want[f]) for f in ("behavior", "behaviorClose")):
                improved.append(case)
    for line in failed:
        print("REGRESSION " + line)
    if improved:
        print(f"better than expected (raise tests/autobahn/expected.json): {', '.join(improved[:20])}")
    print(f"autobahn: {passed} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
