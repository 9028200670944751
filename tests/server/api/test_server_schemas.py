"""The fal request/response models and the 422 error bodies (fast: no torch, no model)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from model.contract.errors import InputError
from model.contract.fields import MAX_SEED, NUM_FRAMES
from server.api.errors import (
    ECHO_MAX_CHARS,
    input_error_body,
    input_error_response,
    install_error_handlers,
    validation_error_body,
)
from server.api.schemas import (
    MAX_DATA_URI_CHARS,
    AvatarMultiInput,
    AvatarOutput,
    CancelResponse,
    QueueStatusResponse,
    QueueSubmitResponse,
    to_generation_options,
)

from repo_paths import REPO_ROOT

NUM_FRAMES_RANGE = (NUM_FRAMES.minimum, NUM_FRAMES.maximum)
AUDIO_2 = "https://example.com/b.wav"
MINIMAL = {
    "image_url": "https://example.com/a.png",
    "first_audio_url": "https://example.com/a.wav",
    "prompt": "two people talk",
}


def _detail(body: dict) -> list[dict]:
    """The 422 detail list that validating `body` gives, as the server would send it."""
    with pytest.raises(ValidationError) as caught:
        AvatarMultiInput.model_validate(body)
    return validation_error_body(caught.value.errors(include_url=False), loc_prefix=("body",))["detail"]


def test_limits_and_choices_match_the_model():
    """The schema is built from the model's own (torch-free) limits and choices."""
    from model.contract import fields as contract

    properties = AvatarMultiInput.model_json_schema()["properties"]
    num_frames, seed = properties["num_frames"], properties["seed"]["anyOf"][0]
    assert ((num_frames["minimum"], num_frames["maximum"]), seed["maximum"]) == (NUM_FRAMES_RANGE, MAX_SEED)
    fields = AvatarMultiInput.model_fields
    assert fields["resolution"].annotation.__args__ == contract.RESOLUTION.choices
    assert fields["acceleration"].annotation.__args__ == contract.ACCELERATION.choices


def test_server_modules_do_not_import_torch():
    code = "import sys, server.api.schemas, server.api.errors; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT).returncode == 0


def test_hosted_defaults():
    inp = AvatarMultiInput.model_validate(MINIMAL)
    assert (inp.second_audio_url, inp.num_frames, inp.resolution, inp.seed) == (None, 181, "480p", 81)
    assert (inp.use_only_first_audio, inp.acceleration) == (False, "regular")
    extensions = (inp.audio_mode, inp.speaker_boxes, inp.speaker_placement, inp.negative_prompt)
    assert extensions == ("add", None, "halves", None)


def test_explicit_null_seed_means_random():
    assert AvatarMultiInput.model_validate({**MINIMAL, "seed": None}).seed is None


def test_unknown_fields_are_ignored():
    inp = AvatarMultiInput.model_validate({**MINIMAL, "sync_mode": True, "enable_safety_checker": False})
    assert "sync_mode" not in inp.model_dump()


@pytest.mark.parametrize("field, value, expected", [
    ("num_frames", "181", 181),  # lax mode, as fal: numeric strings and integral floats are numbers
    ("num_frames", 121.0, 121),
    ("seed", 0, 0),
    ("seed", MAX_SEED, MAX_SEED),
    ("use_only_first_audio", "true", True),
    ("image_url", "data:image/png;base64,iVBORw0KGgo=", "data:image/png;base64,iVBORw0KGgo="),
    ("image_url", "HTTP://example.com/a.png", "HTTP://example.com/a.png"),
])
def test_accepted_values(field, value, expected):
    assert getattr(AvatarMultiInput.model_validate({**MINIMAL, field: value}), field) == expected


BAD_VALUES = [
    ("num_frames", "abc", "int_parsing"),
    ("num_frames", 12.5, "int_from_float"),
    ("num_frames", True, "int_type"),
    ("num_frames", 40, "greater_than_equal"),
    ("num_frames", 242, "less_than_equal"),
    ("num_frames", None, "int_type"),
    ("resolution", "1080p", "literal_error"),
    ("acceleration", "max", "literal_error"),
    ("seed", -1, "greater_than_equal"),
    ("seed", 2**32, "less_than_equal"),
    ("seed", False, "int_type"),
    ("seed", "lucky", "int_parsing"),
    ("image_url", "", "string_too_short"),
    ("image_url", None, "string_type"),
    ("image_url", 42, "string_type"),
    ("image_url", "ftp://example.com/a.png", "url_scheme"),
    ("image_url", "example.com/a.png", "url_scheme"),
    ("image_url", "https:///a.png", "url_parsing"),
    ("first_audio_url", "data:audio/wav;base64", "url_parsing"),
    ("first_audio_url", "data:audio/wav;base64," + "A" * MAX_DATA_URI_CHARS, "data_uri_too_large"),
    ("second_audio_url", "file:///etc/passwd", "url_scheme"),
    ("prompt", 7, "string_type"),
    ("use_only_first_audio", "sometimes", "bool_parsing"),
    ("audio_mode", "mix", "literal_error"),
    ("speaker_placement", "left", "literal_error"),
    ("negative_prompt", ["blur"], "string_type"),
    ("speaker_boxes", "0,0,10,10", "list_type"),
]


