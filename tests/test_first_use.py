"""What a new user trips on (issue 18 §2), both directions: --verify without MindSpore is refused
before any work, a run refused for bad input leaves nothing behind (not even the missing parents of
its output folder), an output folder that is a file is called a file, and a run stopped while it
verifies leaves files at final paths only where a "complete" manifest vouches for them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.expected_outputs import CLI, REPO, SAMPLE
from tests.helpers import BACK_CLI, SIZES, back_flags, error_lines, leftovers

SAMPLE_ITER = SAMPLE / "iter_0000010"
BACK_SIZES = back_flags(tp=2, pp=2, dp=2)

# Runs a command line with `mindspore` unimportable, as after a plain `pip install .`: a finder
# ahead of every other refuses it (argv: the script, then its flags).
WITHOUT_MINDSPORE = """
import runpy, sys
class NoMindSpore:
    def find_spec(self, name, path=None, target=None):
        if name == "mindspore" or name.startswith("mindspore."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NoMindSpore())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run(script: Path, *args, without_mindspore: bool = False) -> subprocess.CompletedProcess:
    prefix = ["-c", WITHOUT_MINDSPORE] if without_mindspore else []
    return subprocess.run([sys.executable, *prefix, str(script), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def sample_ms(tmp_path_factory):
    """The Megatron sample converted to MindSpore, the way back's input."""
    out = tmp_path_factory.mktemp("first_use") / "ms"
    proc = run(CLI, "--megatron-path", SAMPLE_ITER, "--ms-path", out, *SIZES)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def back_args(ms: Path, megatron: Path, *extra) -> list:
    return ["--ms-path", ms, "--param-map-path", ms / "pt_meta", "--megatron-path", megatron, *BACK_SIZES, *extra]


# ---------------------------------------------------------------------------------------------
# --verify without MindSpore


def test_verify_without_mindspore_is_refused_before_any_work(tmp_path):
    out = tmp_path / "new" / "ms"
    proc = run(CLI, "--megatron-path", SAMPLE_ITER, "--ms-path", out, *SIZES, "--verify", without_mindspore=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    [line] = error_lines(proc)
    assert "--verify needs mindspore" in line and "pip install .[verify]" in line, line
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "new").exists()


def test_without_mindspore_the_forward_run_and_the_way_back_with_verify_still_work(sample_ms, tmp_path):
    """The refusal is for the forward --verify alone: converting without it, and the way back's
    --verify (which reads its outputs with torch), need no MindSpore."""
    forward = run(CLI, "--megatron-path", SAMPLE_ITER, "--ms-path", tmp_path / "ms", *SIZES, without_mindspore=True)
    assert forward.returncode == 0, forward.stdout + forward.stderr
    back = run(BACK_CLI, *back_args(sample_ms, tmp_path / "back", "--verify"), without_mindspore=True)
    assert back.returncode == 0, back.stdout + back.stderr
    assert "verified" in back.stdout and "Traceback" not in back.stdout + back.stderr


# ---------------------------------------------------------------------------------------------
# Bad input creates nothing


def test_an_output_folder_that_is_a_file_is_called_a_file(sample_ms, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    cases = [(CLI, "--ms-path", ["--megatron-path", SAMPLE_ITER, "--ms-path", afile, *SIZES]),
             (CLI, "--ms-path", ["--megatron-path", SAMPLE_ITER, "--ms-path", afile / "ms", *SIZES]),
             (BACK_CLI, "--megatron-path", back_args(sample_ms, afile)),
             (BACK_CLI, "--megatron-path", back_args(sample_ms, afile / "deeper" / "megatron"))]
    for script, flag, args in cases:
        proc = run(script, *args)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        [line] = error_lines(proc)
        assert f"{flag} " in line and "is a file, not a folder" in line, line
        assert "Errno" not in line, line
        assert afile.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_run_refused_for_bad_input_creates_nothing(sample_ms, tmp_path):
    """Each of these is found once the inputs are read (not by the flags alone): the missing parents
    of the output folder must not exist afterwards."""
    missing = tmp_path / "missing"
    out = missing / "parent" / "out"
    cases = [(CLI, ["--megatron-path", tmp_path / "no_such_checkpoint", "--ms-path", out, *SIZES]),
             (CLI, ["--megatron-path", SAMPLE_ITER, "--ms-path", out, "--tp-size", 4, "--pp-size", 2,
                    "--dp-size", 2]),  # contradicts the saved args
             (CLI, ["--megatron-path", SAMPLE_ITER, "--ms-path", out, *SIZES, "--param-map-path",
                    tmp_path / "no_such_param_map"]),
             (BACK_CLI, back_args(tmp_path / "no_such_ms", out)),
             (BACK_CLI, ["--ms-path", sample_ms, "--param-map-path", sample_ms / "pt_meta", "--megatron-path", out,
                         *back_flags(tp=4, pp=2, dp=2)])]
    for script, args in cases:
        proc = run(script, *args)
        assert proc.returncode == 2, (args, proc.stdout + proc.stderr)
        assert len(error_lines(proc)) == 1, proc.stdout
        assert not missing.exists(), (args, sorted(map(str, missing.rglob("*"))))


# ---------------------------------------------------------------------------------------------
# Ctrl-C while verifying: files at final paths agree with their manifests


def outputs_and_vouched(files: list[Path], manifests: list[Path]) -> tuple[set[str], set[str]]:
    """The rank outputs at final paths, and the files that "complete" manifests list (with the size
    they have)."""
    vouched = set()
    for path in manifests:
        record = json.loads(path.read_text())
        if record["state"] == "complete":
            for name, size in record["files"].items():
                assert Path(name).stat().st_size == size, name
                vouched.add(name)
    return {str(p) for p in files}, vouched


def stop_at_first_output(proc: subprocess.Popen, first_output: Path, deadline_s: float = 120) -> psutil.Process:
    """SIGSTOP the worker as soon as its first output is at its final path: from then until its
    manifest says "complete" (on main: after --verify) a stop leaves that file behind."""
    parent = psutil.Process(proc.pid)
    end = time.monotonic() + deadline_s
    while not first_output.exists():
        assert time.monotonic() < end and proc.poll() is None, "the output never appeared"
        time.sleep(0.001)
    [worker] = parent.children()
    worker.suspend()
    return worker


def interrupt_while_verifying(script: Path, args: list, first_output: Path) -> str:
    proc = subprocess.Popen([sys.executable, str(script), *map(str, args), "--verify", "--process-limit", "1"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        worker = stop_at_first_output(proc, first_output)
        proc.send_signal(signal.SIGINT)
        log, _ = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, log
    assert not psutil.pid_exists(worker.pid) or worker.status() == psutil.STATUS_ZOMBIE
    return log


def test_ctrl_c_while_verifying_leaves_no_file_without_a_complete_manifest(tmp_path):
    out = tmp_path / "ms"
    log = interrupt_while_verifying(CLI, ["--megatron-path", SAMPLE_ITER, "--ms-path", out, *SIZES],
                                    out / "rank_0" / "network.ckpt")
    files = [*out.glob("rank_*/*"), *(out / "pt_meta").glob("args_*.pt")]
    found, vouched = outputs_and_vouched(files, list((out / "pt_meta").glob("manifest_*.json")))
    assert found == vouched, (log, found, vouched)
    assert leftovers(out) == []


def test_ctrl_c_while_verifying_on_the_way_back_leaves_no_file_without_a_complete_manifest(sample_ms, tmp_path):
    megatron = tmp_path / "back"
    iteration = megatron / "iter_0000010"
    log = interrupt_while_verifying(BACK_CLI, back_args(sample_ms, megatron),
                                    iteration / "mp_rank_00_000" / "distrib_optim.pt")
    found, vouched = outputs_and_vouched(list(iteration.glob("mp_rank_*/*.pt")),
                                         list(iteration.glob(".convert_ckpt2pt/manifest_*.json")))
    assert found == vouched, (log, found, vouched)
    assert not list(megatron.rglob("*.partial*"))
