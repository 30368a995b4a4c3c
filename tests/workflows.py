"""Small workflows the tests run through the real worker (imported by reference)."""

from __future__ import annotations

import os
import signal

# A task that starts processes, for the tests that check they end with their attempt.
import subprocess  # nosec B404
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ml_platform.sdk import Backoff, Skip, context, task, workflow

FAST_RETRY = Backoff(base=0.05, factor=2.0, max_delay=0.2, jitter=0.0)


@task
def double(x: float) -> float:
    return 2 * x


@task
def echo(value: object) -> str:
    return str(value)


@task
def total(values: Sequence[float]) -> float:
    context().log_metric("count", len(values))
    return sum(values)


@task(cache=True)
def square(x: int, counter: str) -> int:
    with Path(counter).open("a") as handle:
        handle.write("ran\n")
    return x * x


@task(retries=2, retry_backoff=FAST_RETRY)
def flaky(counter: str, fail_times: int) -> str:
    path = Path(counter)
    calls = len(path.read_text().splitlines()) if path.exists() else 0
    with path.open("a") as handle:
        handle.write("call\n")
    print(f"flaky call {calls + 1}")
    if calls < fail_times:
        raise ConnectionError(f"transient failure {calls + 1}")
    return "ok"


@task(retries=3, retry_on=(ConnectionError,), retry_backoff=FAST_RETRY)
def picky(message: str) -> None:
    raise ValueError(message)


@task
def explode(message: str) -> int:
    raise RuntimeError(message)


@task(timeout=1.0, retries=1, retry_backoff=FAST_RETRY)
def overrun(seconds: float) -> None:
    time.sleep(seconds)


@task(retries=1, retry_backoff=FAST_RETRY)
def long_step(marker: str, seconds: float) -> str:
    with Path(marker).open("a") as handle:
        handle.write("started\n")
    time.sleep(seconds)
    with Path(marker).open("a") as handle:
        handle.write("finished\n")
    return "done"


@task
def maybe_skip(value: float, threshold: float) -> float:
    if value < threshold:
        raise Skip(f"{value} is below {threshold}")
    return value


@task
def big(n: int) -> list[int]:
    ctx = context()
    ctx.log_param("n", n)
    ctx.save_artifact("numbers", list(range(10)))
    return list(range(n))


@task
def length(values: list[int]) -> int:
    return len(values)


@task(cache=True)
def cached_numbers() -> int:
    ctx = context()
    ctx.log_metric("items", 10)
    ctx.log_param("source", "range")
    ctx.save_artifact("numbers", list(range(10)))
    return 10


