"""Where the tests find the project and the shared reference material, wherever a test file sits."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"  # beside the project: golden numbers, fixtures
GOLDEN_DIR = SHARED_DIR / "golden"  # numbers from running the original implementation on tiny random weights
