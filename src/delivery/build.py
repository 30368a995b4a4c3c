"""Build checks and metadata: what the dists contain, and the image's OCI labels."""

from __future__ import annotations

import re
import sys
import tarfile
import zipfile
from datetime import UTC, datetime
from pathlib import Path

from delivery.tags import current_ref

SOURCE = "https://github.com/ml-platform/ml-platform"
#: Only the product ships; the pipeline's library and the tests never do.
FORBIDDEN_IN_WHEEL = ("delivery/", "tests/")


class DistError(RuntimeError):
    """A built distribution is not what may be published."""


def check_dist(directory: Path) -> list[str]:
    """Check the wheel and sdist in ``directory``; return a line per checked file."""
    wheels = sorted(directory.glob("*.whl"))
    sdists = sorted(directory.glob("*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        found = ", ".join(p.name for p in sorted(directory.iterdir())) or "nothing"
        raise DistError(f"expected one wheel and one sdist in {directory}, found {found}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = wheel.namelist()
    leaked = [n for n in names if n.startswith(FORBIDDEN_IN_WHEEL)]
    if leaked:
        raise DistError(f"{wheels[0].name} must not contain {leaked[0]}")
    for required in ("ml_platform/__init__.py", "ml_platform/store/migrations/env.py"):
        if required not in names:
            raise DistError(f"{wheels[0].name} lacks {required}")
    migrations = [
        n for n in names if re.match(r"ml_platform/store/migrations/versions/\d+_.*\.py", n)
    ]
    with tarfile.open(sdists[0]) as sdist:
        members = sdist.getnames()
    return [
        f"{wheels[0].name}: {len(names)} files, {len(migrations)} migrations, no delivery or tests",
        f"{sdists[0].name}: {len(members)} files",
    ]


def labels(now: datetime | None = None) -> list[str]:
    """KEY=VALUE build arguments for the Dockerfile's OCI labels."""
    ref = current_ref()
    version = "0.0.0"
    pyproject = Path("pyproject.toml")
    if pyproject.exists():
        match = re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.M)
        version = match[1] if match else version
    if ref.git_tag:
        version = ref.git_tag.removeprefix("v")
    created = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return [f"VERSION={version}", f"REVISION={ref.sha}", f"CREATED={created}", f"SOURCE={SOURCE}"]


def main(argv: list[str]) -> int:
    if argv[:1] == ["check-dist"] and len(argv) == 2:
        try:
            for line in check_dist(Path(argv[1])):
                print(line)
        except DistError as exc:
            print(f"error: {exc}")
            return 1
        return 0
    if argv == ["labels"]:
        print("\n".join(labels()))
        return 0
    print("usage: python -m delivery.build check-dist DIR | labels")
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
