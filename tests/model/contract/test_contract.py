"""The request contract is the one declaration of every field: the HTTP schema, the CLI and the pipeline follow it."""

import argparse
import re
from dataclasses import replace

import pytest

from model.contract.errors import InputError
from model.contract.fields import ENDPOINTS, FIELDS, IMAGE, MEDIA_FIELDS, OPTION_FIELDS, SPEECH_FIELDS, RequestField
from model.contract.request import GenerationRequest
from server.api.schemas import INPUT_MODELS
from server.cli.generate import SPEECH_FLAG_FIELDS, add_generate_parser

from repo_paths import REPO_ROOT


def _generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_generate_parser(parser.add_subparsers())
    return parser._subparsers._group_actions[0].choices["generate"]


def _actions() -> dict[str, argparse.Action]:
    """The generate flags by destination; the first action wins (`--detect-speakers` is an alias)."""
    actions: dict[str, argparse.Action] = {}
    for action in _generate_parser()._actions:
        actions.setdefault(action.dest, action)
    return actions


@pytest.mark.parametrize("model", INPUT_MODELS, ids=lambda m: m.endpoint.app_id)
def test_the_http_schema_is_the_contract(model):
    endpoint = model.endpoint
    properties = model.model_json_schema()["properties"]
    assert list(properties) == [f.name for f in endpoint.fields]
    assert set(model.model_json_schema()["required"]) == {f.name for f in endpoint.fields if f.required}
    for spec in endpoint.fields:
        schema = properties[spec.name]
        value_schema = schema["anyOf"][0] if "anyOf" in schema else schema
        assert value_schema.get("minimum") == spec.minimum and value_schema.get("maximum") == spec.maximum, spec.name
        assert tuple(value_schema.get("enum", ())) == spec.choices, spec.name
        if not spec.required:
            assert schema["default"] == endpoint.default(spec), spec.name
    assert all(f.http for f in endpoint.fields)
    assert {f.name for f in OPTION_FIELDS if f.http and not f.hosted} - {"audio_mode"} <= set(properties)


def test_every_endpoint_speaks_from_its_own_fields_and_the_hosted_defaults():
    """fal's published schemas: the field each person's speech comes from, and each endpoint's defaults."""
    sources = {e.app_id: [(s.source.name, s.voice.name if s.voice else None) for s in e.speakers] for e in ENDPOINTS}
    assert sources == {
        "fal-ai/ai-avatar": [("audio_url", None)],
        "fal-ai/ai-avatar/single-text": [("text_input", "voice")],
        "fal-ai/ai-avatar/multi": [("first_audio_url", None), ("second_audio_url", None)],
        "fal-ai/ai-avatar/multi-text": [("first_text_input", "voice1"), ("second_text_input", "voice2")],
    }
    defaults = {e.app_id: (e.default(FIELDS["num_frames"]), e.default(FIELDS["seed"])) for e in ENDPOINTS}
    assert defaults == {"fal-ai/ai-avatar": (145, 42), "fal-ai/ai-avatar/single-text": (136, 42),
                        "fal-ai/ai-avatar/multi": (181, 81), "fal-ai/ai-avatar/multi-text": (191, 81)}
    assert FIELDS["voice"].required and (FIELDS["voice1"].default, FIELDS["voice2"].default) == ("Sarah", "Roger")


def test_the_generate_flags_are_the_contract():
    actions = _actions()
    for spec in (IMAGE, *SPEECH_FLAG_FIELDS, *OPTION_FIELDS):
        action = actions[spec.name]
        assert spec.cli_flag in action.option_strings, spec.name
        # a person's speech is an audio file or a text: neither flag is required on its own
        assert action.required == (spec.required and spec not in SPEECH_FLAG_FIELDS), spec.name
        if spec.kind not in ("image", "audio", "boxes"):
            assert action.default == spec.default, spec.name
        assert tuple(action.choices or ()) == spec.choices, spec.name
        if spec.kind in ("int", "float") and spec.minimum is not None and spec.maximum is not None:
            assert spec.limits in action.help, spec.name


