#!/usr/bin/env bash
# The GPU proof (scripts/gpu_proof.py) on a lent GPU machine that has no network, in ONE device call.
#
# That machine's python3 (3.12) has torch 2.11 + CUDA, transformers, accelerate, peft, safetensors, scipy and
# lazy-loader, but not diffusers, ftfy (+ wcwidth), torchao (weights fp8), librosa (+ soxr), pyloudnorm or
# imageio-ffmpeg.
# The proof runs the first four. The last three it only imports: tools/real_size.py imports the encoders, and
# model.media.audio_input imports them at module level, while the proof reads no audio file and writes no MP4.
# librosa and pyloudnorm are small pure-Python wheels (librosa loads its numba-backed parts only when used);
# imageio-ffmpeg is built here from its sdist, without the 29 MB ffmpeg binary. ≈ 10 MB in all, well inside the
# 64 MiB a call may carry with the repository.
#
# 1. Here, once (into .whl/, which .gitignore ignores):
#        bash scripts/device_benchmark.sh fetch
# 2. There, ONE call of the device tool, at most 8 minutes:
#        run(command="bash scripts/device_benchmark.sh proof", carry=[".whl"], timeout_s=600)
#    = the wheel install (≤ 30 s), then scripts/gpu_proof.py with what is left of 450 s as its budget (at most 420 s;
#    it starts a stage only if the stage fits), then ≤ 30 s to exit. It writes $OUT/gpu_proof.json after every stage
#    and $OUT/gpu_proof.log, whose end (the call's output tail) is the table of stages and targets. With the
#    machine's start (1–2 minutes) the call takes ≈ 10 of a session's 15 minutes of device time.
# 3. Here: the JSON's figures go to docs/benchmarks.md.
#
# `bash scripts/device_benchmark.sh PARTS [benchmark.py arguments]` (PARTS: loop, options) runs one part of
# scripts/benchmark.py instead; each takes minutes at 14B. Its e2e part needs what `fetch` leaves out: the ffmpeg
# binary and librosa's audio stack.
set -euo pipefail
cd "$(dirname "$0")/.."

# soxr: the image's transformers imports it at module level once librosa is importable (its audio_utils), and peft
# imports transformers: without it the proof stopped at its imports on the first H200 run (2026-12-04).
WHEELS=(diffusers==0.42.1 ftfy==6.3.1 wcwidth==0.7.0 torchao==0.18.0 librosa==0.11.0 pyloudnorm==0.2.0 soxr==1.0.0)
SDISTS=(imageio-ffmpeg==0.6.0)  # built into pure-Python wheels here: the import without the binary

if [[ "${1:-}" == "fetch" ]]; then
    rm -rf .whl  # one version of each package: two stop the install there
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d .whl "${WHEELS[@]}"
    python3 -m pip wheel -q --no-deps --no-binary=:all: --no-build-isolation -w .whl "${SDISTS[@]}"
    du -sh .whl
    exit 0
fi

mode=${1:?usage: device_benchmark.sh fetch | proof [gpu_proof.py arguments] | PARTS [benchmark.py arguments]}
shift
ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/: run 'bash scripts/device_benchmark.sh fetch' here and carry .whl" >&2; exit 2; }
started=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
out=${OUT:-/tmp/benchmark-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
if [[ "$mode" == "proof" ]]; then
    # 480 s in all: install + proof within 450 s (a slow install shortens the proof's budget), then 30 s to exit.
    budget=$(( 450 - (SECONDS - started) ))
    budget=$(( budget > 420 ? 420 : budget ))
    echo "wheels installed in $(( SECONDS - started )) s; the proof's budget: $budget s"
    python3 scripts/gpu_proof.py --device cuda --config 14b --budget-s "$budget" --out "$out/gpu_proof.json" "$@" 2>&1 \
        | tee "$out/gpu_proof.log"
    exit
fi
name="bench-${mode//,/-}"
python3 scripts/benchmark.py --device cuda --config 14b --parts "$mode" --out "$out/$name.json" "$@" 2>&1 | tee "$out/$name.log"
