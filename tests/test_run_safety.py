"""A run as schedulers and users stop it, and runs that meet each other: SIGTERM (`timeout`, Slurm,
Kubernetes) and Ctrl-C stop the workers and clean up; a worker never outlives its parent to write
later; a second run into the same --ms-path stops at once; and a re-run recognises its own outputs
however the paths are spelled, but redoes outputs of another converter version."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megatron_ms_convert.folder_lock import FolderLocked, folder_lock
from tests.expected_outputs import REPO, SAMPLE, run_cli
from tests.helpers import (RANKS, SIZES, assert_outputs_complete_and_correct, convert, error_lines, leftovers,
                           run_back, start_cli, stop_first_worker, success_count)


@pytest.fixture
def started():
    """Start the CLI like test_faults.start_cli; whatever a failed test leaves of the run (a frozen
    worker included) is killed at the end: each run is a process group of its own."""
    procs = []

    def start(*args) -> subprocess.Popen:
        procs.append(start_cli(*args))
        return procs[-1]
    yield start
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()


def files_and_states(out: Path) -> dict[str, tuple]:
    """Every file under `out` with its size and mtime, and each manifest's recorded state."""
    found = {}
    for path in out.rglob("*"):
        if path.is_file():
            state = path.read_text().split('"state": "')[1].split('"')[0] if path.name.startswith("manifest") else ""
            found[str(path.relative_to(out))] = (path.stat().st_size, path.stat().st_mtime_ns, state)
    return found


def resume(process: psutil.Process) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        process.resume()


def is_gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until_gone(process: psutil.Process, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if is_gone(process):
            return True
        time.sleep(0.05)
    return is_gone(process)


def run_processes_of(out: Path) -> list[psutil.Process]:
    """The converter's processes (parent and forked workers) writing into `out`."""
    return [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])
            and not is_gone(p)]


def assert_stopped_worker_writes_nothing(worker: psutil.Process, out: Path) -> None:
    """Let a frozen worker of a run that has ended go on: it must be dead, or die, and write nothing."""
    before = files_and_states(out)
    resume(worker)
    gone = wait_until_gone(worker, timeout_s=20)  # a live worker of the sample finishes in ~1 s
    after = files_and_states(out)
    assert before == after, ("a worker wrote after its run had ended",
                             sorted(set(after.items()) ^ set(before.items())))
    assert gone, "the worker outlived its run"


def test_sigterm_stops_the_workers_cleans_up_and_exits_143(ckpt, tmp_path, clean_outputs, started):
    out = tmp_path / "out"
    proc = started(ckpt, out, "--process-limit", 1)
    worker = stop_first_worker(proc)  # like a worker stalled on a hung disk
    proc.send_signal(signal.SIGTERM)  # to the parent alone, as `timeout` sends it
    proc.wait(timeout=120)
    assert_stopped_worker_writes_nothing(worker, out)
    log = proc.stdout.read()  # (a surviving worker would hold the log pipe open)
    assert proc.returncode == 143, log
    [error] = [line for line in log.splitlines() if " ERROR " in line]
    assert "interrupted (SIGTERM)" in error and "removed their partial files" in error
    assert "summary: 0 converted, 0 skipped, 0 failed, 4 not run of 4 folders" in log
    assert "Traceback" not in log and "successfully" not in log
    assert leftovers(out) == []
    assert assert_outputs_complete_and_correct(out, clean_outputs) <= 1
    assert not (out / ".convert.lock").exists()
    assert not run_processes_of(out)


def test_a_worker_dies_with_its_parent_and_the_lock_with_it(ckpt, tmp_path, clean_outputs, started):
    out = tmp_path / "out"
    proc = started(ckpt, out, "--process-limit", 1)
    worker = stop_first_worker(proc)
    proc.kill()  # no cleanup possible: only the kernel can stop the worker now
    proc.wait(timeout=60)
    assert_stopped_worker_writes_nothing(worker, out)
    again = convert(ckpt, out)  # the dead run's lock does not block the next one
    assert again.returncode == 0, again.stdout
    assert success_count(again) == 4
    for rank in RANKS:
        assert (out / f"rank_{rank}/network.ckpt").read_bytes() == clean_outputs[rank]
    assert leftovers(out) == [] and not (out / ".convert.lock").exists()


