"""What may be published: the dists' contents, and the image's labels."""

from __future__ import annotations

import tarfile
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from delivery.build import DistError, check_dist, labels, main

pytestmark = pytest.mark.unit


def _dists(directory: Path, wheel_files: list[str]) -> None:
    directory.mkdir()
    with zipfile.ZipFile(directory / "ml_platform-1.0.0-py3-none-any.whl", "w") as wheel:
        for name in wheel_files:
            wheel.writestr(name, "")
    source = directory / "pkg"
    source.mkdir()
    (source / "pyproject.toml").write_text("")
    with tarfile.open(directory / "ml_platform-1.0.0.tar.gz", "w:gz") as sdist:
        sdist.add(source / "pyproject.toml", arcname="ml_platform-1.0.0/pyproject.toml")
    (source / "pyproject.toml").unlink()
    source.rmdir()


GOOD = [
    "ml_platform/__init__.py",
    "ml_platform/store/migrations/env.py",
    "ml_platform/store/migrations/versions/0001_initial_schema.py",
]


def test_a_good_pair_of_dists(tmp_path: Path) -> None:
    _dists(tmp_path / "dist", GOOD)
    lines = check_dist(tmp_path / "dist")
    assert lines[0].endswith("3 files, 1 migrations, no delivery or tests")


@pytest.mark.parametrize(
    ("files", "problem"),
    [
        ([*GOOD, "delivery/tags.py"], "must not contain delivery/tags.py"),
        ([*GOOD, "tests/conftest.py"], "must not contain tests/conftest.py"),
        (GOOD[:1], "lacks ml_platform/store/migrations/env.py"),
    ],
)
def test_what_must_not_ship_or_must_ship(tmp_path: Path, files: list[str], problem: str) -> None:
    _dists(tmp_path / "dist", files)
    with pytest.raises(DistError, match=problem):
        check_dist(tmp_path / "dist")


def test_missing_dists_and_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistError, match="expected one wheel and one sdist"):
        check_dist(tmp_path / "empty")
    assert main(["check-dist", str(tmp_path / "empty")]) == 1
    assert main(["nonsense"]) == 2
    capsys.readouterr()


def test_labels_name_version_revision_and_time(monkeypatch: pytest.MonkeyPatch) -> None:
    sha = "0123456789abcdef0123456789abcdef01234567"  # pragma: allowlist secret
    monkeypatch.setenv("GITHUB_REF", "refs/tags/v2.3.4")
    monkeypatch.setenv("GITHUB_SHA", sha)
    args = labels(datetime(2026, 11, 26, 12, 0, tzinfo=UTC))
    assert args == [
        "VERSION=2.3.4",
        f"REVISION={sha}",
        "CREATED=2026-11-26T12:00:00Z",
        "SOURCE=https://github.com/ml-platform/ml-platform",
    ]
