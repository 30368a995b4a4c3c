"""The scanners' installer: a pinned digest or nothing."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from delivery.scanners import PINS, InstallError, Pin, install

pytestmark = pytest.mark.unit


def _archive(name: str, content: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
        readme = tarfile.TarInfo("README.md")
        readme.size = 2
        tar.addfile(readme, io.BytesIO(b"hi"))
    return buffer.getvalue()


def test_only_an_archive_with_the_pinned_digest_is_installed(tmp_path: Path) -> None:
    archive = _archive("gitleaks", b"#!/bin/sh\necho gitleaks\n")
    pin = Pin(
        "gitleaks", "8.24.0", "https://example.invalid/g.tgz", hashlib.sha256(archive).hexdigest()
    )
    installed = install(pin, tmp_path / "bin", fetch=lambda url: archive)
    assert installed.read_bytes() == b"#!/bin/sh\necho gitleaks\n"
    assert installed.stat().st_mode & 0o111
    tampered = _archive("gitleaks", b"#!/bin/sh\necho pwned\n")
    with pytest.raises(InstallError, match="refusing to run it"):
        install(pin, tmp_path / "other", fetch=lambda url: tampered)
    assert not (tmp_path / "other").exists()


def test_every_pin_is_a_release_url_with_a_full_digest() -> None:
    for name, pin in PINS.items():
        assert pin.tool == name and f"/v{pin.version}/" in pin.url
        assert pin.url.startswith("https://github.com/") and pin.url.endswith(".tar.gz")
        assert len(pin.sha256) == 64 and int(pin.sha256, 16) >= 0
