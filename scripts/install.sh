#!/usr/bin/env bash
# The install steps that .ci/run and the Dockerfile share, so the image is built the way CI tests.
# Run them in this order, in the Python environment to install into (an activated venv):
#
#   scripts/install.sh torch [INDEX_URL]  a current pip, then torch==$TORCH_VERSION: the build the
#                                         configured indexes serve (CI: the CPU wheel), or the one from
#                                         INDEX_URL (the image: https://download.pytorch.org/whl/cu126)
#   scripts/install.sh deps               the dependencies listed in pyproject.toml, without the project,
#                                         so that a Docker layer caches them apart from the source
#   scripts/install.sh project PIP_ARGS   the project itself: -e ".[test]" in CI, ".[quant]" in the image
#
# torch comes first so that no dependency pulls another torch build; `deps` reads pyproject.toml with
# tomllib (Python 3.11+, the version CI and the image use).
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0 # the version CI tests; the image installs the same version's CUDA build

pip_install() {
    python -m pip install --quiet "$@"
}

case "${1:-}" in
torch)
    pip_install --upgrade pip
    if [ $# -ge 2 ]; then
        pip_install "torch==$TORCH_VERSION" --index-url "$2"
    else
        pip_install "torch==$TORCH_VERSION"
    fi
    ;;
deps)
    requirements=$(mktemp)
    trap 'rm -f "$requirements"' EXIT
    python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' >"$requirements"
    pip_install -r "$requirements"
    ;;
project)
    shift
    pip_install "$@"
    ;;
*)
    echo "usage: $0 torch [INDEX_URL] | deps | project PIP_ARGS..." >&2
    exit 2
    ;;
esac
