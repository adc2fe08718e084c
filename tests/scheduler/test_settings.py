"""Settings: defaults, MRIQ_* overrides, token file, secrets kept out of repr."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from scheduler.settings import Settings, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Tests start from no MRIQ_* variables and a cwd without a .env file.
    for name in list(os.environ):
        if name.startswith("MRIQ_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults(tmp_path: Path) -> None:
    s = Settings()
    data_dir = (tmp_path / "mriq-data").resolve()
    assert s.data_dir == data_dir
    assert s.resolved_database_url == f"sqlite:///{data_dir / 'mriq.db'}"
    assert s.database_url is None and s.broker_url is None and s.result_backend is None
    assert s.is_embedded_broker
    assert s.broker_dir == data_dir / "broker"
    assert s.jobs_dir == data_dir / "jobs" and s.models_dir == data_dir / "models"
    assert s.data_roots == (data_dir, tmp_path.resolve())
    assert s.api_token is None and s.flower_basic_auth is None
    assert (s.chunk_size, s.max_paths_per_job, s.task_max_retries) == (512, 100_000, 3)
    assert s.visibility_timeout == 43_200
    assert s.visibility_timeout > max(s.train_time_limit, s.chunk_time_limit)
    assert s.retrain_cron is None and s.retrain_data_dir is None
    assert s.default_device == "auto"
    assert (s.api_host, s.api_port) == ("127.0.0.1", 8000)


def test_env_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("MRIQ_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("MRIQ_DATABASE_URL", "postgresql://u:pw@db/mriq")
    monkeypatch.setenv("MRIQ_BROKER_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("MRIQ_DATA_ROOTS", f"{a}{os.pathsep}{b}{os.pathsep}")
    monkeypatch.setenv("MRIQ_CHUNK_SIZE", "64")
    monkeypatch.setenv("MRIQ_DEFAULT_DEVICE", "cpu")
    monkeypatch.setenv("MRIQ_RETRAIN_CRON", "0 3 * * 0")
    monkeypatch.setenv("MRIQ_RETRAIN_DATA_DIR", str(tmp_path / "train"))
    s = Settings()
    assert s.data_dir == (tmp_path / "d").resolve()
    assert s.resolved_database_url == "postgresql://u:pw@db/mriq"
    assert not s.is_embedded_broker
    assert s.data_roots == (a.resolve(), b.resolve())
    assert (s.chunk_size, s.default_device, s.retrain_cron) == (64, "cpu", "0 3 * * 0")


def test_load_settings_reads_dotenv_and_overrides_win(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text("MRIQ_CHUNK_SIZE=32\nMRIQ_API_PORT=9000\n")
    monkeypatch.setenv("MRIQ_API_PORT", "9100")  # the environment beats .env
    s = load_settings(chunk_size=16, database_url=None)  # None overrides are ignored
    assert (s.chunk_size, s.api_port, s.database_url) == (16, 9100, None)
    assert load_settings().chunk_size == 32
    assert Settings().chunk_size == 512  # plain Settings() never reads .env


def test_data_roots_from_list_override(tmp_path: Path) -> None:
    s = load_settings(data_roots=[str(tmp_path / "x"), tmp_path / "y"])
    assert s.data_roots == ((tmp_path / "x").resolve(), (tmp_path / "y").resolve())


def test_api_token_from_file_is_secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    monkeypatch.setenv("MRIQ_API_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("MRIQ_FLOWER_BASIC_AUTH", "admin:pa55word")
    monkeypatch.setenv("MRIQ_DATABASE_URL", "postgresql://mriq:dbpa55@db/mriq")
    s = Settings()
    assert isinstance(s.api_token, SecretStr)
    assert s.api_token.get_secret_value() == "s3cret-token"
    assert s.flower_basic_auth is not None
    assert s.flower_basic_auth.get_secret_value() == "admin:pa55word"
    for text in (repr(s), str(s), repr(s.model_dump())):
        assert "s3cret-token" not in text
        assert "pa55word" not in text
    # The URL stays a plain str (callers need it) but repr() hides its password.
    assert "dbpa55" not in repr(s) and "dbpa55" not in str(s)
    assert "postgresql://mriq:***@db/mriq" in repr(s)


def test_token_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="cannot read"):
        Settings(api_token_file=tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValidationError, match="is empty"):
        Settings(api_token_file=empty)
    with pytest.raises(ValidationError, match="not both"):
        Settings(api_token=SecretStr("x"), api_token_file=empty)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"default_device": "tpu"}, "default_device"),
        ({"retrain_cron": "every day"}, "5 fields"),
        ({"retrain_cron": "0 3 * * 0"}, "retrain_data_dir"),
        ({"visibility_timeout": 600}, "must exceed the longest task time limit"),
    ],
)
def test_invalid_values_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**overrides)  # type: ignore[arg-type]


def test_invalid_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MRIQ_CHUNK_SIZE", "lots")
    with pytest.raises(ValidationError, match="chunk_size"):
        Settings()


def test_no_environment_read_at_import() -> None:
    import importlib

    import scheduler.settings as module

    os.environ["MRIQ_CHUNK_SIZE"] = "not-a-number"
    try:
        importlib.reload(module)  # must not validate anything at import
    finally:
        del os.environ["MRIQ_CHUNK_SIZE"]


def test_every_setting_is_documented() -> None:
    rows = Settings.describe()
    assert {name for name, _, _ in rows} >= {"MRIQ_DATABASE_URL", "MRIQ_DATA_ROOTS"}
    assert all(description for _, _, description in rows)
