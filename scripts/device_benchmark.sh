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
# `bash scripts/device_benchmark.sh PARTS [benchmark.py arguments]` (PARTS: loop, options, e2e) runs one part of
# scripts/benchmark.py instead; each takes minutes at 14B. e2e, the default request through the whole pipeline,
# needs what the proof does without: `bash scripts/device_benchmark.sh fetch e2e` here also brings the ffmpeg binary
# (imageio-ffmpeg's 29 MB wheel instead of the import-only build) and what librosa's audio code imports that the
# image lacks (soundfile with cffi and pycparser, audioread, decorator, pooch with platformdirs: the e2e run's
# imports on the tiny models here, 2026-12-04, less KINDS.md's package list of the image): ≈ 41 MB in all, so
# the call carries ≈ 53 MB of its 64 MiB. Then, there: run(command="bash scripts/device_benchmark.sh e2e",
# carry=[".whl"], timeout_s=600); predicted from the proof's parts, ≈ 3 minutes at 14B after the imports.
set -euo pipefail
cd "$(dirname "$0")/.."

# soxr: the image's transformers imports it at module level once librosa is importable (its audio_utils), and peft
# imports transformers: without it the proof stopped at its imports on the first H200 run (2026-12-04).
WHEELS=(diffusers==0.42.1 ftfy==6.3.1 wcwidth==0.7.0 torchao==0.18.0 librosa==0.11.0 pyloudnorm==0.2.0 soxr==1.0.0)
SDISTS=(imageio-ffmpeg==0.6.0)  # built into pure-Python wheels here: the import without the binary
E2E_WHEELS=(imageio-ffmpeg==0.6.0 soundfile==0.14.0 cffi==2.0.0 pycparser==3.0 audioread==3.1.0 decorator==5.2.1
            pooch==1.9.0 platformdirs==4.14.9)  # `fetch e2e`: with the binary, in place of the SDISTS build

if [[ "${1:-}" == "fetch" ]]; then
    rm -rf .whl  # one version of each package: two stop the install there
    wheels=("${WHEELS[@]}")
    [[ "${2:-}" == "e2e" ]] && wheels+=("${E2E_WHEELS[@]}")
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d .whl "${wheels[@]}"
    [[ "${2:-}" == "e2e" ]] || python3 -m pip wheel -q --no-deps --no-binary=:all: --no-build-isolation -w .whl "${SDISTS[@]}"
    du -sh .whl
    exit 0
fi

mode=${1:?usage: device_benchmark.sh fetch [e2e] | proof [gpu_proof.py arguments] | PARTS [benchmark.py arguments]}
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