@task
def nap(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x


@workflow
def naps(n: int = 8, seconds: float = 0.5) -> None:
    """Fan out over tasks that take a moment, so that several workers take part."""
    total([nap(i, seconds) for i in range(n)])


@workflow
def mixed_lengths(n: int = 48, every: int = 8, seconds: float = 0.03) -> None:
    """Short tasks with a brief nap every ``every``: a batch's outcomes of unlike lengths."""
    for i in range(n):
        if i % every == every - 1:
            nap(i, seconds)
        else:
            double(i)


@task
def stamped_nap(x: int, seconds: float, path: str) -> int:
    """Sleep, then note when this task ended (wall clock)."""
    time.sleep(seconds)
    with open(path, "a") as stamps:
        stamps.write(f"{x} {time.time()}\n")
    return x


@workflow
def stamped_naps(path: str, n: int = 8, seconds: float = 0.1) -> None:
    """Brief tasks that say when they ended: claims made ahead show against those times."""
    total([stamped_nap(i, seconds, path) for i in range(n)])


@workflow
def arithmetic(n: int = 3) -> None:
    """Fan out over range(n), fan in to a total."""
    total([double(i) for i in range(n)])


@workflow
def cached_squares(counter: str, n: int = 2) -> None:
    total([square(i, counter) for i in range(n)])


@workflow
def flaky_pipeline(counter: str, fail_times: int = 2) -> None:
    flaky(counter, fail_times)


@workflow
def picky_pipeline() -> None:
    picky("not a connection problem")


@workflow
def failing_with(message: str = "boom") -> None:
    explode(message)


@workflow
def failing_pipeline() -> None:
    """One branch fails; the other still runs; the failed branch's downstream never does."""
    echo(explode("boom"))
    double(21)


@workflow
def overrun_pipeline(seconds: float = 30.0) -> None:
    overrun(seconds)


@workflow
def long_pipeline(marker: str, seconds: float = 60.0) -> None:
    echo(long_step(marker, seconds))


@workflow
def skip_pipeline(value: float = 0.5, threshold: float = 0.8) -> None:
    double(maybe_skip(value, threshold))


@workflow
def cached_big() -> None:
    cached_numbers()


@workflow
def big_pipeline(n: int = 50_000) -> None:
    length(big(n))


@task
def fit(seed: int) -> int:
    context().save_artifact("model", {"seed": seed, "weights": list(range(seed * 1000))})
    return seed


@workflow
def two_models() -> None:
    """Two tasks that each save an artifact named "model", with different bytes."""
    fit(1)
    fit(2)


not_a_workflow = double


@task(pool="tests-pool")
def pooled(x: int) -> int:
    return x


@workflow
def pooled_pipeline() -> None:
    pooled(1)


@workflow
def pooled_after_a_step(x: int = 1) -> None:
    """A pooled task that becomes ready when its upstream finishes."""
    pooled(nap(x, 0.0))


@workflow
def every_column(note: str = "tab\there, nul\u0000 there") -> None:
    """Every kind of thing a submission stores: two roots, one with a timeout and retries, and
    tasks downstream of them, one in a pool (tests/integration/test_service.py)."""
    echo(note)
    overrun(0.0)
    total([double(1.0), pooled(length(big(1)))])


@workflow
def spread(n: int = 4) -> None:
    """One task, then n tasks that read it (each its only upstream), then their total."""
    first = double(1)
    total([double(first) for _ in range(n)])


@workflow
def relay(n: int = 5) -> None:
    """A chain of n short steps."""
    value = double(1)
    for _ in range(n - 1):
        value = double(value)


@task(retries=1, retry_backoff=FAST_RETRY)
def slow_first_attempt(marker: str, seconds: float) -> int:
    """Sleeps on its first attempt only, so a retry after a crash ends quickly."""
    attempt = context().attempt
    print(f"attempt {attempt} began", flush=True)
    with Path(marker).open("a") as handle:
        handle.write(f"started {attempt}\n")
    if attempt == 1:
        time.sleep(seconds)
    with Path(marker).open("a") as handle:
        handle.write(f"finished {attempt}\n")
    return attempt


@workflow
def crash_pipeline(marker: str, seconds: float = 60.0) -> None:
    slow_first_attempt(marker, seconds)


@task
def process_id(previous: int | None = None) -> int:
    return os.getpid()


@task(retries=1, retry_backoff=FAST_RETRY)
def slow_first_attempt_after(previous: int, marker: str, seconds: float) -> int:
    """slow_first_attempt, downstream of a task."""
    return slow_first_attempt.fn(marker, seconds)


@workflow
def short_steps_then_a_crash(marker: str, seconds: float = 60.0) -> None:
    """Two short steps, then one that sleeps on its first attempt: once the task process is
    warm, the short step's finish claims the slow one for its worker (finish and continue)."""
    slow_first_attempt_after(process_id(process_id()), marker, seconds)


@task
def flush_on_sigterm(path: str, deaf: bool) -> int:
    """Registers a SIGTERM handler in its task process, as an experiment tracker does to flush
    (or, ``deaf``, ignores SIGTERM)."""

    def flush(number: int, frame: object) -> None:
        Path(path).write_text(f"flushed by {os.getpid()}")
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, signal.SIG_IGN if deaf else flush)
    return os.getpid()


