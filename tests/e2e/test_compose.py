"""docker-compose.yml and the Dockerfile, checked the honest way without Docker.

The compose file is parsed; every hetbatch command in it must be accepted by the real
CLI parser, every HETBATCH_* variable must be a setting the code reads, and the
worker-cpu service and the demo producer are really run, outside Docker, against a
private redis-server started with the compose file's own flags (password, AOF).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from hetbatch.producers.settings import ClientSettings
from hetbatch.worker.cli import build_parser
from hetbatch.worker.devtools.redis_server import RedisServer, free_port
from hetbatch.worker.settings import WorkerSettings
from tests.kit.helpers import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
# What an operator's .env would hold.
DOTENV = {"REDIS_PASSWORD": "compose-test-pw-0123", "FLOWER_PASSWORD": "flower-pw"}
SETTINGS = {f.name for f in fields(WorkerSettings)} | {f.name for f in fields(ClientSettings)}
OTHER_ENV = {"PYTHONUNBUFFERED", "REDISCLI_AUTH"}


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${NAME}``, ``${NAME:-default}``, ``${NAME:?error}`` and ``$$``."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if name in env and env[name] != "":
            return env[name]
        if op == ":-":
            return arg or ""
        if op == ":?":
            raise KeyError(f"compose would refuse to start: {arg}")
        return ""

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, value).replace("$$", "$")


def environment(service: str) -> dict[str, str]:
    return {k: interpolate(str(v), DOTENV) for k, v in (SERVICES[service].get("environment") or {}).items()}


def hetbatch_commands() -> list[tuple[str, list[str]]]:
    return [
        (name, [str(a) for a in svc["command"]]) for name, svc in SERVICES.items() if svc["command"][0] == "hetbatch"
    ]


def test_the_services_are_all_there_with_persistence_auth_and_healthchecks() -> None:
    assert set(SERVICES) == {"redis", "worker-cpu", "worker-gpu", "flower", "demo"}
    redis_cmd = [interpolate(str(a), DOTENV) for a in SERVICES["redis"]["command"]]
    assert redis_cmd[redis_cmd.index("--requirepass") + 1] == DOTENV["REDIS_PASSWORD"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert "redis-data:/data" in SERVICES["redis"]["volumes"]
    for name in ("redis", "worker-cpu", "worker-gpu", "flower"):
        assert SERVICES[name]["healthcheck"]["test"], name
    for name in ("worker-cpu", "worker-gpu", "demo"):
        assert "models:/models" in SERVICES[name]["volumes"], name
    assert set(COMPOSE["volumes"]) == {"redis-data", "models"}
    gpu = SERVICES["worker-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert gpu["command"][gpu["command"].index("--pool") + 1] == "gpu"
    assert "--no-auth" not in SERVICES["flower"]["command"]
    flower_env = environment("flower")
    assert flower_env["HETBATCH_FLOWER_USER"] and flower_env["HETBATCH_FLOWER_PASSWORD"] == DOTENV["FLOWER_PASSWORD"]
    assert SERVICES["demo"]["restart"] == "no"
    with pytest.raises(KeyError, match="REDIS_PASSWORD"):
        interpolate(SERVICES["worker-cpu"]["environment"]["HETBATCH_REDIS_URL"], {})


@pytest.mark.parametrize(("service", "argv"), hetbatch_commands(), ids=[n for n, _ in hetbatch_commands()])
def test_every_command_is_accepted_by_the_real_cli_parser(service: str, argv: list[str]) -> None:
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse's way of refusing
        pytest.fail(f"{service}: 'hetbatch {' '.join(argv[1:])}' is refused by the CLI ({exc})")
    assert args.command in ("worker", "flower", "demo")


@pytest.mark.parametrize("service", [s for s in SERVICES if s != "redis"])
def test_every_variable_is_a_setting_the_code_reads(service: str) -> None:
    env = environment(service)
    for name in env:
        assert name in OTHER_ENV or (name.startswith("HETBATCH_") and name[9:].lower() in SETTINGS), name
    settings = {k[9:].lower(): v for k, v in env.items() if k.startswith("HETBATCH_")}
    old = dict(os.environ)
    try:
        os.environ.update(env)
        parsed = WorkerSettings.from_env()
        client = ClientSettings.from_env()
    finally:
        os.environ.clear()
        os.environ.update(old)
    for key, raw in settings.items():
        target = parsed if hasattr(parsed, key) else client
        assert str(getattr(target, key)) == raw, key


def test_the_dockerfile_builds_both_images_with_extras_that_exist() -> None:
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    stages = dict(re.findall(r"^FROM \S+ AS (\w+)\n(.*?)(?=^FROM |\Z)", DOCKERFILE, re.M | re.S))
    assert {"base", "cpu", "gpu"} <= set(stages)
    assert {SERVICES[s]["build"]["target"] for s in SERVICES if "build" in SERVICES[s]} == {"cpu", "gpu"}
    cpu, gpu = stages["cpu"], stages["gpu"]
    assert "ARG TORCH_VERSION=2.13.0" in cpu and re.search(r"ARG TORCH_INDEX_URL=\S+/whl/cpu", cpu)
    assert '"torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"' in cpu
    for stage in (cpu, gpu):
        (chosen,) = re.findall(r"ARG EXTRAS=(\S+)", stage)
        assert set(chosen.split(",")) <= extras, chosen
    cpu_extras = set(re.findall(r"ARG EXTRAS=(\S+)", cpu)[0].split(","))
    gpu_extras = set(re.findall(r"ARG EXTRAS=(\S+)", gpu)[0].split(","))
    assert {"sklearn", "onnx", "torch", "flower", "metrics", "convert"} <= cpu_extras  # demo needs convert
    assert "gpu" in gpu_extras and "onnx" not in gpu_extras  # onnxruntime and onnxruntime-gpu clash
    assert "--index-url" not in gpu  # the default index's Linux torch is the CUDA build


def wait_for(log: Path, proc: subprocess.Popen[bytes], text: bytes, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"never saw {text!r}:\n{log.read_text(errors='replace')}")
        time.sleep(0.2)


def test_worker_cpu_and_the_demo_run_as_composed_against_a_password_redis(tmp_path: Path) -> None:
    redis_args = [interpolate(str(a), DOTENV) for a in SERVICES["redis"]["command"][1:]]
    server = RedisServer(*redis_args)
    procs: list[subprocess.Popen[bytes]] = []

    def service_env(name: str, **extra: str) -> dict[str, str]:
        env = {**os.environ, **environment(name), **extra}
        env["HETBATCH_REDIS_URL"] = env["HETBATCH_REDIS_URL"].replace("@redis:6379", f"@127.0.0.1:{server.port}")
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).ping()  # the compose flags really demand the password
        worker_env = service_env(
            "worker-cpu", HETBATCH_METRICS_PORT=str(free_port()), HETBATCH_METRICS_ADDRESS="127.0.0.1"
        )
        log = tmp_path / "worker-cpu.log"
        argv = [str(a) for a in SERVICES["worker-cpu"]["command"]]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "hetbatch", *argv[1:]],
                env=worker_env,
                cwd=tmp_path,
                stdout=log.open("wb"),
                stderr=subprocess.STDOUT,
            )
        )
        wait_for(log, procs[0], b" ready.")
        check = SERVICES["worker-cpu"]["healthcheck"]["test"]
        assert check[0] == "CMD-SHELL"
        probe = interpolate(check[1], {}).replace("python ", f"{sys.executable} ", 1)
        assert subprocess.run(probe, shell=True, env=worker_env, timeout=30).returncode == 0

        demo = SERVICES["demo"]
        assert demo["working_dir"] == "/models"  # the shared volume: artifacts registered there are seen by workers
        done = subprocess.run(
            [sys.executable, "-m", "hetbatch", *[str(a) for a in demo["command"][1:]]],
            env=service_env("demo"),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert re.search(r"labels equal in-process\s+20,000/20,000", done.stdout), done.stdout
        assert b"demo-forest-onnx" in log.read_bytes()  # the composed worker did the work
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        server.stop()
