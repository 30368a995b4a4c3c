"""Settings from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml_platform.config import Settings, load_settings

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
