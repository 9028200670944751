# MultiTalk inference server, for NVIDIA GPUs.
#
#   docker build -t multitalk-server .
#   docker run --gpus all -p 8000:8000 -v /path/to/weights:/weights:ro -v multitalk-data:/data multitalk-server
#   docker run --gpus all ... multitalk-server worker    # a worker only (docker-compose.yml runs both)
#   docker run --gpus all ... multitalk-server doctor    # is this host ready? GPU, VRAM, weights, ...
#
# /weights: the checkpoint folder (weights/README.md), mounted read-only. /data: jobs, uploads, videos
# (MULTITALK_DATA_DIR). Without checkpoints, `-e MULTITALK_WEIGHTS=tiny` serves the random demo weights.
#
# The install steps are CI's (scripts/install.sh, in .ci/run's order): torch first, then the
# dependencies, then the project. CI installs torch's CPU wheel; the image, the same torch version's
# CUDA 12.6 wheel. That wheel brings its own CUDA libraries; the CUDA 12.6 base image matches it and
# sets what the NVIDIA Container Toolkit reads (NVIDIA_VISIBLE_DEVICES, the host driver it requires).
FROM nvidia/cuda:12.6.3-runtime-ubuntu22.04

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# No prompts (tzdata asks for a time zone otherwise); an ARG, so it does not stay in the image.
ARG DEBIAN_FRONTEND=noninteractive

# Python 3.11, the version CI tests, from the deadsnakes PPA (Ubuntu 22.04 ships 3.10); the tool that
# adds the PPA is removed again in the same layer. No ffmpeg: the product uses the binary inside the
# imageio-ffmpeg wheel. Apt versions are not pinned (DL3008) because Ubuntu and the PPA keep only the
# latest build of each package, so a pin breaks the build at their next security update; what makes
# the image reproducible is pinned instead: the base image tag and torch.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates gpg-agent software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && apt-get purge -y --auto-remove gpg-agent software-properties-common \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
RUN python3.11 -m venv "$VIRTUAL_ENV"

# One layer per install step, least often changed first, so that editing the source reinstalls only
# the project and a new dependency does not download torch again.
WORKDIR /src
COPY scripts/install.sh scripts/install.sh
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
RUN bash scripts/install.sh torch "$TORCH_INDEX_URL"
COPY pyproject.toml README.md ./
RUN bash scripts/install.sh deps
COPY model/ model/
COPY server/ server/
RUN bash scripts/install.sh project ".[quant]"
# librosa (audio input) has numba compile a few functions on first use and caches them; compiled here,
# into a folder uid 1000 may extend, so the first job of a new container does not pay seconds for it.
ENV NUMBA_CACHE_DIR=/opt/numba-cache
RUN python -c "import numpy, librosa; librosa.resample(numpy.zeros(4410, numpy.float32), orig_sr=44100, target_sr=16000, res_type='soxr_hq')" \
    && mkdir -p "$NUMBA_CACHE_DIR" && chown -R 1000:1000 "$NUMBA_CACHE_DIR"

# An unprivileged user. /data belongs to it, so a new named volume mounted there is writable (Docker
# copies the folder's owner into it); a host folder bind-mounted there must be writable by uid 1000.
RUN useradd --create-home --uid 1000 --user-group multitalk \
    && mkdir -p /data /weights \
    && chown multitalk:multitalk /data
ENV MULTITALK_HOST=0.0.0.0 \
    MULTITALK_WEIGHTS=/weights \
    MULTITALK_DATA_DIR=/data
VOLUME ["/weights", "/data"]
# Numeric, so that orchestrators can verify it is not root (Kubernetes' runAsNonRoot) without /etc/passwd.
USER 1000:1000
# Out of /src, so that `python -c` and `python -m` import the installed package, not the build copy.
WORKDIR /home/multitalk

EXPOSE 8000
# Probes the API of `serve` with the interpreter already in the image (no curl). A container running
# `worker` or `doctor` serves no HTTP and passes; workers report through the API's /readyz instead. With TLS
# (set it through MULTITALK_TLS_CERT / MULTITALK_TLS_KEY in containers) the probe speaks https.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, ssl, sys, urllib.request; sys.exit(0) if b'serve' not in open('/proc/1/cmdline', 'rb').read().split(bytes(1)) else urllib.request.urlopen('%s://127.0.0.1:%s/healthz' % ('https' if os.environ.get('MULTITALK_TLS_CERT') else 'http', os.environ.get('MULTITALK_PORT', '8000')), timeout=4, context=ssl._create_unverified_context())"]

# `docker run IMAGE` serves; `docker run IMAGE worker` (or doctor, generate, weights ...) runs that command.
ENTRYPOINT ["multitalk"]
CMD ["serve"]
