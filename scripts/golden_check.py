#!/usr/bin/env python3
"""Run every check of a golden folder's manifest.json against this implementation.

Usage: python scripts/golden_check.py DIR [--only REGEX]
Prints one line per check: NAME max_abs max_rel PASS|FAIL|SKIPPED(reason)
(max_rel = max |actual − expected| / max |expected|). Exits 0 only if nothing FAILs.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.golden import run_all  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="folder with a multitalk-golden-manifest manifest.json")
    parser.add_argument("--only", help="regex: run only the checks whose name matches")
    args = parser.parse_args()
    results = run_all(args.folder, args.only)
    for result in results:
        print(result.line(), flush=True)
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIPPED")}
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIPPED']} skipped", file=sys.stderr)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
