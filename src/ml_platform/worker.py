"""The worker: claims attempts, runs each in a child process, heartbeats, commits with fencing."""

from __future__ import annotations

import argparse
import codecs
import gc
import json
import os
import select
import shutil
import signal
import socket

# Runs this package's own task runner with a fixed argv, never a shell.
import subprocess  # nosec B404
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
from sqlalchemy.exc import DBAPIError

from ml_platform.config import load_settings
from ml_platform.dispatch import (
    DEFAULT_QUEUE,
    Delivery,
    Dispatch,
    Dispatcher,
    InProcessDispatcher,
    RedisDispatcher,
    queue_of,
)
from ml_platform.engine.states import RUN_TERMINAL, AttemptState, RunState
from ml_platform.errors import SettingsError
from ml_platform.sdk import WorkflowError
from ml_platform.service import (
    ClaimedAttempt,
    FencedOut,
    LogPiece,
    NotFound,
    Outcome,
    Platform,
    timeout_outcome,
)
from ml_platform.store.db import DatabaseUnavailable

#: An attempt's log keeps the last this many characters of its output (the earlier ones are
#: counted, not kept: offsets into a log count from the start of the whole output).
MAX_LOG_CHARS = 1024 * 1024
#: A cut moves forward to the next line's start when one begins within this many characters.
LOG_CUT_LINE_CHARS = 4096
#: Scheduler passes between two full advances of every active run (see Platform.schedule).
ADVANCE_EVERY_POLLS = 4
#: Errors of a service that is away for a while (restart, network): retried, not fatal.
TRANSIENT_ERRORS = (DBAPIError, redis.RedisError)
#: Attempts that ran briefer than this (seconds): the worker claims the next ones ahead, while
#: they run, for the slots they will free (see Worker._finish_and_reserve).
BRIEF_SECONDS = 1.0
#: A claim made ahead that waited longer than this for a slot is handed back (seconds; at most
#: half MLP_TIMEOUT_GRACE_SECONDS, so that the reaper never counts its wait as run time).
RESERVED_WAIT_SECONDS = 2.0
#: A worker's attempt logs: in ``<tmp>/mlp-logs-<host>-<pid namespace>-<pid>-<random>``
#: (see log_dir_prefix).
LOG_DIR_PREFIX = "mlp-logs-"
#: Short attempts (briefer than a commit) are claimed ahead and committed in batches: as many
#: per slot as run in BATCH_HOLD_SECONDS (counting PER_TASK_SECONDS of the worker's own work
#: each), at most MAX_BATCH; an outcome waits at most BATCH_HOLD_SECONDS for its batch.
MAX_BATCH = 16
BATCH_HOLD_SECONDS = 0.01
PER_TASK_SECONDS = 0.0005
#: Attempts started on claims made ahead are checked for a cancel of their run at most this
#: often (seconds): one read for many short ones (which end before a stop could matter), not
#: one per task; one that started since the last look and still runs is stopped at the next.
CANCEL_LOOK_SECONDS = 0.1
#: After the dispatcher had nothing for a commit that claims, the next such commits within this
#: many seconds do not ask it again (a chain's steps continue on the worker itself: asking
#: before each was a Redis round trip for nothing); idle workers are asked at once meanwhile.
QUIET_SECONDS = 0.02
#: While attempts run and a slot is free, the worker looks for new work this soon after
#: anything happened, then twice as late after each look that found nothing, up to a fifth of
#: its poll: a long task beside a free slot costs a few looks a second, not two hundred.
LOOK_AGAIN_SECONDS = 0.005


def make_dispatcher(
    platform: Platform, consumer: str, queues: Sequence[str] = (DEFAULT_QUEUE,)
) -> Dispatcher:
    """Redis Streams when ``REDIS_URL`` is set, else the in-process dispatcher."""
    settings = platform.settings
    if not settings.redis_url:
        return InProcessDispatcher()
    return RedisDispatcher(
        redis.Redis.from_url(settings.redis_url, socket_timeout=10, health_check_interval=30),
        consumer=consumer,
        prefix=settings.redis_prefix,
        queues=queues,
        claim_idle_seconds=settings.lease_seconds,
        max_deliveries=settings.max_deliveries,
        republish_seconds=settings.lease_seconds * 2,
        on_dead_letter=platform.dead_letter,
    )


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def reap_orphans(own: set[int]) -> int:
    """Reap exited children that are not our own task processes; return how many.

    Run as a container's PID 1, the worker inherits every orphan of its task processes -- their
    wardens, and what a warden killed -- and must reap them or they stay zombies. Our own task
    processes are left to their ``Popen``, which needs their exit status.
    """
    reaped = 0
    while True:
        try:
            exited = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return reaped
        if exited is None or exited.si_pid in own:
            return reaped  # none, or ours: reaped by its Popen, the rest on a later pass
        os.waitpid(exited.si_pid, 0)
        reaped += 1


