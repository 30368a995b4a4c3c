"""Content-addressed artifact store (sha256) on a local directory, and value encoding.

A task's result is kept inline in the database when it is small JSON; anything else is
pickled into the store and referenced by digest. Pickles are only ever read from this store,
which holds what this platform's own tasks wrote.
"""

from __future__ import annotations

import hashlib
import os
import pickle  # nosec B403
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ml_platform.engine.cache import UnserializableInput, canonical_json

ARTIFACT_KEY = "__mlp_artifact__"
#: A mapped task's stored result: the stored results of its elements, in order.
ELEMENTS_KEY = "__mlp_elements__"
_CHUNK = 1024 * 1024


class ArtifactCorrupted(ValueError):
    """A stored blob no longer matches its digest: it is not loaded."""


class ArtifactNotFound(LookupError):
    """No blob with that digest exists in the store."""


class ArtifactStore:
    """Blobs under ``root/<first two hex digits>/<sha256>``, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.root / digest[:2] / digest

    def _commit(self, tmp: Path, digest: str) -> str:
        target = self.path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            tmp.unlink()
            _touch(target)
        else:
            os.replace(tmp, target)
        return digest

    def _tempfile(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.root, prefix=".incoming-")
        os.close(fd)
        return Path(name)

    def put_bytes(self, data: bytes) -> str:
        """Store ``data``; return its sha256. Storing the same bytes twice keeps one copy."""
        digest = hashlib.sha256(data).hexdigest()
        if self.path(digest).exists() and _touch(self.path(digest)):
            return digest
        tmp = self._tempfile()
        tmp.write_bytes(data)
        return self._commit(tmp, digest)

    def put_file(self, source: Path) -> str:
        """Copy a file into the store; return its sha256."""
        tmp = self._tempfile()
        hasher = hashlib.sha256()
        with source.open("rb") as src, tmp.open("wb") as dst:
            while chunk := src.read(_CHUNK):
                hasher.update(chunk)
                dst.write(chunk)
        return self._commit(tmp, hasher.hexdigest())

    def get_bytes(self, digest: str) -> bytes:
        path = self.path(digest)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ArtifactNotFound(f"artifact {digest} is not in {self.root}") from None

    def copy_to(self, digest: str, destination: Path) -> Path:
        if not self.path(digest).exists():
            raise ArtifactNotFound(f"artifact {digest} is not in {self.root}")
        shutil.copyfile(self.path(digest), destination)
        return destination

    def put_object(self, value: Any) -> tuple[str, int]:
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        return self.put_bytes(data), len(data)

    def get_object(self, digest: str) -> Any:
        # Only blobs this platform's own tasks wrote are loaded (see the module docstring), and
        # only when they are still what was written: a file changed in the store is refused.
        data = self.get_bytes(digest)
        if hashlib.sha256(data).hexdigest() != digest:
            raise ArtifactCorrupted(f"artifact {digest} in {self.root} does not match its digest")
        return pickle.loads(data)  # nosec B301


def _touch(path: Path) -> bool:
    """Mark a blob as written now (saved again: `mlp prune` sweeps only blobs nothing names
    that were last written before its cut-off). False if it vanished meanwhile."""
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    return True


def encode_value(value: Any, store: ArtifactStore, inline_limit: int) -> dict[str, Any]:
    """The stored form of a task result: inline JSON when small, else a pickled artifact."""
    try:
        text = canonical_json(value)
    except UnserializableInput:
        text = None
    if text is not None and len(text.encode()) <= inline_limit:
        return {"value": value}
    digest, size = store.put_object(value)
    stored: dict[str, Any] = {ARTIFACT_KEY: digest, "kind": "pickle", "size": size}
    if isinstance(value, (list, tuple)):
        stored["length"] = len(value)  # what a mapped task needs to expand over it
    return stored


def decode_value(stored: dict[str, Any], store: ArtifactStore) -> Any:
    """The live value of a stored result (see encode_value, element_of and mapped results)."""
    if ELEMENTS_KEY in stored:  # a mapped task's result: its elements' results, in order
        return [decode_value(element, store) for element in stored[ELEMENTS_KEY]]
    if ARTIFACT_KEY in stored:
        value = store.get_object(stored[ARTIFACT_KEY])
        return value[stored["item"]] if "item" in stored else value
    return stored["value"]


def length_of(stored: dict[str, Any]) -> int | None:
    """How many elements a stored result has, when it is a list (else None)."""
    if ELEMENTS_KEY in stored:
        return len(stored[ELEMENTS_KEY])
    if ARTIFACT_KEY in stored:
        length = stored.get("length")
        return length if isinstance(length, int) else None
    value = stored.get("value")
    return len(value) if isinstance(value, list) else None


def element_of(stored: dict[str, Any], index: int) -> dict[str, Any]:
    """The stored form of element ``index`` of a stored list (see length_of)."""
    if ELEMENTS_KEY in stored:
        element: dict[str, Any] = stored[ELEMENTS_KEY][index]
        return element
    if ARTIFACT_KEY in stored:
        return {**stored, "item": index}
    return {"value": stored["value"][index]}
