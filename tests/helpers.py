"""Helpers several test modules share (test modules import from here, never from each other)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from megatron_ms_convert.megatron.checkpoint import load_pt
from tests.expected_outputs import CLI, REPO, run_cli
from tests.megatron_fixture import FixtureSpec, load_megatron_file

BACK_CLI = REPO / "convert_ckpt2pt.py"
SAMPLE_SIZE_FLAGS = ["--tp-size", 2, "--pp-size", 2, "--dp-size", 2, "--cp-size", 1]  # tests/data/megatron_sample


def in_process(main, *args) -> subprocess.CompletedProcess:
    """A CLI's main() run in this process (no interpreter start-up), its log captured like run_cli's."""
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, log.getvalue(), "")


def run_back(*args, **kw) -> subprocess.CompletedProcess:
    """convert_ckpt2pt.py as users run it: a subprocess with its log on stdout."""
    return subprocess.run([sys.executable, str(BACK_CLI), *map(str, args)], capture_output=True, text=True,
                          timeout=600, **kw)


def back_flags(tp=1, pp=1, dp=1, cp=1, vpp=1) -> list:
    return ["--tp-size", tp, "--pp-size", pp, "--dp-size", dp, "--cp-size", cp, "--vpp-size", vpp]


def model_tensors_of(path: Path) -> dict[str, torch.Tensor]:
    """The parameters of a single-chunk model_optim_rng.pt by dotted key, read with torch.load
    (Transformer Engine's `_extra_state` entries are not parameters)."""
    out: dict[str, torch.Tensor] = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, torch.Tensor) and not key.endswith("_extra_state"):
                out[prefix + key] = value
    walk(load_megatron_file(path)["model"], "")
    return out


SIZES = ["--tp-size", 2, "--pp-size", 2, "--dp-size", 2]


RANKS = (0, 1, 4, 5)


def convert(ckpt: Path, out: Path, *extra, **kw) -> subprocess.CompletedProcess:
    return run_cli("--megatron-path", ckpt / "iter_0000010", "--ms-path", out, *SIZES, *extra, **kw)


def leftovers(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if ".partial" in p.name or p.suffix == ".tmp")


def assert_outputs_complete_and_correct(out: Path, clean_outputs: dict) -> int:
    """Whatever sits at a final output path equals the clean run's file. (A worker frozen by the test
    may already have renamed its finished output, so how many exist is not fixed.)"""
    files = list(out.glob("rank_*/network.ckpt"))
    for path in files:
        assert path.read_bytes() == clean_outputs[int(path.parent.name[5:])], path
    assert leftovers(out) == []
    return len(files)


def stop_first_worker(proc: subprocess.Popen, deadline_s: float = 60) -> psutil.Process:
    """Freeze the first worker the CLI forks (SIGSTOP), so the test controls what happens to it."""
    parent = psutil.Process(proc.pid)
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        for child in parent.children():
            try:
                child.suspend()
                if child.status() == psutil.STATUS_STOPPED:
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.002)
    raise AssertionError("no worker appeared")


def kill_first_worker(proc: subprocess.Popen, folder_word: str, converted: int) -> str:
    """SIGKILL the CLI's first worker; the run must fail that one folder (its error names the signal
    and a `folder_word` folder), convert the `converted` others, exit 1. Returns the log."""
    worker = stop_first_worker(proc)
    worker.kill()
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, log
    [error] = [line for line in log.splitlines() if " ERROR " in line]
    assert "killed by signal SIGKILL" in error and folder_word in error
    assert sum("successfully" in line for line in log.splitlines()) == converted
    return log


def assert_same(got, want, where="root"):
    """Structure, types, dict key order and tensors bitwise (dtype, shape, stride, bytes)."""
    assert type(got) is type(want), where
    if isinstance(want, torch.Tensor):
        assert (got.dtype, got.shape, got.stride()) == (want.dtype, want.shape, want.stride()), where
        assert got.reshape(-1).view(torch.uint8).tolist() == want.reshape(-1).view(torch.uint8).tolist(), where
    elif isinstance(want, dict):
        assert list(got) == list(want), where
        for k in want:
            assert_same(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, argparse.Namespace):
        assert_same(vars(got), vars(want), where)
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), where
    elif isinstance(want, io.BytesIO):
        assert got.getvalue() == want.getvalue(), where
    else:
        assert got == want, where


