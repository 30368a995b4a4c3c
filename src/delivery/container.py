"""Build and run the image without Docker or a registry: podman, buildah and debootstrap.

What `nox -s image_e2e` does (see docs/building-without-a-registry.md):
1. installs podman, buildah, debootstrap and runc from Debian if they are missing (root only);
2. bootstraps a minimal Debian bookworm root filesystem, slims it as debian:bookworm-slim is
   (no package cache, documentation or translations) and commits it as a local image;
3. adds Python on top (the stand-in for the pinned python:3.11-slim base);
4. builds the real Dockerfile on that base (`podman build --isolation chroot`);
5. runs the container as its non-root user with a read-only root filesystem, against this
   machine's PostgreSQL (a database of its own) and Redis (a key prefix of its own);
6. runs the smoke tests against it, and removes the container, the database and the keys.

`python -m delivery.container size [--json PATH]` does steps 1-4, says the image's size (the
base's and ours), writes it as JSON and removes the image: `nox -s bench -- image` records it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess  # nosec B404
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

# The tags change with the recipe: a base built by an older recipe is never reused.
MINBASE = "localhost/debian-slim:bookworm"
PYTHON_BASE = "localhost/ml-platform-base:bookworm-slim"
IMAGE = "localhost/ml-platform:e2e"
TOOLS = ("podman", "buildah", "debootstrap", "runc")
RUN_FLAGS = [
    "--runtime",
    "runc",  # crun fails here (cgroups in hybrid mode, setrlimit not permitted)
]
#: The container's own /tmp (a tmpfs inside it), not the host's temporary directory.
CONTAINER_TMP = "/tmp"  # nosec B108
# What debian:bookworm-slim (the base of python:3.11-slim) leaves out: documentation, manual
# pages and translations, now and in every package installed later (dpkg path excludes).
SLIM_DPKG_EXCLUDES = """path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
"""
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
# The machine's own trust store goes into the base: where TLS to the package registries passes
# through an inspecting proxy, its CA is there, and pip and uv inside the build need it too.
PYTHON_BASE_CONTAINERFILE = f"""FROM {MINBASE}
RUN apt-get update \\
    && apt-get install -y --no-install-recommends \\
        python3 python3-venv python3-pip ca-certificates \\
    && apt-get clean && rm -rf /var/lib/apt/lists/*
COPY host-ca.crt /usr/local/share/ca-certificates/host-ca.crt
RUN update-ca-certificates
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \\
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
"""


class ContainerError(RuntimeError):
    """A step of the container build or run failed; the message names it."""


def say(message: str) -> None:
    print(f"[image_e2e] {message}", flush=True)


def run(argv: Sequence[str], *, capture: bool = False) -> str:
    result = subprocess.run(  # nosec B603 - fixed tool names with arguments built here
        list(argv), capture_output=capture, text=True, check=False
    )
    if result.returncode != 0:
        detail = (result.stderr or "").strip().splitlines()[-1:] if capture else []
        raise ContainerError(f"{' '.join(argv[:3])} … failed ({result.returncode}) {detail}")
    return result.stdout if capture else ""


def ensure_tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise ContainerError(f"missing {', '.join(missing)}; install them (needs root)")
    say(f"installing {', '.join(TOOLS)} from Debian")
    run(["apt-get", "update", "-qq"])
    run(["apt-get", "install", "-y", "-qq", *TOOLS])


def image_exists(name: str) -> bool:
    return (
        subprocess.run(  # nosec B603 B607
            ["podman", "image", "exists", name], check=False
        ).returncode
        == 0
    )


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (the only network here besides registries)."""
    for path in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]:
        if not path.is_file() or path.name.endswith("disabled-by-farm"):
            continue
        text = path.read_text()
        match = re.search(r"^URIs:\s*(\S+/debian)\s*$", text, re.M) or re.search(
            r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)\s+bookworm", text, re.M
        )
        if match:
            return match[1]
    return "http://deb.debian.org/debian"


def slim(rootfs: Path) -> None:
    """Make a bootstrapped root filesystem as lean as debian:bookworm-slim.

    debootstrap keeps every package it downloaded (120 MB) and installs documentation,
    manual pages and translations; the slim images keep none of these.
    """
    (rootfs / "etc/dpkg/dpkg.cfg.d/slim").write_text(SLIM_DPKG_EXCLUDES)
    (rootfs / "etc/apt/apt.conf.d/slim-clean").write_text(
        'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin'
        ' || true"; };\n'
    )
    for cached in [
        *rootfs.glob("var/cache/apt/archives/*.deb"),
        *rootfs.glob("var/cache/apt/*.bin"),
    ]:
        cached.unlink()
    shutil.rmtree(rootfs / "var/lib/apt/lists", ignore_errors=True)
    (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    for folder in ("man", "groff", "info", "lintian", "linda", "locale"):
        shutil.rmtree(rootfs / "usr/share" / folder, ignore_errors=True)
    for doc in (rootfs / "usr/share/doc").glob("*"):
        if doc.is_dir() and not doc.is_symlink():
            for item in doc.iterdir():
                if item.name != "copyright":
                    (
                        shutil.rmtree(item)
                        if item.is_dir() and not item.is_symlink()
                        else item.unlink()
                    )


def ensure_bases() -> None:
    if not image_exists(MINBASE):
        rootfs = Path(tempfile.mkdtemp(prefix="mlp-rootfs-"))
        started = time.monotonic()
        say(f"debootstrap --variant=minbase bookworm from {debian_mirror()}")
        run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), debian_mirror()])
        slim(rootfs)
        container = run(["buildah", "from", "scratch"], capture=True).strip()
        mount = run(["buildah", "mount", container], capture=True).strip()
        run(["cp", "-a", f"{rootfs}/.", mount])
        run(["buildah", "umount", container])
        run(["buildah", "commit", "--quiet", container, MINBASE])
        run(["buildah", "rm", container])
        shutil.rmtree(rootfs, ignore_errors=True)
        say(f"base {MINBASE} ready in {time.monotonic() - started:.0f} s")
    if not image_exists(PYTHON_BASE):
        say(f"adding Python and this machine's CA certificates to the base: {PYTHON_BASE}")
        context = Path(tempfile.mkdtemp(prefix="mlp-base-"))
        bundle = Path(os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"))
        shutil.copyfile(bundle, context / "host-ca.crt")
        (context / "Containerfile").write_text(PYTHON_BASE_CONTAINERFILE)
        try:
            run(["podman", "build", "--isolation", "chroot", "-t", PYTHON_BASE, str(context)])
        finally:
            shutil.rmtree(context, ignore_errors=True)


@dataclass(frozen=True)
class Built:
    """What a build made: how long it took and how big the image is, and of what."""

    seconds: float
    image_bytes: int
    base_bytes: int
    #: The largest entries of the image's virtual environment (name, bytes), largest first.
    largest: list[tuple[str, int]]

    def summary(self) -> str:
        return (
            f"{self.image_bytes / 1e6:.0f} MB (the base {self.base_bytes / 1e6:.0f} MB "
            f"+ ours {(self.image_bytes - self.base_bytes) / 1e6:.0f} MB)"
        )


def image_bytes(name: str) -> int:
    return int(run(["podman", "image", "inspect", "--format", "{{.Size}}", name], capture=True))


def largest_packages(count: int = 8) -> list[tuple[str, int]]:
    """The biggest entries of the image's site-packages, measured inside the image."""
    listing = run(
        [
            "podman",
            *RUN_FLAGS,
            "run",
            "--rm",
            *LIMITS,
            "--entrypoint",
            "sh",
            IMAGE,
            "-c",
            "du -sk /opt/venv/lib/python3*/site-packages/* | sort -rn | head -n " + str(count),
        ],
        capture=True,
    )
    rows = [line.split("\t", 1) for line in listing.splitlines() if "\t" in line]
    return [(Path(path).name, int(kib) * 1024) for kib, path in rows]


def build(context: Path) -> Built:
    """Build the Dockerfile on the local base and measure the image."""
    started = time.monotonic()
    run(
        [
            "podman",
            "build",
            "--isolation",
            "chroot",
            "--build-arg",
            f"BASE_IMAGE={PYTHON_BASE}",
            "--build-arg",
            "VERSION=0.0.0-e2e",
            "-t",
            IMAGE,
            str(context),
        ]
    )
    seconds = time.monotonic() - started
    return Built(seconds, image_bytes(IMAGE), image_bytes(PYTHON_BASE), largest_packages())


def size(context: Path) -> Built:
    """Build the image, measure it and remove it: `python -m delivery.container size`."""
    ensure_tools()
    ensure_bases()
    try:
        return build(context)
    finally:
        subprocess.run(  # nosec B603 B607
            ["podman", "rmi", "-f", IMAGE], capture_output=True, check=False
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def database(base_url: str) -> Iterator[str]:
    """A database of this run's own on the machine's PostgreSQL, dropped afterwards."""
    import psycopg
    from psycopg import sql

    name = f"mlp_e2e_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(base_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield base_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(base_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def wait_ready(url: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:  # nosec B310
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise ContainerError(f"the container did not become ready at {url}/readyz in {timeout:.0f} s")


def e2e(context: Path, database_url: str, redis_url: str) -> int:
    ensure_tools()
    ensure_bases()
    built = build(context)
    say(f"built {IMAGE} in {built.seconds:.0f} s: {built.summary()}")
    port = free_port()
    name = f"mlp-e2e-{os.getpid()}"
    home = Path(tempfile.mkdtemp(prefix="mlp-e2e-home-"))
    os.chown(home, 10001, 10001)
    prefix = f"mlp-e2e-{uuid.uuid4().hex[:8]}"
    with database(database_url) as url:
        env = {
            "ENVIRONMENT": "staging",
            "SECRET_KEY": secrets.token_urlsafe(48),
            "DATABASE_URL": url,
            "REDIS_URL": redis_url,
            "MLP_REDIS_PREFIX": prefix,
        }
        env_args = [arg for key in env for arg in ("--env", key)]
        try:
            # The same image twice, as the deployment runs it: API server and a worker.
            common = [
                *LIMITS,
                "--network",
                "host",
                "--read-only",
                "--tmpfs",
                CONTAINER_TMP,
                "--volume",
                f"{home}:/var/lib/ml-platform",
                *env_args,
                IMAGE,
            ]
            server_args = ["server", "--host", "127.0.0.1", "--port", str(port)]
            for container, command in (
                (name, server_args),
                (f"{name}-worker", ["worker", "--concurrency", "1"]),
            ):
                run(["podman", *RUN_FLAGS, "run", "-d", "--name", container, *common, *command])
            base = f"http://127.0.0.1:{port}"
            wait_ready(base)
            password = secrets.token_urlsafe(18)
            subprocess.run(  # nosec B603 B607 - podman with arguments built here
                [
                    "podman",
                    *RUN_FLAGS,
                    "exec",
                    "-i",
                    name,
                    "mlp",
                    "users",
                    "create",
                    "smoke",
                    "--admin",
                    "--password-stdin",
                ],
                input=password + "\n",
                text=True,
                check=True,
                capture_output=True,
            )
            uid = run(["podman", *RUN_FLAGS, "exec", name, "id", "-u"], capture=True).strip()
            if uid != "10001":
                raise ContainerError(f"the container runs as uid {uid}, not 10001")
            say(f"container {name} is ready at {base}, running as uid {uid} on a read-only root")
            smoke = subprocess.run(  # nosec B603 - our own interpreter and test suite
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "tests/smoke",
                    "-p",
                    "no:cacheprovider",
                    "--no-cov",
                    "-q",
                    "-ra",
                    "--base-url",
                    base,
                    "--smoke-user",
                    "smoke",
                    "--smoke-password",
                    password,
                ],
                check=False,
                env={**os.environ, **{k: v for k, v in env.items() if k != "SECRET_KEY"}},
            )
            return smoke.returncode
        finally:
            logs = subprocess.run(  # nosec B603 B607
                ["podman", *RUN_FLAGS, "logs", "--tail", "20", name],
                capture_output=True,
                text=True,
                check=False,
            )
            if logs.returncode == 0:
                say("last lines of the container's log:\n" + logs.stdout + logs.stderr)
            subprocess.run(  # nosec B603 B607
                ["podman", *RUN_FLAGS, "rm", "-f", name, f"{name}-worker"],
                capture_output=True,
                check=False,
            )
            subprocess.run(  # nosec B603 B607
                ["podman", "rmi", "-f", IMAGE], capture_output=True, check=False
            )
            shutil.rmtree(home, ignore_errors=True)
            _drop_keys(redis_url, prefix)


def _drop_keys(redis_url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def main(argv: Sequence[str]) -> int:
    if list(argv[:1]) not in (["e2e"], ["size"]):
        print("usage: python -m delivery.container e2e | size [--json PATH]")
        return 2
    if argv[0] == "size":
        try:
            built = size(Path.cwd())
        except ContainerError as exc:
            say(f"error: {exc}")
            return 1
        say(f"{IMAGE}: {built.summary()}")
        if argv[1:2] == ["--json"] and len(argv) > 2:
            Path(argv[2]).write_text(json.dumps(asdict(built)) + "\n")
        return 0
    try:
        code = e2e(
            Path.cwd(),
            os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
            os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        )
    except ContainerError as exc:
        say(f"error: {exc}")
        return 1
    say("smoke tests against the container: " + ("PASSED" if code == 0 else "FAILED"))
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