@pytest.mark.parametrize("field, value, kind", BAD_VALUES, ids=[f"{f}={v!r:.30}" for f, v, _ in BAD_VALUES])
def test_bad_value_names_its_field(field, value, kind):
    [error] = _detail({**MINIMAL, field: value})
    assert error["loc"] == ["body", field]
    assert error["type"] == kind
    assert error["msg"].startswith(f"{field}: ")


@pytest.mark.parametrize("field", ["image_url", "first_audio_url", "prompt"])
def test_missing_required_field(field):
    body = {key: value for key, value in MINIMAL.items() if key != field}
    [error] = _detail(body)
    assert (error["loc"], error["type"], error["msg"]) == (["body", field], "missing", f"{field}: Field required")


@pytest.mark.parametrize("boxes, loc, kind", [
    ([[10, 0, 10, 20]], ["body", "speaker_boxes", 0], "box_empty"),
    ([[0, 30, 10, 20]], ["body", "speaker_boxes", 0], "box_empty"),
    ([[-1, 0, 10, 20]], ["body", "speaker_boxes", 0, 0], "greater_than_equal"),
    ([[0, 0, 10]], ["body", "speaker_boxes", 0, 3], "missing"),
    ([[0, 0, 10, 20.5]], ["body", "speaker_boxes", 0, 3], "int_from_float"),
    ([[0, 0, True, 20]], ["body", "speaker_boxes", 0, 2], "int_type"),
    ([[0, 0, 10, 20], [20, 0, 30, 20]], ["body", "speaker_boxes"], "box_count"),
])
def test_bad_speaker_boxes(boxes, loc, kind):
    [error] = _detail({**MINIMAL, "speaker_boxes": boxes})
    assert (error["loc"], error["type"]) == (loc, kind)
    assert error["msg"].startswith("speaker_boxes")


@pytest.mark.parametrize("extra, boxes, valid", [
    ({"second_audio_url": AUDIO_2}, 2, True),
    ({"second_audio_url": AUDIO_2}, 1, False),
    ({"second_audio_url": AUDIO_2, "use_only_first_audio": True}, 1, True),
    ({"second_audio_url": AUDIO_2, "use_only_first_audio": True}, 2, False),
    ({}, 1, True),
])
def test_one_box_per_speaker(extra, boxes, valid):
    body = {**MINIMAL, **extra, "speaker_boxes": [[0, 0, 10, 10]] * boxes}
    if valid:
        assert len(AvatarMultiInput.model_validate(body).speaker_boxes) == boxes
    else:
        assert [e["type"] for e in _detail(body)] == ["box_count"]


def test_long_inputs_are_not_echoed_in_full():
    [error] = _detail({**MINIMAL, "image_url": "data:image/png;base64," + "A" * MAX_DATA_URI_CHARS})
    assert len(error["input"]) < ECHO_MAX_CHARS + 50
    assert error["ctx"] == {"size": MAX_DATA_URI_CHARS + 22, "max_size": MAX_DATA_URI_CHARS}


def test_input_error_body():
    exc = InputError("first_audio_url", "could not decode the audio", "file_download_error")
    assert input_error_body(exc) == {"detail": [{
        "loc": ["body", "first_audio_url"], "msg": "first_audio_url: could not decode the audio",
        "type": "file_download_error",
    }], "message": "first_audio_url: could not decode the audio"}
    response = input_error_response(InputError("seed", "must be an integer"))
    assert response.status_code == 422
    assert json.loads(response.body)["detail"][0]["type"] == "value_error"


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/fal-ai/ai-avatar/multi", response_model=AvatarOutput)
    def generate(inp: AvatarMultiInput) -> AvatarOutput:
        if inp.first_audio_url.endswith("silence.wav"):
            raise InputError("first_audio_url", "the audio is silent")
        return AvatarOutput(video={"url": "https://example.com/v.mp4"}, seed=inp.seed or 0)

    @app.get("/status", response_model=QueueStatusResponse)
    def status() -> QueueStatusResponse:
        return QueueStatusResponse(
            status="IN_PROGRESS", request_id="r1", response_url="u", status_url="u/status", cancel_url="u/cancel",
        )

    return TestClient(app)


def test_route_accepts_a_fal_body(client):
    response = client.post("/fal-ai/ai-avatar/multi", json=MINIMAL)
    assert response.status_code == 200
    assert response.json()["seed"] == 81


def test_route_answers_422_in_the_fal_shape(client):
    response = client.post("/fal-ai/ai-avatar/multi", json={**MINIMAL, "num_frames": 5, "resolution": "1080p"})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert [(e["loc"], e["type"]) for e in detail] == [
        (["body", "num_frames"], "greater_than_equal"), (["body", "resolution"], "literal_error"),
    ]
    assert detail[0]["msg"] == "num_frames: Input should be greater than or equal to 41"
    assert detail[0]["input"] == 5 and "url" not in detail[0]


