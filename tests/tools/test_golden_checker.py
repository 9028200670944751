"""The golden checker itself, on a small folder of its format: every documented reference form, and a check it
cannot evaluate is reported (SKIPPED or FAIL with the reason), never a crash of the whole run."""

import json

import pytest
import torch
from safetensors.torch import save_file

import tools.golden
from tools.golden import run_all

VIDEO = torch.arange(3 * 5 * 17 * 17, dtype=torch.float32).reshape(3, 5, 17, 17)
SUBSAMPLE = "video[:, :, ::8, ::8]"


def _folder(tmp_path, checks: list[dict]):
    save_file({"video_sub": VIDEO[:, :, ::8, ::8].contiguous(), "video_sub_wrong": VIDEO[:, :, ::8, ::8] + 1,
               "video": VIDEO}, str(tmp_path / "out.safetensors"))
    manifest = {"schema": "multitalk-golden-manifest", "schema_version": 1, "set": "test", "models": {},
                "checks": checks}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def _check(name: str, expected: dict, kind: str = "echo") -> dict:
    return {"name": name, "kind": kind, "inputs": {}, "params": {}, "tolerance": {"exact": True},
            "expected": [{"role": "video", "file": "out.safetensors", **expected}]}


@pytest.fixture(autouse=True)
def echo_runner(monkeypatch):
    """A kind whose implementation 'produces' the full video."""
    monkeypatch.setitem(tools.golden.RUNNERS, "echo", lambda folder, check: [VIDEO])


def test_every_reference_form_and_failure_is_reported_per_check(tmp_path):
    folder = _folder(tmp_path, [
        _check("whole", {"tensor": "video"}),
        _check("subsampled", {"tensor": "video_sub", "transform": SUBSAMPLE}),
        _check("subsampled_wrong", {"tensor": "video_sub_wrong", "transform": SUBSAMPLE}),
        _check("unknown_transform", {"tensor": "video", "transform": "mirror"}),
        _check("missing_tensor", {"tensor": "no_such_tensor"}),
        _check("unknown_kind", {"tensor": "video"}, kind="not_a_kind"),
        _check("after_the_failures", {"tensor": "video"}),
    ])
    results = {r.name: r for r in run_all(folder)}
    assert [r.status for r in results.values()] == ["PASS", "PASS", "FAIL", "SKIPPED", "FAIL", "SKIPPED", "PASS"]
    assert results["subsampled_wrong"].max_abs == 1.0
    assert "mirror" in results["unknown_transform"].reason
    assert "no_such_tensor" in results["missing_tensor"].worst
    assert "not_a_kind" in results["unknown_kind"].reason


def test_a_subsample_transform_cuts_the_implementations_value():
    from tools.golden.folder import subsample

    assert torch.equal(subsample(VIDEO, SUBSAMPLE), VIDEO[:, :, ::8, ::8])
    assert torch.equal(subsample(VIDEO, "video[..., 1:3]"), VIDEO[..., 1:3])
    assert subsample(VIDEO, None) is VIDEO
