"""The README's client examples, run as written against real servers, and https in both documented forms.

The Python and curl blocks are extracted from README.md and run unchanged; only what they read from
the environment differs (`SERVER_URL`, `FAL_KEY`, `SSL_CERT_FILE`), and they run in a folder holding
`examples/` as `scripts/make_example_inputs.py examples` writes it. Two servers, each with an API
key so that a missing `Authorization` header fails: one on plain http, with no public URL, so that
its URLs come from the request (and behind nginx, from the proxy's forwarded headers); one serving
TLS itself (`--tls-cert`). nginx runs deploy/nginx/multitalk.conf.template filled in as the
compose profile's image does, and the unmodified fal client goes through it over https. Outside
traffic is routed to a dead proxy in the recipe's process, so an upload left on fal's hosts fails.
"""

from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import fal_client
import httpx
import pytest

from local_servers import binary_or_skip, free_port
from repo_paths import REPO_ROOT
from server_harness import Cluster, Process
from tls_certs import HOST, write_self_signed

pytestmark = [pytest.mark.service, pytest.mark.slow]

APP = "fal-ai/ai-avatar/multi"
API_KEY = "doc-recipe-key"
PROXY_TEMPLATE = REPO_ROOT / "deploy" / "nginx" / "multitalk.conf.template"
NO_OUTSIDE_TRAFFIC = {"ALL_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1,localhost"}
RECIPE_TIMEOUT_S = 300


def readme_block(heading: str, language: str) -> str:
    """The first ```language block after the README line `heading`."""
    text = (REPO_ROOT / "README.md").read_text()
    after = text[text.index(f"\n{heading}\n"):]
    match = re.search(rf"^```{language}\n(.*?)^```$", after, re.S | re.M)
    assert match, f"README.md has no {language} block after {heading!r}"
    return match.group(1)


class TlsCluster(Cluster):
    """A cluster whose API serves https on `localhost` (the test process trusts it via SSL_CERT_FILE)."""

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.port}"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    return write_self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def trusted(certificate):
    """This process's httpx trusts the test certificate, as the documented SSL_CERT_FILE makes a client do."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SSL_CERT_FILE", str(certificate[0]))
        yield certificate[0]


def _start(cluster: Cluster, *args: str) -> Cluster:
    api = cluster.start_api(*args)
    cluster.wait_ready(process=api)
    return cluster


@pytest.fixture(scope="module")
def http_server(tmp_path_factory, tiny_weights):
    cluster = Cluster(tmp_path_factory.mktemp("http-server"), tiny_weights["multitalk"],
                      env={"MULTITALK_API_KEYS": API_KEY, "MULTITALK_PUBLIC_URL": ""})
    yield _start(cluster)
    cluster.stop_all()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, tiny_weights, certificate, trusted):
    cluster = TlsCluster(tmp_path_factory.mktemp("tls-server"), tiny_weights["multitalk"],
                         env={"MULTITALK_API_KEYS": API_KEY, "MULTITALK_PUBLIC_URL": ""})
    yield _start(cluster, "--tls-cert", str(certificate[0]), "--tls-key", str(certificate[1]))
    cluster.stop_all()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, example_inputs) -> Path:
    """A folder with `examples/` as `python scripts/make_example_inputs.py examples` leaves it."""
    folder = tmp_path_factory.mktemp("recipes")
    (folder / "examples").symlink_to(example_inputs["image"].parent, target_is_directory=True)
    return folder


def _run(command: list[str], workdir: Path, **env: str) -> str:
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=RECIPE_TIMEOUT_S,
                          env={**os.environ, "FAL_KEY": API_KEY, **NO_OUTSIDE_TRAFFIC, **env})
    assert done.returncode == 0, f"{command[0]} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _run_python_recipe(workdir: Path, **env: str) -> str:
    """The README's Python example as written; the video URL it prints."""
    (workdir / "client.py").write_text(readme_block("#### Python fal client (unmodified)", "python"))
    return _run([sys.executable, "client.py"], workdir, **env).strip().splitlines()[-1]