class _Runner:
    """A warm task process (``ml_platform.task_runner``) that runs attempts one at a time."""

    def __init__(self, first_log: Path) -> None:
        env = dict(os.environ)
        # Workflow modules are imported by reference, as the submitting process found them.
        env["PYTHONPATH"] = os.pathsep.join(p for p in [os.getcwd(), *sys.path] if p)
        read_end, write_end = os.pipe()
        try:
            with first_log.open("ab") as log:
                # Fixed argv: our own interpreter and module; no shell, no user input.
                self.process = subprocess.Popen(  # nosec B603
                    [
                        sys.executable,
                        "-m",
                        "ml_platform.task_runner",
                        str(write_end),
                        # Given, not read by the child: it may start after the worker died.
                        str(os.getpid()),
                    ],
                    stdin=subprocess.PIPE,
                    # Until the first request, output (e.g. an import error) goes to its log.
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    pass_fds=(write_end,),
                    # Own session and process group (whose id is the pid): a Ctrl-C at the
                    # terminal reaches the worker, which decides, and the attempt's processes
                    # can be ended together.
                    start_new_session=True,
                )
        finally:
            os.close(write_end)
        os.set_blocking(read_end, False)
        self.replies = read_end
        self.ran = 0
        self.closed = False
        self.stop_deadline: float | None = None
        self._buffer = b""

    def send(self, request: dict[str, Any]) -> None:
        assert self.process.stdin is not None  # nosec B101 - opened with stdin=PIPE
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()
        self.ran += 1

    def revoke(self, attempt_id: int) -> None:
        """Take back the request sent behind the running one (the answer says if it was in time)."""
        assert self.process.stdin is not None  # nosec B101 - opened with stdin=PIPE
        try:
            self.process.stdin.write(json.dumps({"revoke": attempt_id}).encode() + b"\n")
            self.process.stdin.flush()
        except (OSError, ValueError):  # its pipe broke, or was closed with it
            pass  # the process is gone: it began nothing more (see Worker._collect)

    def has_reply(self) -> bool:
        """Whether a whole reply has been read already (so waiting on the pipe would stall)."""
        return b"\n" in self._buffer

    def reply(self) -> dict[str, Any] | None:
        """The reply to the current request if it has arrived, else None (never blocks)."""
        while b"\n" not in self._buffer:
            try:
                chunk = os.read(self.replies, 1 << 16)
            except BlockingIOError:
                return None
            if not chunk:  # the process is gone
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def dead(self) -> bool:
        return self.process.poll() is not None

    def signal_group(self, number: signal.Signals) -> None:
        """Send ``number`` to the task process and everything it started (its process group)."""
        if self.process.returncode is not None:
            return  # reaped: its warden has ended the group, and the id may be reused
        try:
            os.killpg(self.process.pid, number)
        except ProcessLookupError:
            pass

    def stop(self, grace: float) -> None:
        """Ask the attempt's processes to end (SIGTERM); ``stopped`` kills them after ``grace``."""
        if self.stop_deadline is None:
            self.signal_group(signal.SIGTERM)
            self.stop_deadline = time.monotonic() + grace

    def stopped(self) -> bool:
        """Whether a stop has ended: the process is gone, or its grace is over and it was killed."""
        assert self.stop_deadline is not None  # nosec B101 - called for stopping runners only
        if self.process.poll() is None and time.monotonic() < self.stop_deadline:
            return False
        self.close()
        return True

    def close(self) -> None:
        """Kill the process group if it still runs and release the pipes (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self.signal_group(signal.SIGKILL)
        self.process.wait()
        if self.process.stdin is not None:
            try:
                self.process.stdin.close()
            except BrokenPipeError:
                pass
        os.close(self.replies)


class LogTail:
    """The end of an attempt's log file as text, read as it grows: each read decodes only
    what was written since the last (a character split between two reads is decoded whole),
    keeps the last MAX_LOG_CHARS characters and counts those it let go in ``start``. A
    burst larger than that between two reads is skipped unread (counted as characters)."""

    __slots__ = ("_decoder", "_read", "start", "text")

    def __init__(self) -> None:
        self.text = ""
        self.start = 0
        self._read = 0
        self._decoder: codecs.IncrementalDecoder | None = None

    def read(self, path: Path, final: bool = False) -> str:
        try:
            with path.open("rb") as handle:
                size = handle.seek(0, os.SEEK_END)
                if size - self._read > 4 * MAX_LOG_CHARS:  # at most 4 bytes a character
                    skipped = size - self._read - 4 * MAX_LOG_CHARS
                    self.start += len(self.text) + skipped
                    self.text, self._read, self._decoder = "", self._read + skipped, None
                handle.seek(self._read)
                data = handle.read(max(0, size - self._read))  # (cut shorter: nothing new)
        except FileNotFoundError:
            data = b""
        if not data and (not final or self._decoder is None):
            return self.text
        if self._decoder is None:
            self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._read += len(data)
        # PostgreSQL's text holds no NUL: as storable_text does, one character for one.
        text = self.text + self._decoder.decode(data, final=final).replace("\x00", "\ufffd")
        if len(text) > MAX_LOG_CHARS:
            cut = len(text) - MAX_LOG_CHARS
            line = text.find("\n", cut, cut + LOG_CUT_LINE_CHARS)
            cut = cut if line < 0 else line + 1
            self.start += cut
            text = text[cut:]
        self.text = text
        return text


@dataclass
class _Reserved:
    """An attempt claimed ahead (committed: leased to this worker), waiting for a slot; or
    sent ahead to a busy task process (``runner``), which begins it as soon as it has answered
    for the running one, without waiting for the worker."""

    claimed: ClaimedAttempt
    delivery: Delivery
    since: float
    runner: _Runner | None = None
    request: dict[str, Any] = field(default_factory=dict)
    log_path: Path = Path()
    #: Sent ahead, then taken back: ended in the database already, its process told to skip
    #: it (if it began meanwhile, its outcome is fenced out).
    revoking: bool = False


@dataclass
class _Child:
    """An attempt running in one of the worker's task processes."""

    claimed: ClaimedAttempt
    delivery: Delivery
    request: dict[str, Any]
    runner: _Runner
    log_path: Path
    started: float
    deadline: float | None
    outcome: Outcome | None = None
    #: How long the task itself ran, as its process measured it (None: it did not say).
    ran_seconds: float | None = None
    #: When its outcome was collected (monotonic): a short one waits for its batch.
    ended_at: float = 0.0
    #: Size of the log file when it was last shipped to the database (live logs), and how
    #: much of its output (characters) has been shipped.
    shipped: int = 0
    shipped_to: int = 0
    log: LogTail = field(default_factory=LogTail)

    def read_log(self) -> str:
        """What the attempt printed so far: the last MAX_LOG_CHARS characters (``log.start``
        says how many came before)."""
        return self.log.read(self.log_path)

    def ended_log(self) -> dict[str, Any]:
        """The log of an attempt whose process has ended or was stopped, for its Outcome."""
        return {"log": self.log.read(self.log_path, final=True), "log_start": self.log.start}

    def cleanup(self) -> None:
        self.log_path.unlink(missing_ok=True)


