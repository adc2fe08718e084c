"""Runtime settings of the control plane and the workers, read from ``MRIQ_*`` variables.

Nothing here reads the environment at import time: entry points (CLI, API app factory, worker
main) call :func:`load_settings` once and pass the :class:`Settings` object down. Tests build
``Settings(...)`` directly.

Every field is documented in its ``Field(description=...)``; ``Settings.describe()`` lists them
(the README's settings table is generated from it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url

__all__ = ["ENV_PREFIX", "Settings", "load_settings"]

ENV_PREFIX = "MRIQ_"


def _mask(url: str | None) -> str | None:
    """A URL with its password hidden, for repr(); non-URLs are returned unchanged."""
    if url is None:
        return None
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


class Settings(BaseSettings):
    """mriq settings; each field ``foo`` is read from ``MRIQ_FOO`` (or a ``.env`` file)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        # .env is only read when load_settings() asks for it (entry points), never implicitly.
        env_file=None,
        extra="ignore",
        validate_default=True,
        # Validation errors would otherwise echo the raw inputs, the API token and the
        # Flower password included, into CLI output and logs.
        hide_input_in_errors=True,
    )

    # One declaration per setting, spelled out: ``duplicates`` pairs the Field(default=...,
    # ge=..., description=...) blocks by shape, but each is its own setting's single home
    # (name, type, bounds, help); a helper per bound kind would hide them, not share logic.

    data_dir: Path = Field(
        default=Path("./mriq-data"),
        description=(
            "Folder for the SQLite database, the embedded broker, job outputs and models. "
            "Made absolute at load time."
        ),
    )
    database_url: str | None = Field(
        default=None,
        description=(
            "SQLAlchemy URL of the job database, e.g. "
            "postgresql://user:pass@host/mriq (psycopg 3 is used). "
            "Default: sqlite:///<data_dir>/mriq.db."
        ),
    )
    broker_url: str | None = Field(
        default=None,
        description=(
            "Celery broker URL, e.g. redis://127.0.0.1:6379/0. Default (unset): the embedded "
            "filesystem broker under <data_dir>/broker (single machine, no server needed)."
        ),
    )
    result_backend: str | None = Field(
        default=None,
        description="Celery result backend URL. Unset: no result backend (results live in SQL).",
    )
    data_roots: Annotated[tuple[Path, ...], NoDecode] = Field(
        default=(),
        description=(
            "Folders that submitted input paths must lie inside (symlinks resolved), separated "
            f"by {os.pathsep!r}. Default: data_dir and the working directory at load time."
        ),
    )
    api_token: SecretStr | None = Field(
        default=None,
        description=(
            "Bearer token the HTTP API requires. Unset: no authentication (bind to localhost)."
        ),
    )
    api_token_file: Path | None = Field(
        default=None,
        description="File holding the API token (alternative to api_token, e.g. a secret mount).",
    )
    flower_basic_auth: SecretStr | None = Field(
        default=None,
        description="user:password for the Flower monitoring UI. Unset: Flower without auth.",
    )
    chunk_size: int = Field(
        # 512: a chunk's fixed cost (claim, a fresh decode pipeline filling, complete) is
        # ~0.2 s on a 2-core CPU, 7% of a 256-image chunk of EfficientNet-B0 but 3% of 512.
        default=512,
        ge=1,
        le=100_000,
        description="Inputs per classify task (chunk); also the unit of retry and progress.",
    )
    inference_streams: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description=(
            "Batches a CPU worker runs through the model at once, each on its share of the "
            "task's cores. Unset: one per 4 cores, at most 4 (2 cores: 1 stream x 2 "
            "threads; 16 cores: 4 x 4). 1 = one batch on all cores (least memory). Ignored "
            "on a GPU."
        ),
    )
    max_paths_per_job: int = Field(
        default=100_000,
        ge=1,
        description="Maximum number of inputs one classify job may have.",
    )
    expansion_time_limit: float = Field(
        default=60.0,
        gt=0,
        description=(
            "Seconds one submission may spend expanding its folders, globs and list files "
            "before it is refused (a pattern over a huge tree must not hold the API)."
        ),
    )
    retrain_cron: str | None = Field(
        default=None,
        description=(
            "Cron expression (5 fields, e.g. '0 3 * * 0') for scheduled retraining. "
            "Unset: no scheduled retraining."
        ),
    )
    retrain_data_dir: Path | None = Field(
        default=None,
        description="Dataset folder the scheduled retraining uses (required with retrain_cron).",
    )
    task_max_retries: int = Field(
        default=3,
        ge=0,
        description="Retries of a failed task (with backoff) before it is given up.",
    )
    db_outage_limit: float = Field(
        default=600.0,
        ge=0,
        description=(
            "Seconds a worker keeps retrying a database transaction (with backoff, up to 15 s "
            "apart) while the database is unreachable, e.g. restarting or failing over, "
            "before the task gives up; jobs pause meanwhile instead of failing."
        ),
    )
    train_time_limit: int = Field(
        default=36_000,
        ge=1,
        description="Hard time limit of a train task in seconds.",
    )
    evaluate_time_limit: int = Field(
        default=7_200,
        ge=1,
        description="Hard time limit of an evaluate task in seconds.",
    )
    chunk_time_limit: int = Field(
        default=1_800,
        ge=1,
        description=(
            "Hard time limit of one classify chunk task in seconds, on every pool (threads/solo: "
            "the chunk is abandoned, re-sent once, then failed; prefork: the child is killed)."
        ),
    )
    chunk_stall_timeout: float = Field(
        default=300.0,
        gt=0,
        description=(
            "Seconds a running classify chunk may go without recording a prediction before its "
            "worker abandons it (e.g. a read hung on a dead mount): re-sent once, then failed "
            "with the reason. Must exceed the time one batch of images takes."
        ),
    )
    visibility_timeout: int = Field(
        default=43_200,
        ge=1,
        description=(
            "Seconds the broker waits for an unacknowledged task before redelivering it; must "
            "exceed every task time limit, or long tasks would run twice."
        ),
    )
    default_device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="Device workers use unless a job says otherwise: auto, cpu or cuda.",
    )
    runtime: Literal["torch", "onnxruntime"] = Field(
        default="torch",
        description=(
            "CPU runtime of classify chunks: torch (eager, BatchNorm folded) or onnxruntime "
            "(the checkpoint exported to ONNX once, cached beside it). CUDA always runs "
            "torch. The default is torch: on this CPU ONNX Runtime did not beat eager "
            "PyTorch by the 1.2x issue 14 asks for (bench/README.md, runtime)."
        ),
    )
    api_host: str = Field(default="127.0.0.1", description="Interface the HTTP API binds to.")
    api_port: int = Field(default=8000, ge=1, le=65535, description="Port of the HTTP API.")
    api_db_pool_size: int = Field(
        default=10,
        ge=1,
        le=1000,
        description=(
            "Database connections the HTTP API keeps open; as many again are opened under a "
            "burst, so at most twice this many at once."
        ),
    )
    api_db_pool_timeout: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description=(
            "Seconds an API request waits for a free database connection before it is "
            "answered 503 with Retry-After (pool exhausted)."
        ),
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level of the API, CLI and workers."
    )

    # ------------------------------------------------------------------ validation

    @field_validator("data_dir", mode="after")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        # Absolute, so a worker started from another folder agrees on where files are.
        return value.expanduser().resolve()

    @field_validator("data_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: Any) -> Any:
        if value is None:
            return ()
        if isinstance(value, str | os.PathLike):
            text = os.fspath(value)
            return tuple(part for part in text.split(os.pathsep) if part.strip())
        return value

    @field_validator("data_roots", mode="after")
    @classmethod
    def _resolve_roots(cls, value: tuple[Path, ...]) -> tuple[Path, ...]:
        return tuple(root.expanduser().resolve() for root in value)

    @field_validator("retrain_cron", mode="after")
    @classmethod
    def _check_cron(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if len(value.split()) != 5:
            raise ValueError(
                f"retrain_cron must have 5 fields (minute hour day month weekday), got {value!r}"
            )
        return value.strip()

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        if not self.data_roots:
            self.data_roots = (self.data_dir, Path.cwd().resolve())
        if self.api_token_file is not None:
            if self.api_token is not None:
                raise ValueError("set either api_token or api_token_file, not both")
            path = self.api_token_file.expanduser()
            try:
                token = path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"api_token_file {path}: cannot read: {exc.strerror}") from exc
            if not token:
                raise ValueError(f"api_token_file {path}: file is empty")
            self.api_token = SecretStr(token)
        longest = max(self.train_time_limit, self.evaluate_time_limit, self.chunk_time_limit)
        if self.visibility_timeout <= longest:
            raise ValueError(
                f"visibility_timeout ({self.visibility_timeout}s) must exceed the longest task "
                f"time limit ({longest}s), or the broker redelivers tasks that are still running"
            )
        if self.retrain_cron is not None and self.retrain_data_dir is None:
            raise ValueError("retrain_cron needs retrain_data_dir (the dataset to retrain on)")
        return self

    # ------------------------------------------------------------------ derived values

    @property
    def resolved_database_url(self) -> str:
        """database_url, or the SQLite file under data_dir when unset."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'mriq.db'}"

    @property
    def is_embedded_broker(self) -> bool:
        """True when tasks go through the filesystem broker under :attr:`broker_dir`."""
        return self.broker_url is None or self.broker_url.startswith("filesystem://")

    @property
    def broker_dir(self) -> Path:
        """Folder of the embedded filesystem broker."""
        return self.data_dir / "broker"

    @property
    def jobs_dir(self) -> Path:
        """Per-job output folders live at ``jobs_dir / str(job_id)``."""
        return self.data_dir / "jobs"

    @property
    def models_dir(self) -> Path:
        """Registered model checkpoints."""
        return self.data_dir / "models"

    def __repr_args__(self) -> Any:
        # URLs may embed passwords; SecretStr fields already render as '**********'.
        for name, value in super().__repr_args__():
            if name in ("database_url", "broker_url", "result_backend"):
                yield name, _mask(value)
            else:
                yield name, value

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(environment variable, default, description) of every setting, for docs/--help."""
        rows = []
        for name, field in cls.model_fields.items():
            default = field.default
            shown = "" if default is None or default == () else str(default)
            rows.append((f"{ENV_PREFIX}{name.upper()}", shown, field.description or ""))
        return rows


def load_settings(**overrides: Any) -> Settings:
    """Settings from ``MRIQ_*`` variables and an optional ``./.env``; call at entry points only.

    ``overrides`` (e.g. CLI options) win over the environment; overrides whose value is None
    are ignored, so optional CLI flags can be passed straight through.
    """
    values = {key: value for key, value in overrides.items() if value is not None}
    values.setdefault("_env_file", ".env")
    return Settings(**values)
