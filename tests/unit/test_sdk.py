"""Declaring workflows: tracing the DAG, parameters, and their errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ml_platform.engine.cache import UnserializableInput
from ml_platform.inputs import REF_KEY
from ml_platform.sdk import (
    Backoff,
    ParamError,
    TaskContext,
    WorkflowError,
    context,
    task,
    workflow,
)
from tests import workflows

pytestmark = pytest.mark.unit


def test_fan_out_and_fan_in_become_dependencies() -> None:
    specs = {spec.node_id: spec for spec in workflows.arithmetic.build({"n": 3})}
    assert list(specs) == ["double[0]", "double[1]", "double[2]", "total"]
    assert specs["total"].upstream == ("double[0]", "double[1]", "double[2]")
    assert specs["total"].inputs["args"] == [
        [{REF_KEY: "double[0]"}, {REF_KEY: "double[1]"}, {REF_KEY: "double[2]"}]
    ]
    assert specs["double[1]"].inputs == {"args": [1], "kwargs": {}}
    assert specs["double[0]"].task_ref == "tests.workflows:double"


def test_task_called_outside_a_workflow_is_a_plain_function() -> None:
    assert workflows.double(4) == 8


def test_options_are_recorded() -> None:
    options = workflows.picky.options()
    assert options["retries"] == 3
    assert options["retry_on"] == ["builtins:ConnectionError"]
    assert workflows.overrun.options()["timeout"] == 1.0


def test_code_version_changes_with_the_source() -> None:
    def one(x: int) -> int:
        return x

    def two(x: int) -> int:
        return x + 1

    assert task(one).code_version != task(two).code_version
    assert task(version="7")(one).code_version == "7"


def test_params_are_validated_against_the_signature() -> None:
    wf = workflows.arithmetic
    assert wf.validate_params({}) == {"n": 3}
    assert wf.validate_params({"n": "4"}) == {"n": 4}
    with pytest.raises(ParamError, match="parameter 'n': Input should be a valid integer"):
        wf.validate_params({"n": "four"})
    with pytest.raises(ParamError, match="unknown parameter 'm'"):
        wf.validate_params({"m": 1})
    with pytest.raises(ParamError, match="missing parameter 'counter'"):
        workflows.flaky_pipeline.validate_params({})


def test_the_params_schema_is_the_signatures_and_each_caller_gets_its_own_copy() -> None:
    schema = workflows.arithmetic.params_schema()
    assert schema["properties"]["n"] == {"default": 3, "title": "N", "type": "integer"}
    schema["properties"]["n"]["default"] = 99  # a caller changing what it was given
    assert workflows.arithmetic.params_schema()["properties"]["n"]["default"] == 3


def test_cli_params_parse_json_except_for_strings() -> None:
    wf = workflows.flaky_pipeline
    assert wf.parse_cli_params({"counter": "123", "fail_times": "2"}) == {
        "counter": "123",
        "fail_times": 2,
    }
    assert workflows.arithmetic.parse_cli_params({"n": "x"}) == {"n": "x"}


def test_unserializable_input_names_the_task() -> None:
    @workflow
    def bad() -> None:
        workflows.echo({1, 2})

    with pytest.raises(WorkflowError, match=r"task 'echo': argument\[0\] is a builtins.set"):
        bad.build({})


def test_reserved_keys_are_refused() -> None:
    @workflow
    def sneaky() -> None:
        workflows.echo({REF_KEY: "x"})

    with pytest.raises(WorkflowError, match="reserved key"):
        sneaky.build({})


def test_using_a_result_inside_the_workflow_body_is_a_clear_error() -> None:
    @workflow
    def peeks() -> None:
        value: Any = workflows.double(1)
        if value > 1:
            workflows.double(2)

    with pytest.raises(WorkflowError, match="result of task 'double' is not known"):
        peeks.build({})


def test_wrong_task_arguments_and_empty_workflows() -> None:
    @workflow
    def wrong() -> None:
        workflows.double(1, 2)  # type: ignore[call-arg]  # the mistake under test

    with pytest.raises(WorkflowError, match="task 'double' called with wrong arguments"):
        wrong.build({})

    @workflow
    def empty() -> None:
        return None

    with pytest.raises(WorkflowError, match="declares no tasks"):
        empty.build({})

    @workflow
    def crashes() -> None:
        raise KeyError("oops")

    with pytest.raises(WorkflowError, match="failed while declaring its tasks"):
        crashes.build({})


def test_bad_decorator_arguments_fail_at_import_time() -> None:
    with pytest.raises(ValueError, match="timeout must be > 0"):
        task(timeout=0)(lambda: None)
    with pytest.raises(TypeError, match="retry_on must be a tuple of exception classes"):
        task(retry_on=("ValueError",))(lambda: None)  # type: ignore[arg-type]  # under test
    with pytest.raises(ValueError, match="jitter"):
        task(retry_backoff=Backoff(factor=1.0))(lambda: None)
    with pytest.raises(ValueError, match="max_concurrency"):
        workflow(max_concurrency=0)(lambda: None)
    with pytest.raises(WorkflowError, match=r"\*args"):
        workflow(lambda *args: None)


def test_context_outside_a_task_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="only available inside a running task"):
        context()


def test_map_records_one_node_whose_items_and_fixed_arguments_are_templates() -> None:
    specs = {spec.node_id: spec for spec in workflows.mapped.build({"n": 3, "folder": "/f"})}
    assert list(specs) == ["shards", "shard_work", "gather"]
    node = specs["shard_work"]
    assert node.upstream == ("shards",)
    assert node.inputs["map"] == {REF_KEY: "shards"}
    assert node.inputs["args"] == []
    assert node.inputs["kwargs"] == {"folder": "/f", "fail": -1, "fail_times": 1}
    assert node.inputs["map_to"] == "item"  # the first parameter the fixed ones leave open
    assert node.options["map_concurrency"] is None
    assert specs["gather"].inputs["args"] == [{REF_KEY: "shard_work"}]
    literal = {s.node_id: s for s in workflows.mapped_literal.build({"folder": "/f"})}
    assert literal["shard_work"].inputs["map"] == [2, -1, {REF_KEY: "double"}]
    assert literal["shard_work"].upstream == ("double",)


def test_map_outside_a_workflow_is_a_loop_and_bad_uses_say_what_is_wrong(tmp_path: Path) -> None:
    assert workflows.double.map([1, 2, 3]) == [2, 4, 6]
    # The elements go to the first parameter the fixed arguments leave open.
    assert workflows.step.map([1, 2], previous=10, folder=str(tmp_path)) == [11, 12]
    with pytest.raises(WorkflowError, match="no parameter left for the elements"):
        workflows.double.map([1], x=2)

    @workflow
    def over_a_string() -> None:
        workflows.double.map("abc")

    with pytest.raises(WorkflowError, match=r"double.map\(\) needs a list or another task"):
        over_a_string.build({})

    @workflow
    def wrong_fixed() -> None:
        workflows.double.map([1], y=2)

    with pytest.raises(WorkflowError, match="called with wrong arguments"):
        wrong_fixed.build({})
    with pytest.raises(ValueError, match="max_concurrency must be >= 1"):
        workflows.double.map([1], max_concurrency=0)


def test_a_metric_param_or_artifact_the_database_cannot_keep_fails_in_the_task(
    tmp_path: Path,
) -> None:
    """Names of 1 to 200 characters without NUL, steps that fit the column: checked where the
    task can still fail with the reason (on PostgreSQL the worker's commit was refused, again
    and again, and the run never ended)."""
    ctx = TaskContext("run", "task", 1, tmp_path)
    for bad in ("m" * 201, "a\x00b", "", 7):
        with pytest.raises(ValueError, match="must be text of 1 to 200 characters, no NUL"):
            ctx.log_metric(bad, 1.0)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="param .* must be text"):
            ctx.log_param(bad, 1)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="artifact .* must be text"):
            ctx.save_artifact(bad, b"x")  # type: ignore[arg-type]
    for step in (2**31, -(2**31) - 1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="step must be a whole number below 2"):
            ctx.log_metric("loss", 0.5, step=step)  # type: ignore[arg-type]
    ctx.log_metric("m" * 200, 1.0, step=2**31 - 1)
    ctx.log_metric("loss", 0.25, step=_Index(7))  # type: ignore[arg-type]
    ctx.log_param("lr", 0.1)
    assert ctx.metrics[-1] == {"name": "loss", "value": 0.25, "step": 7}
    assert type(ctx.metrics[-1]["step"]) is int and ctx.params == {"lr": 0.1}
    assert ctx.artifacts == []


class _Index:
    """An integer of another library (numpy's int64, say): it has __index__."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


def test_numbers_of_other_libraries_are_logged_as_the_numbers_they_stand_for(
    tmp_path: Path,
) -> None:
    """A training script's params come from numpy as often as not (np.int64 from an array
    of choices): they were refused as not JSON-serializable, failing the task."""
    np = pytest.importorskip("numpy")
    ctx = TaskContext("run", "task", 1, tmp_path)
    ctx.log_param("n_estimators", np.int64(200))
    ctx.log_param("layers", [np.int32(64), np.int32(32)])
    ctx.log_param("search", {"lr": np.float32(0.5), "shuffle": np.bool_(True)})
    ctx.log_param("threshold", np.array(0.25))
    ctx.log_metric("loss", np.float32(0.125), step=np.int64(3))
    assert ctx.params == {
        "n_estimators": 200,
        "layers": [64, 32],
        "search": {"lr": 0.5, "shuffle": True},
        "threshold": 0.25,
    }
    assert [type(v) for v in ctx.params["search"].values()] == [float, bool]
    assert ctx.metrics == [{"name": "loss", "value": 0.125, "step": 3}]
    with pytest.raises(UnserializableInput, match="nan.*which JSON cannot represent"):
        ctx.log_param("bad", np.float64("nan"))
    with pytest.raises(UnserializableInput, match="ndarray"):
        ctx.log_param("weights", np.zeros(3))  # a result's job, not a param's


def test_a_grid_made_with_numpy_is_traced_as_plain_numbers() -> None:
    np = pytest.importorskip("numpy")

    @workflow
    def grid() -> None:
        workflows.total([workflows.double(n) for n in np.arange(2, 4)])

    specs = {spec.node_id: spec for spec in grid.build({})}
    assert specs["double[0]"].inputs == {"args": [2], "kwargs": {}}
    assert type(specs["double[1]"].inputs["args"][0]) is int
