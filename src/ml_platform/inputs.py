"""Task inputs: references to upstream results, resolved before and decoded inside a task."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ml_platform.artifacts import ArtifactStore, decode_value, element_of

REF_KEY = "__mlp_ref__"


def references(inputs: Any) -> set[str]:
    """The ids of the upstream tasks whose results ``inputs`` refer to."""
    if isinstance(inputs, dict):
        if REF_KEY in inputs:
            return {inputs[REF_KEY]}
        return {ref for value in inputs.values() for ref in references(value)}
    if isinstance(inputs, list):
        return {ref for value in inputs for ref in references(value)}
    return set()


def resolve_inputs(inputs: Any, results: Mapping[str, dict[str, Any]]) -> Any:
    """Replace every upstream reference with that upstream's stored result.

    A reference with an ``item`` (an element of a mapped task) takes that element only.
    """
    if isinstance(inputs, dict):
        if REF_KEY in inputs:
            node_id = inputs[REF_KEY]
            stored = results[node_id]
            if "item" in inputs:
                stored = element_of(stored, inputs["item"])
            return {REF_KEY: node_id, "stored": stored}
        return {key: resolve_inputs(value, results) for key, value in inputs.items()}
    if isinstance(inputs, list):
        return [resolve_inputs(value, results) for value in inputs]
    return inputs


def decode_inputs(resolved: Any, store: ArtifactStore) -> Any:
    """The live Python values of resolved inputs (what the task function receives)."""
    if isinstance(resolved, dict):
        if REF_KEY in resolved:
            return decode_value(resolved["stored"], store)
        return {key: decode_inputs(value, store) for key, value in resolved.items()}
    if isinstance(resolved, list):
        return [decode_inputs(value, store) for value in resolved]
    return resolved
