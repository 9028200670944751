"""`multitalk doctor`: each check on this (GPU-less) machine, the thresholds on given numbers, the command."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from server.cli import doctor
from server.cli.doctor import GB, Check
from server.cli.main import main
from server.settings import OPTIONS

from repo_paths import REPO_ROOT

MEMINFO = """\
MemTotal:       65843212 kB
MemFree:         1234567 kB
MemAvailable:   51234567 kB
HugePages_Total:       0
"""
NO_GPU = not torch.cuda.is_available()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """The checks read the settings' variables: none leak in from the shell."""
    for option in OPTIONS:
        monkeypatch.delenv(option.env, raising=False)


def _is_sentence(text: str | None) -> bool:
    return bool(text) and text[0].isupper() and text.endswith(".")


def test_parse_meminfo_reads_bytes():
    fields = doctor.parse_meminfo(MEMINFO)
    assert fields["MemTotal"] == 65843212 * 1024
    assert fields["MemAvailable"] == 51234567 * 1024
    assert fields["HugePages_Total"] == 0


def test_system_memory_of_this_machine():
    available, total = doctor.system_memory()
    assert 0 < available <= total


@pytest.mark.parametrize("weights, memory, options, status", [
    ("/weights", (50 * GB, 128 * GB), {}, "ok"),
    ("/weights", (20 * GB, 32 * GB), {}, "ok"),  # bf16 streams to the GPU; only umT5 stays in CPU memory
    ("/weights", (20 * GB, 32 * GB), {"offload": "blocks"}, "fail"),  # the pinned blocks alone are ≈ 35 GB
    ("/weights", (60 * GB, 64 * GB), {"offload": "blocks"}, "ok"),
    ("/weights", (20 * GB, 32 * GB), {"weight_storage": "int8"}, "fail"),  # converted from bf16 on the CPU
    ("tiny", (2 * GB, 8 * GB), {}, "ok"),
    ("/weights", None, {}, "warn"),
])
def test_ram_against_the_memory_plan(weights, memory, options, status):
    check = doctor.check_ram(weights, memory, **options)
    assert check.status == status
    assert (check.fix is None) == (status == "ok")


# GPUs as they report their size: an "80 GB" H100 has 85 GB (79.2 GiB), an "48 GB" L40S 48 GB.
@pytest.mark.parametrize("weights, memory, options, status", [
    ("/weights", (84 * GB, 85 * GB), {}, "ok"),
    ("/weights", (65 * GB, 85 * GB), {}, "warn"),  # 480p fits, 720p with 3 passes does not
    ("/weights", (40 * GB, 85 * GB), {}, "fail"),
    ("/weights", (22 * GB, 24 * GB), {}, "fail"),
    ("/weights", (22 * GB, 24 * GB), {"weight_storage": "fp8"}, "fail"),
    ("/weights", (35 * GB, 48 * GB), {"weight_storage": "fp8"}, "fail"),
    ("/weights", (44 * GB, 48 * GB), {"weight_storage": "int8"}, "warn"),
    ("/weights", (8 * GB, 24 * GB), {"offload": "blocks"}, "fail"),
    ("/weights", (22 * GB, 24 * GB), {"offload": "blocks"}, "warn"),  # 480p on a 24 GB GPU
    ("/weights", (140 * GB, 150 * GB), {}, "ok"),
    ("/weights", None, {}, "warn"),
    ("tiny", None, {}, "ok"),
    ("tiny", (1 * GB, 8 * GB), {}, "ok"),
])
def test_vram_against_the_memory_plan(weights, memory, options, status):
    check = doctor.check_vram(weights, memory, **options)
    assert check.status == status
    assert check.fix is None if status == "ok" else _is_sentence(check.fix)
    if memory and weights != "tiny":
        assert "predicted peak" in check.detail


def test_disk_reports_free_space_of_a_data_dir_yet_to_be_created(tmp_path):
    check = doctor.check_disk(tmp_path / "data" / "multitalk")
    assert check.status in ("ok", "warn")
    assert f"to be created in {tmp_path}" in check.detail


