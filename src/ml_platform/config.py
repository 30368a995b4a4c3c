"""Settings from the environment; the embedded defaults need no service at all."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ml_platform.errors import SettingsError

ENVIRONMENTS = ("development", "staging", "production")


def _default_home() -> Path:
    return Path.home() / ".ml_platform"


class Settings(BaseSettings):
    """Where the platform keeps its state and how its workers behave."""

    model_config = SettingsConfigDict(env_prefix="MLP_", extra="ignore", populate_by_name=True)

    environment: str = Field(
        default="development", validation_alias=AliasChoices("ENVIRONMENT", "MLP_ENVIRONMENT")
    )
    #: Serve /docs, /redoc and /openapi.json outside development too.
    api_docs: bool = False
    #: Addresses (or networks) of the proxies whose X-Forwarded-For/-Proto are believed
    #: (uvicorn's own variable); a client's address decides its login limit.
    forwarded_allow_ips: str = Field(
        default="127.0.0.1",
        validation_alias=AliasChoices("FORWARDED_ALLOW_IPS", "MLP_FORWARDED_ALLOW_IPS"),
    )
    home: Path = Field(
        default_factory=_default_home,
        validation_alias=AliasChoices("ML_PLATFORM_HOME", "MLP_HOME"),
    )
    database_url_override: str | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "MLP_DATABASE_URL")
    )
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("REDIS_URL", "MLP_REDIS_URL")
    )
    #: Prefix of every Redis key this platform writes (tests use one of their own).
    redis_prefix: str = "mlp"
    #: Deliveries of one dispatch message before it goes to the dead-letter stream.
    max_deliveries: int = Field(default=5, ge=1)
    artifacts_dir_override: Path | None = Field(
        default=None, validation_alias=AliasChoices("MLP_ARTIFACTS_DIR")
    )
    secret_key: str | None = Field(
        default=None, validation_alias=AliasChoices("SECRET_KEY", "MLP_SECRET_KEY"), repr=False
    )
    access_token_minutes: float = Field(default=15.0, gt=0)
    refresh_token_days: float = Field(default=14.0, gt=0)
    #: Failed logins allowed per user and per client address within the window.
    login_attempts: int = Field(default=10, ge=1)
    login_window_seconds: int = Field(default=300, ge=1)
    #: Seconds a running attempt's lease lasts without a heartbeat.
    lease_seconds: float = Field(default=30.0, gt=0)
    #: Seconds between two passes of a worker's loop when nothing wakes it earlier.
    poll_seconds: float = Field(default=0.5, gt=0)
    #: Times one task run may lose an attempt to the infrastructure (its worker died, its
    #: lease expired, its dispatch was dead-lettered) before it fails. Lost attempts never
    #: consume the task's own ``retries``.
    max_lost: int = Field(default=3, ge=0)
    #: Delay before the first retry of a lost attempt; doubled per further loss (up to 30 s).
    lost_backoff_seconds: float = Field(default=1.0, ge=0)
    #: Seconds a worker (or an embedded server) stopped with SIGTERM lets its running attempts
    #: finish before it hands the rest back; a second SIGTERM hands back at once.
    drain_seconds: float = Field(default=30.0, ge=0)
    #: Seconds between SIGTERM and SIGKILL when an attempt's processes are stopped (timeout,
    #: cancel, lost lease, hand-back).
    kill_grace_seconds: float = Field(default=5.0, ge=0)
    #: Module prefixes a server may load workflows from (comma-separated), besides the
    #: packages and modules in its working directory (the project's own code). A reference
    #: outside them is refused before anything is imported.
    workflow_modules: str = "ml_platform.examples"
    #: Largest run params the API accepts, as JSON.
    max_params_bytes: int = Field(default=1024 * 1024, ge=1)
    #: Longest a server may take to import and trace a submitted workflow (in a subprocess).
    trace_timeout_seconds: float = Field(default=60.0, gt=0)
    #: Grace after a task's timeout before the reaper fails an attempt that a worker did not stop.
    timeout_grace_seconds: float = Field(default=10.0, ge=0)
    #: Attempts one task process runs before it is replaced (0: no limit; 1: a fresh
    #: process per attempt, the strictest isolation, at the price of a Python start-up each).
    max_tasks_per_process: int = Field(default=0, ge=0)
    #: Seconds between two shipments of running attempts' output to the database (what
    #: `mlp logs -f`, the API and the UI show while a task runs).
    log_ship_seconds: float = Field(default=1.0, gt=0)
    #: Largest task result kept inline in the database; larger ones become artifacts.
    inline_result_bytes: int = Field(default=64 * 1024, ge=0)
    #: Most elements one mapped task (`task.map(items)`) may expand into; a longer list fails
    #: the mapped task with a message that says so.
    max_map_size: int = Field(default=10_000, ge=0)

    @field_validator("environment", mode="after")
    @classmethod
    def _known_environment(cls, value: str) -> str:
        name = value.strip().lower()
        if name not in ENVIRONMENTS:
            raise ValueError(f"ENVIRONMENT must be one of {', '.join(ENVIRONMENTS)}, not {value!r}")
        return name

    @field_validator("home", mode="after")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    @cached_property
    def database_url(self) -> str:
        if self.database_url_override:
            url = self.database_url_override
            # The spec's URLs say postgresql://; SQLAlchemy needs the driver named.
            if url.startswith("postgresql://") or url.startswith("postgres://"):
                url = "postgresql+psycopg://" + url.split("://", 1)[1]
            return url
        return f"sqlite:///{self.home / 'ml_platform.db'}"

    @cached_property
    def artifacts_dir(self) -> Path:
        return self.artifacts_dir_override or self.home / "artifacts"

    @property
    def workflow_module_prefixes(self) -> list[str]:
        return [part.strip() for part in self.workflow_modules.split(",") if part.strip()]

    @property
    def heartbeat_seconds(self) -> float:
        """Heartbeats come three times per lease, so one late beat loses nothing."""
        return self.lease_seconds / 3


def load_settings() -> Settings:
    """Read the settings from the environment as it is now (SettingsError if one is wrong)."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors()
        )
        raise SettingsError(f"invalid settings in the environment: {problems}") from None
