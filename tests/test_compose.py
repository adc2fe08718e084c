"""docker-compose.yml and the Dockerfile: parsed and checked statically (no Docker needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SERVICES = ("redis", "postgres", "migrate", "api", "worker-gpu", "worker-cpu", "beat", "flower")
MRIQ_SERVICES = ("migrate", "api", "worker-gpu", "worker-cpu", "beat", "flower")
LONG_RUNNING = ("redis", "postgres", "api", "worker-gpu", "worker-cpu", "beat", "flower")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((REPO / "docker-compose.yml").read_text("utf-8"))
    assert isinstance(data, dict)
    return data


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services = compose["services"]
    assert isinstance(services, dict)
    return services


def _cmd(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return command if isinstance(command, list) else str(command).split()


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_all_services_present(compose: dict[str, Any]) -> None:
    assert set(SERVICES) <= set(_services(compose))


def test_commands(compose: dict[str, Any]) -> None:
    s = _services(compose)
    assert _cmd(s["migrate"]) == ["mriq", "db", "upgrade"]
    assert _cmd(s["api"])[:2] == ["mriq", "api"] and "0.0.0.0" in _cmd(s["api"])
    gpu = _cmd(s["worker-gpu"])
    assert gpu[:2] == ["mriq", "worker"]
    assert gpu[gpu.index("--queues") + 1] == "gpu"
    assert gpu[gpu.index("--concurrency") + 1] == "1"
    cpu = _cmd(s["worker-cpu"])
    assert cpu[:2] == ["mriq", "worker"] and cpu[cpu.index("--queues") + 1] == "cpu"
    assert _cmd(s["beat"])[:4] == ["celery", "-A", "worker.app", "beat"]
    assert _cmd(s["flower"])[:2] == ["mriq", "flower"]


def test_migrate_runs_once_and_gates_the_rest(compose: dict[str, Any]) -> None:
    s = _services(compose)
    assert str(s["migrate"].get("restart", "no")) == "no"
    assert s["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker-gpu", "worker-cpu", "beat", "flower"):
        deps = s[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["postgres"]["condition"] == "service_healthy", name
        assert deps["redis"]["condition"] == "service_healthy", name


def test_environment(compose: dict[str, Any]) -> None:
    s = _services(compose)
    for name in MRIQ_SERVICES:
        env = _env(s[name])
        assert env["MRIQ_DATABASE_URL"].startswith("postgresql+psycopg://"), name
        assert "@postgres:5432/" in env["MRIQ_DATABASE_URL"], name
        assert env["MRIQ_BROKER_URL"] == "redis://redis:6379/0", name
        assert env["MRIQ_DATA_DIR"] == "/var/lib/mriq", name
        assert "/data" in env["MRIQ_DATA_ROOTS"].split(":"), name
    api_env = _env(s["api"])
    # The token reaches the API as a secret file sourced from the MRIQ_API_TOKEN variable.
    assert api_env["MRIQ_API_TOKEN_FILE"] == "/run/secrets/mriq_api_token"
    assert "mriq_api_token" in s["api"]["secrets"]
    assert compose["secrets"]["mriq_api_token"]["environment"] == "MRIQ_API_TOKEN"
    assert "MRIQ_FLOWER_BASIC_AUTH" in _env(s["flower"])
    assert "FLOWER_UNAUTHENTICATED_API" not in _env(s["flower"])


def test_named_volumes(compose: dict[str, Any]) -> None:
    s = _services(compose)
    declared = set(compose["volumes"])

    def named(service: dict[str, Any]) -> dict[str, str]:
        out = {}
        for entry in service.get("volumes", []):
            source, target = str(entry).split(":")[:2]
            out[target] = source
        return out

    pg = named(s["postgres"])
    assert pg["/var/lib/postgresql/data"] in declared
    for name in ("api", "worker-gpu", "worker-cpu"):
        mounts = named(s[name])
        assert mounts["/data"] in declared, name  # input images
        assert mounts["/var/lib/mriq"] in declared, name  # models, job outputs, plots
    assert len({pg["/var/lib/postgresql/data"], named(s["api"])["/data"],
                named(s["api"])["/var/lib/mriq"]}) == 3


def test_healthchecks(compose: dict[str, Any]) -> None:
    s = _services(compose)
    for name in LONG_RUNNING:
        check = s[name].get("healthcheck")
        assert check and check.get("test"), name
    assert "redis-cli" in " ".join(s["redis"]["healthcheck"]["test"])
    assert "pg_isready" in " ".join(s["postgres"]["healthcheck"]["test"])
    assert "/health" in " ".join(s["api"]["healthcheck"]["test"])
    assert "inspect ping" in " ".join(s["worker-gpu"]["healthcheck"]["test"])
    assert "/healthcheck" in " ".join(s["flower"]["healthcheck"]["test"])


def test_gpu_reservation(compose: dict[str, Any]) -> None:
    s = _services(compose)
    devices = s["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    for name in ("api", "worker-cpu", "beat", "flower", "migrate"):
        assert "deploy" not in s[name], name


def test_dockerfile_installs_the_package() -> None:
    dockerfile = (REPO / "Dockerfile").read_text("utf-8")
    assert dockerfile.startswith("#") or "FROM" in dockerfile
    assert "FROM python:3.11" in dockerfile
    assert "pip install" in dockerfile and "pyproject.toml" in dockerfile
    for package in ("core", "scheduler", "worker"):
        assert f"COPY {package} {package}" in dockerfile
    assert "USER " in dockerfile  # not root
    ignore = (REPO / ".dockerignore").read_text("utf-8").split()
    for entry in (".git", ".venv", "mriq-data", ".env"):
        assert entry in ignore
