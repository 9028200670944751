"""The browser playground at `/`: served as plain files, and driven end to end in headless Chromium.

One `multitalk serve` with an embedded worker on the tiny weights (the harness's fast frame size and
one step, a tiny Kokoro for the text endpoints). The page offers every ai-avatar endpoint the server
queues and shows the fields of the chosen one; two videos run end to end: a multi-text one from typed
texts (the speech synthesis path) and a multi one from uploaded audio with drawn boxes. The browser tests
need Chromium, chromedriver and selenium; they are skipped without them, and fail instead under
MULTITALK_REQUIRE_BROWSER=1 (CI). The multi-text run takes a screenshot of the page;
`MULTITALK_SCREENSHOT_DIR=docs` keeps it as the README's docs/playground.png.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from model.contract.fields import (
    AVATAR_MULTI,
    AVATAR_MULTI_TEXT,
    AVATAR_SINGLE_TEXT,
    ENDPOINTS,
    IMAGE,
    NUM_FRAMES,
    SPEAKER_BOXES,
)
from model.speech.voices import HOSTED_NAMES
from server.api.schemas import INPUT_MODELS

from server_harness import Cluster

pytestmark = [pytest.mark.browser, pytest.mark.service, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
JOB_TIMEOUT_S = 120
AUDIO_INPUTS = ("audio_url-input", "first_audio_url-input", "second_audio_url-input")
# The page marks each field's controls with data-field, except the image's drop zone and the boxes drawn on it.
UNMARKED_FIELDS = {IMAGE.name, SPEAKER_BOXES.name}
SHOWN_FIELDS = """return [...new Set([...document.querySelectorAll('#form [data-field]')]
    .filter((element) => element.getClientRects().length).map((element) => element.dataset.field))]"""
# Records what the page POSTs to the queue (the test's own probe, wrapped around the page's fetch).
RECORD_SUBMITS = """window.submits = [];
const pageFetch = window.fetch;
window.fetch = (url, options) => {
  if (String(url).includes('/queue/') && options && options.method === 'POST') {
    window.submits.push([String(url), JSON.parse(options.body)]);
  }
  return pageFetch(url, options);
};"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("playground"), Path("tiny"))
    try:
        process = cluster.start_api(workers=1, MULTITALK_WEIGHTS="tiny")
        cluster.wait_ready(process=process)
        yield cluster
    finally:
        cluster.stop_all()


def _browser_or_skip():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the selenium package")
    if missing:
        reason = f"browser tests need {', '.join(missing)}"
        if os.environ.get("MULTITALK_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,1000", "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture(scope="module")
def browser():
    driver = _browser_or_skip()
    driver.set_window_size(1280, 1000)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, cluster):
    """The playground freshly loaded, with this browser's history and key cleared."""
    browser.get(f"{cluster.url}/")
    browser.execute_script("localStorage.clear()")
    browser.get(f"{cluster.url}/")
    return browser


def _wait(driver, condition, timeout_s: float, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout_s, poll_frequency=0.25).until(condition)
    except Exception as exc:  # selenium's TimeoutException says nothing about the page
        text = driver.execute_script(
            "return ['status','job-error','form-error','logs'].map(id => id + ': ' + "
            "(document.getElementById(id).textContent || '')).join('\\n')")
        raise AssertionError(f"timed out waiting for {what}:\n{text}") from exc


def _ready(driver) -> None:
    """Wait for the page to read the endpoints and their options from the schema."""
    _wait(driver, lambda d: d.find_element("id", "form").get_attribute("data-schema") != "loading", 30,
          "the page to read the schema")
    assert driver.find_element("id", "form").get_attribute("data-schema") == "ready", \
        driver.find_element("id", "schema-status").text


def _choose(driver, app_id: str) -> None:
    from selenium.webdriver.support.ui import Select

    _ready(driver)
    Select(driver.find_element("id", "endpoint")).select_by_value(app_id)


def _fill(driver, example_inputs, num_frames: int, app_id: str = AVATAR_MULTI.app_id, **texts: str) -> None:
    """The example image, a prompt and `num_frames` for `app_id`; both example audio files, or `texts` by field."""
    _choose(driver, app_id)
    by_id = driver.find_element
    by_id("id", "image-input").send_keys(str(example_inputs["image"]))
    if app_id == AVATAR_MULTI.app_id:
        by_id("id", "first_audio_url-input").send_keys(str(example_inputs["audio1"]))
        by_id("id", "second_audio_url-input").send_keys(str(example_inputs["audio2"]))
    for field, text in texts.items():
        by_id("id", field).send_keys(text)
    by_id("id", "prompt").send_keys("Two friends chat at a kitchen table")
    frames = by_id("id", "num_frames")
    frames.clear()
    frames.send_keys(str(num_frames))


def _selected(driver, select_id: str) -> list[str]:
    return driver.execute_script(
        f"return [...document.getElementById('{select_id}').selectedOptions].map(o => o.value)")