class Worker:
    """Runs up to ``concurrency`` attempts at once, each in its own process."""

    def __init__(
        self,
        platform: Platform,
        dispatcher: Dispatcher,
        *,
        concurrency: int = 2,
        worker_id: str | None = None,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.platform = platform
        self.dispatcher = dispatcher
        self.concurrency = concurrency
        self.worker_id = worker_id or new_worker_id()
        self.children: dict[int, _Child] = {}
        self.idle: list[_Runner] = []
        #: Processes of ended attempts (timeout, cancel, lost lease) given their grace to stop.
        self.stopping: list[_Runner] = []
        #: Attempts whose outcome is known and not yet committed (see step()).
        self.ended: list[_Child] = []
        #: Attempts claimed ahead for the slots brief attempts will free (see step()).
        self.reserved: list[_Reserved] = []
        self.draining = False
        self._last_beat = 0.0
        #: How long committing an outcome takes here (moving average, seconds).
        self._commit_seconds = 0.005
        self._last_ship = 0.0
        #: Attempts started on claims ahead whose run was not looked at for a cancel since.
        self._unlooked: list[int] = []
        self._last_look = 0.0
        #: When the dispatcher last had nothing for a commit that claims (monotonic).
        self._quiet_since = -QUIET_SECONDS
        #: Where the attempts' logs are written (see _request).
        self._logs: Path | None = None
        self.on_event = on_event or (lambda _message: None)

    # One pass of the loop: finish what ended, enforce deadlines and leases, take new work.
    def step(self, block_seconds: float = 0.0) -> bool:
        """Do one pass; return True if anything happened (the caller may loop again at once).

        ``block_seconds`` lets a blocking dispatcher wait that long for new work.
        """
        busy = self._collect()
        busy |= self._enforce_timeouts()
        self._progress_stops()
        if os.getpid() == 1:  # a container's init: the kernel hands us every orphan
            reap_orphans(self._runner_pids())
        if time.monotonic() - self._last_beat >= self.platform.settings.heartbeat_seconds:
            self._beat()
        if time.monotonic() - self._last_ship >= self.platform.settings.log_ship_seconds:
            self._ship_logs()
            self._stop_cancelled()
        # What was claimed ahead starts at once: no database or Redis trip between two tasks.
        busy |= self._start_reserved()
        if self._holding():
            # Short outcomes wait (briefly) for the rest of their batch: one commit for all.
            return busy
        if self.ended and self.accepting and self._short(self.ended):
            # Short tasks: their commits are most of the time, so finish them and claim new
            # work in one transaction.
            busy |= self._finish_and_take()
        elif self.accepting:
            # New work first: the freed processes start on it while the outcomes just
            # collected are committed, instead of waiting for those commits.
            busy |= self._take_work(block_seconds if not self.ended else 0.0)
        if self.ended and self._brief(self.ended):
            # Brief tasks: commit their outcomes with claims for the slots the running ones
            # will free soon, while those run.
            busy |= self._finish_and_reserve()
        self._commit_ended()
        return busy

    def _brief(self, ended: list[_Child]) -> bool:
        """Whether these attempts ran briefly enough that the next ones (of the same kind,
        likely) are worth claiming ahead: then a slot's next task starts without waiting for
        a claim's round trips, and the claim shares the outcomes' transaction."""
        return self._reserved_wait() > BRIEF_SECONDS and all(
            child.ran_seconds is not None and child.ran_seconds < BRIEF_SECONDS for child in ended
        )

    def _batch(self, ended: list[_Child]) -> int:
        """How many attempts a slot claims ahead, and how many outcomes share a commit: one,
        unless these ran shorter than a commit; then as many as would run in
        BATCH_HOLD_SECONDS (judged by these: the next ones are likely of the same kind)."""
        if not ended or not self._short(ended):
            return 1
        each = max(child.ran_seconds or 0.0 for child in ended) + PER_TASK_SECONDS
        return max(1, min(MAX_BATCH, int(BATCH_HOLD_SECONDS / each)))

    def _holding(self) -> bool:
        """Whether the outcomes collected wait for more of their batch: short ones, while
        attempts claimed ahead with them are still to run, until the batch is full or its
        first outcome has waited BATCH_HOLD_SECONDS."""
        ended = self.ended
        return (
            bool(ended and self.reserved)
            and not self.draining
            and len(ended) < self._batch(ended)
            and time.monotonic() - ended[0].ended_at < BATCH_HOLD_SECONDS
        )

    def _reserved_wait(self) -> float:
        return min(RESERVED_WAIT_SECONDS, self.platform.settings.timeout_grace_seconds / 2)

    def _finish_and_reserve(self) -> bool:
        """Commit the collected outcomes and, in the same transaction, claim attempts ahead
        for the busy slots (one each, or a batch of short ones). Nothing when draining: claims
        ahead are for work this worker will still do."""
        if self.draining:
            return False
        # The outcomes share one transaction even when no claim is wanted (enough ahead).
        want = max(0, self._batch(self.ended) * len(self.children) - len(self.reserved))
        now = time.monotonic()
        for claimed, delivery in self._finish_and_claim(want):
            self.reserved.append(_Reserved(claimed, delivery, now))
        return True

    def _start_reserved(self) -> bool:
        """Start claims made ahead in the free slots; hand back those that waited too long
        (a task turned out long: another worker may be idle) or that a drain will not run."""
        now = time.monotonic()
        for reserved in list(self.reserved):
            if self.draining or now - reserved.since > self._reserved_wait():
                reason = "draining" if self.draining else "waited too long for a slot"
                self._take_back(reserved, _handed_back(reason))
        started = []
        while self.accepting and (waiting := self._unsent()):
            reserved = waiting[0]
            self.reserved.remove(reserved)
            self._spawn(reserved.claimed, reserved.delivery)
            started.append(reserved.claimed.attempt_id)
        if not self.draining:
            self._send_ahead()
        # A run cancelled since the claim (which a claim made now would have refused): its
        # attempt is stopped at once. Asked after the start, while the task runs, not before:
        # a read on the way between two tasks cost 10 ms tasks more than a third of the gain.
        # Short ones start many times in CANCEL_LOOK_SECONDS: one read looks at those of them
        # still running (a stop could not catch the others anyway).
        self._unlooked += started
        if self._unlooked and now - self._last_look >= CANCEL_LOOK_SECONDS:
            running = [a for a in self._unlooked if a in self.children]
            self._unlooked.clear()
            if running:
                self._last_look = now
                for attempt_id in self.platform.cancelled_among(running):
                    self.stop(attempt_id, "run cancelled")
        return bool(started)

    def _unsent(self) -> list[_Reserved]:
        return [reserved for reserved in self.reserved if reserved.runner is None]

    def _send_ahead(self) -> None:
        """Send a claim made ahead to each busy task process that has none waiting: it begins
        the moment the running attempt is answered, not after the worker's next pass (which may
        be in a commit or a scheduler pass then)."""
        limit = self.platform.settings.max_tasks_per_process
        for child in list(self.children.values()):
            runner = child.runner
            if runner.stop_deadline is not None or self._sent_to(runner) is not None:
                continue
            if limit and runner.ran >= limit:
                continue  # it ends after this attempt
            waiting = self._unsent()
            # A claim sent to a process waits for that process, which may turn out long: with
            # several slots, enough stay unsent for any slot that frees first.
            if not waiting or (self.concurrency > 1 and len(waiting) <= len(self.children)):
                return
            reserved = waiting[0]
            reserved.request, reserved.log_path = self._request(reserved.claimed)
            try:
                runner.send(reserved.request)
            except OSError:  # the process died: the next pass collects its attempt
                reserved.log_path.unlink(missing_ok=True)
                continue
            reserved.runner = runner

    def _sent_to(self, runner: _Runner) -> _Reserved | None:
        return next((r for r in self.reserved if r.runner is runner), None)

    def _take_back(self, reserved: _Reserved, outcome: Outcome | None) -> None:
        """End a claim made ahead unrun with ``outcome`` (None: only acknowledge it, its lease
        was lost)."""
        if reserved.revoking:
            return
        if reserved.runner is None:
            if outcome is None:
                self.reserved.remove(reserved)
                self.dispatcher.ack(reserved.delivery)
            else:
                self._end_reserved(reserved, outcome)
            return
        # Sent ahead: its process reads a revoke only once the task before has ended, which
        # may be long. The claim ends now (another worker may take its retry at once), and
        # the process is told to skip it; had it begun meanwhile, its outcome is fenced out.
        if outcome is not None:
            try:
                queued = self.platform.finish(reserved.claimed, self.worker_id, outcome)
            except FencedOut:
                queued = []
            self.dispatcher.publish(queued)
        self.dispatcher.ack(reserved.delivery)
        reserved.revoking = True
        reserved.runner.revoke(reserved.claimed.attempt_id)

    def _never_began(self, runner: _Runner) -> None:
        """The process ``runner`` ended (or is being stopped) before it answered for its running
        attempt: what was sent ahead to it never began. It waits for a slot again (or ends, if
        it was being taken back)."""
        reserved = self._sent_to(runner)
        if reserved is None:
            return
        reserved.log_path.unlink(missing_ok=True)
        reserved.runner = None
        if reserved.revoking:  # ended already
            self.reserved.remove(reserved)

    def _begin_sent(self, reserved: _Reserved) -> None:
        """The process it was sent to has answered for the attempt before: it runs now."""
        assert reserved.runner is not None  # nosec B101 - only sent claims begin so
        self.reserved.remove(reserved)
        claimed = reserved.claimed
        timeout = claimed.options.get("timeout")
        now = time.monotonic()
        self.children[claimed.attempt_id] = _Child(
            claimed,
            reserved.delivery,
            reserved.request,
            reserved.runner,
            reserved.log_path,
            now,
            now + timeout if timeout else None,
        )
        if not reserved.revoking:
            self._unlooked.append(claimed.attempt_id)
            self.on_event(f"started {claimed.node_id} (attempt {claimed.number})")

    def _end_reserved(self, reserved: _Reserved, outcome: Outcome) -> None:
        """End an attempt claimed ahead that never started (handed back or cancelled). If the
        database is away, it stays claimed ahead: the next pass tries again."""
        if reserved.revoking:  # ended already
            reserved.log_path.unlink(missing_ok=True)
            self.reserved.remove(reserved)
            return
        try:
            queued = self.platform.finish(reserved.claimed, self.worker_id, outcome)
        except FencedOut:
            queued = []  # its lease was lost meanwhile: the reaper retries it
        if reserved.runner is not None:  # sent ahead: its process is being stopped
            reserved.log_path.unlink(missing_ok=True)
        self.reserved.remove(reserved)
        self.dispatcher.publish(queued)
        self.dispatcher.ack(reserved.delivery)

    def _short(self, ended: list[_Child]) -> bool:
        """Whether these attempts ran for less than a commit takes here: then the next ones
        (of the same kind, likely) would hide no commit behind their run, and one shared
        transaction for outcomes and claims saves one."""
        return all(
            child.ran_seconds is not None and child.ran_seconds < self._commit_seconds
            for child in ended
        )

    def _finish_and_take(self) -> bool:
        """Commit the collected outcomes and claim new work for the free slots in the same
        transaction, then start it."""
        free = self.concurrency - len(self.children)
        claims = self._finish_and_claim(free * self._batch(self.ended))
        now = time.monotonic()
        for claimed, delivery in claims[:free]:
            self._spawn(claimed, delivery)
        self.reserved += [_Reserved(claimed, delivery, now) for claimed, delivery in claims[free:]]
        return True

    def _finish_and_claim(self, slots: int) -> list[tuple[ClaimedAttempt, Delivery]]:
        """Commit the collected outcomes and, in the same transaction, claim work for up to
        ``slots`` slots: the deliveries waiting, then what those outcomes made ready (finish
        and continue: never published, so a delivery without a message). The claims that held,
        with their deliveries; the others are acknowledged (taken, finished or cancelled)."""
        now = time.monotonic()
        deliveries = []
        if slots and now - self._quiet_since >= QUIET_SECONDS:
            deliveries = self.dispatcher.receive(slots, 0.0)
            if not deliveries:
                self._quiet_since = now
        ended = list(self.ended)
        began = time.monotonic()
        queued, claims = self.platform.finish_and_claim(
            [(child.claimed, child.outcome) for child in ended if child.outcome is not None],
            [delivery.attempt_id for delivery in deliveries],
            self.worker_id,
            take=slots - len(deliveries),
            serves=self.dispatcher.serves,
        )
        self._timed_commit(time.monotonic() - began)
        for child, made in zip(ended, queued, strict=True):
            self._finished(child, made)
        self.ended.clear()
        held = []
        stale = []
        for delivery, claimed in zip(deliveries, claims, strict=False):
            if claimed is None:
                stale.append(delivery)
            else:
                held.append((claimed, delivery))
        # One round trip acknowledges the whole batch.
        self.dispatcher.ack(*(child.delivery for child in ended), *stale)
        for continued in claims[len(deliveries) :]:
            assert continued is not None  # nosec B101 - only claims that held are returned
            queue = queue_of(continued.options.get("pool"))
            held.append((continued, Delivery(continued.attempt_id, queue)))
        return held

    @property
    def has_work(self) -> bool:
        """Whether attempts are running, claimed ahead, or have outcomes not yet committed."""
        return bool(self.children or self.ended or self.reserved)

    def _commit_ended(self) -> None:
        """Commit the collected outcomes; one the database refused stays for the next pass."""
        while self.ended:
            child = self.ended[0]
            assert child.outcome is not None  # nosec B101 - collected with its outcome
            self._finish(child, child.outcome)
            self.ended.pop(0)

    @property
    def accepting(self) -> bool:
        return not self.draining and len(self.children) < self.concurrency

    def _take_work(self, block_seconds: float = 0.0) -> bool:
        free = self.concurrency - len(self.children)
        started = False
        while free > 0:
            deliveries = self.dispatcher.receive(free, block_seconds)
            block_seconds = 0.0
            if not deliveries:
                break
            for delivery in deliveries:
                claimed = self.platform.claim(delivery.attempt_id, self.worker_id)
                if claimed is None:
                    # Already taken, finished or cancelled: the database says so, drop it.
                    self.dispatcher.ack(delivery)
                    continue
                self._spawn(claimed, delivery)
                free -= 1
                started = True
        return started

    def _request(self, claimed: ClaimedAttempt) -> tuple[dict[str, Any], Path]:
        """What a task process is sent to run ``claimed``, and the log file it writes."""
        settings = self.platform.settings
        # Named, not made: the task process creates it as it points its output there (one
        # file creation less on the worker's way between two tasks: mkstemp was an eighth of
        # a worker's busy time in a fan-out). The directory is the worker's own (mode 0700).
        name = str(self._log_dir() / f"attempt-{claimed.attempt_id}.log")
        request = {
            "attempt": claimed.attempt_id,
            "run_id": claimed.run_id,
            "node_id": claimed.node_id,
            "number": claimed.number,
            "task_ref": claimed.task_ref,
            "code_version": claimed.code_version,
            "inputs": claimed.inputs,
            "options": claimed.options,
            "artifacts_dir": str(settings.artifacts_dir),
            "inline_result_bytes": settings.inline_result_bytes,
            "log": name,
        }
        return request, Path(name)

    def _log_dir(self) -> Path:
        """The directory of this worker's attempt logs, made on first use -- and again if it
        went (a worker lives for days; a cleaner of /tmp may take an idle one's directory).
        Named by host, PID namespace and process, so that the next worker here removes it if
        this one is killed (SIGKILL, the out-of-memory killer) before its close() could."""
        if self._logs is None or not self._logs.is_dir():
            prefix = log_dir_prefix()
            self._logs = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))
            _remove_gone_workers_logs(self._logs.parent, prefix)
        return self._logs

    def _spawn(self, claimed: ClaimedAttempt, delivery: Delivery) -> None:
        request, log_path = self._request(claimed)
        runner = self.idle.pop() if self.idle else _Runner(log_path)
        try:
            runner.send(request)
        except OSError:  # the idle process died meanwhile: start a fresh one
            runner.close()
            runner = _Runner(log_path)
            runner.send(request)
        timeout = claimed.options.get("timeout")
        now = time.monotonic()
        self.children[claimed.attempt_id] = _Child(
            claimed, delivery, request, runner, log_path, now, now + timeout if timeout else None
        )
        self.on_event(f"started {claimed.node_id} (attempt {claimed.number})")

    def _collect(self) -> bool:
        """Collect the outcome of every attempt whose process replied or died.

        The attempt leaves ``children`` (its slot and its process are free at once) for
        ``ended``, where it waits for its commit. True if any was collected.
        """
        collected = False
        for child in list(self.children.values()):
            runner = child.runner
            reply = runner.reply()
            if reply is not None and reply.get("stale"):
                # The task's code changed since this process imported it: use a fresh one.
                # (What was sent ahead to the old one did not begin: it waits for a slot.)
                runner.close()
                self._never_began(runner)
                child.runner = _Runner(child.log_path)
                child.runner.send(child.request)
                continue
            if reply is None and not runner.dead():
                continue
            del self.children[child.claimed.attempt_id]
            collected = True
            # What was sent ahead to this process began the moment it answered.
            following = self._sent_to(runner) if reply is not None else None
            if following is not None:
                self._begin_sent(following)
            if reply is not None and reply.get("revoked"):
                child.cleanup()  # taken back in time: ended in the database already
            else:
                child.outcome = self._outcome(child, reply)
                child.ran_seconds = reply.get("seconds") if reply else None
                child.ended_at = time.monotonic()
                self.ended.append(child)
            if following is None:
                self._never_began(runner)  # it died, if anything was sent ahead to it
                self._release(child)
        return collected

    def _outcome(self, child: _Child, data: dict[str, Any] | None) -> Outcome:
        log = child.ended_log()
        if data is None:
            code = child.runner.process.wait()
            if code < 0:
                reason = f"killed by signal {signal.Signals(-code).name}"
            else:
                reason = f"exited with code {code} before reporting a result"
            return Outcome(AttemptState.FAILED, error=f"task process {reason}", **log)
        return Outcome(
            state=AttemptState(data["state"]),
            result=data.get("result"),
            error=data.get("error"),
            retryable=data.get("retryable", True),
            skipped=data.get("skipped", False),
            **log,
            metrics=data["metrics"],
            params=data["params"],
            artifacts=data["artifacts"],
        )

    def _release(self, child: _Child) -> None:
        """Keep the child's process for the next attempt, or end it."""
        runner = child.runner
        limit = self.platform.settings.max_tasks_per_process
        if runner.dead() or (limit and runner.ran >= limit) or self.draining:
            self._stop_process(runner)  # as a running one: the task's SIGTERM handler runs
        else:
            self.idle.append(runner)

    def wait_for_replies(self, seconds: float) -> None:
        """Sleep up to ``seconds``, waking as soon as a running attempt's process answers."""
        if any(c.runner.has_reply() for c in self.children.values()):
            return
        fds = [c.runner.replies for c in self.children.values()]
        if fds:
            select.select(fds, [], [], seconds)
        elif seconds > 0:
            time.sleep(seconds)

    def close(self) -> None:
        """End the idle task processes and wait for the stopping ones (at most their grace).

        Running attempts are stopped by their own paths (stop_all, hand_back).
        """
        while self.idle:
            self._stop_process(self.idle.pop())
        while self.stopping:
            self._progress_stops()
            if self.stopping:
                time.sleep(0.02)
        # The logs of ended attempts were read when they ended; none runs to write more.
        if self._logs is not None and not self.children:
            shutil.rmtree(self._logs, ignore_errors=True)
            self._logs = None

    def _runner_pids(self) -> set[int]:
        runners = [c.runner for c in self.children.values()] + self.idle + self.stopping
        return {runner.process.pid for runner in runners}

    def _stop_process(self, runner: _Runner) -> None:
        """End a task process (running an attempt, or idle) and all it started: SIGTERM now (the
        task's own handlers run: a tracker flushes), SIGKILL after the grace (not waited for).
        What was sent ahead to the process will not begin there: it waits for a slot again."""
        runner.stop(self.platform.settings.kill_grace_seconds)
        self.stopping.append(runner)
        self._never_began(runner)

    def _progress_stops(self) -> None:
        self.stopping = [runner for runner in self.stopping if not runner.stopped()]

    def _finish(self, child: _Child, outcome: Outcome) -> None:
        """Commit an outcome (the child's process is already released or killed)."""
        child.outcome = outcome
        began = time.monotonic()
        try:
            queued: list[Dispatch] | None = self.platform.finish(
                child.claimed, self.worker_id, outcome
            )
        except FencedOut:
            queued = None
        self._timed_commit(time.monotonic() - began)
        self._finished(child, queued)
        self.dispatcher.ack(child.delivery)

    def _timed_commit(self, seconds: float) -> None:
        self._commit_seconds = 0.8 * self._commit_seconds + 0.2 * seconds

    def _finished(self, child: _Child, queued: list[Dispatch] | None) -> None:
        """After an outcome's commit (None: fenced out, not committed): tell and clean up; the
        caller acknowledges the delivery."""
        outcome = child.outcome
        assert outcome is not None  # nosec B101 - set before any commit
        if queued is None:
            self.on_event(self._fenced_out(child.claimed, outcome))
        else:
            pool = child.claimed.options.get("pool")
            if pool:
                queued = [*queued, *self._admit_waiting(pool)]
            self.dispatcher.publish(queued)
            # A fan-out just queued: the planner is told how large the tables have grown.
            self.platform.db.refresh_statistics({"task_runs": len(queued), "attempts": len(queued)})
            verdict = "skipped" if outcome.skipped else outcome.state.value
            self.on_event(f"{verdict} {child.claimed.node_id} (attempt {child.claimed.number})")
        self.children.pop(child.claimed.attempt_id, None)
        child.cleanup()
        if child.shipped_to:  # its whole log is committed: the pieces shipped are not needed
            try:
                self.platform.sweep_log_parts()
            except (*TRANSIENT_ERRORS, DatabaseUnavailable):
                pass  # the next scheduler pass's sweep removes them

    def _admit_waiting(self, pool: str) -> list[Dispatch]:
        """The slot this attempt held in ``pool`` is free: another run's task waiting for it
        is admitted now (Planning.admit_waiting). If the database is away, the scheduler's
        full pass admits it later, as before."""
        try:
            return self.platform.admit_waiting(pool)
        except (*TRANSIENT_ERRORS, DatabaseUnavailable) as exc:
            self.on_event(f"pool {pool}: its waiting tasks wait for the next full pass ({exc})")
            return []

    def _fenced_out(self, claimed: ClaimedAttempt, outcome: Outcome) -> str:
        """What to say of an outcome refused because the attempt is no longer this worker's:
        another ended it (its lease ran out, a cancel, a hand-back) -- or this very outcome
        was committed and only the commit's answer was lost (the connection broke after it),
        in which case nothing was discarded."""
        try:
            ended = self.platform.attempt_end(claimed.attempt_id)
        except (*TRANSIENT_ERRORS, DatabaseUnavailable):
            ended = None
        if ended == (outcome.state.value, self.worker_id):
            return (
                f"{outcome.state.value} {claimed.node_id} (attempt {claimed.number}; committed, "
                "though the commit's answer was lost)"
            )
        return (
            f"discarded {claimed.node_id}: attempt {claimed.number} is no longer held by "
            f"{self.worker_id}"
        )

    def _enforce_timeouts(self) -> bool:
        now = time.monotonic()
        late = [c for c in self.children.values() if c.deadline is not None and now > c.deadline]
        for child in late:
            self._stop_process(child.runner)
            outcome = timeout_outcome(child.claimed.options, **child.ended_log())
            self._finish(child, outcome)
        return bool(late)

    def _ship_logs(self) -> None:
        """What running attempts printed since the last time, into the database, so that
        `mlp logs -f`, the API and the UI show it while they run (one transaction for all)."""
        self._last_ship = time.monotonic()
        grown: dict[int, tuple[_Child, int, LogPiece]] = {}
        for attempt_id, child in self.children.items():
            try:
                size = child.log_path.stat().st_size
            except FileNotFoundError:
                continue
            if size != child.shipped:
                text, kept_from = child.read_log(), child.log.start
                start = max(child.shipped_to, kept_from)  # what it printed since, if kept
                piece = LogPiece(start, text[start - kept_from :], kept_from)
                grown[attempt_id] = (child, size, piece)
        if grown:
            self.platform.ship_logs(
                {a: piece for a, (_, _, piece) in grown.items()}, self.worker_id
            )
            for child, size, piece in grown.values():  # shipped: not again
                child.shipped, child.shipped_to = size, piece.start + len(piece.text)

    def _stop_cancelled(self) -> None:
        """Stop the running attempts whose runs were cancelled since the last look."""
        held = [*self.children, *(r.claimed.attempt_id for r in self.reserved)]
        for attempt_id in self.platform.cancelled_among(held):
            self.stop(attempt_id, "run cancelled")

    def _beat(self) -> None:
        self._last_beat = time.monotonic()
        reserved = {r.claimed.attempt_id: r for r in self.reserved}
        beat = self.platform.heartbeat([*self.children, *reserved], self.worker_id)
        for attempt_id in beat.lost:
            if attempt_id in reserved:  # never started: nothing to stop
                self._take_back(reserved[attempt_id], None)
                continue
            child = self.children.pop(attempt_id)
            self._stop_process(child.runner)
            self.on_event(f"lost the lease of {child.claimed.node_id}; stopped it")
            self.dispatcher.ack(child.delivery)
            child.cleanup()
        for attempt_id in beat.cancelled:
            self.stop(attempt_id, "run cancelled")

    def stop(self, attempt_id: int, reason: str) -> None:
        """Kill a running attempt and record it as cancelled."""
        reserved = next((r for r in self.reserved if r.claimed.attempt_id == attempt_id), None)
        if reserved is not None:
            self._take_back(reserved, Outcome(AttemptState.CANCELLED, error=reason))
            return
        child = self.children.get(attempt_id)
        if child is None:
            return
        self._stop_process(child.runner)
        self._finish(child, Outcome(AttemptState.CANCELLED, error=reason, **child.ended_log()))

    def stop_all(self, reason: str) -> None:
        self._commit_ended()
        # Claims ahead first, those sent ahead too: their processes are stopped next.
        for reserved in list(self.reserved):
            self._end_reserved(reserved, Outcome(AttemptState.CANCELLED, error=reason))
        for attempt_id in list(self.children):
            self.stop(attempt_id, reason)

    def hand_back(self, reason: str) -> None:
        """Stop every running attempt and hand it back: retried at once, charging no budget.

        If the database or Redis is away, the attempt's lease expires instead (it is then
        lost, and retried on the lost budget).
        """
        try:
            self._commit_ended()
        except TRANSIENT_ERRORS as exc:
            self.on_event(f"could not commit finished attempts: {exc}")
        for reserved in list(self.reserved):
            try:
                self._end_reserved(reserved, _handed_back(reason))
            except TRANSIENT_ERRORS as exc:  # its lease expires instead (the lost budget)
                self.reserved.remove(reserved)
                self.on_event(f"could not hand back {reserved.claimed.node_id}: {exc}")
        for child in list(self.children.values()):
            self._stop_process(child.runner)
            outcome = Outcome(
                AttemptState.LOST,
                error=f"handed back: {reason}",
                handed_back=True,
                **child.ended_log(),
            )
            try:
                self._finish(child, outcome)
            except TRANSIENT_ERRORS as exc:
                self.children.pop(child.claimed.attempt_id, None)
                self.on_event(f"could not hand back {child.claimed.node_id}: {exc}")


