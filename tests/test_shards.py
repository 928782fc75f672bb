"""One conversion shared by several processes on one output folder, as Slurm arrays, torchrun or MPI
would start them: concurrent shards give exactly the files of one unsharded run, a killed shard is
found by --check and finished by re-running it, two processes given the same share cannot both run,
and --shard auto reads each launcher's variables."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from tests.expected_outputs import CLI, SAMPLE, run_cli
from tests.helpers import SIZES, leftovers, stop_first_worker

FOLDERS = ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
LAUNCHERS = {"SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_STEP",
             "SLURM_PROCID", "SLURM_NTASKS", "RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
             "PMI_RANK", "PMI_SIZE"}


def clean_env(**extra) -> dict:
    """The test's environment without any launcher's variables (CI may itself run under one)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHERS}
    env.update(extra)
    return env


def command(out, *extra) -> list[str]:
    return [sys.executable, str(CLI), "--megatron-path", str(SAMPLE / "iter_0000010"), "--ms-path", str(out),
            *map(str, SIZES), *map(str, extra)]


def start(out, *extra, env=None) -> subprocess.Popen:
    return subprocess.Popen(command(out, *extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env or clean_env(), start_new_session=True)


def tree(out) -> dict[str, object]:
    """Every file under the output folder by relative path (lock files are gone after a run). A
    manifest names files by absolute path and fingerprints the plan, which holds the output paths:
    those are compared with the folder's own path taken out."""
    found = {}
    for path in sorted(out.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.name.startswith("manifest_"):
                manifest = json.loads(data.decode().replace(str(out), "<out>"))
                manifest.pop("fingerprint")
                data = manifest
            found[str(path.relative_to(out))] = data
    return found


def converted_folders(log: str) -> list[str]:
    return sorted(re.findall(r"convert '.*/(mp_rank_\d\d_\d\d\d)' to .* successfully", log))


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("unsharded")
    proc = subprocess.run(command(out), capture_output=True, text=True, env=clean_env())
    assert proc.returncode == 0, proc.stdout
    return tree(out)


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_concurrent_shards_write_exactly_the_files_of_one_run(tmp_path, unsharded, count):
    out = tmp_path / "out"
    procs = [start(out, "--shard", f"{i}/{count}") for i in range(count)]
    logs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * count, logs
    assert tree(out) == unsharded
    mine = [converted_folders(log) for log in logs]
    assert sorted(sum(mine, [])) == FOLDERS  # each folder converted by exactly one shard
    for i, log in enumerate(logs):
        assert f"summary (shard {i}/{count}):" in log and f"of {len(mine[i])} folders" in log
        assert sum("successfully" in line for line in log.splitlines()) == len(mine[i])
    check = run_cli("--megatron-path", SAMPLE / "iter_0000010", "--ms-path", out, *SIZES, "--check")
    assert check.returncode == 0, check.stdout
    assert "check: 4 complete, 0 missing" in check.stdout


def test_a_killed_shard_is_found_by_check_and_finished_by_a_rerun(tmp_path, unsharded):
    out = tmp_path / "out"
    victim = start(out, "--shard", "0/2", "--process-limit", 1)
    stop_first_worker(victim)  # the shard is mid-run: a worker is busy, its other folder not started
    os.killpg(victim.pid, signal.SIGKILL)
    victim.communicate(timeout=60)
    other = start(out, "--shard", "1/2")
    assert other.wait(timeout=300) == 0, other.communicate()[0]

    check = run_cli("--megatron-path", SAMPLE / "iter_0000010", "--ms-path", out, *SIZES, "--check")
    assert check.returncode == 1, check.stdout
    missing = re.findall(r"ERROR check: '.*/(mp_rank_\d\d_\d\d\d)' -> .*: missing", check.stdout)
    assert 1 <= len(missing) <= 2, check.stdout
    assert re.search(rf"check: {4 - len(missing)} complete, {len(missing)} missing", check.stdout)

    rerun = start(out, "--shard", "0/2")
    log = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, log
    assert set(missing) <= set(converted_folders(log))
    check = run_cli("--megatron-path", SAMPLE / "iter_0000010", "--ms-path", out, *SIZES, "--check")
    assert check.returncode == 0, check.stdout
    assert leftovers(out) == []
    assert {k: v for k, v in tree(out).items()} == unsharded


def test_two_processes_with_the_same_share_cannot_both_run(tmp_path):
    out = tmp_path / "out"
    first = start(out, "--shard", "1/2", "--process-limit", 1)
    try:
        stop_first_worker(first)  # holds its lock, frozen mid-run
        second = subprocess.run(command(out, "--shard", "1/2"), capture_output=True, text=True, env=clean_env(),
                                timeout=120)
        assert second.returncode == 2, second.stdout
        [error] = [line for line in second.stdout.splitlines() if " ERROR " in line]
        assert f"pid {first.pid}" in error and ".convert.shard-1-of-2.lock" in error
        # another share of the same conversion is not held back by it
        third = subprocess.run(command(out, "--shard", "0/2"), capture_output=True, text=True, env=clean_env(),
                               timeout=300)
        assert third.returncode == 0, third.stdout
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate(timeout=60)


@pytest.mark.parametrize("variables, index, count, origin", [
    ({"SLURM_ARRAY_TASK_ID": "11", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_MAX": "13"}, 1, 4, "Slurm"),
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "3"}, 2, 3, "Slurm"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, 0, 2, "torchrun"),
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4"}, 3, 4, "Open MPI"),
    ({"PMI_RANK": "1", "PMI_SIZE": "2"}, 1, 2, "PMI"),
])
def test_shard_auto_takes_the_launchers_share(tmp_path, variables, index, count, origin):
    auto = subprocess.run(command(tmp_path / "auto", "--shard", "auto"), capture_output=True, text=True,
                          env=clean_env(**variables), timeout=300)
    explicit = subprocess.run(command(tmp_path / "explicit", "--shard", f"{index}/{count}"), capture_output=True,
                              text=True, env=clean_env(), timeout=300)
    assert auto.returncode == 0 and explicit.returncode == 0, auto.stdout + explicit.stdout
    assert f"shard {index}/{count} (--shard auto ({origin}" in auto.stdout
    assert converted_folders(auto.stdout) == converted_folders(explicit.stdout)
    assert tree(tmp_path / "auto") == tree(tmp_path / "explicit")


def test_shard_auto_without_a_launcher_says_what_to_pass(tmp_path):
    proc = subprocess.run(command(tmp_path / "out", "--shard", "auto"), capture_output=True, text=True,
                          env=clean_env(), timeout=120)
    assert proc.returncode == 2
    [error] = [line for line in proc.stdout.splitlines() if " ERROR " in line]
    assert "no launcher's variables are set" in error and "--shard I/N" in error
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# The way back: convert_ckpt2pt.py shares its output folders (Megatron's mp_rank_* folders) the same way

BACK_CLI = CLI.parent / "convert_ckpt2pt.py"


def back_command(ms, out, *extra) -> list[str]:
    return [sys.executable, str(BACK_CLI), "--ms-path", str(ms), "--param-map-path", str(ms / "pt_meta"),
            "--megatron-path", str(out), "--num-layers", "4", "--tp-size", "2", "--pp-size", "2", "--dp-size", "2",
            "--cp-size", "1", "--vpp-size", "1", *map(str, extra)]


@pytest.fixture(scope="module")
def sample_ms(tmp_path_factory):
    ms = tmp_path_factory.mktemp("sample_ms") / "ms"
    proc = subprocess.run(command(ms), capture_output=True, text=True, env=clean_env())
    assert proc.returncode == 0, proc.stdout
    return ms


@pytest.fixture(scope="module")
def unsharded_back(sample_ms, tmp_path_factory):
    out = tmp_path_factory.mktemp("unsharded_back") / "megatron"
    proc = subprocess.run(back_command(sample_ms, out), capture_output=True, text=True, env=clean_env())
    assert proc.returncode == 0, proc.stdout
    return tree(out)


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_concurrent_shards_of_the_way_back_write_exactly_the_files_of_one_run(
        sample_ms, unsharded_back, tmp_path, count):
    out = tmp_path / "megatron"
    procs = [subprocess.Popen(back_command(sample_ms, out, "--shard", f"{i}/{count}"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=clean_env()) for i in range(count)]
    logs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * count, logs
    assert tree(out) == unsharded_back  # the tracker file included, written once the last share finished
    converted = [line for log in logs for line in log.splitlines() if "successfully" in line]
    assert len(converted) == 4
    for i, log in enumerate(logs):
        assert f"summary (shard {i}/{count}):" in log
    check = subprocess.run(back_command(sample_ms, out, "--check"), capture_output=True, text=True, env=clean_env())
    assert check.returncode == 0 and "check: 4 complete, 0 missing" in check.stdout, check.stdout


def test_the_tracker_file_waits_for_the_last_share_of_the_way_back(sample_ms, tmp_path):
    out = tmp_path / "megatron"
    first = subprocess.run(back_command(sample_ms, out, "--shard", "0/2"), capture_output=True, text=True,
                           env=clean_env(), timeout=300)
    assert first.returncode == 0, first.stdout
    assert not (out / "latest_checkpointed_iteration.txt").exists()  # Megatron must not load half a checkpoint
    check = subprocess.run(back_command(sample_ms, out, "--check"), capture_output=True, text=True, env=clean_env())
    assert check.returncode == 1 and re.search(r"check: 2 complete, 2 missing", check.stdout), check.stdout
    second = subprocess.run(back_command(sample_ms, out, "--shard", "1/2"), capture_output=True, text=True,
                            env=clean_env(), timeout=300)
    assert second.returncode == 0, second.stdout
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "10"