def _options(driver, select_id: str) -> list[str]:
    return driver.execute_script(f"return [...document.getElementById('{select_id}').options].map(o => o.value)")


def test_page_and_assets_are_served(cluster):
    page = httpx.get(f"{cluster.url}/", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert 'id="submit"' in page.text and 'id="endpoint"' in page.text and "/playground/playground.js" in page.text
    for name, content_type in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
        asset = httpx.get(f"{cluster.url}/playground/{name}", timeout=10)
        assert asset.status_code == 200, name
        assert asset.headers["content-type"].startswith(content_type), asset.headers["content-type"]
        assert len(asset.content) > 1000
    assert httpx.get(f"{cluster.url}/playground/index.py", timeout=10).status_code == 404
    paths = httpx.get(f"{cluster.url}/openapi.json", timeout=10).json()["paths"]
    assert "/" not in paths and not any(path.startswith("/playground") for path in paths)


def test_the_page_has_a_place_for_every_field_of_every_endpoint(cluster):
    """Each field of each endpoint has its controls marked with data-field (shown only for the endpoints that have
    it) and a place for its 422 error."""
    page = httpx.get(f"{cluster.url}/", timeout=10).text
    for endpoint in ENDPOINTS:
        for field in endpoint.fields:
            assert f'id="error-{field.name}"' in page, (endpoint.app_id, field.name)
            assert field.name in UNMARKED_FIELDS or f'data-field="{field.name}"' in page, (endpoint.app_id, field.name)


def test_options_come_from_the_servers_schema(page, cluster):
    """The endpoints, and each one's fields, limits, choices and defaults, are the request contract's, read from
    `/openapi.json`, not the page's own: the selector lists the four endpoints, multi first chosen, and each choice
    shows exactly the fields its input schema has, with its defaults."""
    schemas = httpx.get(f"{cluster.url}/openapi.json", timeout=10).json()["components"]["schemas"]
    schema_names = {model.endpoint.app_id: model.__name__ for model in INPUT_MODELS}
    _ready(page)
    assert _options(page, "endpoint") == [endpoint.app_id for endpoint in ENDPOINTS]
    assert _selected(page, "endpoint") == [AVATAR_MULTI.app_id]
    for endpoint in ENDPOINTS:
        _choose(page, endpoint.app_id)
        properties = schemas[schema_names[endpoint.app_id]]["properties"]
        assert set(page.execute_script(SHOWN_FIELDS)) == set(properties) - UNMARKED_FIELDS, endpoint.app_id
        frames, seed, resolution = properties["num_frames"], properties["seed"], properties["resolution"]
        num_frames = page.find_element("id", "num_frames")
        assert float(num_frames.get_attribute("min")) == frames["minimum"]
        assert float(num_frames.get_attribute("max")) == frames["maximum"]
        assert float(num_frames.get_attribute("value")) == frames["default"] == endpoint.default(NUM_FRAMES)
        assert float(page.find_element("id", "seed").get_attribute("value")) == seed["default"]
        hint = page.find_element("id", "num_frames-hint").text
        assert f"{frames['minimum']:g}" in hint and f"{frames['maximum']:g}" in hint, hint
        assert _options(page, "resolution") == resolution["enum"]
        assert _selected(page, "resolution") == [resolution["default"]]


def test_single_text_shows_its_text_and_voice_and_no_audio(page):
    _choose(page, AVATAR_SINGLE_TEXT.app_id)
    assert page.find_element("id", "text_input").is_displayed() and page.find_element("id", "voice").is_displayed()
    assert set(HOSTED_NAMES) <= set(_options(page, "voice")) and len(HOSTED_NAMES) == 20
    for hidden in (*AUDIO_INPUTS, "use_only_first_audio", "audio_mode", "first_text_input", "voice1"):
        assert not page.find_element("id", hidden).is_displayed(), hidden
    page.get(page.current_url)  # the browser remembers the choice
    _wait(page, lambda d: _selected(d, "endpoint") == [AVATAR_SINGLE_TEXT.app_id], 30, "the remembered endpoint")
    assert page.find_element("id", "text_input").is_displayed()


def test_multi_text_shows_two_texts_and_two_voices_with_their_defaults(page):
    _choose(page, AVATAR_MULTI_TEXT.app_id)
    for shown in ("first_text_input", "second_text_input", "voice1", "voice2", "audio_mode"):
        assert page.find_element("id", shown).is_displayed(), shown
    assert (_selected(page, "voice1"), _selected(page, "voice2")) == (["Sarah"], ["Roger"])
    assert set(HOSTED_NAMES) <= set(_options(page, "voice2"))
    for hidden in (*AUDIO_INPUTS, "use_only_first_audio", "text_input", "voice"):
        assert not page.find_element("id", hidden).is_displayed(), hidden


def test_generates_and_plays_a_video_from_typed_texts(page, cluster, example_inputs, tmp_path):
    """multi-text: the two texts and voices go to its queue route, the worker speaks them, the video plays."""
    from selenium.webdriver.support.ui import Select

    texts = {"first_text_input": "Hello there.", "second_text_input": "Hi, how are you?"}  # fit 41 frames
    _fill(page, example_inputs, 41, AVATAR_MULTI_TEXT.app_id, **texts)
    Select(page.find_element("id", "voice2")).select_by_value("George")
    page.execute_script(RECORD_SUBMITS)
    page.find_element("id", "submit").click()

    _wait(page, lambda d: d.find_element("id", "status").text == "COMPLETED", JOB_TIMEOUT_S, "COMPLETED")
    _wait(page, lambda d: d.execute_script(
        "const v = document.getElementById('result-video'); return v.readyState >= 1 && v.duration > 0"),
        30, "the result video to load")
    src = page.execute_script("return document.getElementById('result-video').currentSrc")
    assert src.startswith(f"{cluster.url}/files/"), src
    assert page.find_element("id", "job-error").text == ""
    assert page.find_element("id", "progress").get_attribute("value") == "1"
    assert page.find_element("id", "result-download").get_attribute("href") == src
    history = page.find_element("id", "history").text
    assert "COMPLETED" in history and "Two friends chat" in history and AVATAR_MULTI_TEXT.app_id in history
    [(url, body)] = page.execute_script("return window.submits")
    assert url == f"/queue/{AVATAR_MULTI_TEXT.app_id}"
    assert {**texts, "voice1": "Sarah", "voice2": "George", "num_frames": 41}.items() <= body.items()
    assert set(body) <= {field.name for field in AVATAR_MULTI_TEXT.fields}  # no audio, no use_only_first_audio

    page.execute_script("window.scrollTo(0, 0)")
    screenshot = Path(os.environ.get("MULTITALK_SCREENSHOT_DIR") or tmp_path) / "playground.png"
    page.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000

    # The history outlives the page: reloaded, its entry brings the result back.
    page.get(f"{cluster.url}/")
    page.find_element("css selector", "#history .history-entry").click()
    _wait(page, lambda d: d.find_element("id", "status").text == "COMPLETED", 30, "the past request's status")
    _wait(page, lambda d: d.execute_script("return document.getElementById('result-video').currentSrc") == src,
          30, "the past request's video")


def test_server_validation_errors_show_at_their_field(page, example_inputs):
    _fill(page, example_inputs, 5)
    page.find_element("id", "submit").click()
    _wait(page, lambda d: "num_frames" in d.find_element("id", "error-num_frames").text, 30,
          "the num_frames error")
    assert page.find_element("id", "job-id").text == ""  # nothing was queued


def test_a_text_too_long_for_the_video_is_refused_at_its_field(page, example_inputs):
    """single-text's own rule (its text within the speaking rate of num_frames) answers from its queue route."""
    _fill(page, example_inputs, 41, AVATAR_SINGLE_TEXT.app_id, text_input="A sentence far too long for 41 frames.")
    page.find_element("id", "submit").click()
    _wait(page, lambda d: d.find_element("id", "error-text_input").text, 30, "the text_input error")
    assert "characters" in page.find_element("id", "error-text_input").text
    assert page.find_element("id", "error-num_frames").text == ""
    assert page.find_element("id", "job-id").text == ""  # nothing was queued


def test_speaker_boxes_are_drawn_and_moved_in_image_pixels(page, example_inputs):
    from selenium.webdriver.common.action_chains import ActionChains

    _fill(page, example_inputs, 41)
    _wait(page, lambda d: d.execute_script(
        "return document.getElementById('second_audio_url-duration').textContent"), 10, "the audio's duration")
    page.find_element("id", "placement-boxes").click()
    def boxes():
        return page.execute_script(
            "return JSON.parse(document.getElementById('boxes-text').textContent.split(': ')[1])")

    _wait(page, lambda d: boxes() == [[32, 36, 608, 684], [672, 36, 1248, 684]], 10, "the default boxes")
    canvas = page.find_element("id", "preview")
    scale = 1280 / canvas.size["width"]  # image pixels per CSS pixel (the example image is 1280 wide)
    # Drag box 1 by 40 CSS pixels to the right, from a point inside it (offsets are from the canvas centre).
    ActionChains(page).move_to_element_with_offset(canvas, -canvas.size["width"] // 4, 0).click_and_hold() \
        .move_by_offset(20, 0).move_by_offset(20, 0).release().perform()
    (x_min, y_min, x_max, y_max), second = boxes()
    assert abs(x_min - (32 + 40 * scale)) <= 2 * scale and x_max - x_min == 576 and (y_min, y_max) == (36, 684)
    assert second == [672, 36, 1248, 684]
    page.find_element("id", "submit").click()  # the server takes the boxes and runs the request
    _wait(page, lambda d: d.find_element("id", "status").text == "COMPLETED", JOB_TIMEOUT_S, "COMPLETED")
    assert page.find_element("id", "job-error").text == ""
    page.find_element("id", "placement-faces").click()
    assert page.find_element("id", "boxes-text").text == ""
