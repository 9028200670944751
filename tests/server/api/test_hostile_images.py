"""Issue 15 over HTTP: images that start like an image but do not decode are refused at submit with a
422 naming `image_url` in fal's format, not queued to end as a COMPLETED job with a 500 inside.

The hostile files are the ones the unit tests of `load_image` build (tests/model/media/
test_image_input.py), loaded from that file so both layers see the same bytes. They travel as data
URIs, which the API accepts as `fal_client.encode_file` makes them. The server has no worker: the
refusal must come from the submit itself.
"""

from __future__ import annotations

import base64
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from repo_paths import REPO_ROOT
from server_harness import Cluster

pytestmark = [pytest.mark.service]

RUN = "/fal-ai/ai-avatar/multi"
SUBMIT = "/queue/fal-ai/ai-avatar/multi"


def _image_unit_tests():
    """tests/model/media/test_image_input.py as a module (test folders are not packages)."""
    path = REPO_ROOT / "tests" / "model" / "media" / "test_image_input.py"
    spec = importlib.util.spec_from_file_location("image_input_unit_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


IMAGE_TESTS = _image_unit_tests()


@pytest.fixture(scope="module")
def http(tmp_path_factory) -> Iterator[httpx.Client]:
    cluster = Cluster(tmp_path_factory.mktemp("hostile-images"), Path("tiny"))  # no worker: weights never read
    cluster.start_api(workers=0)
    try:
        with httpx.Client(base_url=cluster.url, timeout=60) as client:
            yield client
    finally:
        cluster.stop_all()


def _data_uri(path: Path) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(path.read_bytes()).decode()


def _assert_refused_naming_image_url(response: httpx.Response) -> None:
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "image_url"]
    assert error["msg"].startswith("image_url: ") and "truncated or corrupt" in error["msg"], error


@pytest.mark.parametrize("name", list(IMAGE_TESTS.HOSTILE_FILES))
def test_queue_submit_refuses_an_image_that_does_not_decode(http, speech_request, tmp_path, name):
    image = IMAGE_TESTS.write_hostile_image(name, tmp_path)
    _assert_refused_naming_image_url(http.post(SUBMIT, json={**speech_request, "image_url": _data_uri(image)}))


def test_sync_run_refuses_an_image_that_does_not_decode(http, speech_request, tmp_path):
    image = IMAGE_TESTS.write_hostile_image("bmp-7-bits-per-pixel", tmp_path)
    _assert_refused_naming_image_url(http.post(RUN, json={**speech_request, "image_url": _data_uri(image)}))


def test_a_decodable_image_is_still_queued(http, speech_request):
    response = http.post(SUBMIT, json=speech_request)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "IN_QUEUE"
