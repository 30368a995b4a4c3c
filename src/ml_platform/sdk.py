"""What pipeline code imports: ``@task``, ``@workflow``, ``context()`` and ``Skip``.

A workflow's body calls tasks. While a run is being submitted the body is traced: calling a
task records a node and returns a placeholder, and passing a placeholder to another task makes
that task depend on the first. Lists of placeholders fan in; a comprehension over a parameter
fans out. Outside a workflow a task is a plain function, so it can be unit-tested as one.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import inspect
import json
import numbers
import operator
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, cast, overload

if TYPE_CHECKING:
    from pydantic import BaseModel

from ml_platform.artifacts import ArtifactStore
from ml_platform.engine.cache import UnserializableInput, check_json
from ml_platform.engine.dag import DagError, topological_order
from ml_platform.engine.retry import RetryPolicy
from ml_platform.inputs import REF_KEY

P = ParamSpec("P")
R = TypeVar("R")

RESERVED_KEYS = frozenset({REF_KEY, "__mlp_artifact__"})


class WorkflowError(ValueError):
    """A workflow cannot be loaded, traced or given these parameters."""


class ParamError(WorkflowError):
    """Run parameters do not match the workflow's signature."""


class Skip(Exception):
    """Raise inside a task to end it as ``skipped``; its downstream tasks are skipped too."""


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: ``base * factor**(n-1)`` seconds, jittered, capped at ``max_delay``."""

    base: float = 1.0
    factor: float = 2.0
    max_delay: float = 60.0
    jitter: float = 0.1


def qualified_name(obj: Any) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def _source_hash(obj: Any) -> str:
    try:
        source = inspect.getsource(obj)
    except (OSError, TypeError):  # no source (e.g. defined in a REPL): fall back to bytecode
        code = getattr(obj, "__code__", None)
        source = repr((code.co_code, code.co_consts)) if code else repr(obj)
    return hashlib.sha256(source.encode()).hexdigest()


class Task(Generic[P, R]):
    """A Python function the platform runs as one step of a workflow."""

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        name: str | None = None,
        retries: int = 0,
        retry_backoff: Backoff | float = Backoff(),
        retry_on: tuple[type[BaseException], ...] | None = None,
        timeout: float | None = None,
        cache: bool = False,
        pool: str | None = None,
        version: str | None = None,
    ) -> None:
        backoff = retry_backoff if isinstance(retry_backoff, Backoff) else Backoff(retry_backoff)
        # Validates the numbers now, at import time, rather than after the first failure.
        self.retry_policy = RetryPolicy(
            retries=retries,
            base_delay=backoff.base,
            factor=backoff.factor,
            max_delay=backoff.max_delay,
            jitter=backoff.jitter,
        )
        if timeout is not None and timeout <= 0:
            raise ValueError(f"task timeout must be > 0 seconds, got {timeout}")
        if retry_on is not None and not all(
            isinstance(t, type) and issubclass(t, BaseException) for t in retry_on
        ):
            raise TypeError("retry_on must be a tuple of exception classes")
        self.fn = fn
        self.name = name or fn.__name__
        self.ref = qualified_name(fn)
        self.retry_on = retry_on
        self.timeout = timeout
        self.cache = cache
        self.pool = pool
        self.code_version = version or _source_hash(fn)
        functools.update_wrapper(self, fn)

    def options(self) -> dict[str, Any]:
        """The task's execution options as stored with each task run."""
        policy = self.retry_policy
        return {
            "retries": policy.retries,
            "base_delay": policy.base_delay,
            "factor": policy.factor,
            "max_delay": policy.max_delay,
            "jitter": policy.jitter,
            "retry_on": (
                None if self.retry_on is None else [qualified_name(t) for t in self.retry_on]
            ),
            "timeout": self.timeout,
            "cache": self.cache,
            "pool": self.pool,
        }

    @functools.cached_property
    def _signature(self) -> inspect.Signature:
        """The function's signature, read once: a fan-out's thousand calls check against it."""
        return inspect.signature(self.fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        tracer = _TRACER.get()
        if tracer is None:
            return self.fn(*args, **kwargs)
        return cast(R, tracer.add(self, args, kwargs))

    def map(self, items: Any, /, *, max_concurrency: int | None = None, **fixed: Any) -> list[R]:
        """Run this task once per element of ``items``: ``train.map(grid, data=split)``.

        ``items`` is a list or the result of another task (a list known only when that task
        has run). Each element goes to the task's first parameter that ``fixed`` does not
        name, and ``fixed`` to the others, the same for every element. Downstream tasks
        receive the elements' results as one list, in order (``None`` for an element that
        raised Skip). Each element is a task run of its own -- ``train[0]``, ``train[1]``,
        … -- with its own attempts, retries, timeout, cache key and pool; ``max_concurrency``
        caps how many run at once. Outside a workflow it is a plain loop.
        """
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        target = self._element_parameter(fixed)
        tracer = _TRACER.get()
        if tracer is None:
            call = cast("Callable[..., R]", self.fn)
            return [call(**{target.name: item}, **fixed) for item in items]
        if not isinstance(items, (TaskRef, list, tuple)):
            raise WorkflowError(
                f"{self.name}.map() needs a list or another task's result to map over, "
                f"not {type(items).__name__}"
            )
        return cast(
            "list[R]",
            tracer.add(self, (), {**fixed, target.name: _MapItem()}, items, max_concurrency),
        )

    def _element_parameter(self, fixed: Mapping[str, Any]) -> inspect.Parameter:
        """The parameter each element of a map goes to: the first one ``fixed`` leaves open."""
        for parameter in inspect.signature(self.fn).parameters.values():
            if parameter.name in fixed:
                continue
            if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
                return parameter
            break
        raise WorkflowError(
            f"{self.name}.map(): no parameter left for the elements (the fixed arguments "
            f"{', '.join(sorted(fixed)) or 'none'} take them all, or the first open one is "
            "positional-only or *args)"
        )

    def __repr__(self) -> str:
        return f"<task {self.ref}>"


@overload
def task(fn: Callable[P, R], /) -> Task[P, R]: ...


@overload
def task(
    *,
    name: str | None = None,
    retries: int = 0,
    retry_backoff: Backoff | float = Backoff(),
    retry_on: tuple[type[BaseException], ...] | None = None,
    timeout: float | None = None,
    cache: bool = False,
    pool: str | None = None,
    version: str | None = None,
) -> Callable[[Callable[P, R]], Task[P, R]]: ...


def task(
    fn: Callable[P, R] | None = None, /, **options: Any
) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
    """Declare a task. ``@task`` or ``@task(retries=3, timeout=60, cache=True, pool="gpu")``."""
    if fn is not None:
        return Task(fn)

    def decorate(inner: Callable[P, R]) -> Task[P, R]:
        return Task(inner, **options)

    return decorate


class TaskRef:
    """The placeholder a task call returns while a workflow is traced."""

    def __init__(self, index: int, task_name: str) -> None:
        self.index = index
        self.task_name = task_name

    def __repr__(self) -> str:
        return f"<result of {self.task_name}>"

    def _misuse(self, *_: Any, **__: Any) -> Any:
        raise WorkflowError(
            f"the result of task {self.task_name!r} is not known while the workflow is declared; "
            "pass it to another task instead of using it in the workflow body"
        )

    __bool__ = __iter__ = __len__ = __getitem__ = __getattr__ = _misuse
    __add__ = __lt__ = __gt__ = __le__ = __ge__ = __float__ = __int__ = _misuse


class _MapItem:
    """Where each element of a mapped task goes while its call is checked."""


#: Absent: a plain task node. Present: the items a mapped node expands over.
_NO_MAP = object()


@dataclass
class _Node:
    task: Task[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    upstream: set[int] = field(default_factory=set)
    map_items: Any = _NO_MAP
    map_concurrency: int | None = None


class _Tracer:
    def __init__(self) -> None:
        self.nodes: list[_Node] = []

    def add(
        self,
        task_: Task[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        map_items: Any = _NO_MAP,
        map_concurrency: int | None = None,
    ) -> TaskRef:
        try:
            task_._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise WorkflowError(f"task {task_.name!r} called with wrong arguments: {exc}") from None
        mapped = map_items is not _NO_MAP
        if mapped:  # the element's parameter is checked; it is not an input of the node
            kwargs = {k: v for k, v in kwargs.items() if not isinstance(v, _MapItem)}
        node = _Node(task_, args, kwargs, map_items=map_items)
        node.map_concurrency = map_concurrency
        node.upstream = {ref.index for ref in _refs_in((args, kwargs))}
        if mapped:
            node.upstream |= {ref.index for ref in _refs_in(map_items)}
        self.nodes.append(node)
        return TaskRef(len(self.nodes) - 1, task_.name)


_TRACER: contextvars.ContextVar[_Tracer | None] = contextvars.ContextVar("tracer", default=None)


def _refs_in(value: Any) -> list[TaskRef]:
    if isinstance(value, TaskRef):
        return [value]
    if isinstance(value, (list, tuple)):
        return [ref for item in value for ref in _refs_in(item)]
    if isinstance(value, dict):
        return [ref for item in value.values() for ref in _refs_in(item)]
    return []


@dataclass(frozen=True)
class NodeSpec:
    """One task of a traced workflow, ready to be stored."""

    node_id: str
    task_ref: str
    code_version: str
    upstream: tuple[str, ...]
    inputs: dict[str, Any]
    options: dict[str, Any]


def _template(value: Any, ids: list[str], where: str) -> Any:
    if isinstance(value, TaskRef):
        return {REF_KEY: ids[value.index]}
    if isinstance(value, (list, tuple)):
        return [_template(v, ids, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        clash = RESERVED_KEYS.intersection(value)
        if clash:
            raise UnserializableInput(f"{where} uses the reserved key {sorted(clash)[0]!r}")
        return {k: _template(v, ids, f"{where}[{k!r}]") for k, v in value.items()}
    value = _plain(value)  # a grid from numpy: np.arange(2, 6) gives numpy's integers
    check_json(value, where)
    return value


@dataclass(frozen=True)
class TracedWorkflow:
    """What registering or submitting needs of a workflow, as plain data.

    Made by ``Workflow.trace`` in the process that imported the workflow's code -- for a
    long-lived server, a short-lived subprocess (``ml_platform.tracer``), so that the code
    traced is always the code on disk now and never runs in the server itself.
    """

    name: str
    code_hash: str
    params_schema: dict[str, Any]
    description: str
    max_concurrency: int | None
    #: The validated run params and the traced nodes; None when only registering.
    params: dict[str, Any] | None = None
    specs: tuple[NodeSpec, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "code_hash": self.code_hash,
            "params_schema": self.params_schema,
            "description": self.description,
            "max_concurrency": self.max_concurrency,
            "params": self.params,
            "specs": [
                {
                    "node_id": spec.node_id,
                    "task_ref": spec.task_ref,
                    "code_version": spec.code_version,
                    "upstream": list(spec.upstream),
                    "inputs": spec.inputs,
                    "options": spec.options,
                }
                for spec in self.specs
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TracedWorkflow:
        return cls(
            name=data["name"],
            code_hash=data["code_hash"],
            params_schema=data["params_schema"],
            description=data["description"],
            max_concurrency=data["max_concurrency"],
            params=data["params"],
            specs=tuple(
                NodeSpec(
                    node_id=spec["node_id"],
                    task_ref=spec["task_ref"],
                    code_version=spec["code_version"],
                    upstream=tuple(spec["upstream"]),
                    inputs=spec["inputs"],
                    options=spec["options"],
                )
                for spec in data["specs"]
            ),
        )


class Workflow:
    """A named DAG of tasks, declared by a function whose parameters are the run's params."""

    def __init__(
        self, fn: Callable[..., Any], *, name: str | None = None, max_concurrency: int | None = None
    ) -> None:
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.fn = fn
        self.ref = qualified_name(fn)
        self.name = name or self.ref
        self.max_concurrency = max_concurrency
        self.description = inspect.getdoc(fn) or ""
        for param in inspect.signature(fn).parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise WorkflowError(f"workflow {self.ref}: *args and **kwargs cannot be run params")
        functools.update_wrapper(self, fn)

    @functools.cached_property
    def params_model(self) -> type[BaseModel]:
        """The params as a pydantic model, made on first use: a task process that imports the
        workflow's module to run one of its tasks never needs it (nor pydantic)."""
        from pydantic import ConfigDict, create_model

        fields: dict[str, Any] = {}
        for param in inspect.signature(self.fn).parameters.values():
            annotation = Any if param.annotation is param.empty else param.annotation
            default = ... if param.default is param.empty else param.default
            fields[param.name] = (annotation, default)
        try:
            model = create_model(
                f"Params_{self.fn.__name__}", __config__=ConfigDict(extra="forbid"), **fields
            )
        except Exception as exc:  # an annotation pydantic cannot validate
            raise WorkflowError(f"workflow {self.ref}: its params cannot be validated: {exc}")
        return cast("type[BaseModel]", model)

    @property
    def code_hash(self) -> str:
        """Changes whenever the workflow's module changes: a new version of the workflow."""
        module = sys.modules.get(self.fn.__module__)
        return _source_hash(module if module is not None else self.fn)

    def params_schema(self) -> dict[str, Any]:
        """The params' JSON schema: a fresh copy each time (pydantic's own takes ≈ 0.15 ms,
        once per workflow object; a changed module is a new one)."""
        return cast("dict[str, Any]", json.loads(self._params_schema_json))

    @functools.cached_property
    def _params_schema_json(self) -> str:
        return json.dumps(self.params_model.model_json_schema())

    def validate_params(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Check and convert run parameters; raise ParamError naming every bad one."""
        from pydantic import ValidationError

        try:
            model = self.params_model.model_validate(dict(raw))
        except ValidationError as exc:
            problems = []
            for error in exc.errors():
                where = ".".join(str(part) for part in error["loc"]) or "params"
                if error["type"] == "missing":
                    problems.append(f"missing parameter {where!r}")
                elif error["type"] == "extra_forbidden":
                    problems.append(f"unknown parameter {where!r}")
                else:
                    problems.append(f"parameter {where!r}: {error['msg']}")
            raise ParamError(f"workflow {self.name}: " + "; ".join(problems)) from None
        return model.model_dump(mode="json")

    def parse_cli_params(self, pairs: Mapping[str, str]) -> dict[str, Any]:
        """Turn ``key=value`` strings into values: JSON where it parses, except for str params."""
        fields = self.params_model.model_fields
        values: dict[str, Any] = {}
        for key, text in pairs.items():
            if key in fields and fields[key].annotation is str:
                values[key] = text
                continue
            try:
                values[key] = json.loads(text)
            except json.JSONDecodeError:
                values[key] = text
        return values

    def build(self, params: Mapping[str, Any]) -> list[NodeSpec]:
        """Trace the workflow body with validated ``params`` and return its nodes."""
        tracer = _Tracer()
        token = _TRACER.set(tracer)
        try:
            self.fn(**params)
        except WorkflowError:
            raise
        except Exception as exc:
            raise WorkflowError(f"workflow {self.name} failed while declaring its tasks: {exc!r}")
        finally:
            _TRACER.reset(token)
        if not tracer.nodes:
            raise WorkflowError(f"workflow {self.name} declares no tasks")
        counts: dict[str, int] = {}
        for node in tracer.nodes:
            counts[node.task.name] = counts.get(node.task.name, 0) + 1
        seen: dict[str, int] = {}
        ids: list[str] = []
        for node in tracer.nodes:
            name = node.task.name
            if counts[name] == 1:
                ids.append(name)
            else:
                ids.append(f"{name}[{seen.get(name, 0)}]")
                seen[name] = seen.get(name, 0) + 1
        specs = []
        for index, node in enumerate(tracer.nodes):
            node_id = ids[index]
            options = node.task.options()
            try:
                inputs = {
                    "args": _template(list(node.args), ids, f"task {node_id!r}: argument"),
                    "kwargs": _template(node.kwargs, ids, f"task {node_id!r}: argument"),
                }
                if node.map_items is not _NO_MAP:
                    # Expanded by the engine when the items are known: see Platform._expand.
                    inputs["map"] = _template(node.map_items, ids, f"task {node_id!r}: items")
                    inputs["map_to"] = node.task._element_parameter(node.kwargs).name
                    options["map_concurrency"] = node.map_concurrency
            except UnserializableInput as exc:
                raise WorkflowError(str(exc)) from None
            specs.append(
                NodeSpec(
                    node_id=node_id,
                    task_ref=node.task.ref,
                    code_version=node.task.code_version,
                    upstream=tuple(sorted(ids[i] for i in node.upstream)),
                    inputs=inputs,
                    options=options,
                )
            )
        try:
            topological_order({spec.node_id: spec.upstream for spec in specs})
        except DagError as exc:
            raise WorkflowError(f"workflow {self.name}: {exc}") from None
        return specs

    def trace(self, params: Mapping[str, Any] | None = None) -> TracedWorkflow:
        """The workflow as data; with ``params``, also validated and traced into nodes."""
        values = None if params is None else self.validate_params(params)
        return TracedWorkflow(
            name=self.name,
            code_hash=self.code_hash,
            params_schema=self.params_schema(),
            description=self.description,
            max_concurrency=self.max_concurrency,
            params=values,
            specs=() if values is None else tuple(self.build(values)),
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<workflow {self.ref}>"


@overload
def workflow(fn: Callable[..., Any], /) -> Workflow: ...


@overload
def workflow(
    *, name: str | None = None, max_concurrency: int | None = None
) -> Callable[[Callable[..., Any]], Workflow]: ...


def workflow(
    fn: Callable[..., Any] | None = None, /, **options: Any
) -> Workflow | Callable[[Callable[..., Any]], Workflow]:
    """Declare a workflow. ``@workflow`` or ``@workflow(max_concurrency=4)``."""
    if fn is not None:
        return Workflow(fn)
    return lambda inner: Workflow(inner, **options)


def _plain(value: Any) -> Any:
    """``value`` with the numbers of other libraries (numpy's int64, float32 …, registered as
    numbers) made Python's own, in lists, tuples and dicts too; anything else as it is."""
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "shape", None) == ():  # numpy's bool_, a 0-d array
        return _plain(item())
    return value


#: Longest name of a metric, param or artifact (the database's column).
MAX_NAME_CHARS = 200


def _check_name(kind: str, name: Any) -> None:
    """A metric's, param's or artifact's name as the database keeps it: text of 1 to
    MAX_NAME_CHARS characters, without NUL. Checked in the task, which fails with the reason;
    its worker would otherwise be the first to learn of it, at the commit."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS or "\x00" in name:
        shown = repr(name) if len(repr(name)) <= 60 else repr(name)[:57] + "..."
        raise ValueError(
            f"{kind} name {shown}: must be text of 1 to {MAX_NAME_CHARS} characters, no NUL"
        )


@dataclass
class TaskContext:
    """What a running task can do besides returning its result."""

    run_id: str
    task_id: str
    attempt: int
    artifacts_dir: Path
    metrics: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)

    def _store(self) -> ArtifactStore:
        return ArtifactStore(self.artifacts_dir)

    def log_metric(self, name: str, value: float, step: int | None = None) -> None:
        """Record a metric (e.g. ``accuracy``) for this task run, at ``step`` if given."""
        _check_name("metric", name)
        number = float(value)
        check_json(number, f"metric {name!r}")
        if step is not None:
            try:  # an int, or what stands for one (numpy's integers, say); not a bool
                step = None if isinstance(step, bool) else operator.index(step)
            except TypeError:
                step = None
            if step is None or not -(2**31) <= step < 2**31:
                raise ValueError(f"metric {name!r}: step must be a whole number below 2**31")
        self.metrics.append({"name": name, "value": number, "step": step})

    def log_param(self, name: str, value: Any) -> None:
        """Record a parameter the task chose (JSON-serializable; numbers of other libraries,
        numpy's say, are taken as the int or float they stand for, in lists and dicts too)."""
        _check_name("param", name)
        value = _plain(value)
        check_json(value, f"param {name!r}")
        self.params[name] = value

    def save_artifact(self, name: str, obj: Any) -> str:
        """Pickle ``obj`` into the artifact store under ``name``; return its sha256."""
        _check_name("artifact", name)
        digest, size = self._store().put_object(obj)
        self.artifacts.append({"name": name, "sha256": digest, "size": size, "kind": "pickle"})
        return digest

    def save_file(self, name: str, path: str | Path) -> str:
        """Copy a file into the artifact store under ``name``; return its sha256."""
        _check_name("artifact", name)
        source = Path(path)
        digest = self._store().put_file(source)
        size = source.stat().st_size
        self.artifacts.append({"name": name, "sha256": digest, "size": size, "kind": "file"})
        return digest

    def load_artifact(self, digest: str) -> Any:
        """Load a pickled artifact by its sha256."""
        return self._store().get_object(digest)


_CONTEXT: contextvars.ContextVar[TaskContext | None] = contextvars.ContextVar(
    "task_context", default=None
)


def context() -> TaskContext:
    """The context of the task that is running now."""
    ctx = _CONTEXT.get()
    if ctx is None:
        raise RuntimeError("ml_platform.sdk.context() is only available inside a running task")
    return ctx


def _set_context(ctx: TaskContext | None) -> contextvars.Token[TaskContext | None]:
    return _CONTEXT.set(ctx)


def _reset_context(token: contextvars.Token[TaskContext | None]) -> None:
    _CONTEXT.reset(token)


__all__ = [
    "Backoff",
    "Skip",
    "Task",
    "TaskContext",
    "TracedWorkflow",
    "Workflow",
    "context",
    "task",
    "workflow",
]
