"""The browser playground at `/`: served as plain files, and driven end to end in headless Chromium.

One `multitalk serve` with an embedded worker on the tiny weights (the harness's fast frame size and
one step). The browser tests need Chromium, chromedriver and selenium; they are skipped without them,
and fail instead under MULTITALK_REQUIRE_BROWSER=1 (CI). The end-to-end run takes a screenshot of
the page; `MULTITALK_SCREENSHOT_DIR=docs` keeps it as the README's docs/playground.png.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server_harness import Cluster

pytestmark = [pytest.mark.browser, pytest.mark.service, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
JOB_TIMEOUT_S = 120


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


def _fill(driver, example_inputs, num_frames: int) -> None:
    by_id = driver.find_element
    by_id("id", "image-input").send_keys(str(example_inputs["image"]))
    by_id("id", "audio1-input").send_keys(str(example_inputs["audio1"]))
    by_id("id", "audio2-input").send_keys(str(example_inputs["audio2"]))
    by_id("id", "prompt").send_keys("Two friends chat at a kitchen table")
    frames = by_id("id", "num_frames")
    frames.clear()
    frames.send_keys(str(num_frames))


def test_page_and_assets_are_served(cluster):
    page = httpx.get(f"{cluster.url}/", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert 'id="submit"' in page.text and "/playground/playground.js" in page.text
    for name, content_type in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
        asset = httpx.get(f"{cluster.url}/playground/{name}", timeout=10)
        assert asset.status_code == 200, name
        assert asset.headers["content-type"].startswith(content_type), asset.headers["content-type"]
        assert len(asset.content) > 1000
    assert httpx.get(f"{cluster.url}/playground/index.py", timeout=10).status_code == 404
    paths = httpx.get(f"{cluster.url}/openapi.json", timeout=10).json()["paths"]
    assert "/" not in paths and not any(path.startswith("/playground") for path in paths)


def test_options_come_from_the_servers_schema(page, cluster):
    """The limits, choices and defaults are the request contract's, read from `/openapi.json`, not the page's own."""
    schema = httpx.get(f"{cluster.url}/openapi.json", timeout=10).json()
    properties = schema["components"]["schemas"]["AvatarMultiInput"]["properties"]
    frames, resolution = properties["num_frames"], properties["resolution"]
    _wait(page, lambda d: d.find_element("id", "form").get_attribute("data-schema") != "loading", 30,
          "the page to read the schema")
    assert page.find_element("id", "form").get_attribute("data-schema") == "ready", \
        page.find_element("id", "schema-status").text
    num_frames = page.find_element("id", "num_frames")
    assert float(num_frames.get_attribute("min")) == frames["minimum"]
    assert float(num_frames.get_attribute("max")) == frames["maximum"]
    assert float(num_frames.get_attribute("value")) == frames["default"]
    hint = page.find_element("id", "num_frames-hint").text
    assert f"{frames['minimum']:g}" in hint and f"{frames['maximum']:g}" in hint, hint
    options = page.execute_script(
        "return [...document.getElementById('resolution').options].map(o => [o.value, o.selected])")
    assert [value for value, _ in options] == resolution["enum"]
    assert [value for value, selected in options if selected] == [resolution["default"]]


def test_generates_and_plays_a_video(page, cluster, example_inputs, tmp_path):
    _fill(page, example_inputs, 41)
    _wait(page, lambda d: d.execute_script("return document.getElementById('audio2-duration').textContent"),
          10, "the durations of the audio files")
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
    assert "COMPLETED" in history and "Two friends chat" in history

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


def test_speaker_boxes_are_drawn_and_moved_in_image_pixels(page, example_inputs):
    from selenium.webdriver.common.action_chains import ActionChains

    _fill(page, example_inputs, 41)
    page.find_element("id", "placement-boxes").click()
    boxes = lambda: page.execute_script(  # noqa: E731
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
