"""Parity checks against golden numbers produced by the original MultiTalk code.

Driven only by a folder's `manifest.json` (schema: `multitalk-golden-manifest` v1): for each check,
dispatch on `kind`, load the named inputs, run our implementation with the check's params, and
compare every `expected` entry under its tolerance. Nothing about file names, case names, shapes or
counts is assumed, so other folders of the same format (other configs, seeds, inputs) work too.
Kinds not implemented yet are reported as SKIPPED with the reason, never as a crash.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from tools.golden.folder import CheckResult, GoldenFolder, Skip, compare, subsample
from tools.golden.model_checks import MODEL_RUNNERS
from tools.golden.pipeline_checks import PIPELINE_RUNNERS

RUNNERS: dict[str, Callable[[GoldenFolder, dict], list]] = {**MODEL_RUNNERS, **PIPELINE_RUNNERS}


def run_check(folder: GoldenFolder, check: dict) -> CheckResult:
    runner = RUNNERS.get(check["kind"])
    if runner is None:
        return CheckResult(check["name"], "SKIPPED", reason=f"kind {check['kind']} not implemented yet")
    try:
        actuals = runner(folder, check)
    except Skip as skip:
        return CheckResult(check["name"], "SKIPPED", reason=str(skip))
    except Exception as exc:  # a crash is this check's failure, not the end of the run
        return CheckResult(check["name"], "FAIL", worst=f"{type(exc).__name__}: {exc}")
    worst_abs, worst_rel, passed, worst = 0.0, 0.0, True, ""
    try:
        for entry, actual in zip(check["expected"], actuals, strict=True):
            tolerance = entry.get("tolerance", check.get("tolerance", {}))
            max_abs, max_rel, ok = compare(subsample(actual, entry.get("transform")), folder.value(entry), tolerance)
            if max_rel >= worst_rel:
                worst = entry.get("tensor", entry.get("role", ""))
            worst_abs, worst_rel = max(worst_abs, max_abs), max(worst_rel, max_rel)
            if not ok:
                passed, worst = False, entry.get("tensor", entry.get("role", ""))
    except Skip as skip:  # an expected reference this checker cannot read: this check only, with the reason
        return CheckResult(check["name"], "SKIPPED", reason=str(skip))
    except Exception as exc:  # noqa: BLE001 - a crash is this check's failure, not the end of the run
        return CheckResult(check["name"], "FAIL", worst=f"{type(exc).__name__}: {exc}")
    return CheckResult(check["name"], "PASS" if passed else "FAIL", worst_abs, worst_rel, worst=worst)


def run_all(root: Path, only: str | None = None) -> list[CheckResult]:
    folder = GoldenFolder(root)
    return [run_check(folder, c) for c in folder.manifest["checks"] if only is None or re.search(only, c["name"])]
