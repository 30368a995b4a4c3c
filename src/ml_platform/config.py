"""Settings from the environment; the embedded defaults need no service at all.

Read with the standard library: every process of the platform reads them (each CLI command,
worker and server), and the worker's own code needs nothing else of pydantic. A keyword given
to ``Settings(...)`` wins over the environment; any setting not given is read from it, else
takes its default.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

from ml_platform.errors import SettingsError

ENVIRONMENTS = ("development", "staging", "production")
_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}


def _default_home() -> Path:
    return Path.home() / ".ml_platform"


def _setting(
    default: Any = MISSING,
    *,
    env: tuple[str, ...] = (),
    factory: Callable[[], Any] | None = None,
    at_least: float | None = None,
    above: float | None = None,
    repr: bool = True,  # noqa: A002 - dataclasses' own name for it
) -> Any:
    """A setting: read from ``env`` (else ``MLP_<NAME>``), bounded below if asked."""
    metadata = {"env": env, "at_least": at_least, "above": above}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata, repr=repr)
    return field(default=default, metadata=metadata, repr=repr)


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(f"must be true or false (1/0, yes/no, on/off), not {value!r}")


def _whole(value: object) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return int(value)
        except ValueError:
            pass
    raise ValueError(f"must be a whole number, not {value!r}")


def _number(value: object) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"must be a number, not {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise ValueError(f"must be a finite number, not {value!r}")
    return number


#: How each annotated type is read from a keyword or an environment string.
_KINDS: dict[str, Callable[[Any], Any]] = {
    "str": str,
    "bool": _boolean,
    "int": _whole,
    "float": _number,
    "Path": lambda value: Path(value).expanduser(),
}


#: The database URLs the platform can use, by scheme (``postgres://`` as Heroku and others
#: spell it; SQLAlchemy's own ``postgresql+psycopg://``).
DATABASE_SCHEMES = frozenset({"sqlite", "postgresql", "postgres", "postgresql+psycopg"})


@dataclass(init=False)
class Settings:
    """Where the platform keeps its state and how its workers behave."""

    environment: str = _setting("development", env=("ENVIRONMENT", "MLP_ENVIRONMENT"))
    #: Serve /docs, /redoc and /openapi.json outside development too.
    api_docs: bool = _setting(False)
    #: Addresses (or networks) of the proxies whose X-Forwarded-For/-Proto are believed
    #: (uvicorn's own variable); a client's address decides its login limit.
    forwarded_allow_ips: str = _setting(
        "127.0.0.1", env=("FORWARDED_ALLOW_IPS", "MLP_FORWARDED_ALLOW_IPS")
    )
    home: Path = _setting(factory=_default_home, env=("ML_PLATFORM_HOME", "MLP_HOME"))
    database_url_override: str | None = _setting(None, env=("DATABASE_URL", "MLP_DATABASE_URL"))
    redis_url: str | None = _setting(None, env=("REDIS_URL", "MLP_REDIS_URL"))
    #: Prefix of every Redis key this platform writes (tests use one of their own).
    redis_prefix: str = _setting("mlp")
    #: Deliveries of one dispatch message before it goes to the dead-letter stream.
    max_deliveries: int = _setting(5, at_least=1)
    artifacts_dir_override: Path | None = _setting(None, env=("MLP_ARTIFACTS_DIR",))
    secret_key: str | None = _setting(None, env=("SECRET_KEY", "MLP_SECRET_KEY"), repr=False)
    access_token_minutes: float = _setting(15.0, above=0)
    refresh_token_days: float = _setting(14.0, above=0)
    #: Failed logins allowed per user and per client address within the window.
    login_attempts: int = _setting(10, at_least=1)
    login_window_seconds: int = _setting(300, at_least=1)
    #: Seconds a running attempt's lease lasts without a heartbeat.
    lease_seconds: float = _setting(30.0, above=0)
    #: Seconds between two passes of a worker's loop when nothing wakes it earlier.
    poll_seconds: float = _setting(0.5, above=0)
    #: Times one task run may lose an attempt to the infrastructure (its worker died, its
    #: lease expired, its dispatch was dead-lettered) before it fails. Lost attempts never
    #: consume the task's own ``retries``.
    max_lost: int = _setting(3, at_least=0)
    #: Delay before the first retry of a lost attempt; doubled per further loss (up to 30 s).
    lost_backoff_seconds: float = _setting(1.0, at_least=0)
    #: Seconds a worker (or an embedded server) stopped with SIGTERM lets its running attempts
    #: finish before it hands the rest back; a second SIGTERM hands back at once.
    drain_seconds: float = _setting(30.0, at_least=0)
    #: Seconds between SIGTERM and SIGKILL when an attempt's processes are stopped (timeout,
    #: cancel, lost lease, hand-back).
    kill_grace_seconds: float = _setting(5.0, at_least=0)
    #: Module prefixes a server may load workflows from (comma-separated), besides the
    #: packages and modules in its working directory (the project's own code). A reference
    #: outside them is refused before anything is imported.
    workflow_modules: str = _setting("ml_platform.examples")
    #: Largest run params the API accepts, as JSON.
    max_params_bytes: int = _setting(1024 * 1024, at_least=1)
    #: Longest a server may take to import and trace a submitted workflow (in a subprocess).
    trace_timeout_seconds: float = _setting(60.0, above=0)
    #: Grace after a task's timeout before the reaper fails an attempt that a worker did not stop.
    timeout_grace_seconds: float = _setting(10.0, at_least=0)
    #: Attempts one task process runs before it is replaced (0: no limit; 1: a fresh
    #: process per attempt, the strictest isolation, at the price of a Python start-up each).
    max_tasks_per_process: int = _setting(0, at_least=0)
    #: Seconds between two shipments of running attempts' output to the database (what
    #: `mlp logs -f`, the API and the UI show while a task runs).
    log_ship_seconds: float = _setting(1.0, above=0)
    #: Largest task result kept inline in the database; larger ones become artifacts.
    inline_result_bytes: int = _setting(64 * 1024, at_least=0)
    #: Most elements one mapped task (`task.map(items)`) may expand into; a longer list fails
    #: the mapped task with a message that says so.
    max_map_size: int = _setting(10_000, at_least=0)

    def __init__(self, **given: Any) -> None:
        unknown = given.keys() - {setting.name for setting in fields(self)}
        if unknown:
            raise TypeError(f"Settings() got unknown settings: {', '.join(sorted(unknown))}")
        problems = []
        for setting in fields(self):
            try:
                setattr(self, setting.name, _read(setting, given))
            except ValueError as exc:
                problems.append(str(exc))
        scheme = (self.database_url_override or "sqlite:").split(":", 1)[0]
        if scheme not in DATABASE_SCHEMES:  # only the scheme: the URL may hold a password
            problems.append(
                f"database_url (DATABASE_URL): a {scheme!r} URL, but the platform keeps its"
                " state in PostgreSQL (postgresql://USER@HOST:PORT/DB) or SQLite"
                " (sqlite:///PATH)"
            )
        if problems:
            raise SettingsError(f"invalid settings in the environment: {'; '.join(problems)}")

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


def _read(setting: Any, given: dict[str, Any]) -> Any:
    """One setting's value: the keyword, else the first of its variables set, else the default."""
    names = setting.metadata["env"] or (f"MLP_{setting.name.upper()}",)
    optional = setting.type.endswith(" | None")
    if setting.name in given:
        value, origin = given[setting.name], setting.name
    else:
        found = [name for name in names if name in os.environ]
        if not found:
            if setting.default_factory is not MISSING:
                return setting.default_factory()
            return setting.default
        value = os.environ[found[0]]
        origin = f"{setting.name} ({found[0]}={value!r})"
        if optional and value == "":
            return None  # DATABASE_URL= means no database URL
    if value is None and optional:
        return None
    kind = setting.type.removesuffix(" | None")
    try:
        value = _KINDS[kind](value)
        if setting.name == "environment":
            value = _known_environment(value)
    except ValueError as exc:
        raise ValueError(f"{origin}: {exc}") from None
    at_least, above = setting.metadata["at_least"], setting.metadata["above"]
    if at_least is not None and value < at_least:
        raise ValueError(f"{origin}: must be at least {at_least:g}")
    if above is not None and value <= above:
        raise ValueError(f"{origin}: must be greater than {above:g}")
    return value


def _known_environment(value: str) -> str:
    name = value.strip().lower()
    if name not in ENVIRONMENTS:
        raise ValueError(f"ENVIRONMENT must be one of {', '.join(ENVIRONMENTS)}, not {value!r}")
    return name


def load_settings() -> Settings:
    """Read the settings from the environment as it is now (SettingsError if one is wrong)."""
    return Settings()
