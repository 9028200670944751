"""fal's ai-avatar family over HTTP, in process: the single-audio, single-text and multi-text endpoints take their
hosted fields and defaults, and every bad text or voice is a 422 naming its field, on the queue and on the sync
route, before any work. The app runs without workers: accepted requests stay queued, and the stored job is read back.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from model.contract.fields import MAX_SPEECH_CHARS
from model.speech.voices import HOSTED_NAMES, LOCAL_VOICES
from server.app import create_app
from server.settings import Settings

IMAGE = "https://example.com/two_people.png"  # never fetched: every request here is refused before, or has no image
SINGLE_TEXT = {"text_input": "Spend more time with people who make you feel alive.", "voice": "Bill",
               "prompt": "a man talks"}
MULTI_TEXT = {"first_text_input": "Do you know what we are eating?",
              "second_text_input": "I think it is something called milky pie.", "prompt": "two kids talk"}
ENDPOINTS = {"single-text": SINGLE_TEXT, "multi-text": MULTI_TEXT}


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(data_dir=tmp_path_factory.mktemp("text-api"), workers=0))) as client:
        yield client


@pytest.fixture(scope="module")
def image_uri(example_inputs) -> str:
    from fal_client import encode_file

    return encode_file(example_inputs["image"])


def _refusal(api: TestClient, endpoint: str, body: dict, sync: bool = False) -> dict:
    path = f"/fal-ai/ai-avatar/{endpoint}" if sync else f"/queue/fal-ai/ai-avatar/{endpoint}"
    response = api.post(path, json={"image_url": IMAGE, **body})
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    return error


BAD_TEXTS = [
    ("empty", "", "text_unspeakable", "must contain words to speak"),
    ("blank", " \n\t ", "text_unspeakable", "must contain words to speak"),
    ("emoji", "Hello there 👋", "text_unspeakable", "'👋' (WAVING HAND SIGN) at position 12"),
    ("chinese", "你好，朋友", "text_unspeakable", "the English voices cannot read: '你'"),
    ("cyrillic", "Привет", "text_unspeakable", "cannot read: 'П'"),
    ("escape-sequence", "Hi \x1b[31mthere", "control_character", "must not contain control characters"),
    ("nul", "Hi\x00", "control_character", "must not contain control characters"),
    ("bidi-override", "Hi \u202ethere", "text_unspeakable", "RIGHT-TO-LEFT OVERRIDE"),
    ("over-the-hard-limit", "word " * 60, "string_too_long", f"at most {MAX_SPEECH_CHARS} characters"),
]


@pytest.mark.parametrize("endpoint, field", [("single-text", "text_input"), ("multi-text", "first_text_input"),
                                             ("multi-text", "second_text_input")])
@pytest.mark.parametrize("case", BAD_TEXTS, ids=lambda case: case[0])
def test_an_unusable_text_is_a_422_naming_its_field(api, endpoint, field, case):
    _, text, error_type, reason = case
    error = _refusal(api, endpoint, {**ENDPOINTS[endpoint], field: text})
    assert (error["loc"], error["type"]) == (["body", field], error_type)
    assert error["msg"].startswith(f"{field}: ") and reason in error["msg"]


@pytest.mark.parametrize("sync", [False, True], ids=["queue", "sync"])
def test_a_text_longer_than_the_video_can_hold_is_a_422_with_the_limit(api, sync):
    """20 characters per second of video: 41 frames (1.64 s) hold 32 characters."""
    error = _refusal(api, "single-text", {**SINGLE_TEXT, "num_frames": 41}, sync)
    assert (error["loc"], error["type"]) == (["body", "text_input"], "text_too_long")
    assert "41 frames (1.64 s): 52 characters, at most 32 fit" in error["msg"] and "raise num_frames" in error["msg"]


def test_the_second_text_is_named_when_the_first_fits_but_both_together_do_not(api):
    body = {**MULTI_TEXT, "num_frames": 81}  # 3.24 s: 64 characters; 31 + 41 = 72
    error = _refusal(api, "multi-text", body)
    assert (error["loc"], error["type"]) == (["body", "second_text_input"], "text_too_long")
    assert "72 characters together with the text before it, at most 64 fit" in error["msg"]
    error = _refusal(api, "multi-text", {**body, "first_text_input": "Hello " * 12})
    assert error["loc"] == ["body", "first_text_input"]


def test_texts_spoken_at_once_each_have_the_whole_video(api, image_uri):
    """`audio_mode: para`: 81 frames hold 64 characters per text, not 64 for both."""
    body = {**MULTI_TEXT, "num_frames": 81, "audio_mode": "para", "image_url": image_uri}  # 31 and 41 characters
    assert _stored(api, _submit(api, "fal-ai/ai-avatar/multi-text", body)).input["options"]["audio_mode"] == "para"
    error = _refusal(api, "multi-text", {**body, "second_text_input": "word " * 14})
    assert error["loc"] == ["body", "second_text_input"] and "69 characters, at most 64 fit" in error["msg"]


@pytest.mark.parametrize("endpoint, field", [("single-text", "voice"), ("multi-text", "voice1"),
                                             ("multi-text", "voice2")])
def test_an_unknown_voice_is_a_422_naming_the_field_and_listing_the_choices(api, endpoint, field):
    error = _refusal(api, endpoint, {**ENDPOINTS[endpoint], field: "Rachel"})
    assert (error["loc"], error["type"]) == (["body", field], "literal_error")
    assert all(f"'{name}'" in error["msg"] for name in (*HOSTED_NAMES, *LOCAL_VOICES))


def test_single_text_requires_its_voice_and_text(api):
    for field in ("voice", "text_input"):
        body = {k: v for k, v in SINGLE_TEXT.items() if k != field}
        error = _refusal(api, "single-text", body)
        assert (error["loc"], error["type"]) == (["body", field], "missing")


def test_the_single_audio_endpoint_takes_audio_url(api):
    error = _refusal(api, "", {"prompt": "x", "first_audio_url": "https://example.com/a.wav"})
    assert (error["loc"], error["type"]) == (["body", "audio_url"], "missing")


def _stored(api: TestClient, request_id: str):
    return api.app.state.services.store.get(request_id)


def _submit(api: TestClient, path: str, body: dict) -> str:
    response = api.post(f"/queue/{path}", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["status_url"].endswith(f"/fal-ai/ai-avatar/requests/{response.json()['request_id']}/status")
    return response.json()["request_id"]


@pytest.mark.parametrize("path, body, frames, seed, speech", [
    ("fal-ai/ai-avatar/single-text", SINGLE_TEXT, 136, 42,
     [(SINGLE_TEXT["text_input"], "Bill", "text_input", "voice")]),
    ("fal-ai/ai-avatar/multi-text", MULTI_TEXT, 191, 81,
     [(MULTI_TEXT["first_text_input"], "Sarah", "first_text_input", "voice1"),
      (MULTI_TEXT["second_text_input"], "Roger", "second_text_input", "voice2")]),
], ids=["single-text", "multi-text"])
def test_a_text_request_is_queued_with_the_endpoints_defaults_and_its_texts(api, image_uri, path, body, frames, seed,
                                                                           speech):
    job = _stored(api, _submit(api, path, {**body, "image_url": image_uri}))
    assert job.app == path
    assert (job.input["options"]["num_frames"], job.input["options"]["seed"]) == (frames, seed)
    assert list(job.input["files"]) == ["image_url"]
    assert [(s["text"], s["voice"], s["text_field"], s["voice_field"]) for s in job.input["speech"]] == speech


def test_local_voice_ids_are_accepted(api, image_uri):
    job = _stored(api, _submit(api, "fal-ai/ai-avatar/multi-text",
                               {**MULTI_TEXT, "image_url": image_uri, "voice1": "af_heart", "voice2": "bm_george"}))
    assert [s["voice"] for s in job.input["speech"]] == ["af_heart", "bm_george"]


def test_the_single_audio_endpoint_stores_its_audio_with_its_defaults(api, image_uri, speech_request):
    body = {"image_url": image_uri, "audio_url": speech_request["first_audio_url"], "prompt": "a woman talks"}
    job = _stored(api, _submit(api, "fal-ai/ai-avatar", body))
    assert job.app == "fal-ai/ai-avatar" and list(job.input["files"]) == ["image_url", "audio_url"]
    assert (job.input["options"]["num_frames"], job.input["options"]["seed"]) == (145, 42)
    assert "speech" not in job.input


def test_every_endpoint_has_its_sync_and_queue_routes_and_shares_the_request_routes(api, image_uri):
    paths = api.app.openapi()["paths"]
    for endpoint in ("fal-ai/ai-avatar", "fal-ai/ai-avatar/single-text", "fal-ai/ai-avatar/multi",
                     "fal-ai/ai-avatar/multi-text"):
        assert "post" in paths[f"/{endpoint}"] and "post" in paths[f"/queue/{endpoint}"]
    request_id = _submit(api, "fal-ai/ai-avatar/single-text", {**SINGLE_TEXT, "image_url": image_uri})
    for prefix in ("fal-ai/ai-avatar", "fal-ai/ai-avatar/single-text"):  # fal's form, and the hand-built one
        assert api.get(f"/queue/{prefix}/requests/{request_id}/status").json()["status"] == "IN_QUEUE"
    assert api.put(f"/queue/fal-ai/ai-avatar/requests/{request_id}/cancel").json() == {"status": "OK"}