def test_disk_fails_when_nearly_full_or_read_only(tmp_path, monkeypatch):
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: SimpleNamespace(free=GB // 2))
    assert doctor.check_disk(tmp_path).status == "fail"
    monkeypatch.setattr(doctor.os, "access", lambda path, mode: False)
    check = doctor.check_disk(tmp_path)
    assert check.status == "fail" and "not writable" in check.detail and _is_sentence(check.fix)


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_no_gpu_is_a_warning_with_a_fix():
    check = doctor.check_gpu("auto")
    assert check.status == "warn"
    assert check.detail.startswith("no GPU")
    assert _is_sentence(check.fix)


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_no_gpu_fails_when_the_device_setting_demands_cuda():
    assert doctor.check_gpu("cuda:0").status == "fail"
    assert doctor.gpu_memory("auto") is None


def test_torch_reports_its_build():
    check = doctor.check_torch()
    assert torch.__version__ in check.detail
    assert check.status == ("warn" if torch.version.cuda is None else "ok")


def test_python_version():
    assert doctor.check_python().status == "ok"
    assert doctor.check_python((3, 9, 18)).status == "fail"


def test_ffmpeg_from_the_imageio_ffmpeg_wheel_runs():
    check = doctor.check_ffmpeg()
    assert check.status == "ok", check
    assert "ffmpeg" in check.detail


def test_weights_tiny_real_layout_and_missing(tiny_weights, tmp_path):
    assert doctor.check_weights("tiny").status == "ok"
    found = doctor.check_weights(str(tiny_weights["diffusers"]))
    assert found.status == "ok" and "diffusers layout" in found.detail
    missing = doctor.check_weights(str(tmp_path / "nothing-here"))
    assert missing.status == "fail" and "not found" in missing.detail
    assert "MULTITALK_WEIGHTS" in missing.fix and _is_sentence(missing.fix)


def test_redis_unset_is_fine_unreachable_fails_without_showing_the_password():
    assert doctor.check_redis(None).status == "ok"
    check = doctor.check_redis("redis://user:s3cret@127.0.0.1:1/0")
    assert check.status == "fail"
    assert "s3cret" not in check.detail + check.fix and "***" in check.detail


def test_redis_that_answers(redis_url):
    assert doctor.check_redis(redis_url).status == "ok"


def test_settings_check_names_the_bad_variable():
    assert doctor.check_settings({}).status == "ok"
    bad = doctor.check_settings({"MULTITALK_PORT": "eighty"})
    assert bad.status == "fail" and "MULTITALK_PORT" in bad.detail


def test_an_invalid_unrelated_variable_does_not_stop_the_other_checks(tmp_path):
    environ = {"MULTITALK_WORKERS": "-1", "MULTITALK_WEIGHTS": "tiny", "MULTITALK_DATA_DIR": str(tmp_path)}
    settings = doctor.doctor_settings(None, environ)
    assert settings.weights == "tiny" and settings.data_dir == tmp_path
    checks = {check.name: check for check in doctor.run_checks(settings, environ)}
    assert checks["settings"].status == "fail"
    assert checks["weights"].status == "ok"


def test_a_crashing_check_is_a_failed_check():
    def broken() -> Check:
        raise RuntimeError("boom")

    check = doctor._guarded("gpu", broken)
    assert check.status == "fail" and "RuntimeError: boom" in check.detail and _is_sentence(check.fix)


def test_command_exits_0_with_tiny_weights_and_1_without_weights(tmp_path, capsys):
    assert main(["doctor", "--weights", "tiny", "--data-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "OK    weights" in text and "FAIL" not in text

    assert main(["doctor", "--weights", str(tmp_path / "missing"), "--data-dir", str(tmp_path)]) == 1
    text = capsys.readouterr().out
    assert "FAIL  weights" in text and "fix: " in text and "failed" in text.splitlines()[-1]


def test_json_report(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MULTITALK_WEIGHTS", str(tmp_path / "missing"))
    assert main(["doctor", "--json", "--data-dir", str(tmp_path)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    names = [check["name"] for check in report["checks"]]
    assert names == ["python", "settings", "torch", "gpu", "vram", "ram", "disk", "ffmpeg", "weights", "redis"]
    for check in report["checks"]:
        assert set(check) == {"name", "status", "detail", "fix"}
        assert check["status"] in ("ok", "warn", "fail")
        assert (check["fix"] is None) == (check["status"] == "ok")
    weights = next(check for check in report["checks"] if check["name"] == "weights")
    assert weights["status"] == "fail" and str(tmp_path / "missing") in weights["detail"]


def test_the_command_in_a_fresh_process(tmp_path):
    """`python -m server.cli.main doctor`, the code `multitalk doctor` (and `docker run IMAGE doctor`) runs."""
    done = subprocess.run([sys.executable, "-m", "server.cli.main", "doctor", "--json", "--weights", "tiny", "--data-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
                          env={key: value for key, value in os.environ.items() if key not in {option.env for option in OPTIONS}})
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["ok"] is True