class Recorded:
    """The fixture's record of what it wrote: per (tp, pp, chunk) and parameter, every state's tensor."""

    def __init__(self, root: Path):
        self.params = json.loads((root / "expected.json").read_text())["params"]
        self.tensors = torch.load(root / "expected.pt", weights_only=True)

    def entry(self, tp: int, pp: int, chunk: int, ddp_name: str) -> str:
        return f"tp{tp}/pp{pp}/chunk{chunk}/{ddp_name}"

    def state_value(self, tp: int, pp: int):
        def value(chunk: int, ddp_name: str, state: str) -> torch.Tensor:
            return self.tensors[f"{self.entry(tp, pp, chunk, ddp_name)}::{state}"].reshape(-1)
        return value

    def model_value(self, tp: int, pp: int):
        """The fp32 master weight of a state-dict key, or (a frozen parameter has none) its model copy."""
        by_key = {(e["vpp_chunk"], e.get("state_dict_key") or _state_key(e["name"])): e["key"]
                  for e in self.params if (e["tp"], e["pp"]) == (tp, pp)}

        def value(chunk: int, key: str) -> torch.Tensor:
            prefix = by_key[(chunk, key)]
            master = self.tensors.get(f"{prefix}::param")
            return master if master is not None else self.tensors[f"{prefix}::model_bf16"]
        return value


def assert_distrib_equal(ours: Path, theirs: Path) -> int:
    """Equal outside padding, zeros in it; returns how many buckets were compared. A MoE run's list
    `[dense, expert]` is compared element by element (None where the original has None)."""
    got, want = load_pt(ours), load_pt(theirs)
    if isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want)
        assert [g is None for g in got] == [w is None for w in want]
        return sum(assert_distrib_trees_equal(g, w) for g, w in zip(got, want) if w is not None)
    return assert_distrib_trees_equal(got, want)


SMALL = dict(hidden=24, ffn=52, heads=2, vocab=61)


LAYOUTS = {
    "tp1_pp1_dp1": FixtureSpec(num_layers=2, **SMALL),
    "tp2_pp2_dp2_small_buckets_padded": FixtureSpec(tp=2, pp=2, dp=2, num_layers=4, hidden=20, ffn=38, heads=2,
                                                    vocab=97, overlap_grad_reduce=True, bucket_size=300),
    "pp4_vpp2_dp2_buckets_in_chunk0": FixtureSpec(pp=4, vpp=2, dp=2, num_layers=8, overlap_grad_reduce=True,
                                                  bucket_size=500, **SMALL),
    "fp16_tp2_dp3": FixtureSpec(tp=2, dp=3, num_layers=2, dtype="fp16", overlap_grad_reduce=True,
                                bucket_size=400, **SMALL),
    "fp32_pp2": FixtureSpec(pp=2, num_layers=2, dtype="fp32", **SMALL),
    "mcore_tp2_pp2_tied": FixtureSpec(tp=2, pp=2, dp=2, num_layers=4, model="mcore", overlap_grad_reduce=True,
                                      bucket_size=700, **SMALL),
    "mcore_te_pp3_vpp2_untied": FixtureSpec(pp=3, vpp=2, dp=2, num_layers=6, model="mcore", mcore_spec="te",
                                            untie_embeddings=True, **SMALL),
    "mcore_te_rmsnorm_rope_tp2_pp2": FixtureSpec(tp=2, pp=2, num_layers=2, model="mcore", mcore_spec="te",
                                                 normalization="RMSNorm", position_embedding="rope", **SMALL),
    "legacy_rmsnorm_untied_pp2": FixtureSpec(pp=2, dp=2, num_layers=4, normalization="RMSNorm",
                                             untie_embeddings=True, **SMALL),
    "mixed_dtype_two_buffers": FixtureSpec(pp=2, dp=2, num_layers=2, mixed_dtype=True, overlap_grad_reduce=True,
                                           bucket_size=300, **SMALL),
    "mcore_cp2_release": FixtureSpec(tp=2, dp=2, cp=2, num_layers=2, model="mcore", release=True, **SMALL),
    "uneven_stage_list": FixtureSpec(pp=2, dp=2, num_layers=5, stage_list=(3, 2), **SMALL),
    "sidecar_map": FixtureSpec(tp=2, pp=2, dp=2, num_layers=2, param_map="with_sidecar",
                               overlap_grad_reduce=True, bucket_size=200, **SMALL),
}