def test_route_answers_422_for_bad_json_and_input_errors(client):
    json_header = {"content-type": "application/json"}
    response = client.post("/fal-ai/ai-avatar/multi", content=b"{not json", headers=json_header)
    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "json_invalid"
    response = client.post("/fal-ai/ai-avatar/multi", json={**MINIMAL, "first_audio_url": "https://e.com/silence.wav"})
    assert response.status_code == 422
    assert response.json() == {"detail": [{
        "loc": ["body", "first_audio_url"], "msg": "first_audio_url: the audio is silent", "type": "value_error",
    }], "message": "first_audio_url: the audio is silent"}


def test_status_always_has_queue_position_and_logs(client):
    body = client.get("/status").json()
    assert body["queue_position"] is None and body["logs"] is None
    assert not {"metrics", "error", "error_type"} & body.keys()


def test_status_field_rules():
    urls = {"request_id": "r1", "response_url": "u", "status_url": "u/status", "cancel_url": "u/cancel"}
    log = {"message": "step 1/8", "timestamp": "2025-01-01T00:00:00Z"}
    failed = QueueStatusResponse(status="COMPLETED", metrics={"inference_time": 1.5}, error="boom",
                                 error_type="runner_server_error", logs=[log], **urls)
    wire = failed.model_dump(mode="json")
    assert wire["logs"] == [{**log, "level": "INFO", "source": "USER"}]
    assert (wire["error"], wire["error_type"], wire["metrics"]) == ("boom", "runner_server_error", failed.metrics)
    with pytest.raises(ValidationError, match="queue_position"):
        QueueStatusResponse(status="IN_QUEUE", **urls)
    with pytest.raises(ValidationError, match="COMPLETED"):
        QueueStatusResponse(status="IN_PROGRESS", error="boom", **urls)
    submitted = QueueSubmitResponse(queue_position=0, **urls).model_dump()
    assert submitted == {**urls, "status": "IN_QUEUE", "queue_position": 0}
    assert CancelResponse(status="CANCELLATION_REQUESTED").model_dump() == {"status": "CANCELLATION_REQUESTED"}


def test_to_generation_options():
    inp = AvatarMultiInput.model_validate({
        **MINIMAL, "second_audio_url": AUDIO_2, "num_frames": 81, "resolution": "720p", "seed": None,
        "acceleration": "high",
        "audio_mode": "para", "speaker_boxes": [[0, 0, 10, 10], [10, 0, 20, 10]], "speaker_placement": "faces",
        "negative_prompt": "blur",
    })
    assert to_generation_options(inp, seed=1234) == {
        "prompt": "two people talk", "num_frames": 81, "resolution": "720p", "seed": 1234, "acceleration": "high",
        "use_only_first_audio": False, "audio_mode": "para", "speaker_boxes": [(0, 0, 10, 10), (10, 0, 20, 10)],
        "speaker_placement": "faces", "negative_prompt": "blur",
    }
    assert to_generation_options(AvatarMultiInput.model_validate(MINIMAL), seed=81)["speaker_placement"] == "halves"


def test_generation_options_are_generation_request_fields():
    from model.contract.request import OPTION_NAMES

    options = to_generation_options(AvatarMultiInput.model_validate(MINIMAL), seed=81)
    assert options.keys() <= OPTION_NAMES


def test_openapi_schema_has_the_examples(client):
    schema = client.app.openapi()
    components = schema["components"]["schemas"]
    inp = components["AvatarMultiInput"]
    assert inp["examples"][0]["image_url"] == "https://example.com/two_people.png"
    num_frames = inp["properties"]["num_frames"]
    assert {"default": 181, "minimum": 41, "maximum": 241, "examples": [181]}.items() <= num_frames.items()
    seed = inp["properties"]["seed"]
    assert seed["default"] == 81 and seed["anyOf"][0] == {"type": "integer", "minimum": 0, "maximum": MAX_SEED}
    box = inp["properties"]["speaker_boxes"]["anyOf"][0]["items"]
    assert box["prefixItems"][0] == {"type": "integer", "minimum": 0}
    assert set(inp["required"]) == {"image_url", "first_audio_url", "prompt"}
    assert components["AvatarOutput"]["examples"][0]["seed"] == 81
    assert "QueueStatusResponse" in components


@pytest.mark.parametrize("body, field", [
    ('"num_frames": NaN', "num_frames"),
    ('"num_frames": 1e400', "num_frames"),
    ('"seed": Infinity', "seed"),
    ('"seed": -Infinity', "seed"),
])
def test_non_finite_numbers_are_a_422_naming_the_field(client, body, field):
    """Python's JSON parser accepts NaN, Infinity and overflowing literals; echoing them back used to be a 500."""
    raw = json.dumps(MINIMAL)[:-1] + ", " + body + "}"
    response = client.post("/fal-ai/ai-avatar/multi", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422
    entry = response.json()["detail"][0]
    assert entry["loc"] == ["body", field] and entry["msg"].startswith(f"{field}: ")
    assert entry["input"] in ("NaN", "Infinity", "-Infinity")
