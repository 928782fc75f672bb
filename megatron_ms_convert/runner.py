"""Running plans of either direction: one worker process per plan (at most `process_limit` at
a time), the timeout, the signals that stop a run, and the workers' progress reports. It knows
nothing of what a plan writes: the caller passes `execute(plan, settings, write, progress)`
(pt2ckpt_execute.execute_rank or ckpt2pt_execute.execute_rank), and every plan has `folder` (with
`.name` and `.path`), `output_files`, `manifest_file` and `fingerprint`.

Stopping: SIGINT (Ctrl-C) and SIGTERM (`timeout`, Slurm, Kubernetes) reach the parent as
`RunStopped`; it kills the workers and removes their temporaries, and the files a worker had put in
place while its manifest said "writing". Workers ignore SIGINT (the parent stops them, so Ctrl-C
prints one message, not one traceback per worker) and are killed by the kernel when the parent
dies, so no worker resumes later to write into a folder its run has given up.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .atomic import partial_path
from .errors import ConvertInputError
from .manifest import remove_unfinished_outputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSettings:
    """The flags that shape how plans run (the plans themselves say what to write)."""

    verify: bool = False
    debug: bool = False
    multiprocess_off: bool = False
    process_limit: int = 4
    process_timeout: float = 3600


@dataclass
class RankResult:
    folder: str
    status: str  # "converted", "skipped" or "failed"
    message: str = ""
    bytes_written: int = 0
    tensors: int = 0
    verified_tensors: int = 0
    verified_files: int = 0
    peak_anon_bytes: int = 0


def anon_memory_bytes() -> int:
    """This process's resident anonymous memory (RssAnon): copies we made, not mmap'd input pages."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------------------------------
# Stopping a run: signals and the workers' lifetime


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
KILLED_WORKER_WAIT_S = 5.0
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): the signal the kernel sends a process when its parent dies


