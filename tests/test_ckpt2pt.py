"""The way back, end to end: Megatron -> convert_pt2ckpt -> convert_ckpt2pt -> Megatron, compared with
the ORIGINAL Megatron-format files (the fixture's or Megatron's own), never with this package's
builders: every distrib_optim.pt tensor bitwise outside padding and zeros in it, model_optim_rng.pt
equal in structure and values. A checkpoint changed by MindSpore's own load/save converts back to
exactly the changed values. Bad input and interrupted runs: one-line error naming the file and the
fix, non-zero exit, nothing half-written, and a re-run completes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_ms_convert.ckpt2pt import main as ckpt2pt_main
from megatron_ms_convert.megatron.checkpoint import load_pt
from megatron_ms_convert.pt2ckpt import main as pt2ckpt_main
from tests.expected_outputs import SAMPLE
from tests.helpers import BACK_CLI, back_flags, in_process, run_back
from tests.megatron_fixture import FixtureSpec, write_fixture
from tests.helpers import (LAYOUTS, Recorded, assert_distrib_equal, assert_same, kill_first_worker, leftovers,
                           mindspore_train_step, size_flags, stop_first_worker)

SAMPLE_SIZES = dict(tp=2, pp=2, dp=2, cp=1, vpp=1)

# layouts of the forward tests (tp/pp/vpp/dp/cp, padding, several buckets and buffers, fp16/fp32, legacy/mcore,
# untied, uneven stages, release), each in one (format, name style); together they cover all four
COMBOS = [("ckpt", "mindspeed"), ("safetensors", "documented"), ("safetensors", "mindspeed"), ("ckpt", "documented")]
ROUND_TRIP_LAYOUTS = ["tp2_pp2_dp2_small_buckets_padded", "pp4_vpp2_dp2_buckets_in_chunk0", "fp16_tp2_dp3",
                      "fp32_pp2", "mcore_te_pp3_vpp2_untied", "legacy_rmsnorm_untied_pp2", "mixed_dtype_two_buffers",
                      "mcore_cp2_release", "uneven_stage_list", "mcore_tp2_pp2_tied"]
ROUND_TRIPS = {name: (LAYOUTS[name], *COMBOS[i % len(COMBOS)]) for i, name in enumerate(ROUND_TRIP_LAYOUTS)}


def to_ms(megatron_iter: Path, ms_path: Path, flags: list, *extra) -> None:
    proc = in_process(pt2ckpt_main, "--megatron-path", megatron_iter, "--ms-path", ms_path, *flags, *extra)
    assert proc.returncode == 0, proc.stdout


def successes(proc) -> int:
    return sum("successfully" in line for line in proc.stdout.splitlines())


def errors(proc) -> list[str]:
    return [line for line in proc.stdout.splitlines() if " ERROR " in line]


def assert_same_checkpoint(back_iter: Path, original_iter: Path, *, ignore_args=()) -> int:
    """Every rank folder of the original has its twin, with equal files; returns buckets compared."""
    folders = sorted(p.name for p in original_iter.glob("mp_rank_*"))
    assert sorted(p.name for p in back_iter.glob("mp_rank_*")) == folders
    buckets = 0
    for name in folders:
        ours, theirs = back_iter / name, original_iter / name
        buckets += assert_distrib_equal(ours / "distrib_optim.pt", theirs / "distrib_optim.pt")
        got, want = load_pt(ours / "model_optim_rng.pt"), load_pt(theirs / "model_optim_rng.pt")
        for field in ignore_args:
            delattr(got["args"], field)
            delattr(want["args"], field)
        assert_same(got, want)
    return buckets


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.fixture(scope="module", params=sorted(ROUND_TRIPS))
def round_trip(request, tmp_path_factory):
    spec, fmt, style = ROUND_TRIPS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    fixture = write_fixture(root / "save", spec)
    forward = in_process(pt2ckpt_main, "--megatron-path", fixture.megatron_path, "--ms-path", root / "ms",
                         *size_flags(spec), "--param-map-path", fixture.param_map_dir, "--format", fmt,
                         "--name-style", style)
    assert forward.returncode == 0, forward.stdout
    proc = in_process(ckpt2pt_main, "--ms-path", root / "ms", "--param-map-path", root / "ms" / "pt_meta",
                      "--megatron-path", root / "back", *back_flags(spec.tp, spec.pp, spec.dp, spec.cp, spec.vpp),
                      "--src-model-format", fmt, "--num-layers", spec.num_layers)
    return spec, fixture, root, proc


def test_round_trip_equals_the_original(round_trip):
    spec, fixture, root, proc = round_trip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert successes(proc) == spec.tp * spec.pp and "WARNING" not in proc.stdout
    assert (root / "back" / "latest_checkpointed_iteration.txt").read_text() == "10"
    buckets = assert_same_checkpoint(root / "back" / "iter_0000010", fixture.megatron_path)
    assert buckets >= 3 * spec.tp * spec.pp
    assert not list((root / "back").rglob("*.partial*"))


def test_megatron_sample_round_trip_with_verify(sample_ms, tmp_path):
    proc = run_back("--ms-path", sample_ms, "--param-map-path", sample_ms / "pt_meta",
                    "--megatron-path", tmp_path / "back", *back_flags(**SAMPLE_SIZES), "--verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert successes(proc) == 4 and "verified" in proc.stdout and "in 8 files" in proc.stdout
    # 3 states x 2 tp ranks x (10 buckets on stage 0 + 2 on stage 1)
    assert assert_same_checkpoint(tmp_path / "back" / "iter_0000010", SAMPLE / "iter_0000010") == 3 * 2 * 12
    again = back(sample_ms, tmp_path / "back")
    assert again.returncode == 0 and "summary: 0 converted, 4 skipped, 0 failed" in again.stdout
    forced = back(sample_ms, tmp_path / "back", "--overwrite")
    assert forced.returncode == 0 and "summary: 4 converted, 0 skipped" in forced.stdout


def test_another_data_parallel_size_equals_that_checkpoint(tmp_path):
    spec = FixtureSpec(pp=3, vpp=2, num_layers=6, overlap_grad_reduce=True, bucket_size=250, vocab=49, hidden=10,
                       ffn=25, seq_length=7)  # odd sizes, so that padding differs between dp sizes
    source = write_fixture(tmp_path / "source", replace(spec, dp=2))
    target = write_fixture(tmp_path / "target", replace(spec, dp=3), record=False)
    to_ms(source.megatron_path, tmp_path / "ms", size_flags(replace(spec, dp=2)))
    proc = run_back("--ms-path", tmp_path / "ms", "--param-map-path", tmp_path / "ms" / "pt_meta",
                    "--megatron-path", tmp_path / "back", *back_flags(pp=3, vpp=2, dp=3), "--ms-dp-size", 2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    moved = False
    for folder in sorted(source.megatron_path.glob("mp_rank_*")):
        out = tmp_path / "back" / "iter_0000010" / folder.name
        # the distributed optimizer's file equals the one Megatron's layout rules give at dp 3 ...
        assert_distrib_equal(out / "distrib_optim.pt", target.megatron_path / folder.name / "distrib_optim.pt")
        moved |= load_pt(out / "distrib_optim.pt")["per_bucket_numel"] != \
            load_pt(folder / "distrib_optim.pt")["per_bucket_numel"]
        # ... and the model file is the source's with the data-parallel size of the new run
        got, want = load_pt(out / "model_optim_rng.pt"), load_pt(folder / "model_optim_rng.pt")
        assert (got["args"].data_parallel_size, got["args"].world_size) == (3, 3 * want["args"].world_size // 2)
        got["args"].data_parallel_size = want["args"].data_parallel_size
        got["args"].world_size = want["args"].world_size
        assert_same(got, want)
    assert moved  # the case really moved buckets


def test_convert_param_only_writes_the_model_file_alone(sample_ms, tmp_path):
    proc = back(sample_ms, tmp_path / "back", "--convert-param-only")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for original in sorted((SAMPLE / "iter_0000010").glob("mp_rank_*")):
        out = tmp_path / "back" / "iter_0000010" / original.name
        assert sorted(p.name for p in out.iterdir()) == ["model_optim_rng.pt"]
        assert_same(load_pt(out / "model_optim_rng.pt"), load_pt(original / "model_optim_rng.pt"))


# ---------------------------------------------------------------------------------------------
# A checkpoint MindSpore changed


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_values_changed_by_mindspore_come_back(tmp_path, fmt):
    forward = in_process(pt2ckpt_main, "--megatron-path", SAMPLE / "iter_0000010", "--ms-path", tmp_path / "ms",
                         "--tp-size", 2, "--pp-size", 2, "--dp-size", 2, "--format", fmt)
    assert forward.returncode == 0, forward.stdout
    for rank in (0, 1, 4, 5):
        mindspore_train_step(tmp_path / "ms" / f"rank_{rank}" / f"network.{fmt}", fmt, step=15)
    recorded = Recorded(SAMPLE)
    proc = back(tmp_path / "ms", tmp_path / "back", "--src-model-format", fmt, "--verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "back" / "latest_checkpointed_iteration.txt").read_text() == "15"
    compared = 0
    for tp, pp in ((0, 0), (1, 0), (0, 1), (1, 1)):
        original = load_pt(SAMPLE / "iter_0000010" / f"mp_rank_{tp:02}_{pp:03}" / "model_optim_rng.pt")
        got = load_pt(tmp_path / "back" / "iter_0000015" / f"mp_rank_{tp:02}_{pp:03}" / "model_optim_rng.pt")
        gbs = original["args"].global_batch_size
        assert got["iteration"] == 15 and got["args"].iteration == 15
        assert got["args"].consumed_train_samples == original["args"].consumed_train_samples + 5 * gbs
        groups = got["optimizer"]["optimizer"]["param_groups"]
        assert groups[0]["lr"] == float(np.float32(1.25e-4)) and all(g["step"] == 15 for g in groups if "step" in g)
        assert got["opt_param_scheduler"]["num_steps"] == 15 * 16
        assert_same(got["rng_state"], original["rng_state"])
        # model weights: the changed master weights (the record's, changed as above), cast to the run's bf16
        master = recorded.model_value(tp, pp)
        for key, tensor in _flat(got["model"]):
            if isinstance(tensor, torch.Tensor) and not key.endswith("_extra_state"):
                changed = (master(0, key).numpy() * np.float32(0.75) + np.float32(0.125)).astype(np.float32)
                want = torch.from_numpy(changed).reshape(tensor.shape).bfloat16()
                assert tensor.dtype == torch.bfloat16 and torch.equal(tensor.view(torch.int16), want.view(torch.int16))
                compared += 1
    assert compared > 10


def test_every_changed_tensor_lands_in_its_bucket(ms_copy, tmp_path):
    """Moments and master weights changed by MindSpore sit at the original's offsets: the new bucket
    equals the original one transformed element-wise by the same change (outside padding)."""
    for rank in (0, 1, 4, 5):
        mindspore_train_step(ms_copy / f"rank_{rank}" / "network.ckpt", "ckpt", step=12)
    proc = back(ms_copy, tmp_path / "back")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for original in sorted((SAMPLE / "iter_0000010").glob("mp_rank_*")):
        want, got = load_pt(original / "distrib_optim.pt"), load_pt(tmp_path / "back/iter_0000012" / original.name
                                                                    / "distrib_optim.pt")
        for gbuf in (k for k in want if isinstance(k, int)):
            [(key, states)] = want[gbuf].items()
            unpadded = want["per_bucket_numel_unpadded"][gbuf][key]
            for state, buckets in states.items():
                for w, g, n in zip(buckets, got[gbuf][key][state], unpadded):
                    expected = (w[:n].numpy() * np.float32(0.75) + np.float32(0.125)).astype(np.float32)
                    assert g[:n].numpy().tobytes() == expected.tobytes(), (original.name, state)
                    assert not g[n:].any()


def _flat(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_epoch_num_asks_for_the_iteration(ms_copy, tmp_path):
    for rank in (0, 1, 4, 5):
        mindspore_train_step(ms_copy / f"rank_{rank}" / "network.ckpt", "ckpt", step=3, epoch=2)
    refused = back(ms_copy, tmp_path / "back")
    assert refused.returncode == 2
    [line] = errors(refused)
    assert "epoch_num is 2" in line and "--iteration" in line and "rank_0" in line
    assert not (tmp_path / "back").exists()  # the lock's folder is removed again: nothing written
    ok = back(ms_copy, tmp_path / "back", "--iteration", 40)
    assert ok.returncode == 0, ok.stdout
    assert (tmp_path / "back" / "latest_checkpointed_iteration.txt").read_text() == "40"


# ---------------------------------------------------------------------------------------------
# Faults


@pytest.fixture(scope="module")
def sample_ms(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample_ms") / "ms"
    to_ms(SAMPLE / "iter_0000010", out, ["--tp-size", 2, "--pp-size", 2, "--dp-size", 2])
    return out


@pytest.fixture
def ms_copy(sample_ms, tmp_path):
    target = tmp_path / "ms"
    shutil.copytree(sample_ms, target)
    for path in target.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def back(ms: Path, out: Path, *extra, sizes=SAMPLE_SIZES):
    return in_process(ckpt2pt_main, "--ms-path", ms, "--param-map-path", ms / "pt_meta", "--megatron-path", out,
                      *back_flags(**sizes), *extra)


def assert_refused(proc, out: Path, *needles) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    [line] = errors(proc)
    for needle in needles:
        assert needle in line, (needle, line)
    assert successes(proc) == 0
    assert not out.exists() or not list(out.rglob("*.pt"))
    assert not out.exists() or not (out / "latest_checkpointed_iteration.txt").exists()


def test_truncated_ms_file(ms_copy, tmp_path):
    target = ms_copy / "rank_4" / "network.ckpt"
    target.write_bytes(target.read_bytes()[:5000])
    assert_refused(back(ms_copy, tmp_path / "out"), tmp_path / "out", str(target), "re-copy")


def test_garbage_ms_file(ms_copy, tmp_path):
    target = ms_copy / "rank_1" / "network.ckpt"
    target.write_bytes(os.urandom(4096))
    assert_refused(back(ms_copy, tmp_path / "out"), tmp_path / "out", str(target))


def test_missing_rank_folder(ms_copy, tmp_path):
    shutil.rmtree(ms_copy / "rank_5")
    assert_refused(back(ms_copy, tmp_path / "out"), tmp_path / "out", "rank_5", "copy the missing folder")


def rewrite_ms(path: Path, change) -> None:
    import mindspore as ms
    loaded = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}
    change(loaded)
    path.unlink()
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in loaded.items()], str(path))


def test_tensor_missing(ms_copy, tmp_path):
    target = ms_copy / "rank_0" / "network.ckpt"
    rewrite_ms(target, lambda d: d.pop("exp_avg.language_model.encoder.layers.1.mlp.mapping.weight"))
    assert_refused(back(ms_copy, tmp_path / "out"), tmp_path / "out", str(target), "1 tensors missing",
                   "exp_avg language_model.encoder.layers.1.mlp.dense_h_to_4h.weight")


def test_tensor_of_the_wrong_shape(ms_copy, tmp_path):
    target = ms_copy / "rank_0" / "network.ckpt"
    name = "language_model.encoder.layers.0.attention.qkv_proj.weight"
    rewrite_ms(target, lambda d: d.__setitem__(name, d[name][:-1]))
    assert_refused(back(ms_copy, tmp_path / "out"), tmp_path / "out", str(target), name, "--param-map-path")


def test_pt_meta_of_another_run(ms_copy, tmp_path):
    other = write_fixture(tmp_path / "other", FixtureSpec(tp=2, pp=2, dp=2, num_layers=4, hidden=20, ffn=38, heads=2,
                                                          vocab=97))
    forward = in_process(pt2ckpt_main, "--megatron-path", other.megatron_path, "--ms-path", tmp_path / "other_ms",
                         "--tp-size", 2, "--pp-size", 2, "--dp-size", 2)
    assert forward.returncode == 0, forward.stdout
    shutil.rmtree(ms_copy / "pt_meta")
    shutil.copytree(tmp_path / "other_ms" / "pt_meta", ms_copy / "pt_meta")
    proc = back(ms_copy, tmp_path / "out")
    assert_refused(proc, tmp_path / "out", "rank_0", "--param-map-path")


def test_flag_contradicting_the_inputs(ms_copy, tmp_path):
    proc = back(ms_copy, tmp_path / "out", "--num-layers", 6)
    assert_refused(proc, tmp_path / "out", "--num-layers 6", "pass --num-layers 4")


def start_back(ms: Path, out: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(BACK_CLI), "--ms-path", str(ms), "--param-map-path",
                             str(ms / "pt_meta"), "--megatron-path", str(out),
                             *map(str, back_flags(**SAMPLE_SIZES)), *map(str, extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def assert_complete_files_only(out: Path, sample_iter: Path = SAMPLE / "iter_0000010") -> None:
    """Whatever sits at a final path is complete and equal to the original; no temporaries."""
    assert leftovers(out) == []
    for folder in out.glob("iter_0000010/mp_rank_*"):
        original = sample_iter / folder.name
        if (folder / "distrib_optim.pt").exists():
            assert_distrib_equal(folder / "distrib_optim.pt", original / "distrib_optim.pt")
        if (folder / "model_optim_rng.pt").exists():
            assert_same(load_pt(folder / "model_optim_rng.pt"), load_pt(original / "model_optim_rng.pt"))


def test_killed_worker_then_rerun(ms_copy, tmp_path):
    out = tmp_path / "out"
    kill_first_worker(start_back(ms_copy, out, "--process-limit", 1), "rank_", converted=3)
    assert not (out / "latest_checkpointed_iteration.txt").exists()  # never points at an incomplete iteration
    assert_complete_files_only(out)
    again = back(ms_copy, out)
    assert again.returncode == 0 and "summary: 1 converted, 3 skipped" in again.stdout, again.stdout
    assert assert_same_checkpoint(out / "iter_0000010", SAMPLE / "iter_0000010") > 0


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_run_cleans_up_and_a_rerun_finishes(ms_copy, tmp_path, signum, code):
    out = tmp_path / "out"
    proc = start_back(ms_copy, out, "--process-limit", 1)
    stop_first_worker(proc)
    os.killpg(proc.pid, signum) if signum == signal.SIGINT else proc.send_signal(signum)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == code, log
    assert "interrupted" in log and log.count("Traceback") == 0
    assert_complete_files_only(out)
    assert not (out / "latest_checkpointed_iteration.txt").exists()
    again = back(ms_copy, out)
    assert again.returncode == 0 and successes(again) == 4, again.stdout
    assert assert_same_checkpoint(out / "iter_0000010", SAMPLE / "iter_0000010") > 0


def test_outputs_of_another_source_are_not_mixed(ms_copy, tmp_path, sample_ms):
    out = tmp_path / "out"
    assert back(sample_ms, out).returncode == 0
    for rank in (0, 1, 4, 5):
        mindspore_train_step(ms_copy / f"rank_{rank}" / "network.ckpt", "ckpt", step=10)
    assert_refused_keep = back(ms_copy, out)
    assert assert_refused_keep.returncode == 2 and "--overwrite" in errors(assert_refused_keep)[0]
    assert back(ms_copy, out, "--overwrite").returncode == 0


# ---------------------------------------------------------------------------------------------
# A pt_meta written by the documented tool; no-op layers


def as_documented_pt_meta(pt_meta: Path) -> None:
    """Reduce every args_*.pt to the keys the documented tool writes (the param_map copies stay)."""
    from megatron_ms_convert.megatron.checkpoint import megatron_enum_importable
    keys = ("args", "checkpoint_version", "iteration", "optimizer", "opt_param_scheduler", "rng_state",
            "num_floating_point_operations_so_far")
    for path in pt_meta.glob("args_*.pt"):
        record = load_pt(path, mmap=False)
        path.unlink()
        with megatron_enum_importable():
            torch.save({key: record[key] for key in keys}, path)


@pytest.mark.parametrize("layout", ["tp2_pp2_dp2_small_buckets_padded", "mcore_te_pp3_vpp2_untied"])
def test_documented_pt_meta_works_from_rules(tmp_path, layout):
    spec = LAYOUTS[layout]
    fixture = write_fixture(tmp_path / "save", spec)
    to_ms(fixture.megatron_path, tmp_path / "ms", size_flags(spec), "--param-map-path", fixture.param_map_dir)
    as_documented_pt_meta(tmp_path / "ms" / "pt_meta")
    proc = in_process(ckpt2pt_main, "--ms-path", tmp_path / "ms", "--param-map-path", tmp_path / "ms" / "pt_meta",
                      "--megatron-path", tmp_path / "back", *back_flags(spec.tp, spec.pp, spec.dp, spec.cp, spec.vpp),
                      "--verify")
    assert proc.returncode == 0, proc.stdout
    assert "written by the documented tool" in proc.stdout
    for original in sorted(fixture.megatron_path.glob("mp_rank_*")):
        out = tmp_path / "back" / "iter_0000010" / original.name
        assert_distrib_equal(out / "distrib_optim.pt", original / "distrib_optim.pt")
        got, want = load_pt(out / "model_optim_rng.pt"), load_pt(original / "model_optim_rng.pt")
        for key in want:
            if key.startswith("model"):
                # every parameter, in Megatron's nesting and order; _extra_state cannot be known
                params = [(k, v) for k, v in _flat(want[key]) if not k.endswith("_extra_state")]
                assert [k for k, _ in _flat(got[key])] == [k for k, _ in params]
                for (_, g), (name, w) in zip(_flat(got[key]), params):
                    assert g.dtype == w.dtype and torch.equal(g.view(torch.uint8), w.view(torch.uint8)), name
            else:
                assert_same(got[key], want[key], key)


def test_noop_layers_are_skipped(tmp_path):
    spec = LAYOUTS["tp1_pp1_dp1"]  # 2 layers
    fixture = write_fixture(tmp_path / "save", spec)
    to_ms(fixture.megatron_path, tmp_path / "ms", size_flags(spec))

    def insert_noop_layer_1(tensors: dict) -> None:
        for name in sorted(tensors):
            if ".layers.1." in name:  # Megatron's layer 1 becomes MindSpore's layer 2; layer 1 is a no-op
                tensors[name.replace(".layers.1.", ".layers.2.")] = tensors[name]
                tensors[name] = np.full_like(tensors[name], 7.0)
    rewrite_ms(tmp_path / "ms" / "rank_0" / "network.ckpt", insert_noop_layer_1)
    args = ["--ms-path", tmp_path / "ms", "--param-map-path", tmp_path / "ms" / "pt_meta", *back_flags()]
    proc = in_process(ckpt2pt_main, *args, "--megatron-path", tmp_path / "back", "--noop", 1)
    assert proc.returncode == 0, proc.stdout
    assert_same_checkpoint(tmp_path / "back" / "iter_0000010", fixture.megatron_path)
    assert [p.name for p in (tmp_path / "back" / "iter_0000010").glob("mp_rank_*")] == ["mp_rank_00"]
    without = in_process(ckpt2pt_main, *args, "--megatron-path", tmp_path / "back2")
    assert without.returncode == 2 and "--noop" in errors(without)[0]
