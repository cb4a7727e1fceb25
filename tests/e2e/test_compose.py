"""docker-compose.yml and the Dockerfile, checked without a Docker engine: every service's command is
one the `vlmq` CLI accepts, ports and healthchecks line up, settings are real settings, workers scale."""

from __future__ import annotations

import json
import re

import pytest
import tomllib
import yaml

from shared.config.settings import Settings
from tests.support.services import REPO
from vlmq.cli import build_parser

VLMQ_SERVICES = ("embedder-api", "embedder-worker", "generator-api", "generator-worker")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def with_defaults(text: str) -> str:
    """Compose's `${VAR:-default}` interpolation, with every variable unset."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", text)


def parsed_command(service: dict):
    return build_parser().parse_args([with_defaults(arg) for arg in service["command"]])


def container_ports(service: dict) -> list[int]:
    return [int(str(mapping).rsplit(":", 1)[-1].split("/")[0]) for mapping in service.get("ports", [])]


def test_every_service_command_is_a_vlmq_command(compose):
    commands = {}
    for name, service in compose["services"].items():
        if name == "redis":
            continue
        commands[name] = parsed_command(service).command  # argparse exits (SystemExit) on anything unknown
    assert {name: commands[name] for name in VLMQ_SERVICES} == {
        "embedder-api": "api", "embedder-worker": "worker", "generator-api": "api", "generator-worker": "worker",
    }


def test_apis_listen_where_their_ports_and_healthchecks_point(compose):
    for name, kind, port in (("embedder-api", "embed", 8001), ("generator-api", "generate", 8002)):
        service = compose["services"][name]
        args = parsed_command(service)
        assert (args.kind, args.host, args.port) == (kind, "0.0.0.0", port)
        assert container_ports(service) == [port]
        assert f"127.0.0.1:{port}/healthz" in " ".join(service["healthcheck"]["test"])


def test_workers_scale_and_reserve_a_gpu(compose):
    for name, kind in (("embedder-worker", "embed"), ("generator-worker", "generate")):
        service = compose["services"][name]
        args = parsed_command(service)
        assert args.kind == kind and args.device == ["cuda:0"]
        assert args.model.startswith("/models/")
        # `--scale` needs containers without fixed names or host ports.
        assert "container_name" not in service and "ports" not in service
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices and "gpu" in devices[0]["capabilities"]
        assert any(volume.split(":")[:2] == ["models", "/models"] for volume in service["volumes"])
    assert "models" in compose["volumes"]


def test_vlmq_services_share_one_environment_of_real_settings(compose):
    assert "x-vlmq-env" in compose
    shared_env = compose["x-vlmq-env"]
    assert shared_env["VLMQ_BROKER_URL"] == "redis://redis:6379/0"
    for key in shared_env:
        assert key.startswith("VLMQ_") and key[5:].lower() in Settings.model_fields, key
    Settings(**{key[5:].lower(): value for key, value in shared_env.items()})  # values validate too
    for name in VLMQ_SERVICES:
        service = compose["services"][name]
        assert service["environment"] == shared_env
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"


def test_redis_persists_never_evicts_and_has_a_healthcheck(compose):
    redis = compose["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert redis["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]


def test_dockerfile_installs_the_package_and_enters_through_vlmq():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    assert re.search(r"^RUN pip install \.$", text, re.M)
    entrypoint = re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1)
    assert json.loads(entrypoint) == ["vlmq"]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["vlmq"] == "vlmq.cli:main"
    for package in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:  # "shared*" → shared
        name = package.rstrip("*")
        assert re.search(rf"^COPY {name} \./{name}$", text, re.M), f"the image does not copy the {name} package"