def freeze_run(proc: subprocess.Popen, deadline_s: float = 60) -> tuple[psutil.Process, list[psutil.Process]]:
    """SIGSTOP the parent as soon as it has forked a worker, then every worker it has, so that a
    signal can be delivered to all of them before any of them acts on it."""
    parent = psutil.Process(proc.pid)
    end = time.monotonic() + deadline_s
    while not parent.children() and time.monotonic() < end:
        time.sleep(0.002)
    parent.suspend()
    workers = parent.children()
    for worker in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.suspend()
    assert workers, "no worker appeared"
    return parent, workers


def test_ctrl_c_prints_one_message_and_no_worker_tracebacks(ckpt, tmp_path, clean_outputs, started):
    out = tmp_path / "out"
    proc = started(ckpt, out, "--process-limit", 4)
    parent, workers = freeze_run(proc)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
    for worker in workers:
        resume(worker)
    time.sleep(1.0)  # the workers act on the signal before the parent can stop them
    parent.resume()
    log, _ = proc.communicate(timeout=120)
    assert log.count("Traceback") == 0, log
    [message] = [line for line in log.splitlines() if "interrupted" in line]
    assert " ERROR interrupted (Ctrl-C): stopped the workers" in message
    assert proc.returncode == 130, log
    assert "summary:" in log
    assert leftovers(out) == []
    assert_outputs_complete_and_correct(out, clean_outputs)
    assert not run_processes_of(out)


def test_a_second_run_into_the_same_ms_path_stops_at_once(ckpt, tmp_path, clean_outputs, started):
    out = tmp_path / "out"
    first = started(ckpt, out, "--process-limit", 1)
    worker = stop_first_worker(first)  # the first run holds --ms-path and is mid-way
    before = files_and_states(out)
    second = convert(ckpt, out)
    assert files_and_states(out) == before  # nothing touched
    assert second.returncode == 2, second.stdout
    [line] = error_lines(second)
    assert f"--ms-path {out}: another conversion is writing into it" in line
    assert f"host {socket.gethostname()}, pid {first.pid}," in line and str(out / ".convert.lock") in line
    assert success_count(second) == 0
    resume(worker)
    log, _ = first.communicate(timeout=300)
    assert first.returncode == 0, log
    assert "summary: 4 converted, 0 skipped, 0 failed" in log
    for rank in RANKS:
        assert (out / f"rank_{rank}/network.ckpt").read_bytes() == clean_outputs[rank]
    assert not (out / ".convert.lock").exists()


HOLD_AND_FORK = """
import os, sys, time
from pathlib import Path
from megatron_ms_convert.folder_lock import folder_lock
with folder_lock(Path(sys.argv[1])):
    child = os.fork()
    if child == 0:  # a forked worker that outlives its parent
        time.sleep(120)
        os._exit(0)
    print(child, flush=True)
    sys.stdin.readline()
    os._exit(0)  # the holder dies without releasing anything, as when it is killed
"""


def test_the_lock_dies_with_its_holder_even_when_a_forked_child_lives_on(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_FORK, str(tmp_path)], cwd=REPO, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(FolderLocked) as refused:
            with folder_lock(tmp_path):
                pass
        assert f"pid {holder.pid}," in str(refused.value) and str(tmp_path / ".convert.lock") in str(refused.value)
        holder.stdin.close()  # the holder reads EOF and dies
        holder.wait(timeout=60)
        assert (tmp_path / ".convert.lock").exists() and psutil.pid_exists(child)  # a stale lock file
        with folder_lock(tmp_path, ".convert.lock") as lock:
            assert f"pid {os.getpid()}," in lock.read_text()
        assert not lock.exists()
    finally:
        os.kill(child, signal.SIGKILL)
        holder.stdout.close()


def test_paths_spelled_differently_are_the_same_conversion(ckpt, tmp_path):
    assert ckpt == tmp_path / "save"
    first = run_cli("--megatron-path", "save/iter_0000010", "--ms-path", "o1", *SIZES, cwd=tmp_path)
    assert first.returncode == 0 and "summary: 4 converted" in first.stdout, first.stdout
    (tmp_path / "link").symlink_to(tmp_path)
    for megatron_path, ms_path in [(ckpt / "iter_0000010", tmp_path / "o1"),
                                   ("link/save/iter_0000010/", "./o1/../o1")]:
        again = run_cli("--megatron-path", megatron_path, "--ms-path", ms_path, *SIZES, cwd=tmp_path)
        assert again.returncode == 0, again.stdout
        assert "summary: 0 converted, 4 skipped, 0 failed" in again.stdout


