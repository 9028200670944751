"""scripts/benchmark.py runs end to end on the tiny models and reports every case (a benchmark is no test:
nothing here asserts a time, only that each number exists, is positive and the ratios are consistent)."""

import json
import os
import subprocess
import sys

import pytest

from repo_paths import REPO_ROOT

pytestmark = [pytest.mark.slow]

SCRIPT = REPO_ROOT / "scripts" / "benchmark.py"
PRESETS = ("none", "regular", "high", "regular-teacache", "high-teacache")
CPU_OPTIONS = ("attention=auto", "attention=native", "attention=_native_math", "attention=flash",
               "weights=fp8", "weights=fp8-storage", "weights=int8", "offload=blocks")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    # One thread: the tiny model's work is far too small to share, and on a busy 2-core machine a
    # second thread only waits for the first.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), "--config", "tiny", "--device", "cpu", "--out", str(out)]  # 32 × 64 px
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout, out


def test_environment_and_matmul_rate(tiny_run):
    result, _, _ = tiny_run
    env = result["environment"]
    for key in ("date", "command", "torch", "diffusers", "device"):
        assert env[key]
    assert "--config tiny" in env["command"]
    assert result["matmul"]["tflops"] > 0
    assert result["settings"]["frame_size"] == [32, 64]


def test_every_preset_and_speaker_count_has_its_numbers(tiny_run):
    result, _, _ = tiny_run
    loop = result["loop"]
    assert loop["grid"] == [6, 4, 8]
    rows = {(r["preset"], r["speakers"]): r for r in loop["presets"]}
    assert set(rows) == {(p, s) for p in PRESETS for s in (1, 2)}
    for (preset, _), row in rows.items():
        assert row["steps"] == {"none": 40, "regular": 8, "high": 4, "regular-teacache": 40, "high-teacache": 20}[preset]
        assert row["passes"] == (2 if preset in ("regular", "high") else 3)
        for key in ("s_per_step", "s_per_pass", "flops_per_step", "floor_s_per_step", "ratio_to_floor", "peak_memory_gib",
                    "reference_s_per_step", "speedup_over_reference", "loop_s"):
            assert row[key] > 0, (preset, key)
        assert row["s_per_pass"] == pytest.approx(row["s_per_step"] / row["passes"])
        assert row["ratio_to_floor"] == pytest.approx(row["s_per_step"] / row["floor_s_per_step"])
        assert row["floor_s_per_step"] == pytest.approx(row["flops_per_step"] / (result["matmul"]["tflops"] * 1e12))
        assert row["speedup_over_reference"] == pytest.approx(row["reference_s_per_step"] / row["s_per_step"])
        assert ("s_per_skipped_step" in row) == preset.endswith("teacache")
    schedules = {(m["name"].split("/")[0], m["speakers"], m["schedule"]) for m in loop["measurements"]}
    for passes in ("3-pass", "2-pass+lora"):
        for speakers in (1, 2):
            assert {(passes, speakers, "batched"), (passes, speakers, "reference")} <= schedules
    lora_rows = [m for m in loop["measurements"] if m["name"].startswith("2-pass")]
    assert all(m["lora_rank"] == 4 for m in lora_rows)


def test_every_execution_option_is_measured_or_says_why_not(tiny_run):
    result, _, _ = tiny_run
    rows = {r["name"]: r for r in result["options"]}
    assert set(rows) == set(CPU_OPTIONS)
    for name, row in rows.items():
        assert row["status"] in ("ok", "unavailable"), (name, row.get("note"))
        if row["status"] == "ok":
            assert row["s_per_step"] > 0 and row["peak_memory_gib"] > 0 and row["ratio_to_floor"] > 0
        else:
            assert row["note"]
    assert rows["attention=native"]["status"] == "ok"
    assert rows["weights=fp8"]["status"] == "unavailable"  # float8 matmuls need an Ada/Hopper GPU


def test_end_to_end_request_and_targets(tiny_run):
    result, stdout, out = tiny_run
    (row,) = result["e2e"]
    assert row["acceleration"] == "high" and row["num_frames"] == 41 and row["speakers"] == 2
    assert "steps=4" in row["settings"] and "passes=2" in row["settings"] and "lightx2v" in row["settings"]
    assert row["total_s"] > 0 and row["timings"]["sampling_s"] > 0
    assert {c["target"].split(" ")[0] for c in result["targets"]} >= {"`none`", "default", "peak"}
    for table in ("| preset |", "| options |", "| acceleration |", "| target |"):
        assert table in stdout

    merged = subprocess.run([sys.executable, str(SCRIPT), "--merge", str(out), str(out)], capture_output=True,
                            text=True, timeout=120, cwd=REPO_ROOT)
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert merged.stdout.count("| high | 41 |") == 2  # the e2e rows of both files