class RunStopped(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM reached the parent. A BaseException, like KeyboardInterrupt, so that
    no `except Exception` on the way up swallows it and every cleanup on the way runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signal.Signals(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process the signal killed: 130, 143

    @property
    def cause(self) -> str:
        return "Ctrl-C" if self.signum == signal.SIGINT else self.signum.name


@contextlib.contextmanager
def signals_stop_the_run() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM raise RunStopped in the main thread, once: a second signal
    during the cleanup that follows is ignored, so that the workers are stopped, their temporaries
    removed and the summary logged. The previous handlers come back on exit. (Only the main thread
    can handle signals; elsewhere the block runs with the handlers as they are.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, _frame):
        for each in STOP_SIGNALS:
            signal.signal(each, signal.SIG_IGN)
        raise RunStopped(signum)

    previous = {each: signal.signal(each, stop) for each in STOP_SIGNALS}
    try:
        yield
    finally:
        for each, handler in previous.items():
            signal.signal(each, handler)


@contextlib.contextmanager
def _stop_signals_held_back() -> Iterator[None]:
    """Block SIGINT and SIGTERM while a worker is forked and registered. The child starts with them
    blocked until it has set its own dispositions (so it never runs the parent's handler), and a
    RunStopped raised when the parent lets them through finds the new worker among the running ones,
    to be stopped with the rest."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _die_with_parent(run_pid: int) -> None:
    """Have the kernel SIGKILL this worker when its parent dies, however the parent dies: a worker
    that was stalled (say on a hung disk) while its run was stopped must never resume later and write
    a rank file and a 'complete' manifest nobody is waiting for. SIGKILL also ends a stopped process.
    The parent is the run's process, or the fork server, which exits when the run's process does.
    The run's process may have died before the request was made; then this worker ends now."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if not _process_alive(run_pid) or os.getppid() == 1:
        os._exit(1)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or another user's process under the reused pid
        return False
    return True


def worker_context(execute: Callable) -> multiprocessing.context.BaseContext:
    """How workers start. A fork starts them at no cost with what the parent imported (torch), but it
    copies only the forking thread: a lock that another thread of the parent held at that moment stays
    locked forever in the worker. Threads a library started and named are such threads: MindSpore's
    runtime (ActorThread_0, frontend_queue, ...), once a program in the same process has loaded a
    MindSpore checkpoint, made a forked worker hang in a futex. Then workers start from a fork server
    instead: a fresh process that has imported only the module of `execute` (and MindSpore, when this
    process has), forked once per worker.
    (torch's own worker threads keep the process's name and are safe to fork: torch resets them.)"""
    named = threads_named_by_libraries()
    if not named:
        return multiprocessing.get_context("fork")
    context = multiprocessing.get_context("forkserver")
    # MindSpore loaded here is MindSpore the workers use (--verify): imported once, not once per worker.
    loaded_here = ["mindspore"] if "mindspore" in sys.modules else []
    context.set_forkserver_preload([execute.__module__, *loaded_here])
    log.debug("this process runs threads that a fork would copy mid-work (%s); workers start from a fork server",
              ", ".join(named))
    return context


def threads_named_by_libraries() -> list[str]:
    """The names of this process's threads that differ from the process's own name (Linux; elsewhere
    none are seen and workers are forked)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return []
    own = _thread_name(tasks / str(os.getpid()))
    names = []
    for each in tasks.iterdir():
        name = _thread_name(each)
        if name is not None and name != own:
            names.append(name)
    return sorted(names)


def _thread_name(task: Path) -> str | None:
    try:
        return (task / "comm").read_text().strip()
    except OSError:  # the thread ended meanwhile
        return None


def _kill_workers(processes: Sequence[Any]) -> None:
    """SIGKILL the workers and wait a bounded time for them to go. A worker blocked in the kernel (a
    hung disk) dies only when its I/O returns; its kill is pending by then, so it runs none of its
    own code again, and the run need not wait for it to report and exit."""
    for process in processes:
        process.kill()
    deadline = time.monotonic() + KILLED_WORKER_WAIT_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.exitcode is None:
            log.warning("worker %s (pid %d) has not exited %.0f s after SIGKILL (blocked in I/O?); it exits when "
                        "its I/O returns and writes nothing more", process.name, process.pid, KILLED_WORKER_WAIT_S)


# ---------------------------------------------------------------------------------------------
# Running the plans


@dataclass(frozen=True)
class Task:
    """One plan to execute (of either direction); `execute(plan, settings, write, progress)` runs it."""

    plan: Any
    write: bool  # False: the output is complete from an earlier run and is only verified


# A worker's progress: `progress(phase, done)`, `done` the bytes of this plan handled so far in that
# phase ("write" or "verify"), growing. The parent hears of it as `on_progress(plan, phase, done)`.
Progress = Callable[[str, int], None]
PROGRESS_EVERY_BYTES = 64 * 2**20
PROGRESS_EVERY_S = 0.5


def no_progress(phase: str, done: int) -> None:
    """What `execute` is given when nobody listens."""


class ByteCounter:
    """Counts the bytes of one phase of a plan as they are handled, reporting the sum to `progress`."""

    def __init__(self, progress: Progress, phase: str):
        self.progress, self.phase, self.done = progress, phase, 0
        progress(phase, 0)  # the phase has started

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        self.progress(self.phase, self.done)


def run_tasks(tasks: Sequence[Task], settings: RunSettings, on_done: Callable[[Any, RankResult], None],
              execute: Callable[[Any, RunSettings, bool, Progress], RankResult],
              on_progress: Callable[[Any, str, int], None] | None = None) -> None:
    """Execute every task with `execute`, at most --process-limit at a time, each in its own worker
    process (see `worker_context`) so that a crash, a signal or --process_timeout stops that rank only
    and is reported with its folder. Workers send their
    progress (throttled) to `on_progress` as they go. However this ends (RunStopped included), no
    worker is left running and no temporary file is left behind."""
    on_progress = on_progress or (lambda plan, phase, done: None)
    if settings.multiprocess_off:
        for task in tasks:
            report = functools.partial(on_progress, task.plan)
            on_done(task.plan, _execute_reporting_errors(task, settings, execute, report))
        return
    context = worker_context(execute)
    pending = deque(tasks)
    running: dict[Any, _Worker] = {}  # by the process's sentinel
    try:
        while pending or running:
            while pending and len(running) < settings.process_limit:
                task = pending.popleft()
                with _stop_signals_held_back():
                    worker = _start_worker(context, task, settings, execute)
                    running[worker.process.sentinel] = worker
            deadline = min(worker.started for worker in running.values()) + settings.process_timeout
            listening = {worker.receiver: worker for worker in running.values() if not worker.ended}
            ready = multiprocessing.connection.wait([*running, *listening],
                                                    timeout=max(0.0, deadline - time.monotonic()))
            for each in ready:
                if each in listening:
                    listening[each].receive(on_progress)
            for each in ready:
                if each in running:
                    worker = running.pop(each)
                    on_done(worker.plan, worker.collect(on_progress))
            now = time.monotonic()
            for sentinel, worker in list(running.items()):
                if now - worker.started >= settings.process_timeout:
                    _kill_workers([worker.process])
                    worker.receiver.close()
                    del running[sentinel]
                    remove_partials(worker.plan)
                    on_done(worker.plan, RankResult(worker.plan.folder.name, "failed",
                                                    f"timed out after --process_timeout {settings.process_timeout} s; "
                                                    "the worker was killed"))
    finally:
        _kill_workers([worker.process for worker in running.values()])
        for worker in running.values():
            remove_partials(worker.plan)


@dataclass
class _Worker:
    """A running worker: its plan, process, the pipe it reports on, and what it reported."""

    plan: Any
    process: Any
    receiver: Any
    started: float
    result: RankResult | None = None
    ended: bool = False  # the pipe is at its end (the worker closed it or died)

    def receive(self, on_progress: Callable[[Any, str, int], None]) -> None:
        """Every message waiting: progress is passed on, the result kept."""
        try:
            while self.receiver.poll():
                message = self.receiver.recv()
                if isinstance(message, RankResult):
                    self.result = message
                else:
                    on_progress(self.plan, *message)
        except EOFError:
            self.ended = True

    def collect(self, on_progress: Callable[[Any, str, int], None]) -> RankResult:
        """The result of a worker that has exited (a failure if it died before sending one)."""
        self.receive(on_progress)
        self.process.join()
        self.receiver.close()
        if self.result is not None:
            return self.result
        remove_partials(self.plan)
        code = self.process.exitcode
        cause = f"killed by signal {signal.Signals(-code).name}" if code and code < 0 else f"exited with code {code}"
        return RankResult(self.plan.folder.name, "failed", f"worker {cause} before finishing "
                                                           "(out of memory? see the system log)")


def _start_worker(context, task: Task, settings: RunSettings, execute) -> _Worker:
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_worker_main, args=(task, settings, execute, sender, os.getpid()),
                              name=f"convert-{task.plan.folder.name}", daemon=True)
    process.start()
    sender.close()
    return _Worker(task.plan, process, receiver, time.monotonic())


def _worker_main(task: Task, settings: RunSettings, execute, sender, parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent(parent_pid)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    result = _execute_reporting_errors(task, settings, execute, ThrottledProgress(sender.send))
    sender.send(result)
    sender.close()


class ThrottledProgress:
    """A worker's `progress(phase, done)`, passed on to `send((phase, done))` at most every
    PROGRESS_EVERY_BYTES or PROGRESS_EVERY_S, whichever comes first, and at the start of a phase."""

    def __init__(self, send: Callable[[tuple[str, int]], None], clock: Callable[[], float] = time.monotonic):
        self._send, self._clock = send, clock
        self._last: tuple[str, int, float] | None = None  # phase, done, when: the last report sent

    def __call__(self, phase: str, done: int) -> None:
        now = self._clock()
        last = self._last
        if (last is None or last[0] != phase or done - last[1] >= PROGRESS_EVERY_BYTES
                or now - last[2] >= PROGRESS_EVERY_S):
            self._send((phase, done))
            self._last = (phase, done, now)


def _execute_reporting_errors(task: Task, settings: RunSettings, execute, progress: Progress) -> RankResult:
    plan = task.plan
    try:
        return execute(plan, settings, task.write, progress)
    except ConvertInputError as err:
        remove_partials(plan)
        return RankResult(plan.folder.name, "failed", str(err))
    except Exception as err:  # the worker reports every failure with its folder instead of dying silently
        remove_partials(plan)
        if settings.debug:
            log.exception("worker for %s failed", plan.folder.path)
        return RankResult(plan.folder.name, "failed", f"{type(err).__name__}: {err}")
    except BaseException:  # a stop (Ctrl-C, SIGTERM) in --multiprocess-off mode: leave no temporaries
        remove_partials(plan)
        raise


def remove_partials(plan: Any) -> None:
    """What a worker that did not finish leaves: its temporaries, and the files it had already put at
    final paths, which no "complete" manifest vouches for."""
    for path in (*plan.output_files, plan.manifest_file):
        partial_path(path).unlink(missing_ok=True)
    remove_unfinished_outputs(plan)
