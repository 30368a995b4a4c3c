"""gitleaks and trufflehog, installed the way their projects publish them: a released
binary archive, checked against a pinned SHA-256 before anything in it is run.

``python -m delivery.scanners install DIR [TOOL ...]`` puts the binaries in DIR. The secrets
session does this by itself in GitHub Actions, where both tools are required; elsewhere a tool
that is not on PATH is recorded NOT CHECKED, like pip-audit without its database.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pin:
    tool: str
    version: str
    url: str
    sha256: str


#: Linux x86-64 release archives (the GitHub runners'). To upgrade: take the new release's
#: checksums file, verify its signature, and change version, URL and digest together.
PINS = {
    "gitleaks": Pin(
        "gitleaks",
        "8.24.0",
        "https://github.com/gitleaks/gitleaks/releases/download/v8.24.0/"
        "gitleaks_8.24.0_linux_x64.tar.gz",
        "cb49b7de5ee986510fe8666ca0273a6cc15eb82571f2f14832c9e8920751f3a4",  # noqa: E501 # pragma: allowlist secret
    ),
    "trufflehog": Pin(
        "trufflehog",
        "3.93.8",
        "https://github.com/trufflesecurity/trufflehog/releases/download/v3.93.8/"
        "trufflehog_3.93.8_linux_amd64.tar.gz",
        "b965dd2a4106dc3c194dfcaa93931fe0a93571261e3e1f46f2d1728b6612e019",  # noqa: E501 # pragma: allowlist secret
    ),
}


class InstallError(RuntimeError):
    """The tool could not be installed; nothing of it was kept."""


def _download(url: str) -> bytes:
    if not url.startswith("https://"):
        raise InstallError(f"{url} is not an https URL")
    with urllib.request.urlopen(url, timeout=120) as response:  # nosec B310 - https only
        data: bytes = response.read()
        return data


def install(pin: Pin, into: Path, fetch: Callable[[str], bytes] = _download) -> Path:
    """Download ``pin``'s archive, check its digest, extract its binary into ``into``."""
    try:
        archive = fetch(pin.url)
    except (OSError, urllib.error.URLError) as exc:
        raise InstallError(f"{pin.tool} {pin.version}: download failed: {exc}") from None
    digest = hashlib.sha256(archive).hexdigest()
    if digest != pin.sha256:
        raise InstallError(
            f"{pin.tool} {pin.version}: the archive's SHA-256 is {digest}, not the pinned "
            f"{pin.sha256}; refusing to run it"
        )
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        member = next(
            (m for m in tar.getmembers() if m.isfile() and Path(m.name).name == pin.tool), None
        )
        if member is None:
            raise InstallError(f"{pin.tool} {pin.version}: no {pin.tool} binary in the archive")
        data = tar.extractfile(member)
        assert data is not None  # a regular file member always has content  # nosec B101
        into.mkdir(parents=True, exist_ok=True)
        target = into / pin.tool
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(data.read())
        tmp.chmod(0o755)
        os.replace(tmp, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m delivery.scanners")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("install", help="install pinned scanner releases into a folder")
    cmd.add_argument("into", type=Path)
    cmd.add_argument("tools", nargs="*", default=sorted(PINS))
    args = parser.parse_args(argv)
    failed = 0
    for name in args.tools:
        try:
            path = install(PINS[name], args.into)
            print(f"{name} {PINS[name].version}: installed at {path} (SHA-256 verified)")
        except InstallError as exc:
            print(f"{name}: NOT INSTALLED — {exc}")
            failed = 1
    return failed


if __name__ == "__main__":
    sys.exit(main())
