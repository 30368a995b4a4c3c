"""The content-addressed artifact store and result encoding."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import pytest

from ml_platform.artifacts import (
    ARTIFACT_KEY,
    ArtifactCorrupted,
    ArtifactNotFound,
    ArtifactStore,
    decode_value,
    encode_value,
)

pytestmark = pytest.mark.unit


def test_bytes_are_stored_once_under_their_digest(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    digest = store.put_bytes(b"model")
    assert digest == hashlib.sha256(b"model").hexdigest()
    assert store.put_bytes(b"model") == digest
    assert store.get_bytes(digest) == b"model"
    assert len([p for p in tmp_path.rglob("*") if p.is_file()]) == 1


def test_files_and_objects_round_trip(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    source = tmp_path / "weights.bin"
    source.write_bytes(b"\x00" * 3_000_000)
    digest = store.put_file(source)
    assert digest == hashlib.sha256(source.read_bytes()).hexdigest()
    assert store.copy_to(digest, tmp_path / "copy.bin").read_bytes() == source.read_bytes()
    obj_digest, size = store.put_object({"a": (1, 2)})
    assert store.get_object(obj_digest) == {"a": (1, 2)} and size > 0


def test_missing_and_malformed_digests(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(ArtifactNotFound):
        store.get_bytes("0" * 64)
    with pytest.raises(ArtifactNotFound):
        store.copy_to("0" * 64, tmp_path / "x")
    with pytest.raises(ValueError, match="not a sha256 digest"):
        store.path("../../etc/passwd")


def test_small_json_stays_inline_and_the_rest_becomes_an_artifact(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    assert encode_value({"x": 1}, store, inline_limit=100) == {"value": {"x": 1}}
    large = encode_value(list(range(1000)), store, inline_limit=100)
    assert ARTIFACT_KEY in large and large["kind"] == "pickle"
    assert decode_value(large, store) == list(range(1000))
    odd = encode_value({1, 2}, store, inline_limit=100)
    assert decode_value(odd, store) == {1, 2}


def test_a_stored_pickle_that_was_changed_is_never_loaded(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    digest, _ = store.put_object({"weights": [1, 2, 3]})
    assert store.get_object(digest) == {"weights": [1, 2, 3]}
    path = store.path(digest)
    path.chmod(0o644)
    path.write_bytes(pickle.dumps("something else"))
    with pytest.raises(ArtifactCorrupted, match="does not match its digest"):
        store.get_object(digest)


def test_a_list_result_knows_its_length_and_gives_single_elements(tmp_path: Path) -> None:
    from ml_platform.artifacts import ELEMENTS_KEY, element_of, length_of

    store = ArtifactStore(tmp_path)
    inline = encode_value([1, 2, 3], store, inline_limit=1024)
    assert length_of(inline) == 3
    assert element_of(inline, 1) == {"value": 2}
    big = encode_value([object.__name__] * 2 + [b"x" * 10], store, inline_limit=10)
    assert ARTIFACT_KEY in big and length_of(big) == 3
    assert decode_value(element_of(big, 2), store) == b"x" * 10
    assert length_of(encode_value({"a": 1}, store, inline_limit=1024)) is None
    assert length_of(encode_value(b"not json", store, inline_limit=1024)) is None
    grouped = {ELEMENTS_KEY: [inline, {"value": None}, big]}
    assert length_of(grouped) == 3
    assert decode_value(grouped, store) == [[1, 2, 3], None, ["object", "object", b"x" * 10]]
    assert element_of(grouped, 1) == {"value": None}


def test_saving_a_blob_again_marks_it_written_now(tmp_path: Path) -> None:
    """`mlp prune` sweeps only blobs last written before its cut-off: one a task saves again
    (the same bytes as an old run's) is fresh, though its file is not rewritten."""
    store = ArtifactStore(tmp_path)
    digest = store.put_bytes(b"model")
    source = tmp_path / "model.bin"
    source.write_bytes(b"weights")
    copied = store.put_file(source)
    for blob in (digest, copied):
        os.utime(store.path(blob), (0, 0))
    assert store.put_bytes(b"model") == digest and store.put_file(source) == copied
    assert all(store.path(blob).stat().st_mtime > 1e9 for blob in (digest, copied))
