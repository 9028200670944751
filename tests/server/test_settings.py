"""Settings come from flags, then MULTITALK_* variables, then defaults; the docs table is the code's."""

from __future__ import annotations

import argparse

import pytest

from server.settings import OPTIONS, Settings, add_flags, load_settings, settings_table

from repo_paths import REPO_ROOT


@pytest.mark.parametrize("document", ["docs/configuration.md", "README.md"])
def test_docs_table_matches_the_code(document):
    assert settings_table() in (REPO_ROOT / document).read_text(), f"regenerate the settings table in {document}"


def test_defaults_without_flags_or_environment():
    assert load_settings(None, environ={}) == Settings()


def test_environment_is_parsed_and_flags_win():
    parser = argparse.ArgumentParser()
    add_flags(parser, "serve")
    args = parser.parse_args(["--port", "9000", "--frame-size", "32x64", "--log-json"])
    env = {"MULTITALK_PORT": "8001", "MULTITALK_API_KEYS": "k1, k2", "MULTITALK_MAX_QUEUE": "none",
           "MULTITALK_REDIS_URL": "redis://r:6379/0", "MULTITALK_STEPS": "4"}
    settings = load_settings(args, environ=env)
    assert (settings.port, settings.frame_size, settings.log_json) == (9000, (32, 64), True)
    assert settings.api_keys == {"k1", "k2"} and settings.max_queue is None and settings.steps == 4
    assert settings.redis_url == "redis://r:6379/0"


def test_worker_has_only_its_flags():
    parser = argparse.ArgumentParser()
    add_flags(parser, "worker")
    flags = {action.dest for action in parser._actions}
    assert {"weights", "data_dir", "redis_url", "frame_size"} <= flags and not {"port", "host", "workers"} & flags


@pytest.mark.parametrize("env, message", [
    ({"MULTITALK_PORT": "eighty"}, "MULTITALK_PORT"),
    ({"MULTITALK_WORKERS": "-1"}, "workers must be >= 0"),
    ({"MULTITALK_MAX_QUEUE": "0"}, "max_queue"),
    ({"MULTITALK_PUBLIC_URL": "example.com"}, "public_url"),
    ({"MULTITALK_FRAME_SIZE": "64"}, "MULTITALK_FRAME_SIZE"),
    ({"MULTITALK_LOG_JSON": "perhaps"}, "MULTITALK_LOG_JSON"),
    ({"MULTITALK_COMPILE": "1", "MULTITALK_WEIGHT_STORAGE": "fp8-storage"}, "compile.*fp8-storage"),
])
def test_bad_settings_are_refused_naming_the_setting(env, message):
    with pytest.raises(ValueError, match=message):
        load_settings(None, environ=env)


def test_base_url_is_the_public_url_or_the_listening_address():
    assert Settings(host="0.0.0.0", port=8123).base_url == "http://127.0.0.1:8123"
    assert Settings(public_url="https://api.example.com/").base_url == "https://api.example.com"
    assert all(option.env.startswith("MULTITALK_") for option in OPTIONS)
