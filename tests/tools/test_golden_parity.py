"""Parity with the original implementation: every implemented golden check passes at its tolerance."""

import json
import subprocess
import sys

import pytest

from tools.golden import RUNNERS, GoldenFolder, run_check

from repo_paths import GOLDEN_DIR, REPO_ROOT

pytestmark = [pytest.mark.parity, pytest.mark.slow]


def _implemented_checks() -> list[str]:
    manifest = GOLDEN_DIR / "manifest.json"
    if not manifest.is_file():
        return ["<golden folder absent>"]
    return [c["name"] for c in json.loads(manifest.read_text())["checks"] if c["kind"] in RUNNERS]


@pytest.mark.parametrize("name", _implemented_checks())
def test_golden_check_passes(golden_dir, name):
    folder = GoldenFolder(golden_dir)
    check = next(c for c in folder.manifest["checks"] if c["name"] == name)
    result = run_check(folder, check)
    assert result.status == "PASS", result.line()


def test_golden_check_script_reports_every_check(golden_dir):
    run = subprocess.run([sys.executable, str(REPO_ROOT / "scripts/golden_check.py"), str(golden_dir)],
                         capture_output=True, text=True, timeout=600)
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    names = [c["name"] for c in GoldenFolder(golden_dir).manifest["checks"]]
    assert [line.split()[0] for line in lines] == names
    assert all(line.split()[3].startswith(("PASS", "SKIPPED(")) for line in lines), run.stdout
    assert run.returncode == 0


def test_golden_check_fails_on_a_wrong_number(golden_dir, tmp_path):
    """A folder whose expected values are perturbed makes the checker FAIL and exit non-zero."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(golden_dir, tmp_path / "g", ignore=shutil.ignore_patterns("e2e*", "teacache*", "pipeline*"))
    outputs = load_file(str(tmp_path / "g/dit_outputs.safetensors"))
    outputs["two_human.out"] = outputs["two_human.out"] + 1e-2
    save_file(outputs, str(tmp_path / "g/dit_outputs.safetensors"))
    run = subprocess.run([sys.executable, str(REPO_ROOT / "scripts/golden_check.py"), str(tmp_path / "g"), "--only", "^dit\\."],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 1
    assert "dit.two_human " in run.stdout and "FAIL" in run.stdout
    assert torch.isfinite(outputs["two_human.out"]).all()
