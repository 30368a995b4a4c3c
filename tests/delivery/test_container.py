"""The local base for `nox -s image_e2e` is slimmed as debian:bookworm-slim is."""

from __future__ import annotations

from pathlib import Path

from delivery.container import SLIM_DPKG_EXCLUDES, slim


def test_slim_drops_the_package_cache_docs_and_translations_but_keeps_copyrights(
    tmp_path: Path,
) -> None:
    root = tmp_path
    for path, text in {
        "var/cache/apt/archives/python3_3.11.deb": "x" * 100,
        "var/cache/apt/pkgcache.bin": "cache",
        "var/lib/apt/lists/deb.debian.org_Packages": "lists",
        "usr/share/doc/bash/copyright": "GPL",
        "usr/share/doc/bash/changelog.gz": "log",
        "usr/share/man/man1/bash.1.gz": "man",
        "usr/share/locale/de/LC_MESSAGES/bash.mo": "de",
        "usr/bin/bash": "binary",
        "etc/dpkg/dpkg.cfg.d/.keep": "",
        "etc/apt/apt.conf.d/.keep": "",
    }.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)

    slim(root)

    assert not list((root / "var/cache/apt").rglob("*.deb"))
    assert not (root / "var/cache/apt/pkgcache.bin").exists()
    assert (root / "var/lib/apt/lists/partial").is_dir()
    assert not (root / "var/lib/apt/lists/deb.debian.org_Packages").exists()
    assert (root / "usr/share/doc/bash/copyright").read_text() == "GPL"
    assert not (root / "usr/share/doc/bash/changelog.gz").exists()
    assert not (root / "usr/share/man").exists()
    assert not (root / "usr/share/locale").exists()
    assert (root / "usr/bin/bash").read_text() == "binary"
    # Packages installed later on this base leave them out too.
    assert (root / "etc/dpkg/dpkg.cfg.d/slim").read_text() == SLIM_DPKG_EXCLUDES
    assert "path-include /usr/share/doc/*/copyright" in SLIM_DPKG_EXCLUDES