def _outside(spec: RequestField) -> list:
    if spec.choices:
        return ["not-a-choice"]
    values = []
    step = 1 if spec.kind == "int" else 0.5
    if spec.minimum is not None:
        values.append(type(spec.minimum)(spec.minimum - step) if spec.kind == "int" else spec.minimum - step)
    if spec.maximum is not None:
        values.append(spec.maximum + step)
    return values


@pytest.mark.parametrize("spec", [f for f in OPTION_FIELDS if f.choices or f.minimum is not None or f.maximum is not None],
                         ids=lambda f: f.name)
def test_the_pipeline_checks_the_contract(spec, tmp_path):
    """Every limit and choice refuses the value just outside it, naming the field; the defaults pass."""
    request = GenerationRequest(image=tmp_path / "a.png", audio=[tmp_path / "a.wav"], output=tmp_path / "o.mp4",
                                prompt="p")
    request.check()
    for value in _outside(spec):
        with pytest.raises(InputError) as error:
            replace(request, **{spec.name: int(value) if spec.kind == "int" else value}).check()
        assert error.value.field == spec.name and spec.limits in error.value.reason


STRING_KINDS = ("text", "speech", "image", "audio")


@pytest.mark.parametrize("model", INPUT_MODELS, ids=lambda m: m.endpoint.app_id)
def test_every_string_field_has_a_length_limit_the_http_schema_shows(model):
    properties = model.model_json_schema()["properties"]
    for spec in (*MEDIA_FIELDS, *SPEECH_FIELDS, *OPTION_FIELDS):
        if spec.kind in STRING_KINDS and spec in model.endpoint.fields:
            schema = properties[spec.name]
            assert spec.max_length and (schema.get("anyOf") or [schema])[0]["maxLength"] == spec.max_length, spec.name


@pytest.mark.parametrize("spec", [f for f in OPTION_FIELDS if f.kind == "text"], ids=lambda f: f.name)
def test_the_pipeline_refuses_over_long_text_and_control_characters(spec, tmp_path):
    """What the CLI and the worker run: the same limit and character rule as the HTTP schema."""
    request = GenerationRequest(image=tmp_path / "a.png", audio=[tmp_path / "a.wav"], output=tmp_path / "o.mp4",
                                prompt="p")
    allowed = "Two\tfriends\r\ntalk. "
    replace(request, **{spec.name: allowed + "x" * (spec.max_length - len(allowed))}).check()
    for value, reason in [("x" * (spec.max_length + 1), f"at most {spec.max_length} characters"),
                          ("a\x00b", "control characters"), ("\x1b[31mred", "control characters")]:
        with pytest.raises(InputError, match=reason) as error:
            replace(request, **{spec.name: value}).check()
        assert error.value.field == spec.name


def test_the_generation_request_takes_the_contract_defaults(tmp_path):
    request = GenerationRequest(image=tmp_path / "a.png", audio=[tmp_path / "a.wav"], output=tmp_path / "o.mp4")
    assert {f.name: getattr(request, f.name) for f in OPTION_FIELDS} == {f.name: f.default for f in OPTION_FIELDS}


LIMIT_LITERALS = re.compile(r"\b(41|241|4294967295)\b|2\s*\*\*\s*32")


def test_limits_and_choices_are_declared_in_one_module():
    """No module but the contract spells the frame range or the seed range (the playground reads them from
    the OpenAPI schema)."""
    contract = REPO_ROOT / "model" / "contract" / "fields.py"
    offenders = []
    for path in [*REPO_ROOT.joinpath("model").rglob("*.py"), *REPO_ROOT.joinpath("server").rglob("*.py"),
                 *REPO_ROOT.joinpath("server").rglob("*.html"), *REPO_ROOT.joinpath("server").rglob("*.js")]:
        if path == contract:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if LIMIT_LITERALS.search(line.split("#")[0]):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert offenders == []
