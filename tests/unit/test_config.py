"""Settings from the environment."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from ml_platform.config import Settings, load_settings
from ml_platform.errors import SettingsError

pytestmark = pytest.mark.unit


def test_embedded_defaults_live_under_the_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ML_PLATFORM_HOME", "/tmp/mlp-home")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    settings = load_settings()
    assert settings.database_url == "sqlite:////tmp/mlp-home/ml_platform.db"
    assert settings.artifacts_dir == Path("/tmp/mlp-home/artifacts")
    assert settings.heartbeat_seconds == settings.lease_seconds / 3


def test_database_url_from_the_environment_gets_a_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:p@db:5432/ml")
    assert load_settings().database_url == "postgresql+psycopg://u:p@db:5432/ml"
    monkeypatch.setenv("DATABASE_URL", "sqlite:////data/x.db")
    assert load_settings().database_url == "sqlite:////data/x.db"


def test_bad_numbers_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLP_LEASE_SECONDS", "-1")
    with pytest.raises(ValueError, match="lease_seconds"):
        load_settings()


def test_home_expands_the_user() -> None:
    assert "~" not in str(Settings(home=Path("~/x")).home)


def test_a_keyword_wins_over_the_environment_which_wins_over_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLP_LEASE_SECONDS", "12.5")
    monkeypatch.setenv("MLP_API_DOCS", "yes")
    monkeypatch.setenv("MLP_ENVIRONMENT", "staging")
    monkeypatch.setenv("ENVIRONMENT", " Production ")  # the first name listed wins
    settings = Settings(poll_seconds=0.25)
    assert settings.lease_seconds == 12.5 and settings.poll_seconds == 0.25
    assert settings.api_docs is True and settings.environment == "production"
    assert Settings(lease_seconds=3).lease_seconds == 3.0
    assert Settings().max_lost == 3  # nothing set: the default
    monkeypatch.setenv("MLP_API_DOCS", "off")
    assert Settings().api_docs is False


def test_an_empty_database_url_means_the_embedded_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DATABASE_URL", "")
    monkeypatch.setenv("ML_PLATFORM_HOME", str(tmp_path))
    settings = load_settings()
    assert settings.database_url_override is None
    assert settings.database_url == f"sqlite:///{tmp_path}/ml_platform.db"


def test_every_wrong_setting_is_named_with_its_variable_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLP_MAX_LOST", "2.5")
    monkeypatch.setenv("MLP_POLL_SECONDS", "inf")
    monkeypatch.setenv("MLP_API_DOCS", "maybe")
    monkeypatch.setenv("MLP_MAX_DELIVERIES", "0")
    with pytest.raises(SettingsError) as raised:
        load_settings()
    message = str(raised.value)
    assert message.startswith("invalid settings in the environment: ")
    for expected in (
        "max_lost (MLP_MAX_LOST='2.5'): must be a whole number",
        "poll_seconds (MLP_POLL_SECONDS='inf'): must be a finite number",
        "api_docs (MLP_API_DOCS='maybe'): must be true or false",
        "max_deliveries (MLP_MAX_DELIVERIES='0'): must be at least 1",
    ):
        assert expected in message, message
    with pytest.raises(SettingsError, match="lease_seconds: must be greater than 0"):
        Settings(lease_seconds=0)


def test_a_database_url_of_another_kind_is_refused_without_showing_its_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = "mysql://admin:hunter2@db.example/platform"  # pragma: allowlist secret
    monkeypatch.setenv("DATABASE_URL", url)
    with pytest.raises(SettingsError, match="a 'mysql' URL, but the platform keeps") as raised:
        load_settings()
    assert "hunter2" not in str(raised.value)
    for good in ("postgres://u@h/db", "postgresql+psycopg://u@h/db", "sqlite:////tmp/x.db"):
        monkeypatch.setenv("DATABASE_URL", good)
        assert load_settings().database_url.startswith(("postgresql+psycopg://", "sqlite:"))


def test_a_setting_that_does_not_exist_is_refused_and_a_copy_keeps_every_value() -> None:
    with pytest.raises(TypeError, match="lease_second"):
        Settings(lease_second=3)
    settings = Settings(home=Path("/srv/mlp"), secret_key="s3cret", max_lost=1)
    copy = replace(settings, max_lost=0)
    assert (copy.home, copy.secret_key, copy.max_lost) == (Path("/srv/mlp"), "s3cret", 0)
    assert "s3cret" not in repr(settings)
