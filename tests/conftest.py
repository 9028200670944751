"""Shared fixtures: the golden folder beside the project, and tiny checkpoints in both layouts."""

import os
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "golden"


def golden_dir_or_skip() -> Path:
    """The golden folder; skipped when absent (a user's clone), a failure under MULTITALK_REQUIRE_GOLDEN=1 (CI)."""
    if (GOLDEN_DIR / "manifest.json").is_file():
        return GOLDEN_DIR
    reason = f"golden reference numbers not found at {GOLDEN_DIR} (they live beside the project, in shared/)"
    if os.environ.get("MULTITALK_REQUIRE_GOLDEN") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return golden_dir_or_skip()


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """Tiny checkpoints from seed 0 in both published layouts: {"multitalk": root, "diffusers": root}."""
    from model.weights.tiny import write_tiny_weights

    base = tmp_path_factory.mktemp("tiny-weights")
    return {layout: write_tiny_weights(base / layout, layout, seed=0) for layout in ("multitalk", "diffusers")}
