"""Executing plans: each rank's worker streams its tensors from the mmap'd .pt files into its output
file, copies it to the other dp/cp ranks, writes the pt_meta args file and, with --verify, reads the
output back with MindSpore. The parent runs the workers (one forked process per rank, at most
`process_limit` at a time), enforces the timeout, and records which ranks are complete so that a
re-run resumes instead of starting over.

Stopping: SIGINT (Ctrl-C) and SIGTERM (`timeout`, Slurm, Kubernetes) reach the parent as
`RunStopped`; it kills the workers and removes their temporaries. Workers ignore SIGINT (the parent
stops them, so Ctrl-C prints one message, not one traceback per worker) and are killed by the kernel
when the parent dies, so no worker resumes later to write into a folder its run has given up.
"""

from __future__ import annotations

import contextlib
import ctypes
import filecmp
import hashlib
import json
import logging
import math
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

import numpy as np
import torch

from . import __version__
from .atomic import atomic_target, copy_file_atomically, partial_path, write_text_atomically
from .errors import ConvertInputError
from .megatron import checkpoint as reader
from .megatron.pt_meta import pt_meta_record
from .megatron.zip_records import BackgroundChecks
from .mindspore.writer import TensorEntry, write_mindspore_file
from .plan import BucketSlice, ModelTensor, PlannedTensor, RankPlan, Stacked

log = logging.getLogger("convert_pt2ckpt")


@dataclass(frozen=True)
class RunSettings:
    """The flags that shape how plans run (the plans themselves say what to write)."""

    verify: bool = False
    debug: bool = False
    multiprocess_off: bool = False
    process_limit: int = 4
    process_timeout: float = 3600


# ---------------------------------------------------------------------------------------------
# Resuming: which ranks a previous run already finished


def plan_fingerprint(plan: RankPlan) -> str:
    """Hash of the plan and of the source files' identity (path, size, mtime): equal fingerprints mean
    an existing output was written by this same conversion. The plan's paths must be canonical
    (resolved), so that spelling a path another way does not make a conversion look like another."""
    sources = [plan.folder.model_file] + ([path for path, _ in plan.distrib_sources()] if plan.reads_distrib else [])
    sources += [Path(layout.source) for layout in (*plan.layouts, *plan.expert_layouts)
                if Path(layout.source).is_file()]
    return fingerprint_of(plan, sources)  # the repr includes the layouts


def fingerprint_of(plan: Any, sources: Sequence[Path]) -> str:
    """Hash of a plan (any dataclass; its repr) and of its source files' identity (path, size, mtime)."""
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in sources]
    return hashlib.sha256(repr((plan, stats)).encode()).hexdigest()


def read_manifest(plan: RankPlan) -> dict:
    try:
        return json.loads(plan.manifest_file.read_text())
    except (OSError, ValueError):
        return {}


def write_manifest(plan: RankPlan, state: str, files: dict[str, int] | None = None) -> None:
    write_text_atomically(plan.manifest_file, json.dumps(
        {"fingerprint": plan.fingerprint, "converter_version": __version__, "state": state,
         "source": str(plan.folder.path), "files": files or {}}, indent=1))


def rank_status(plan: RankPlan) -> str:
    """'done' (complete output of this conversion, written by this version of the converter), 'todo',
    'outdated' (output of this conversion written by another version of the converter, which may have
    had a bug this one fixes: it is converted again, never skipped), or 'foreign' (outputs exist that
    this conversion did not write, which must not be silently mixed with new ones)."""
    manifest = read_manifest(plan)
    if manifest.get("fingerprint") == plan.fingerprint:
        if manifest.get("converter_version") != __version__:
            return "outdated"
        files = manifest.get("files", {})
        complete = manifest.get("state") == "complete" and all(
            Path(f).is_file() and Path(f).stat().st_size == size for f, size in files.items())
        return "done" if complete else "todo"
    return "foreign" if any(p.exists() for p in plan.output_files) else "todo"


