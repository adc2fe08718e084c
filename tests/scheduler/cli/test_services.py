"""``mriq worker|flower|api``: what they exec or serve, and what they refuse."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from scheduler.cli import services
from tests.scheduler.cli.runner import mriq


def test_worker_and_flower_exec(
    env: dict[str, str], sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[list[str], dict[str, str]]] = []

    def fake_exec(path: str, argv: list[str], environ: dict[str, str]) -> None:
        calls.append((list(argv), dict(environ)))

    monkeypatch.setattr(services, "replace_process", fake_exec)
    result = mriq(env, "worker", "--queues", "gpu", "--concurrency", "2")
    assert result.exit_code == 0, result.output
    argv = calls[-1][0]
    assert argv[1:3] == ["-m", "worker"]
    assert argv[3:] == ["--queues", "gpu", "--concurrency", "2", "--pool", "threads"]
    assert mriq(env, "worker", "--pool", "solo", "--concurrency", "2").exit_code == 2

    result = mriq({**env, "MRIQ_FLOWER_BASIC_AUTH": "admin:s3cret"}, "flower", "--port", "5600")
    assert result.exit_code == 0, result.output
    argv, environ = calls[-1]
    assert argv[1:] == ["-m", "celery", "-A", "worker.app", "flower", "--port=5600",
                        "--address=127.0.0.1"]
    assert environ["FLOWER_BASIC_AUTH"] == "admin:s3cret"
    assert "FLOWER_UNAUTHENTICATED_API" not in environ
    assert "s3cret" not in " ".join(argv)  # credentials never on the command line

    result = mriq({**env, "FLOWER_UNAUTHENTICATED_API": ""}, "flower")
    assert result.exit_code == 0
    assert calls[-1][1]["FLOWER_UNAUTHENTICATED_API"] == "true"
    assert "FLOWER_BASIC_AUTH" not in calls[-1][1] or not calls[-1][1]["FLOWER_BASIC_AUTH"]
    assert "without authentication" in result.stderr


# ----------------------------------------------------------------------------- api


@pytest.mark.parametrize(
    ("args", "extra_env"),
    [
        (["--host", "0.0.0.0"], {}),
        (["--host", "::"], {}),
        (["--host", "192.0.2.10"], {}),
        (["--host", "api.example.org"], {}),
        ([], {"MRIQ_API_HOST": "0.0.0.0"}),
    ],
)
def test_api_refuses_non_loopback_without_token(
    env: dict[str, str], sessions: sessionmaker[Session], args: list[str],
    extra_env: dict[str, str],
) -> None:
    result = mriq({**env, **extra_env}, "api", *args)
    assert result.exit_code == 2, result.output
    assert "without a token" in result.stderr and "--insecure" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.output


def test_is_loopback() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert services.is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.1", "example.org", "127.0.0.1.nip.io", ""):
        assert not services.is_loopback(host), host


@pytest.mark.slow
def test_api_serves_non_loopback_with_token_or_insecure(
    env: dict[str, str], sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """The refusal is only for the tokenless case: with a token, or with --insecure (and
    a warning), ``mriq api --host 0.0.0.0`` starts and serves."""
    import httpx

    from tests.scheduler.apiproc import running_api

    with running_api({**env, "MRIQ_API_TOKEN": "tok-cli"}, tmp_path, "--host", "0.0.0.0") as api:
        assert httpx.get(api.url + "/jobs", timeout=10).status_code == 401
        ok = httpx.get(api.url + "/jobs", headers={"Authorization": "Bearer tok-cli"}, timeout=10)
        assert ok.status_code == 200
    with running_api(env, tmp_path, "--host", "0.0.0.0", "--insecure") as api:
        assert httpx.get(api.url + "/jobs", timeout=10).status_code == 200
        assert "without a token (--insecure)" in api.log()
