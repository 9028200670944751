"""Shared fixtures: the golden folder beside the project, tiny checkpoints in both layouts, example media."""

import os
from pathlib import Path

import pytest

from repo_paths import GOLDEN_DIR


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
def redis_url():
    """A real redis-server for the session (tests/local_servers.py)."""
    from local_servers import running_redis

    with running_redis() as url:
        yield url


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server for the session (moto's, tests/local_servers.py), with test credentials in
    this process's environment (boto3 reads them there; servers the tests start get them too)."""
    from local_servers import S3_TEST_ENV, running_s3

    with pytest.MonkeyPatch.context() as patch:
        for name, value in S3_TEST_ENV.items():
            patch.setenv(name, value)
        with running_s3() as url:
            yield url


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A new empty bucket on the session's S3 server; its name."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """Tiny checkpoints from seed 0 in both published layouts: {"multitalk": root, "diffusers": root}."""
    from model.weights.tiny import write_tiny_weights

    base = tmp_path_factory.mktemp("tiny-weights")
    return {layout: write_tiny_weights(base / layout, layout, seed=0) for layout in ("multitalk", "diffusers")}


@pytest.fixture(scope="session")
def example_inputs(tmp_path_factory):
    """{"image", "audio1", "audio2"}: the drawn two-person image and synthetic speech of scripts/make_example_inputs.py."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_example_inputs.py"
    spec = importlib.util.spec_from_file_location("make_example_inputs", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_example_inputs(tmp_path_factory.mktemp("example-inputs"))


@pytest.fixture(scope="session")
def speech_request(example_inputs) -> dict:
    """A valid `fal-ai/ai-avatar/multi` request: the example image and person 1's speech inline as
    data URIs (as `fal_client.encode_file` makes them), 41 frames. Tests override fields with `{**...}`."""
    from fal_client import encode_file

    return {"image_url": encode_file(example_inputs["image"]),
            "first_audio_url": encode_file(example_inputs["audio1"]),
            "prompt": "a person speaking", "num_frames": 41}


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_weights):
    from model.pipeline import Pipeline

    return Pipeline.from_weights(tiny_weights["multitalk"])


@pytest.fixture
def silent_wav(tmp_path) -> Path:
    """One second of digital silence at 16 kHz: it decodes, so a submit accepts it, and the worker refuses it as
    silent (a 422 naming the field that only the job's result can carry)."""
    import wave

    path = tmp_path / "silence.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(bytes(32000))
    return path
