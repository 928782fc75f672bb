"""Faults and bad input: the CLI as a subprocess on damaged, stale or contradictory input, killed or
interrupted workers. Each case checks the exit code, the one-line error, and the files left behind:
no file at a final output path that is not complete, no stray temporaries, no `successfully` for a
rank that failed, and outputs of ranks that finished intact."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
from pathlib import Path

import psutil
import pytest
import torch

from tests.expected_outputs import SAMPLE, assert_rank_files_match, expected_tensors, load_record, run_cli
from tests.helpers import (RANKS, assert_outputs_complete_and_correct, convert, error_lines, kill_first_worker,
                           leftovers, start_cli, stop_first_worker, success_count)


def output_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.glob("rank_*/*"))


def assert_refused_before_work(proc, out: Path, *needles: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    [line] = error_lines(proc)
    for needle in needles:
        assert needle in line, (needle, line)
    assert success_count(proc) == 0
    assert not out.exists() or not output_files(out)
    assert not out.exists() or not leftovers(out)


def test_truncated_distrib_optim(ckpt, tmp_path):
    target = ckpt / "iter_0000010/mp_rank_01_001/distrib_optim.pt"
    target.write_bytes(target.read_bytes()[:50_000])
    out = tmp_path / "out"
    assert_refused_before_work(convert(ckpt, out), out, str(target), "re-copy the file")


def test_truncated_model_optim_rng(ckpt, tmp_path):
    target = ckpt / "iter_0000010/mp_rank_00_001/model_optim_rng.pt"
    target.write_bytes(target.read_bytes()[:-300])
    out = tmp_path / "out"
    assert_refused_before_work(convert(ckpt, out), out, str(target))


def test_not_a_torch_file(ckpt, tmp_path):
    target = ckpt / "iter_0000010/mp_rank_00_000/distrib_optim.pt"
    target.write_text("this is not a checkpoint\n")
    out = tmp_path / "out"
    assert_refused_before_work(convert(ckpt, out), out, str(target), "not a readable torch checkpoint")


def test_missing_distrib_optim(ckpt, tmp_path):
    target = ckpt / "iter_0000010/mp_rank_00_001/distrib_optim.pt"
    target.unlink()
    out = tmp_path / "out"
    assert_refused_before_work(convert(ckpt, out), out, str(target), "--convert-param-only")


def test_pickle_that_would_run_code_is_refused(ckpt, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    target = ckpt / "iter_0000010/mp_rank_00_000/model_optim_rng.pt"
    torch.save({"iteration": 10, "payload": Evil()}, target)
    out = tmp_path / "out"
    assert_refused_before_work(convert(ckpt, out), out, str(target), "refused to unpickle")
    assert not marker.exists()


def test_distributed_checkpoint_format_is_named(tmp_path):
    folder = tmp_path / "save" / "iter_0000005"
    folder.mkdir(parents=True)
    (folder / "common.pt").write_bytes(b"")
    (folder / ".metadata").write_bytes(b"")
    out = tmp_path / "out"
    proc = run_cli("--megatron-path", folder, "--ms-path", out)
    assert_refused_before_work(proc, out, str(folder), "torch_dist", "without --use-dist-ckpt")


def test_missing_rank_folder(ckpt, tmp_path):
    shutil.rmtree(ckpt / "iter_0000010/mp_rank_01_000")
    out = tmp_path / "out"
    assert_refused_before_work(convert(ckpt, out), out, "missing mp_rank_01_000", "--tp-size")


def test_extra_rank_folder(ckpt, tmp_path):
    shutil.copytree(ckpt / "iter_0000010/mp_rank_01_000", ckpt / "iter_0000010/mp_rank_02_000")
    out = tmp_path / "out"
    assert_refused_before_work(convert(ckpt, out), out, "unexpected mp_rank_02_000")


@pytest.mark.parametrize("sizes, extra, needles", [
    ({"--tp-size": 1}, [], ["unexpected mp_rank_01_000", "--tp-size 1"]),
    ({"--pp-size": 1}, [], ["mp_rank_00_000", "--pp-size"]),
    ({}, ["--vpp-size", 2], ["--vpp-size 2 contradicts", "pass --vpp-size 1"]),
    ({}, ["--num-layers", 6], ["--num-layers 6 contradicts", "pass --num-layers 4"]),
    ({}, ["--stage-list", 3, 2], ["--stage-list 3 2 sums to 5", "--num-layers 4"]),
    ({}, ["--stage-list", 3, 1], ["model chunk 0 holds layers 0..1", "--stage-list"]),
    ({}, ["--dist-opt-content", "param", "momentum"], ["no optimizer state ['momentum']", "--dist-opt-content"]),
    ({}, ["--parallel-init-order", "tp-dp-pp"], ["--parallel-init-order"]),
])
def test_flags_that_contradict_the_checkpoint(ckpt, tmp_path, sizes, extra, needles):
    out = tmp_path / "out"
    flags = {"--tp-size": 2, "--pp-size": 2, "--dp-size": 2, **sizes}
    proc = run_cli("--megatron-path", ckpt / "iter_0000010", "--ms-path", out,
                   *[x for pair in flags.items() for x in pair], *extra)
    assert_refused_before_work(proc, out, *needles)


def test_stale_param_map_wrong_sizes(ckpt, tmp_path):
    maps = ckpt / "param_map"
    for path in maps.glob("*tp1pp0*.json"):
        layout = json.loads(path.read_text())
        name = "module.language_model.encoder.layers.1.mlp.dense_h_to_4h.bias"
        layout[name][3] -= 5  # a map from a run with another ffn size
        path.write_text(json.dumps(layout))
    out = tmp_path / "out"
    proc = convert(ckpt, out, "--param-map-path", maps)
    assert_refused_before_work(proc, out, "param_map_buffer0_dp0tp1pp0vpp0.json", "dense_h_to_4h.bias",
                               "--param-map-path")


def test_param_map_missing_a_chunk_file(ckpt, tmp_path):
    for path in (ckpt / "param_map").glob("*tp0pp1vpp0.json"):
        path.unlink()
    out = tmp_path / "out"
    proc = convert(ckpt, out, "--param-map-path", ckpt / "param_map")
    assert_refused_before_work(proc, out, "tp0 pp1 cover model chunks []", "vpp0")


def test_ms_path_not_writable(ckpt, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "out"  # a folder below a regular file can never be created, even by root
    proc = convert(ckpt, out)
    assert proc.returncode == 2
    [line] = error_lines(proc)
    assert str(blocker) in line and "--ms-path" in line
    assert success_count(proc) == 0


def limit_file_size(nbytes):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return apply


def test_disk_full_mid_write_then_resume(ckpt, tmp_path, clean_outputs):
    out = tmp_path / "out"
    # every rank file is ~240 kB: the limit (like a full disk) hits each rank in the middle of its file
    proc = convert(ckpt, out, "--process-limit", 2, preexec_fn=limit_file_size(100_000))
    assert proc.returncode == 1, proc.stdout
    errors = error_lines(proc)
    assert len(errors) == 4 and all("File too large" in e and "mp_rank_" in e for e in errors), errors
    assert success_count(proc) == 0
    assert output_files(out) == [] and leftovers(out) == []
    assert "summary: 0 converted, 0 skipped, 4 failed" in proc.stdout
    again = convert(ckpt, out)
    assert again.returncode == 0, again.stdout
    assert "summary: 4 converted, 0 skipped, 0 failed" in again.stdout
    for rank in RANKS:
        assert (out / f"rank_{rank}/network.ckpt").read_bytes() == clean_outputs[rank]


def test_worker_killed_by_a_signal(ckpt, tmp_path, clean_outputs):
    out = tmp_path / "out"
    log = kill_first_worker(start_cli(ckpt, out, "--process-limit", 1), "mp_rank_", converted=3)
    assert "summary: 3 converted, 0 skipped, 1 failed" in log
    assert assert_outputs_complete_and_correct(out, clean_outputs) >= 3


def test_worker_past_process_timeout_is_stopped(ckpt, tmp_path, clean_outputs):
    out = tmp_path / "out"
    # long enough that a worker not frozen finishes in time on a loaded machine (2 s did not, in a full run)
    proc = start_cli(ckpt, out, "--process-limit", 1, "--process_timeout", 15)
    worker = stop_first_worker(proc)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, log
    [error] = [line for line in log.splitlines() if " ERROR " in line]
    assert "timed out after --process_timeout 15 s" in error
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
    assert assert_outputs_complete_and_correct(out, clean_outputs) >= 3


def test_ctrl_c_stops_cleanly_and_a_rerun_finishes(ckpt, tmp_path, clean_outputs):
    out = tmp_path / "out"
    proc = start_cli(ckpt, out, "--process-limit", 1)
    stop_first_worker(proc)
    os.killpg(proc.pid, signal.SIGINT)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, log
    assert "interrupted" in log and sum("successfully" in line for line in log.splitlines()) == 0
    assert assert_outputs_complete_and_correct(out, clean_outputs) <= 1
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    again = convert(ckpt, out)
    assert again.returncode == 0 and success_count(again) == 4
    for rank in RANKS:
        assert (out / f"rank_{rank}/network.ckpt").read_bytes() == clean_outputs[rank]


def test_rerun_skips_complete_ranks_and_overwrite_redoes_them(ckpt, tmp_path):
    out = tmp_path / "out"
    assert convert(ckpt, out).returncode == 0
    again = convert(ckpt, out)
    assert again.returncode == 0 and success_count(again) == 4
    assert "summary: 0 converted, 4 skipped, 0 failed" in again.stdout
    forced = convert(ckpt, out, "--overwrite")
    assert forced.returncode == 0 and "summary: 4 converted, 0 skipped" in forced.stdout


def test_outputs_from_another_source_are_not_mixed(ckpt, tmp_path):
    out = tmp_path / "out"
    assert convert(ckpt, out).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    other = convert(ckpt, out, "--dist-opt-content", "param")
    assert other.returncode == 2
    [line] = error_lines(other)
    assert "already exist" in line and "--overwrite" in line
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    forced = convert(ckpt, out, "--dist-opt-content", "param", "--overwrite")
    assert forced.returncode == 0
    assert_rank_files_match(out, expected_tensors(load_record(SAMPLE), tp_size=2, dp_size=2, states=("param",)))


def test_verify_reports_counts_and_catches_a_damaged_output(ckpt, tmp_path):
    out = tmp_path / "out"
    proc = convert(ckpt, out, "--verify")
    assert proc.returncode == 0, proc.stdout
    assert "verified 450 tensors in 4 files" in proc.stdout
    target = out / "rank_5/network.ckpt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte inside tensor data
    target.chmod(0o600)
    target.write_bytes(bytes(data))
    again = convert(ckpt, out, "--verify")
    assert again.returncode == 1, again.stdout
    [line] = error_lines(again)
    assert "rank_5/network.ckpt" in line and "differs" in line and "mp_rank_01_001" in line
    assert success_count(again) == 3
    assert not target.exists()  # a file known to be wrong does not stay at a final path
    repaired = convert(ckpt, out, "--verify")
    assert repaired.returncode == 0 and "summary: 1 converted, 3 skipped, 0 failed" in repaired.stdout
    assert "verified 450 tensors in 4 files" in repaired.stdout


def test_verify_catches_a_damaged_dp_copy(ckpt, tmp_path):
    out = tmp_path / "out"
    assert convert(ckpt, out, "--generate-all-dp-cp").returncode == 0
    copy = out / "rank_2/network.ckpt"  # the dp 1 copy of tp 0, pp 0 (rank_0)
    data = bytearray(copy.read_bytes())
    data[-3] ^= 0x01
    copy.chmod(0o600)
    copy.write_bytes(bytes(data))
    again = convert(ckpt, out, "--generate-all-dp-cp", "--verify")
    assert again.returncode == 1
    [line] = error_lines(again)
    assert "rank_2/network.ckpt: differs from" in line and "rank_0/network.ckpt" in line
    assert "verified" in again.stdout and success_count(again) == 3
