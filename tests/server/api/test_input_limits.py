"""Issue 15 over HTTP: over-long strings and control characters are a 422 naming the field, before any work.

A route taking the generated input model is enough: the refusal is the model's, no server or worker runs.
"""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from model.contract.fields import MAX_PROMPT_CHARS, MAX_URL_CHARS
from server.api.errors import install_error_handlers
from server.api.schemas import AvatarMultiInput

ROUTE = "/fal-ai/ai-avatar/multi"
MINIMAL = {
    "image_url": "https://example.com/a.png",
    "first_audio_url": "https://example.com/a.wav",
    "prompt": "two people talk",
}


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.post(ROUTE)
    def generate(inp: AvatarMultiInput) -> dict:
        return {"prompt_chars": len(inp.prompt)}

    return TestClient(app)


def _refusal(client: TestClient, body: dict) -> dict:
    response = client.post(ROUTE, json=body)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    return error


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_ten_megabyte_prompt_is_refused_naming_its_field(client, field):
    error = _refusal(client, {**MINIMAL, field: "talk " * 2_000_000})
    assert (error["loc"], error["type"]) == (["body", field], "string_too_long")
    assert error["msg"] == f"{field}: String should have at most {MAX_PROMPT_CHARS} characters"


@pytest.mark.parametrize("text", ["a\x00b", "bell\x07", "esc\x1b[31m", "del\x7f", "c1\x85"])
def test_control_characters_in_a_prompt_are_refused(client, text):
    error = _refusal(client, {**MINIMAL, "prompt": text})
    assert (error["loc"], error["type"]) == (["body", "prompt"], "control_character")
    assert error["msg"].startswith("prompt: must not contain control characters")


def test_tabs_line_breaks_and_a_prompt_at_the_limit_are_accepted(client):
    prompt = ("Two friends\tchat.\r\nThey take turns, 你好 👋.\n" * MAX_PROMPT_CHARS)[:MAX_PROMPT_CHARS]
    response = client.post(ROUTE, json={**MINIMAL, "prompt": prompt})
    assert response.status_code == 200 and response.json() == {"prompt_chars": MAX_PROMPT_CHARS}


def test_an_over_long_http_url_is_refused_but_a_larger_data_uri_is_not(client):
    url = "https://example.com/" + "a" * MAX_URL_CHARS
    error = _refusal(client, {**MINIMAL, "first_audio_url": url})
    assert (error["loc"], error["type"]) == (["body", "first_audio_url"], "url_too_long")
    data_uri = "data:audio/wav;base64," + "A" * (4 * MAX_URL_CHARS)
    assert client.post(ROUTE, json={**MINIMAL, "first_audio_url": data_uri}).status_code == 200


def test_the_openapi_schema_shows_every_string_limit(client):
    schema = client.app.openapi()["components"]["schemas"]["AvatarMultiInput"]["properties"]
    assert schema["prompt"]["maxLength"] == MAX_PROMPT_CHARS
    assert schema["negative_prompt"]["anyOf"][0]["maxLength"] == MAX_PROMPT_CHARS
    assert all(schema[name].get("maxLength") or schema[name]["anyOf"][0]["maxLength"]
               for name in ("image_url", "first_audio_url", "second_audio_url"))