def _assert_video(url: str, base: str, verify: ssl.SSLContext | bool = True) -> None:
    assert url.startswith(f"{base}/files/"), url
    response = httpx.get(url, verify=verify, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"


def test_python_recipe_runs_as_written_over_http(http_server, workdir):
    video_url = _run_python_recipe(workdir, SERVER_URL=http_server.url)
    _assert_video(video_url, http_server.url)


def test_curl_example_runs_as_written(http_server, workdir):
    output = _run(["bash", "-c", readme_block("#### curl", "bash")], workdir, SERVER_URL=http_server.url)
    submitted, *_, result = output.strip().splitlines()
    assert '"status":"IN_QUEUE"' in submitted, output
    video_url = re.search(r'"video":\{"url":"([^"]+)"', result)
    assert video_url, output
    _assert_video(video_url.group(1), http_server.url)


def test_python_recipe_runs_as_written_with_tls_cert(tls_server, workdir, certificate):
    """`--tls-cert`: the client trusts the certificate through SSL_CERT_FILE, as the README says."""
    video_url = _run_python_recipe(workdir, SERVER_URL=tls_server.url, SSL_CERT_FILE=str(certificate[0]))
    _assert_video(video_url, tls_server.url, verify=ssl.create_default_context(cafile=certificate[0]))


# --- behind the compose profile's nginx -------------------------------------------------------------

def render_template(values: dict[str, str]) -> str:
    """The template with its ${NAME}s replaced, as the nginx image's envsubst does at start."""
    text = re.sub(r"\$\{(\w+)\}", lambda match: values[match.group(1)], PROXY_TEMPLATE.read_text())
    assert "${" not in text
    return text


@pytest.fixture(scope="module")
def proxy(http_server, certificate, tmp_path_factory):
    """nginx on a free port, TLS with the test certificate, in front of the plain-http server; its https URL."""
    nginx = binary_or_skip("nginx", "MULTITALK_REQUIRE_NGINX", "test deploy/nginx/multitalk.conf.template")
    folder = tmp_path_factory.mktemp("nginx")
    port = free_port()
    site = folder / "multitalk.conf"
    site.write_text(render_template({"PROXY_LISTEN": f"127.0.0.1:{port}", "PROXY_UPSTREAM": f"127.0.0.1:{http_server.port}",
                                     "PROXY_TLS_CERT": str(certificate[0]), "PROXY_TLS_KEY": str(certificate[1])}))
    temp_paths = "\n".join(f"    {kind}_temp_path {folder / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    # One process as the invoking user (no workers switching to `nobody`), everything in the test's folder.
    (folder / "nginx.conf").write_text(f"daemon off;\nmaster_process off;\npid {folder / 'nginx.pid'};\n"
                                       f"events {{}}\nhttp {{\n    access_log off;\n{temp_paths}\n    include {site};\n}}\n")
    log = folder / "error.log"
    process = subprocess.Popen([nginx, "-p", str(folder), "-e", str(log), "-c", str(folder / "nginx.conf")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"https://{HOST}:{port}"
    verify = ssl.create_default_context(cafile=certificate[0])
    try:
        http_server.wait_until(lambda: httpx.get(f"{url}/healthz", verify=verify, timeout=5).status_code == 200,
                               Process(process, log), f"nginx on port {port}", timeout_s=30)
        yield url
    finally:
        process.send_signal(signal.SIGQUIT)
        process.wait(30)


def test_fal_client_through_the_tls_proxy_gets_https_urls_on_the_proxy_host(proxy, trusted, example_inputs, monkeypatch):
    monkeypatch.setattr(fal_client.client, "RUN_URL_FORMAT", f"{proxy}/")
    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"{proxy}/queue/")
    monkeypatch.setattr(fal_client.client, "REST_URL", proxy)
    monkeypatch.setattr(fal_client.client, "CDN_URL", proxy)
    client = fal_client.SyncClient(key=API_KEY)

    image_url = client.upload_file(example_inputs["image"])
    assert image_url.startswith(f"{proxy}/files/")
    handle = client.submit(APP, arguments={"image_url": image_url, "first_audio_url": fal_client.encode_file(example_inputs["audio1"]),
                                           "prompt": "one person speaking", "num_frames": 41})
    response_url = f"{proxy}/queue/fal-ai/ai-avatar/requests/{handle.request_id}"
    assert (handle.response_url, handle.status_url, handle.cancel_url) == (
        response_url, f"{response_url}/status", f"{response_url}/cancel")
    assert type(handle.status(with_logs=True)).__name__ in ("Queued", "InProgress", "Completed")  # GET status_url
    result = handle.get()  # polls status_url, then GET response_url
    _assert_video(result["video"]["url"], proxy, verify=ssl.create_default_context(cafile=trusted))