@workflow
def flushing(path: str, deaf: bool = False) -> None:
    flush_on_sigterm(path, deaf)


@workflow
def three_steps() -> None:
    process_id(process_id(process_id()))


@workflow
def echo_pipeline(value: str = "hello") -> None:
    echo(value)


@task
def spawner(pids: str, seconds: float, leave: bool = False) -> str:
    """Starts a child that starts a grandchild and notes all their pids (one per line).

    With ``leave`` it returns at once and leaves both running; else it waits ``seconds``.
    """
    with Path(pids).open("a") as handle:
        handle.write(f"{os.getpid()}\n")
    script = f'sleep {seconds} & echo $! >> "$0"; echo $$ >> "$0"; wait'
    subprocess.Popen(["sh", "-c", script, pids])  # nosec B603 B607 - a fixed test command
    deadline = time.monotonic() + 10
    while len(Path(pids).read_text().split()) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    if not leave:
        time.sleep(seconds)
    return "left" if leave else "waited"


@task(timeout=1.0)
def spawner_with_timeout(pids: str, seconds: float) -> str:
    return str(spawner.fn(pids, seconds))


@workflow
def spawning(pids: str, seconds: float = 300.0, leave: bool = False) -> None:
    spawner(pids, seconds, leave)


@workflow
def spawning_past_timeout(pids: str, seconds: float = 300.0) -> None:
    spawner_with_timeout(pids, seconds)


@task(timeout=0.5)
def printing_past_timeout() -> None:
    """Prints a NUL (PostgreSQL's text holds none), then runs past its timeout."""
    print("before\x00after", flush=True)
    time.sleep(60)


@workflow
def printed_then_timed_out() -> None:
    printing_past_timeout()


@workflow
def short_and_long(short: float = 1.0, long: float = 5.0) -> None:
    """Two independent naps: one ends within a drain, the other is handed back."""
    nap(1, short)
    nap(2, long)


@task
def chatty(seconds: float) -> str:
    """Says something, works a while, says more: its log is followed while it runs."""
    print("first line", flush=True)
    time.sleep(seconds)
    print("second line", flush=True)
    return "done"


@workflow
def chatty_pipeline(seconds: float = 3.0) -> None:
    chatty(seconds)


@task
def numbered(lines: int, seconds: float) -> int:
    """Prints ``lines`` numbered lines of 80 characters (and their ends) over ``seconds``:
    more than a log keeps, followed while it is written."""
    for i in range(lines):
        print(f"line {i:08d} " + "x" * 66, flush=i % 500 == 499)
        if i % 500 == 499:
            time.sleep(seconds * 500 / lines)
    return lines


@workflow
def numbered_lines(lines: int = 100, seconds: float = 1.0) -> None:
    numbered(lines, seconds)


@task
def step(previous: int, index: int, folder: str) -> int:
    """Leaves a mark per run of its body; the step named in `folder`/fail fails while it exists."""
    marks = Path(folder)
    (marks / f"step{index}-{os.getpid()}-{time.monotonic_ns()}").touch()
    if (marks / "fail").exists() and (marks / "fail").read_text().strip() == str(index):
        raise RuntimeError(f"step {index} was told to fail")
    return previous + index


@workflow
def five_steps(folder: str) -> None:
    value = step(0, 1, folder)
    for index in range(2, 6):
        value = step(value, index, folder)


# -- dynamic fan-out: task.map over what a task computed ----------------------------------


@task
def shards(n: int) -> list[int]:
    return list(range(n))


