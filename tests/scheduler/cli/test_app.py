"""The root app: help texts, settings and database errors, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from scheduler.cli import app
from tests.scheduler.cli.runner import mriq, runner


def test_help_texts() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("classify", "train", "evaluate", "jobs", "results", "models", "worker",
                    "api", "flower", "db", "demo"):
        assert command in result.stdout
    expectations = {
        ("classify",): ["--model", "--top-k", "--wait", "--json", "@list.txt"],
        ("train",): ["--data", "--arch", "--epochs", "--image-size", "--batch-size", "--lr",
                     "--finetune", "--weights", "--labels", "--seed", "--device",
                     "--warm-start", "--wait"],
        ("evaluate",): ["--model", "--data", "--wait"],
        ("jobs",): ["list", "show", "cancel", "wait"],
        ("results",): ["--format", "--out"],
        ("models",): ["list", "show", "promote", "rollback"],
        ("worker",): ["--queues", "--concurrency"],
        ("api",): ["--host", "--port"],
        ("flower",): ["--port"],
        ("db",): ["upgrade"],
        ("demo",): ["--epochs", "--json"],
    }
    for args, words in expectations.items():
        result = runner.invoke(app, [*args, "--help"])
        assert result.exit_code == 0, result.output
        for word in words:
            assert word in result.stdout, (args, word)


def test_unmigrated_database_stops_with_message(env: dict[str, str]) -> None:
    for args in (["jobs", "list"], ["models", "list", "--json"], ["classify", "x.png"],
                 ["worker"], ["api"]):
        result = mriq(env, *args)
        assert result.exit_code == 1, (args, result.output)
        assert "mriq db upgrade" in result.stderr
        assert "Traceback" not in result.output
        assert result.stdout == ""


def test_unmigrated_database_via_subprocess(env: dict[str, str], tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "scheduler", "jobs", "list"],
        env={**_base_env(), **env}, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert "not migrated" in proc.stderr and "mriq db upgrade" in proc.stderr
    assert "Traceback" not in proc.stderr


def _base_env() -> dict[str, str]:

    return {k: v for k, v in os.environ.items() if not k.startswith("MRIQ_")}


def test_db_upgrade_then_empty_lists(env: dict[str, str]) -> None:
    result = mriq(env, "db", "upgrade")
    assert result.exit_code == 0, result.output
    assert "up to date" in result.stderr
    for args in (["jobs", "list", "--json"], ["models", "list", "--json"]):
        result = mriq(env, *args)
        assert result.exit_code == 0
        assert json.loads(result.stdout) == []


def test_invalid_settings_exit_2(env: dict[str, str]) -> None:
    result = mriq({**env, "MRIQ_CHUNK_SIZE": "0"}, "jobs", "list")
    assert result.exit_code == 2
    assert "invalid MRIQ_* settings" in result.stderr