def run_as_version(version: str, *args) -> subprocess.CompletedProcess:
    """The converter as another release of it would run: the package's __version__ replaced."""
    code = ("import sys, megatron_ms_convert; megatron_ms_convert.__version__ = sys.argv[1]; "
            "from megatron_ms_convert.pt2ckpt import main; sys.exit(main(sys.argv[2:]))")
    return subprocess.run([sys.executable, "-c", code, version, *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=600)


def test_outputs_of_another_converter_version_are_converted_again(ckpt, tmp_path, clean_outputs):
    out = tmp_path / "out"
    older = run_as_version("0.0.1", "--megatron-path", ckpt / "iter_0000010", "--ms-path", out, *SIZES)
    assert older.returncode == 0 and "summary: 4 converted" in older.stdout, older.stdout + older.stderr
    current = convert(ckpt, out)
    assert current.returncode == 0, current.stdout
    assert "summary: 4 converted, 0 skipped, 0 failed" in current.stdout
    assert sum("written by another version of the converter" in line for line in current.stdout.splitlines()) == 4
    for rank in RANKS:
        assert (out / f"rank_{rank}/network.ckpt").read_bytes() == clean_outputs[rank]


IN_A_PROCESS_RUNNING_MINDSPORE = """
import sys
from pathlib import Path
import numpy as np
import mindspore as ms
from megatron_ms_convert import ckpt2pt, pt2ckpt
from megatron_ms_convert.runner import threads_named_by_libraries
scratch, source, there, back = map(Path, sys.argv[1:5])
sizes = sys.argv[5:]
ms.save_checkpoint([{"name": "w", "data": ms.Tensor(np.ones(3, np.float32))}], str(scratch))
w = ms.load_checkpoint(str(scratch))["w"]
(w + w).asnumpy()  # an operation: MindSpore's runtime threads run from here on
print("named threads:", threads_named_by_libraries(), flush=True)
assert pt2ckpt.main(["--megatron-path", str(source), "--ms-path", str(there), "--verify", "--debug", *sizes]) == 0
assert ckpt2pt.main(["--ms-path", str(there), "--param-map-path", str(there / "pt_meta"),
                     "--megatron-path", str(back), "--verify", *sizes, "--cp-size", "1", "--vpp-size", "1"]) == 0
print("both directions done", flush=True)
"""


def test_a_process_running_mindspore_converts_both_ways_without_hanging(tmp_path, clean_outputs):
    """A program that has loaded a MindSpore checkpoint (so MindSpore's runtime threads run) calls
    the conversion in-process: forked workers could inherit a lock one of those threads held and hang,
    so the workers start from a fork server; the outputs are those of a run from the shell."""
    there, back = tmp_path / "ms", tmp_path / "back"
    proc = subprocess.run([sys.executable, "-c", IN_A_PROCESS_RUNNING_MINDSPORE, tmp_path / "scratch.ckpt",
                           SAMPLE / "iter_0000010", there, back, *map(str, SIZES)],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [threads] = [line for line in proc.stdout.splitlines() if line.startswith("named threads:")]
    assert "[]" not in threads, threads  # the case this test is about: MindSpore's threads are running
    assert "both directions done" in proc.stdout
    assert "workers start from a fork server" in proc.stdout + proc.stderr  # not forked from this process
    assert assert_outputs_complete_and_correct(there, clean_outputs) == len(RANKS)
    from_the_shell = tmp_path / "back_from_the_shell"
    shell = run_back("--ms-path", there, "--param-map-path", there / "pt_meta", "--megatron-path", from_the_shell,
                     *SIZES, "--cp-size", 1, "--vpp-size", 1)
    assert shell.returncode == 0, shell.stdout + shell.stderr
    written = sorted(p.relative_to(from_the_shell) for p in from_the_shell.rglob("*.pt"))
    assert len([p for p in written if p.name == "distrib_optim.pt"]) == len(RANKS), written
    for each in written:
        assert (back / each).read_bytes() == (from_the_shell / each).read_bytes(), each