@task(cache=True, retries=1, retry_backoff=FAST_RETRY)
def shard_work(item: int, folder: str, fail: int = -1, fail_times: int = 1) -> int:
    """Leaves a mark per run of its body; element `fail` fails its first `fail_times` runs."""
    marks = Path(folder)
    (marks / f"shard{item}-{os.getpid()}-{time.monotonic_ns()}").touch()
    if item == fail and len(list(marks.glob(f"shard{item}-*"))) <= fail_times:
        raise RuntimeError(f"element {item} was told to fail")
    if item < 0:
        raise Skip(f"no work for {item}")
    return item * 10


@task
def gather(values: Sequence[int | None]) -> dict[str, int]:
    return {"count": len(values), "sum": sum(v for v in values if v is not None)}


@workflow
def mapped(
    n: int, folder: str, fail: int = -1, fail_times: int = 1, limit: int | None = None
) -> None:
    gather(
        shard_work.map(
            shards(n), folder=folder, fail=fail, fail_times=fail_times, max_concurrency=limit
        )
    )


@workflow
def mapped_literal(folder: str) -> None:
    gather(shard_work.map([2, -1, double(2)], folder=folder))


@workflow
def mapped_over_a_number(folder: str) -> None:
    gather(shard_work.map(double(2), folder=folder))


@workflow
def mapped_naps(n: int = 8, seconds: float = 0.3) -> None:
    total(nap.map(shards(n), seconds=seconds))


@workflow
def into_a_pool() -> None:
    """A default-queue task whose downstream runs in the pool "tests-pool"."""
    pooled(process_id())


@task
def learning_curve(steps: int) -> int:
    """Logs a point per training step, as a training loop does, and one final score."""
    ctx = context()
    for i in range(steps):
        ctx.log_metric("loss", 1.0 / (i + 1), step=i)
    ctx.log_metric("accuracy", 0.75)
    return steps


@workflow
def curve(steps: int = 3) -> None:
    learning_curve(steps)


@task
def wanders(folder: str) -> dict[str, Any]:
    """Changes what a process has: its directory (then removes it), environment, sys.path."""
    os.makedirs(folder)
    os.chdir(folder)
    os.rmdir(folder)
    os.environ["CUDA_VISIBLE_DEVICES"] = "7"
    sys.path.insert(0, folder)
    return {"pid": os.getpid(), "folder": folder}


@task
def looks_around(before: dict[str, Any]) -> dict[str, Any]:
    """What the next attempt in the same process finds."""
    return {
        "same process": os.getpid() == before["pid"],
        "cwd": os.getcwd(),
        "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "path": before["folder"] in sys.path,
    }


@workflow
def wander_then_look(folder: str) -> None:
    looks_around(wanders(folder))


@task(cache=True, retries=1, retry_backoff=FAST_RETRY)
def curve_then_retry(counter: str) -> int:
    """Logs a few loss points per attempt; the first attempt then fails."""
    path = Path(counter)
    calls = len(path.read_text().splitlines()) if path.exists() else 0
    with path.open("a") as handle:
        handle.write("call\n")
    for step in range(3):
        context().log_metric("loss", (calls + 1) * 10 + step, step=step)
    if calls == 0:
        raise RuntimeError("first attempt fails after logging")
    return calls


@workflow
def curve_retried(counter: str) -> None:
    curve_then_retry(counter)


@task
def hostile_output() -> None:
    """Prints a colour, then what a terminal would obey: write the clipboard (OSC 52) and
    clear the screen."""
    print("\x1b[31mred\x1b[0m then \x1b]52;c;cm0gLXJmIH4=\x07 and \x1b[2J")


@workflow
def hostile() -> None:
    hostile_output()


@task(cache=True)
def recorded(x: int) -> int:
    """A row of every kind a task makes: its output, a param, metric points, an artifact."""
    print(f"recording {x}")
    ctx = context()
    ctx.log_param("x", x)
    for step in range(3):
        ctx.log_metric("loss", 1.0 / (x + step + 1), step=step)
    ctx.save_artifact("model", {"x": x})
    return x


@workflow
def recorded_fan(n: int = 4) -> None:
    total([recorded(x) for x in range(n)])