def check_no_foreign_outputs(plans: Sequence[RankPlan], statuses: dict, flag: str = "--ms-path",
                             root: Path | None = None) -> None:
    """Stop when any plan's status (from rank_status, by folder) is 'foreign'. `flag` and `root` name
    the output folder in the message (by default --ms-path, the parent of the first rank's folder)."""
    foreign = [p for p in plans if statuses[p.folder] == "foreign"]
    if foreign:
        existing = [str(o) for p in foreign for o in p.output_files if o.exists()]
        root = root if root is not None else foreign[0].outputs[0].parent.parent
        raise ConvertInputError(
            f"{flag} {root}: {len(existing)} output files already exist that "
            f"this conversion did not write (another source, other flags, changed inputs, or a version of "
            f"the converter that planned differently), e.g. {existing[0]}",
            expected="an empty --ms-path or outputs of this same conversion", found=f"{len(foreign)} ranks' outputs",
            fix=f"pass --overwrite to replace them, or choose another {flag}")


# ---------------------------------------------------------------------------------------------
# Executing a plan (worker process)


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


class SourceTensors:
    """Hands out the data of planned tensors as numpy views of the mmap'd source files."""

    def __init__(self, plan: RankPlan):
        # every zip record is CRC-checked in a thread while the tensors are copied; see fetch_waiting_at
        self.checks = BackgroundChecks()
        self.model_sd = reader.load_pt(plan.folder.model_file, background=self.checks)
        # per optimizer (dense, then the experts' in a MoE run), its grad buffers
        self.buffers = ([reader.decode_optimizer_part(reader.load_pt(path, background=self.checks), path, element)
                         for path, element in plan.distrib_sources()] if plan.reads_distrib else None)
        self._by_name = {t.name: t for t in plan.tensors}
        self._flat: dict[str, dict[str, torch.Tensor]] = {}

    def array(self, planned: PlannedTensor) -> np.ndarray:
        return self._array(planned.source, planned.shape, planned.dtype)

    def _array(self, source, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        if isinstance(source, Stacked):
            return np.stack([self._array(part, shape[1:], dtype) for part in source.parts])
        if isinstance(source, BucketSlice):
            bucket = self.buffers[source.optimizer][source.gbuf_idx].states[source.state][source.bucket]
            tensor = bucket[source.start:source.end].view(shape)
        elif isinstance(source, ModelTensor):
            if source.chunk_key not in self._flat:
                self._flat[source.chunk_key] = reader.model_tensors(self.model_sd[source.chunk_key])
            tensor = self._flat[source.chunk_key][source.key]
        else:
            return np.array(source.value, dtype=dtype).reshape(shape)
        want = getattr(torch, dtype)
        if tensor.dtype != want:
            tensor = tensor.to(want)
        return tensor.numpy()

    def fetch(self, entry: TensorEntry) -> np.ndarray:
        return self.array(self._by_name[entry.name])

    def fetch_waiting_at(self, last: str):
        """fetch, which also waits for the CRC checks when it hands out the tensor named `last`: the
        writer then has every tensor but has not yet put its file at the final path."""
        def fetch(entry: TensorEntry) -> np.ndarray:
            if entry.name == last:
                self.checks.wait()
            return self.fetch(entry)
        return fetch


def execute_plan(plan: RankPlan, settings: RunSettings, write: bool = True) -> RankResult:
    """Write one rank's output, its copies and its pt_meta args file (or, with write=False, only
    verify a complete output an earlier run left). An output that fails --verify is removed, so no
    final path ever holds a file that is not complete and correct."""
    sources = SourceTensors(plan)
    result = RankResult(plan.folder.name, "skipped")
    if write:
        write_manifest(plan, "writing")
        entries = [TensorEntry(t.name, t.shape, t.dtype) for t in plan.tensors]
        fetch = _measuring_memory(sources.fetch_waiting_at(entries[-1].name) if entries else sources.fetch, result)
        if settings.debug and sys.stderr.isatty():
            fetch = _with_tensor_progress(fetch, len(entries), plan.folder.name)
        plan.outputs[0].parent.mkdir(parents=True, exist_ok=True)
        result.bytes_written = write_mindspore_file(plan.outputs[0], entries, fetch, plan.fmt)
        sources.checks.wait()  # waited for already, unless the file had no tensor
        for copy in plan.outputs[1:]:
            result.bytes_written += copy_file_atomically(plan.outputs[0], copy)
        write_meta_file(plan, sources.model_sd)
        result.status, result.tensors = "converted", len(entries)
    sources.checks.wait()
    if settings.verify:
        try:
            result.verified_tensors, result.verified_files = verify_outputs(plan, sources)
        except VerificationError:
            for path in plan.outputs:
                path.unlink(missing_ok=True)
            write_manifest(plan, "writing")  # our own unfinished work: a re-run redoes it
            raise
    if write:
        write_manifest(plan, "complete", {str(p): p.stat().st_size for p in (*plan.outputs, plan.meta_file)})
    log.debug("%s: %d tensors, %d bytes written, peak anonymous memory %.1f MiB", plan.folder.name,
              result.tensors, result.bytes_written, result.peak_anon_bytes / 2**20)
    return result


class VerificationError(RuntimeError):
    """An output read back with mindspore.load_checkpoint differs from its source."""


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


def _measuring_memory(fetch, result: RankResult):
    """Sample RssAnon as each tensor is handed out, when the previous one is gone and this one exists."""
    def measured_fetch(entry):
        array = fetch(entry)
        result.peak_anon_bytes = max(result.peak_anon_bytes, anon_memory_bytes())
        return array
    return measured_fetch


def _with_tensor_progress(fetch, total: int, label: str):
    from tqdm import tqdm
    bar = tqdm(total=total, desc=label, unit="tensor", leave=False)

    def counting_fetch(entry):
        bar.update(1)
        return fetch(entry)
    return counting_fetch


def write_meta_file(plan: RankPlan, model_sd: dict) -> None:
    """pt_meta/args_tpTT_ppPPP.pt: what the way back (MindSpore -> Megatron) needs besides the tensors:
    the documented keys plus the skeletons, layouts and bucket sizes that make it exact. The bucket
    sizes come from the pickle of distrib_optim.pt (mmap'd: its tensors are not read), when it was read."""
    distrib = reader.load_pt(plan.folder.distrib_file) if plan.reads_distrib else None
    meta = pt_meta_record(model_sd, plan.folder.model_file, distrib, plan.layouts, plan.param_name_list,
                          expert_layouts=plan.expert_layouts, moe=dict(plan.moe) if plan.moe else None)
    del distrib
    with atomic_target(plan.meta_file) as partial, reader.megatron_enum_importable():
        torch.save(meta, partial)


def verify_outputs(plan: RankPlan, sources: SourceTensors) -> tuple[int, int]:
    """Re-open the written file with MindSpore's own loader and compare every tensor bit for bit."""
    import mindspore as ms  # only here: importing it costs seconds

    loaded = ms.load_checkpoint(str(plan.outputs[0]), format=plan.fmt)
    problems = []
    for planned in plan.tensors:
        if math.prod(planned.shape) == 0:
            continue  # MindSpore writes no record for an empty tensor
        got = loaded.get(planned.name)
        want = sources.array(planned)
        if got is None:
            problems.append(f"{planned.name}: missing")
            continue
        got = got.asnumpy()
        if got.shape != want.shape or got.dtype != want.dtype or got.tobytes() != np.ascontiguousarray(want).tobytes():
            problems.append(f"{planned.name}: differs")
    extra = set(loaded) - {t.name for t in plan.tensors}
    problems += [f"{name}: not planned" for name in sorted(extra)]
    for copy in plan.outputs[1:]:
        if not filecmp.cmp(plan.outputs[0], copy, shallow=False):  # compares in chunks, not whole files
            problems.append(f"{copy}: differs from {plan.outputs[0]}")
    if problems:
        raise VerificationError(f"verification of {plan.outputs[0]} failed (output removed): "
                                + "; ".join(problems[:10]))
    return len([t for t in plan.tensors if math.prod(t.shape)]), len(plan.outputs)


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


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this worker when its parent dies, however the parent dies: a worker
    that was stalled (say on a hung disk) while its run was stopped must never resume later and write
    a rank file and a 'complete' manifest nobody is waiting for. SIGKILL also ends a stopped process.
    The parent may have died before the request was made; then this worker ends now."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


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
    """One plan to execute. A plan of either direction has `folder` (with `.name` and `.path`),
    `output_files`, `manifest_file` and `fingerprint`; `execute(plan, settings, write)` runs it."""

    plan: Any
    write: bool  # False: the output is complete from an earlier run and is only verified


def run_tasks(tasks: Sequence[Task], settings: RunSettings, on_done: Callable[[Any, RankResult], None],
              execute: Callable[[Any, RunSettings, bool], RankResult] = execute_plan) -> None:
    """Execute every task with `execute`, at most --process-limit at a time, each in its own forked
    worker so that a crash, a signal or --process_timeout stops that rank only and is reported with its folder.
    Forking after the parent imported torch makes a worker's start-up cost nothing. However this
    ends (RunStopped included), no worker is left running and no temporary file is left behind."""
    if settings.multiprocess_off:
        for task in tasks:
            on_done(task.plan, _execute_reporting_errors(task, settings, execute))
        return
    context = multiprocessing.get_context("fork")
    pending = deque(tasks)
    running: dict[Any, tuple[RankPlan, Any, Any, float]] = {}
    try:
        while pending or running:
            while pending and len(running) < settings.process_limit:
                task = pending.popleft()
                with _stop_signals_held_back():
                    process, receiver = _start_worker(context, task, settings, execute)
                    running[process.sentinel] = (task.plan, process, receiver, time.monotonic())
            deadline = min(start for _, _, _, start in running.values()) + settings.process_timeout
            ready = multiprocessing.connection.wait(list(running), timeout=max(0.0, deadline - time.monotonic()))
            for sentinel in ready:
                plan, process, receiver, _ = running.pop(sentinel)
                on_done(plan, _collect(plan, process, receiver))
            now = time.monotonic()
            for sentinel, (plan, process, receiver, start) in list(running.items()):
                if now - start >= settings.process_timeout:
                    _kill_workers([process])
                    del running[sentinel]
                    remove_partials(plan)
                    on_done(plan, RankResult(plan.folder.name, "failed",
                                             f"timed out after --process_timeout {settings.process_timeout} s; "
                                             "the worker was killed"))
    finally:
        _kill_workers([process for _, process, _, _ in running.values()])
        for plan, _, _, _ in running.values():
            remove_partials(plan)


def _start_worker(context, task: Task, settings: RunSettings, execute) -> tuple[Any, Any]:
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_worker_main, args=(task, settings, execute, sender, os.getpid()),
                              name=f"convert-{task.plan.folder.name}", daemon=True)
    process.start()
    sender.close()
    return process, receiver


def _worker_main(task: Task, settings: RunSettings, execute, sender, parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent(parent_pid)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    result = _execute_reporting_errors(task, settings, execute)
    sender.send(result)
    sender.close()


def _execute_reporting_errors(task: Task, settings: RunSettings, execute=execute_plan) -> RankResult:
    plan = task.plan
    try:
        return execute(plan, settings, task.write)
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


def _collect(plan: RankPlan, process, receiver) -> RankResult:
    try:
        result = receiver.recv() if receiver.poll() else None
    except EOFError:  # the worker died before sending its result
        result = None
    process.join()
    if result is not None:
        return result
    remove_partials(plan)
    code = process.exitcode
    cause = f"killed by signal {signal.Signals(-code).name}" if code and code < 0 else f"exited with code {code}"
    return RankResult(plan.folder.name, "failed", f"worker {cause} before finishing "
                                                  "(out of memory? see the system log)")


def remove_partials(plan: Any) -> None:
    for path in (*plan.output_files, plan.manifest_file):
        partial_path(path).unlink(missing_ok=True)
