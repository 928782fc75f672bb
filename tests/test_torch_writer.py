"""The streaming torch.save: files equal to torch.save's, readable by torch.load in every mode, written
with one produced tensor in memory at a time, and never left half-written."""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import textwrap
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_ms_convert.atomic import partial_path
from megatron_ms_convert.megatron.checkpoint import ModelType, megatron_enum_importable, safe_globals
from megatron_ms_convert.megatron.torch_writer import LazyTensor, materialize, write_torch_file

ROOT = Path(__file__).resolve().parent.parent


def lazy_copy(tensor: torch.Tensor) -> LazyTensor:
    """A LazyTensor that produces a fresh copy of `tensor`."""
    return LazyTensor(tuple(tensor.shape), tensor.dtype, lambda: tensor.clone())


def lazify(tree):
    """`tree` with every tensor leaf replaced by a LazyTensor of it (dict keys are left alone)."""
    if isinstance(tree, torch.Tensor):
        return lazy_copy(tree)
    if isinstance(tree, dict):
        return type(tree)((k, lazify(v)) for k, v in tree.items())
    if isinstance(tree, list):
        return [lazify(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(lazify(v) for v in tree)
    return tree


def megatron_like_tree() -> dict:
    """What model_optim_rng.pt / distrib_optim.pt hold: args with ModelType and dtypes, dtype-tuple
    keys, numpy and python RNG states, tensors of every dtype Megatron saves, 0-d and empty ones."""
    rng = np.random.RandomState(5)
    args = argparse.Namespace(bf16=True, params_dtype=torch.bfloat16, model_type=ModelType.encoder_or_decoder,
                              iteration=10, lr=1e-3, betas=(0.9, 0.95))
    key = (torch.bfloat16, torch.float32)
    return {
        "args": args, "checkpoint_version": 3.0, "iteration": 10,
        "model": OrderedDict([
            ("w", torch.arange(-6, 6, dtype=torch.float32).to(torch.bfloat16).view(3, 4)),
            ("h", (torch.arange(5, dtype=torch.float32) / 3).to(torch.float16)),
            ("x._extra_state", None), ("b", io.BytesIO(b"te-extra")),
        ]),
        "per_bucket_numel": [{key: [8, 4]}], 0: {key: {"param": [torch.linspace(-1, 1, 8), torch.arange(4.0)]}},
        "step": torch.tensor(3, dtype=torch.int64), "scale": torch.tensor(0.5), "ids": torch.arange(7),
        "empty": torch.empty(0, 3, dtype=torch.float16),
        "rng_state": [{"random_rng_state": random.Random(3).getstate(), "np_rng_state": rng.get_state(),
                       "torch_rng_state": torch.ByteTensor(list(range(16)))}],
    }


def simple_tree() -> dict:
    return {"a": torch.arange(10, dtype=torch.int64), "b": [torch.ones(2, 2), torch.tensor(7.0)], "n": None}


def data_pkl(path: Path) -> bytes:
    with zipfile.ZipFile(path) as archive:
        [name] = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        return archive.read(name)


def load_safely(path: Path, **kwargs):
    with torch.serialization.safe_globals(safe_globals()):
        return torch.load(path, weights_only=True, map_location="cpu", **kwargs)


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


def save_reference(tree, path: Path) -> None:
    with megatron_enum_importable():
        torch.save(tree, path)


@pytest.mark.parametrize("make_tree", [megatron_like_tree, simple_tree], ids=["megatron_like", "simple"])
@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_file_equals_torch_save(tmp_path, make_tree, lazy):
    tree = make_tree()
    save_reference(tree, tmp_path / "ref.pt")
    with megatron_enum_importable():
        write_torch_file(tmp_path / "ours.pt", lazify(tree) if lazy else tree)
    assert data_pkl(tmp_path / "ours.pt") == data_pkl(tmp_path / "ref.pt")
    want = load_safely(tmp_path / "ref.pt")
    for mmap in (False, True):
        assert_same(load_safely(tmp_path / "ours.pt", mmap=mmap), want)
    with megatron_enum_importable():
        assert_same(torch.load(tmp_path / "ours.pt", weights_only=False), want)
    assert not partial_path(tmp_path / "ours.pt").exists()


def test_views_and_shared_storages_are_saved_like_torch_save(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    tree = {"whole": base.view(3, 4), "tail": base[5:9], "t": base.view(3, 4).t(), "again": base.view(3, 4),
            "own": lazy_copy(torch.full((2,), 3.0))}
    eager = materialize(tree)
    save_reference(eager, tmp_path / "ref.pt")
    write_torch_file(tmp_path / "ours.pt", tree)
    assert data_pkl(tmp_path / "ours.pt") == data_pkl(tmp_path / "ref.pt")
    got = torch.load(tmp_path / "ours.pt", weights_only=True)
    assert_same(got, torch.load(tmp_path / "ref.pt", weights_only=True))
    assert got["tail"].untyped_storage().data_ptr() == got["whole"].untyped_storage().data_ptr()


def test_shared_lazy_tensor_is_written_once(tmp_path):
    calls = []
    shared = LazyTensor((3,), torch.float32, lambda: calls.append(1) or torch.ones(3))
    write_torch_file(tmp_path / "x.pt", {"a": shared, "b": [shared]})
    got = torch.load(tmp_path / "x.pt", weights_only=True)
    assert len(calls) == 1 and got["a"].data_ptr() == got["b"][0].data_ptr()


@pytest.mark.parametrize("bad", [lambda: torch.ones(4), lambda: torch.ones(3, dtype=torch.float16), lambda: None],
                         ids=["shape", "dtype", "not_a_tensor"])
def test_a_producer_breaking_its_promise_leaves_no_file(tmp_path, bad):
    target = tmp_path / "x.pt"
    target.write_bytes(b"old")
    with pytest.raises(ValueError, match="promised"):
        write_torch_file(target, {"a": LazyTensor((3,), torch.float32, bad)})
    assert target.read_bytes() == b"old" and not partial_path(target).exists()


MEMORY_CHILD = textwrap.dedent("""
    import json, sys, torch
    from megatron_ms_convert.megatron.torch_writer import LazyTensor, write_torch_file
    from megatron_ms_convert.runner import anon_memory_bytes
    count, numel, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    samples = []
    def producer(i):
        def produce():
            samples.append(anon_memory_bytes())
            tensor = torch.full((numel,), float(i))
            samples.append(anon_memory_bytes())
            return tensor
        return produce
    tree = {"buckets": [LazyTensor((numel,), torch.float32, producer(i)) for i in range(count)]}
    baseline = anon_memory_bytes()
    write_torch_file(path, tree)
    samples.append(anon_memory_bytes())
    print(json.dumps({"baseline": baseline, "peak": max(samples)}))
""")


def peak_growth(tmp_path: Path, count: int, numel: int) -> int:
    out = tmp_path / f"m{count}.pt"
    # glibc keeps a freed block of this size for reuse instead of unmapping it, which would hide
    # whether the writer itself still holds the previous tensor; with a low mmap threshold every
    # tensor is its own mapping and RssAnon shows exactly what is alive.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20))
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(count), str(numel), str(out)], cwd=ROOT,
                          capture_output=True, text=True, check=True, env=env)
    report = json.loads(proc.stdout)
    assert out.stat().st_size > count * numel * 4
    out.unlink()
    return report["peak"] - report["baseline"]


def test_memory_stays_at_one_tensor_whatever_the_file_size(tmp_path):
    numel = 2 * 2**20  # 8 MiB per tensor
    tensor_bytes, noise = numel * 4, 3 * 2**20
    small, large = peak_growth(tmp_path, 3, numel), peak_growth(tmp_path, 12, numel)  # 24 MiB vs 96 MiB files
    assert large <= tensor_bytes + noise, f"writing 96 MiB raised RssAnon by {large / 2**20:.1f} MiB"
    assert large - small <= noise, f"{small / 2**20:.1f} MiB for 24 MiB vs {large / 2**20:.1f} MiB for 96 MiB"
