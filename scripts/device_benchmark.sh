#!/usr/bin/env bash
# Run scripts/benchmark.py (14B, random weights) on a lent GPU machine that has no network.
#
# That machine's python3 (3.12) has torch 2.11 + CUDA, transformers, accelerate, peft, safetensors,
# opencv and scipy, but not diffusers, ftfy (+ wcwidth), soxr, pyloudnorm, imageio-ffmpeg (the ffmpeg
# binary the MP4 writer runs) or torchao (weights fp8/int8). Their wheels travel in .whl/ (≈ 40 MB;
# imageio-ffmpeg 0.6.0, not 0.8.1, whose 68 MB wheel alone exceeds the 64 MiB a call may carry).
#
# 1. Here, once (downloads the wheels into .whl/, which .gitignore ignores):
#        bash scripts/device_benchmark.sh fetch
# 2. There, with the device tool: run(command=..., carry=[".whl"]), one call per line (each well inside the
#    10-minute limit of a call; ≈ 20 minutes of device time in all, machine starts included):
#        bash scripts/device_benchmark.sh loop
#        bash scripts/device_benchmark.sh e2e,options --options attention
#        bash scripts/device_benchmark.sh options --options 'memory;compile'
#    Each call writes $OUT/bench-<parts>.json (rewritten after every case, so a cut-off call keeps what it
#    measured) and $OUT/bench-<parts>.log; the tool brings them back.
# 3. Here: python scripts/benchmark.py --merge <the returned bench-*.json> --out benchmarks.json
#    prints the tables for docs/benchmarks.md.
# Extra arguments after the parts go to scripts/benchmark.py (e.g. --steps-measured 3).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(diffusers==0.42.1 ftfy==6.3.1 wcwidth==0.7.0 soxr==1.1.0 pyloudnorm==0.2.0 imageio-ffmpeg==0.6.0 torchao==0.18.0)

if [[ "${1:-}" == "fetch" ]]; then
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d .whl "${WHEELS[@]}"
    du -sh .whl
    exit 0
fi

parts=${1:?usage: device_benchmark.sh fetch | PARTS [benchmark.py arguments] (PARTS: loop,e2e,options)}
shift
ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/: run 'bash scripts/device_benchmark.sh fetch' here and carry .whl" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
out=${OUT:-/tmp/benchmark-out}
mkdir -p "$out"
name="bench-${parts//,/-}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
python3 scripts/benchmark.py --device cuda --config 14b --parts "$parts" --out "$out/$name.json" "$@" 2>&1 | tee "$out/$name.log"