def _handed_back(reason: str) -> Outcome:
    """A claim given back unrun: retried at once (elsewhere, likely), charging no budget."""
    return Outcome(AttemptState.LOST, error=f"handed back: {reason}", handed_back=True)


def pid_space() -> str:
    """``<host>-<namespace>``: where this process's number means something. A process number
    names a process only on its host and in its PID namespace: a process in a container (its
    own namespace) that shares a folder with others must not take their live processes for
    gone ones."""
    try:  # "pid:[4026531836]"
        namespace = os.readlink("/proc/self/ns/pid").partition("[")[2].rstrip("]")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}-{namespace or 'x'}"


def log_dir_prefix() -> str:
    """How the attempt-log directories of this host's workers in this PID namespace begin:
    ``mlp-logs-<host>-<namespace>-``, then the worker's pid."""
    return f"{LOG_DIR_PREFIX}{pid_space()}-"


def _remove_gone_workers_logs(folder: Path, prefix: str) -> None:
    """Remove the attempt-log directories that workers of this host and PID namespace, this
    user's, left when they were killed: those named ``prefix<pid>-…`` whose process is gone.
    (A live worker's is kept; so is another host's or another namespace's, whose process
    numbers mean nothing here.)"""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        # <pid>-<mkdtemp's random part, which has no "-">: not another host's whose name
        # goes on from this one's ("vm" and "vm-2").
        pid, *rest = entry.name.removeprefix(prefix).split("-")
        if not entry.name.startswith(prefix) or not pid.isdigit() or len(rest) != 1:
            continue
        if alive(int(pid)):
            continue
        try:
            owned = entry.is_dir(follow_symlinks=False) and entry.stat().st_uid == os.getuid()
        except OSError:
            continue
        if owned:
            shutil.rmtree(entry.path, ignore_errors=True)