def size_flags(spec: FixtureSpec) -> list:
    flags = ["--tp-size", spec.tp, "--pp-size", spec.pp, "--dp-size", spec.dp, "--cp-size", spec.cp,
             "--vpp-size", spec.vpp]
    if spec.stage_list:
        flags += ["--stage-list", *spec.stage_list]
    return flags


def mindspore_train_step(path: Path, fmt: str, step: int, epoch: int = 0,
                         extra: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Load with mindspore.load_checkpoint, change every tensor and scalar training changes (and the
    float32 scalars `extra` names), save with mindspore.save_checkpoint; returns the values saved (as
    MindSpore holds them)."""
    import mindspore as ms
    loaded = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path), format=fmt).items()}
    changed = {}
    for name, value in loaded.items():
        if "." in name and value.dtype == np.float32:
            changed[name] = (value * np.float32(0.75) + np.float32(0.125)).astype(np.float32)
        else:
            changed[name] = value
    changed["step_num"] = np.array(step, np.int64)
    changed["epoch_num"] = np.array(epoch, np.int64)
    changed["learning_rate_group_0"] = np.array(1.25e-4, np.float32)
    changed["state_step"] = np.full(loaded["state_step"].shape, step, np.float32)
    changed["num_steps"] = np.array(step * 16, np.int64)
    changed.update({name: np.array(value, np.float32) for name, value in (extra or {}).items()})
    path.chmod(0o644)
    path.unlink()
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in changed.items()], str(path), format=fmt)
    return changed


def _state_key(ddp_name: str) -> str:
    key = ddp_name.removeprefix("module.")
    return "word_embeddings_for_head.weight" if key == "word_embeddings.weight" else key


def assert_distrib_trees_equal(got: dict, want: dict) -> int:
    assert list(got) == list(want)
    for key in ("per_bucket_numel", "per_bucket_numel_unpadded"):
        assert got[key] == want[key]
        assert [type(k[0]) for d in got[key] for k in d] == [torch.dtype for d in got[key] for _ in d]
    buckets = 0
    for gbuf, by_dtype in enumerate(want["per_bucket_numel_unpadded"]):
        [(dtype_key, unpadded)] = by_dtype.items()
        assert list(got[gbuf]) == [dtype_key] and list(got[gbuf][dtype_key]) == list(want[gbuf][dtype_key])
        for state, tensors in want[gbuf][dtype_key].items():
            for bucket, (g, w) in enumerate(zip(got[gbuf][dtype_key][state], tensors, strict=True)):
                n = unpadded[bucket]
                assert g.dtype == torch.float32 and g.shape == w.shape
                assert torch.equal(g[:n].view(torch.int32), w[:n].view(torch.int32)), (gbuf, state, bucket)
                assert not g[n:].view(torch.int32).any(), (gbuf, state, bucket)
                buckets += 1
    return buckets


def error_lines(proc) -> list[str]:
    return [line for line in proc.stdout.splitlines() if " ERROR " in line]


def success_count(proc) -> int:
    return sum("successfully" in line for line in proc.stdout.splitlines())


def start_cli(ckpt: Path, out: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(CLI), "--megatron-path", str(ckpt / "iter_0000010"),
                             "--ms-path", str(out), *map(str, SIZES), *map(str, extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


# ---------------------------------------------------------------------------------------------
# What a command imports before it answers (-h, flag errors)

HEAVY = ("torch", "numpy", "mindspore", "tqdm")


def imported_modules(importtime_stderr: str) -> set[str]:
    """The modules `python -X importtime` reports as imported (one `import time:` line each)."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def run_importtime(command: list[str], cwd=REPO) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-X", "importtime", *command], capture_output=True, text=True,
                          timeout=120, cwd=cwd)
    return proc, time.monotonic() - started


def assert_nothing_heavy(proc: subprocess.CompletedProcess) -> None:
    modules = imported_modules(proc.stderr)
    assert "argparse" in modules, proc.stderr[-2000:]  # the parse did run under -X importtime
    heavy = sorted(name for name in modules if name.split(".")[0] in HEAVY)
    assert not heavy, heavy[:10]
