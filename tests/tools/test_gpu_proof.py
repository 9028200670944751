"""scripts/gpu_proof.py, the one-call GPU proof: its GPU form fits the 8-minute device command, every stage ends done,
skipped with a reason or failed with its error while the JSON stays valid, and on a CPU with the tiny models every
stage runs, so the script cannot rot between the sessions that have a GPU. (A benchmark is no test: nothing here
asserts a time, only that each number exists and that the numerics and counts are what they must be.)"""

import importlib.util
import json
import os
import subprocess
import sys
import time
import warnings

import pytest

from repo_paths import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "gpu_proof.py"
# Runs the script with what the GPU machine must never need made unimportable: model.pipeline, and numba and
# llvmlite (librosa's compiled parts, which the image's wheels do not bring along).
GUARDED = """
import importlib.abc, runpy, sys

class NotOnTheGpuMachine(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "model.pipeline" or name.split(".")[0] in ("numba", "llvmlite"):
            raise ImportError(f"the GPU proof must not import {name}")
        return None

sys.meta_path.insert(0, NotOnTheGpuMachine())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def gpu_proof():
    spec = importlib.util.spec_from_file_location("gpu_proof", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_proof"] = module
    spec.loader.exec_module(module)
    return module


def run_proof(tmp_path, *arguments: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "gpu_proof.json"
    # One thread: the tiny model's work is far too small to share, and on a busy 2-core machine a second thread
    # only waits for the first.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", GUARDED, str(SCRIPT), "--config", "tiny", "--device", "cpu",
                           "--out", str(out), *arguments], check=False, capture_output=True, text=True, timeout=900,
                          env=env, cwd=tmp_path)
    assert out.is_file(), done.stderr[-3000:]
    return done, json.loads(out.read_text())


def test_the_gpu_form_fits_the_8_minute_device_command(gpu_proof):
    names = [stage.name for stage in gpu_proof.STAGES]
    for config, estimates in gpu_proof.ESTIMATES_S.items():
        assert list(estimates) == names, config
    assert gpu_proof.DEFAULT_BUDGET_S == 420
    # start (interpreter, imports) + every stage's estimate within the script's budget ...
    assert gpu_proof.START_S + sum(gpu_proof.ESTIMATES_S["14b"].values()) <= gpu_proof.DEFAULT_BUDGET_S
    # ... and the wheel install + that budget + the exit within the 8 minutes of the device command
    assert gpu_proof.WHEEL_INSTALL_S + gpu_proof.DEFAULT_BUDGET_S + gpu_proof.EXIT_S <= 8 * 60
    script = (REPO_ROOT / "scripts" / "device_benchmark.sh").read_text()
    assert f"budget=$(( {gpu_proof.COMMAND_LIMIT_S - gpu_proof.EXIT_S} - (SECONDS - started) ))" in script
    assert f"budget > {gpu_proof.DEFAULT_BUDGET_S} ? {gpu_proof.DEFAULT_BUDGET_S}" in script


def test_each_stage_ends_done_skipped_or_failed_and_the_json_is_valid_after_each(gpu_proof, tmp_path):
    out = tmp_path / "proof.json"
    args = gpu_proof.parse_args(["--config", "tiny", "--device", "cpu", "--budget-s", "1e6", "--out", str(out)])

    def fails(proof, result):
        result["partial"] = 1
        raise RuntimeError("boom")

    def reads_the_json(proof, result):
        result["seen"] = {name: entry["status"] for name, entry in json.loads(out.read_text())["stages"].items()}

    def not_here(proof, result):
        raise gpu_proof.NotHere("needs a GPU")

    stages = tuple(gpu_proof.Stage(name, run) for name, run in (
        ("fails", fails), ("reads", reads_the_json), ("too_long", reads_the_json), ("not_here", not_here),
        ("last", reads_the_json)))
    proof = gpu_proof.Proof(args, [stage.name for stage in stages], tmp_path)
    gpu_proof.run_stages(proof, stages, {"fails": 0, "reads": 0, "too_long": 1e7, "not_here": 0, "last": 0})

    result = json.loads(out.read_text())["stages"]
    assert result["fails"]["status"] == "failed" and result["fails"]["error"] == "RuntimeError: boom"
    assert "RuntimeError: boom" in result["fails"]["traceback"] and result["fails"]["result"] == {"partial": 1}
    # The next stage ran and read a valid file that already recorded the failure, and itself as running.
    assert result["reads"]["status"] == "done"
    assert result["reads"]["result"]["seen"] == {"fails": "failed", "reads": "running", "too_long": "pending",
                                                 "not_here": "pending", "last": "pending"}
    assert result["too_long"]["status"] == "skipped" and result["too_long"]["reason"].startswith("needs ≈ 1e+07 s")
    assert result["not_here"]["status"] == "skipped" and result["not_here"]["reason"] == "needs a GPU"
    assert result["last"]["status"] == "done"
    assert all(entry["seconds"] >= 0 for name, entry in result.items() if name != "too_long")


def test_the_watchdog_ends_a_stage_at_the_end_of_the_budget(gpu_proof, tmp_path):
    args = gpu_proof.parse_args(["--config", "tiny", "--device", "cpu", "--out", str(tmp_path / "proof.json")])

    def endless(proof, result):
        while True:
            time.sleep(0.01)

    stages = (gpu_proof.Stage("endless", endless), gpu_proof.Stage("after", endless))
    proof = gpu_proof.Proof(args, ["endless", "after"], tmp_path)
    args.budget_s = proof.elapsed() + 0.5
    gpu_proof.run_stages(proof, stages, {"endless": 0, "after": 0})

    result = json.loads(args.out.read_text())["stages"]
    assert result["endless"]["status"] == "failed"
    assert result["endless"]["error"].startswith("BudgetExhausted: stopped at the end of the budget")
    assert result["after"]["status"] == "skipped" and "of the budget left" in result["after"]["reason"]


def test_host_syncs_are_counted_per_step_with_where_they_come_from(gpu_proof):
    def two_steps(on_step):
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
        on_step(1, 2)
        warnings.warn("an unrelated warning", stacklevel=1)
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
        on_step(2, 2)

    counted = gpu_proof.count_syncs(two_steps)
    assert counted["per_step"] == [2, 1]
    assert sum(counted["where"].values()) == 3
    assert all(place.startswith("test_gpu_proof.py:") for place in counted["where"])


@pytest.mark.slow
def test_every_stage_runs_on_the_tiny_models_on_a_cpu(gpu_proof, tmp_path):
    done, result = run_proof(tmp_path, "--budget-s", "600")
    assert done.returncode == 0, done.stderr[-3000:]
    stages = result["stages"]
    assert list(stages) == [stage.name for stage in gpu_proof.STAGES]
    statuses = {name: entry["status"] for name, entry in stages.items()}
    assert statuses == {**{name: "done" for name in stages}, "syncs": "skipped"}
    assert "CUDA only" in stages["syncs"]["reason"]
    r = {name: entry["result"] for name, entry in stages.items()}

    assert r["versions"]["attention_auto"] == "native" and r["versions"]["matmul"]["tflops"] > 0
    assert r["versions"]["environment"]["torch"] and r["versions"]["attention_candidates"]["native"] == "usable"

    kernels = {row["kernel"]: row for row in r["attention"]["rows"]}
    assert kernels["native"]["status"] == "ok" and kernels["native"]["s_per_call"] > 0
    assert kernels["native"]["error_vs_fp32"]["max"] < 2e-2  # bf16 inputs against the fp32 reference
    assert kernels["flash"]["status"] == "unavailable" and kernels["flash"]["note"]

    assert r["dit_none"]["passes"] == 3 and r["dit_lora"]["passes"] == 2 and r["dit_lora"]["lora_rank"] == 4
    for name in ("dit_none", "dit_lora"):
        assert r[name]["s_per_step"] > 0 and r[name]["ratio_to_floor"] > 0
        assert {"gpu_peak_bytes", "error"} & set(r[name]["memory"]["prediction"])
    assert r["dit_teacache_skip"]["teacache_skip"] and r["dit_teacache_skip"]["s_per_step"] > 0
    assert r["dit_720p"]["passes"] == 3 and len(r["dit_720p"]["step_seconds"]) == 1  # one step: the peak
    assert r["dit_720p"]["ratio_to_floor"] > 0
    assert r["dit_720p"]["memory"]["prediction"]["case"]["resolution"] == "720p"

    assert r["vae"]["frames"] == 21 and r["vae"]["latent_shape"] == [1, 16, 6, 4, 8]
    assert r["vae"]["encode_s"] > 0 and r["vae"]["decode_s"] > 0
    profiled = r["profile"]
    assert set(profiled["groups_s"]) == {"matmul", "attention", "copy", "element-wise and other"}
    assert profiled["groups_s"]["matmul"] > 0 and profiled["groups_s"]["attention"] > 0
    assert 0 < sum(profiled["groups_s"].values()) and len(profiled["top_s"]) == gpu_proof.PROFILE_TOP
    assert profiled["clock"] == "cpu" and profiled["step_s"] > 0

    variants = r["vae"]["variants"]
    assert list(variants) == ["served", "fp32", "bf16"]
    assert variants["served"]["decode_error_vs_fp32"]["max"] == 0  # a CPU has no TF32: the same fp32 arithmetic
    assert 0 < variants["bf16"]["decode_error_vs_fp32"]["max"] < 0.2
    assert variants["bf16"]["encode_error_vs_fp32"]["finite"]
    assert all(r["encoders"][f"{name}_s"] > 0 for name in ("umt5", "clip", "wav2vec2"))
    assert set(r["encoders"]["weights_bytes"]) == {"text_encoder", "image_encoder", "audio_encoder"}

    assert len(r["drift"]["blocks"]) == 2
    assert all(e["finite"] and 0 < e["max"] < 5e-2 for e in [*r["drift"]["blocks"], r["drift"]["output"]])

    assert r["compile"]["frames_compiled_in_warmup"] >= 1
    assert r["compile"]["recompiles_after_warmup"] == 0  # a second clip of the same shapes reuses the compiled block
    assert r["compile"]["s_per_step"] > 0 and r["compile"]["speedup_over_eager"] > 0

    fp8 = {row["weights"]: row for row in r["fp8"]["rows"]}
    assert fp8["bf16"]["status"] == "ok" and fp8["fp8"]["status"] == "unavailable"  # float8 matmuls need a GPU
    assert fp8["fp8-storage"]["status"] == "ok" and 0 < fp8["fp8-storage"]["error_vs_bf16"]["max"] < 0.1
    assert fp8["bf16+compile"]["status"] == "ok" and fp8["bf16+compile"]["s_per_step"] > 0
    assert fp8["fp8+compile"]["status"] == "unavailable"

    assert r["offload"]["s_per_step"] > 0 and r["offload"]["block_parameter_bytes"] > 0
    assert "offloaded_host_bytes_at_full_depth" in r["offload"] and r["offload"]["page_locked_block_bytes"] == 0  # CPU: none

    assert [row["stage"] for row in r["memory"]["rows"]] == ["dit_none", "dit_lora", "dit_720p", "offload"]
    assert {"gpu_peak_bytes", "error"} & set(r["memory"]["predicted_720p"])

    assert [c["key"] for c in result["targets"]] == ["none_ratio_to_floor", "e2e_high_s", "peak_gb_480p", "peak_gb_720p",
                                                     "offload_gpu_gb_480p", "offload_host_gb_480p"]
    assert all(c["met"] is None for c in result["targets"])  # the targets are about the 14B model
    for table in ("| stage |", "| target |"):
        assert table in done.stdout


@pytest.mark.slow
def test_with_no_budget_every_stage_is_skipped_with_the_reason(gpu_proof, tmp_path):
    done, result = run_proof(tmp_path, "--budget-s", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    for name, entry in result["stages"].items():
        assert entry["status"] == "skipped", name
        assert entry["reason"].startswith(f"needs ≈ {gpu_proof.ESTIMATES_S['tiny'][name]:g} s")


def test_stages_runs_only_the_named_stages_in_the_scripts_order(gpu_proof, tmp_path):
    done, result = run_proof(tmp_path, "--budget-s", "0", "--stages", "memory,versions")
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(result["stages"]) == ["versions", "memory"]
    with pytest.raises(SystemExit):
        gpu_proof.parse_args(["--stages", "versions,warp_drive"])