def alive(pid: int) -> bool:
    """Whether a process numbered ``pid`` exists here (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True


class Runtime:
    """Scheduler and worker in one loop: the embedded mode's whole server."""

    def __init__(
        self,
        platform: Platform,
        dispatcher: Dispatcher,
        worker: Worker,
        *,
        only_run: str | None = None,
    ) -> None:
        self.platform = platform
        self.dispatcher = dispatcher
        self.worker = worker
        self.only_run = only_run
        self._last_schedule = 0.0
        self._last_advance = 0.0
        #: When every due attempt was last published again (monotonic), and when the last
        #: pass began (UTC, as attempts' not_before): see _tick.
        self._last_republish = 0.0
        self._last_pass: datetime | None = None
        #: Looks for new work in a row that found nothing while attempts ran (see _tick).
        self._empty_looks = 0

    def tick(self) -> None:
        """One pass; survives the database or Redis being away (it retries next pass)."""
        try:
            self._tick()
        except TRANSIENT_ERRORS as exc:
            self.worker.on_event(f"database or Redis unavailable, retrying: {exc}")
            time.sleep(self.platform.settings.poll_seconds)

    def _tick(self) -> None:
        settings = self.platform.settings
        now = time.monotonic()
        if now - self._last_schedule >= settings.poll_seconds:
            self._last_schedule = now
            # The full pass reads every task of every active run: its own, rarer, cadence.
            advance = now - self._last_advance >= settings.poll_seconds * ADVANCE_EVERY_POLLS
            if advance:
                self._last_advance = now
            # Every due attempt again (the safety net for lost dispatches) once per lease,
            # half the life of Redis's publication markers; in between only what became due
            # since the last pass (with a pass's margin), not a wide fan-out's thousands.
            since = None
            if now - self._last_republish < settings.lease_seconds and self._last_pass:
                since = self._last_pass - timedelta(seconds=settings.poll_seconds)
            else:
                self._last_republish = now
            self._last_pass = datetime.now(UTC)
            self.dispatcher.publish(
                self.platform.schedule(self.only_run, advance=advance, due_since=since)
            )
        worker = self.worker
        idle_wait = settings.poll_seconds / 5
        # Block on the dispatcher only when nothing runs: a reply must never wait behind it.
        block = self.dispatcher.blocking and worker.accepting and not worker.children
        if worker.step(idle_wait if block else 0.0) or block:
            self._empty_looks = 0
            return
        if worker.children:
            # Woken by the first reply; with outcomes held for their batch, commit them within
            # their hold; with free slots, look for new work again soon, later while none came.
            if worker.ended:
                wait = min(LOOK_AGAIN_SECONDS, BATCH_HOLD_SECONDS)
            elif worker.accepting:
                wait = min(idle_wait, LOOK_AGAIN_SECONDS * 2 ** min(self._empty_looks, 16))
                self._empty_looks += 1
            else:
                wait = idle_wait
            worker.wait_for_replies(wait)
        else:
            time.sleep(idle_wait)

    def drive(
        self,
        run_id: str,
        *,
        on_progress: Callable[[], None] | None = None,
        timeout: float | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> RunState | None:
        """Run ``run_id`` to its end in this process; return its final state.

        ``on_progress`` is called a few times a second (e.g. to redraw a progress table).
        Returns None, between two passes, as soon as ``stop()`` is true (e.g. after Ctrl-C:
        never in the middle of a database transaction). Raises TimeoutError if the run has
        not ended after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        last = 0.0
        while True:
            if stop is not None and stop():
                return None
            self.tick()
            if time.monotonic() - last < 0.2:
                continue
            last = time.monotonic()
            if on_progress is not None:
                on_progress()
            state = RunState(self.platform.run(run_id)[0].state)
            if state in RUN_TERMINAL and not self.worker.has_work:
                return state
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id[:8]} still {state.value} after {timeout} s")


class Shutdown:
    """SIGTERM and SIGINT, counted by handlers and read between two passes (never mid-commit).

    The first SIGTERM asks for a drain; a second one, or a SIGINT, for a hand-back at once.
    """

    def __init__(self) -> None:
        self.terms = 0
        self.interrupts = 0
        #: Called from the handler, e.g. to stop an HTTP server as well.
        self.on_signal: Callable[[], None] = lambda: None

    def install(self) -> None:
        """Handle SIGTERM and SIGINT in this process (call from the main thread)."""
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
        else:
            self.terms += 1
        self.on_signal()

    @property
    def requested(self) -> bool:
        return bool(self.terms or self.interrupts)

    @property
    def immediate(self) -> bool:
        return self.terms >= 2 or self.interrupts > 0


def run_until_shutdown(
    runtime: Runtime,
    shutdown: Shutdown,
    before_pass: Callable[[], None] = lambda: None,
) -> str:
    """Run passes until ``shutdown`` is asked for, then drain and stop; say how it ended.

    A drain takes no new work and lets the running attempts finish for up to
    ``MLP_DRAIN_SECONDS``; what still runs then, or at a second SIGTERM, is handed back: its
    processes are stopped and its attempts retried elsewhere without charging any budget.
    """
    worker = runtime.worker
    drain = runtime.platform.settings.drain_seconds
    deadline: float | None = None
    while True:
        if shutdown.requested:
            worker.draining = True
            if deadline is None:
                deadline = time.monotonic() + drain
                if worker.has_work:
                    worker.on_event(
                        f"draining: {len(worker.children)} running attempt(s) may finish "
                        f"within {drain:g} s (MLP_DRAIN_SECONDS); SIGTERM again to hand back now"
                    )
            if not worker.has_work:
                verdict = "drained"
                break
            if shutdown.immediate or time.monotonic() > deadline:
                reason = "shut down" if shutdown.immediate else "not done within MLP_DRAIN_SECONDS"
                count = len(worker.children)
                worker.hand_back(reason)
                verdict = f"handed back {count} attempt(s) ({reason})"
                break
        else:
            before_pass()
        runtime.tick()
        sys.stdout.flush()  # what the pass printed, in one write
    worker.close()
    return verdict


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def freeze_what_lasts() -> None:
    """Take what a long-lived process (`mlp worker`, `mlp server`) made to start -- its
    modules, the database's engine and mappings, the API's routes: tens of thousands of
    objects kept until it ends -- out of the cyclic garbage collector's reach, after collecting
    what the start-up left. Each full collection went through all of them again, a pause of
    the whole process: in a worker running a 1,000-task fan-out ≈ 70 ms, 1.5 ms with them
    frozen (the fan-out 0.94 → 0.81 s and 0.89 → 0.83 s in two alternated A/B runs); in a
    server answering 240 API requests on 100,000 runs, two of 84–115 ms each, then one of
    9–13 ms (the slowest request 110–120 → 34–39 ms). See docs/benchmarks-analysis.md, "A
    worker's start-up, frozen"."""
    gc.collect()
    gc.freeze()


def main(argv: Sequence[str] | None = None) -> int:
    """``mlp worker``: run scheduled work until stopped; return the exit code.

    Parsed here with argparse, not by the CLI's typer: a worker lives for days, and typer,
    rich and pydantic (typer parses options with it) were ≈ 12 MiB of each worker's memory.
    ``python -m ml_platform worker`` and ``mlp worker`` come straight here (see __main__.py).
    """
    parser = argparse.ArgumentParser(
        prog="mlp worker",
        description=(
            "Run scheduled work until stopped: SIGTERM drains, a second SIGTERM hands work "
            "back. A drain lets running attempts finish for up to MLP_DRAIN_SECONDS (default "
            "30), then hands the rest back; handed-back attempts are retried elsewhere and "
            "charge no retry. With REDIS_URL set, attempts arrive through Redis Streams; "
            "several workers may run, on several machines, against one DATABASE_URL."
        ),
    )
    parser.add_argument(
        "-c",
        "--concurrency",
        type=_at_least_one,
        default=max(2, os.cpu_count() or 2),
        help="Attempts run at once (default: %(default)s).",
    )
    parser.add_argument(
        "-q",
        "--queue",
        action="append",
        help="A queue (pool) to serve; repeat for several; the default queue if none.",
    )
    options = parser.parse_args(argv)
    sys.path.insert(0, os.getcwd())  # the workflows' modules, as `mlp run` finds them
    try:
        platform = Platform(load_settings())
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        platform.start()
        worker_id = new_worker_id()
        dispatcher = make_dispatcher(platform, worker_id, options.queue or [DEFAULT_QUEUE])
        # A line per task event: plain print, written out at the end of each pass (one write
        # for a batch of tasks, not one per line: see run_until_shutdown).
        worker = Worker(
            platform,
            dispatcher,
            concurrency=options.concurrency,
            worker_id=worker_id,
            on_event=print,
        )
        runtime = Runtime(platform, dispatcher, worker)
        shutdown = Shutdown()
        shutdown.install()  # signals only count, read between two passes: never mid-commit
        freeze_what_lasts()
        print(f"worker {worker_id} ready, concurrency {options.concurrency}", flush=True)
        verdict = run_until_shutdown(runtime, shutdown)
        print(f"worker {worker_id} stopped: {verdict}", flush=True)
        return 0
    except (WorkflowError, NotFound, DatabaseUnavailable, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        platform.close()
