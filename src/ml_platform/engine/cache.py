"""Canonical JSON and cache keys: the same code and the same inputs give the same key."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any


class UnserializableInput(TypeError):
    """A value that cannot be stored as JSON; the message says where it was found."""


def check_json(value: Any, path: str = "value") -> None:
    """Raise UnserializableInput, saying where, unless ``value`` can be stored as JSON."""
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UnserializableInput(f"{path} is {value!r}, which JSON cannot represent")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_json(item, f"{path}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise UnserializableInput(
                    f"{path} has a key of type {type(key).__name__}; JSON keys must be strings"
                )
            check_json(item, f"{path}[{key!r}]")
        return
    raise UnserializableInput(
        f"{path} is a {type(value).__module__}.{type(value).__qualname__}, which is not "
        "JSON-serializable; pass large or complex values as the result of a task"
    )


def canonical_json(value: Any, path: str = "value") -> str:
    """Serialize ``value`` to one canonical JSON text, or raise UnserializableInput."""
    check_json(value, path)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def cache_key(task_ref: str, code_version: str, inputs: Any) -> str:
    """The key under which a task's successful result may be reused.

    ``inputs`` are the task's resolved inputs: its arguments with every upstream result
    replaced by that result's stored form (an inline JSON value or an artifact digest).
    """
    material = canonical_json({"task": task_ref, "code": code_version, "inputs": inputs})
    return hashlib.sha256(material.encode()).hexdigest()
