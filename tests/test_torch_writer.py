"""The streaming torch.save: files byte-identical to torch.save's (zip64 layout checked against torch's
own writer), readable by torch.load in every mode and by Python's zipfile, written with one produced
tensor or piece in memory at a time, and never left half-written."""

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
from megatron_ms_convert.megatron.torch_writer import (LazyTensor, Pieces, TorchZipWriter, Zeros, materialize,
                                                       write_torch_file)
from tests.helpers import assert_same

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


def load_safely(path: Path, **kwargs):
    with torch.serialization.safe_globals(safe_globals()):
        return torch.load(path, weights_only=True, map_location="cpu", **kwargs)


def save_reference(tree, path: Path) -> None:
    with megatron_enum_importable():
        torch.save(tree, path)


def save_both(tmp_path: Path, reference, ours, name: str = "x.pt") -> tuple[Path, Path]:
    """torch.save(reference) and write_torch_file(ours) under the same file name (torch names the zip's
    folder after it) in two folders; returns both paths."""
    ref, got = tmp_path / "ref" / name, tmp_path / "ours" / name
    ref.parent.mkdir(exist_ok=True)
    save_reference(reference, ref)
    with megatron_enum_importable():
        write_torch_file(got, ours)
    return ref, got


def assert_identical_file(ref: Path, got: Path) -> None:
    assert got.read_bytes() == ref.read_bytes()
    with zipfile.ZipFile(got) as archive:
        assert archive.testzip() is None
    assert not partial_path(got).exists()


@pytest.mark.parametrize("make_tree", [megatron_like_tree, simple_tree], ids=["megatron_like", "simple"])
@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_file_equals_torch_save(tmp_path, make_tree, lazy):
    tree = make_tree()
    ref, got = save_both(tmp_path, tree, lazify(tree) if lazy else tree)
    assert_identical_file(ref, got)
    want = load_safely(ref)
    for mmap in (False, True):
        assert_same(load_safely(got, mmap=mmap), want)
    with megatron_enum_importable():
        assert_same(torch.load(got, weights_only=False), want)


def many_records_tree() -> dict:
    """Hundreds of records (torch hashes their names into the file), one of every size 0..9 bytes,
    and a tensor whose bytes start like a zip data descriptor (torch's writer then folds them into
    the file's serialization id)."""
    descriptor_like = torch.tensor(list(b"PK\x07\x08\x01\x02\x03\x04\x05"), dtype=torch.uint8)
    return {"many": [torch.full((i % 7,), float(i)) for i in range(300)],
            "bytes": [torch.arange(n, dtype=torch.uint8) for n in range(10)], "pk": descriptor_like}


@pytest.mark.parametrize("make_tree", [many_records_tree, megatron_like_tree], ids=["many_records", "megatron_like"])
@pytest.mark.parametrize("name", ["x.pt", "noext", "a.b.pt", "数据.pt"])
def test_file_equals_torch_save_whatever_the_file_name(tmp_path, make_tree, name):
    tree = make_tree()
    assert_identical_file(*save_both(tmp_path, tree, lazify(tree), name))


@pytest.mark.parametrize("crc32, alignment", [(False, 64), (True, 4096), (True, 1)], ids=["no_crc", "a4096", "a1"])
def test_file_equals_torch_save_under_other_save_options(tmp_path, crc32, alignment):
    from torch.utils.serialization import config
    tree = megatron_like_tree()
    saved = torch.serialization.get_crc32_options(), config.save.storage_alignment
    torch.serialization.set_crc32_options(crc32)
    config.save.storage_alignment = alignment
    try:
        ref, got = save_both(tmp_path, tree, lazify(tree))
    finally:
        torch.serialization.set_crc32_options(saved[0])
        config.save.storage_alignment = saved[1]
    assert got.read_bytes() == ref.read_bytes()
    assert_same(load_safely(got), load_safely(ref))


def test_pieces_are_written_as_the_tensor_they_make_up(tmp_path):
    bf16 = torch.linspace(-3, 3, 11).to(torch.bfloat16)
    whole = torch.cat([torch.zeros(3), torch.arange(5.0), torch.zeros(2), torch.ones(4), torch.zeros(1)])
    tree = {"bucket": LazyTensor((15,), torch.float32, lambda: Pieces(
                [Zeros(12), torch.arange(5.0), Zeros(8), torch.ones(2, 2), Zeros(4)])),
            "bf16": LazyTensor((11,), torch.bfloat16, lambda: Pieces(iter([bf16[:4], bf16[4:], Zeros(0)]))),
            "raw": LazyTensor((2,), torch.float32,
                              lambda: Pieces([torch.tensor([1.0]).view(torch.uint8), torch.tensor([2.0])])),
            "empty": LazyTensor((0, 3), torch.float16, lambda: Pieces([])),
            "scalar": LazyTensor((), torch.float64, lambda: Pieces([Zeros(8)]))}
    eager = {"bucket": whole, "bf16": bf16.clone(), "raw": torch.tensor([1.0, 2.0]),
             "empty": torch.empty(0, 3, dtype=torch.float16), "scalar": torch.tensor(0.0, dtype=torch.float64)}
    assert_identical_file(*save_both(tmp_path, eager, tree))
    assert_same(materialize(tree), eager)


@pytest.mark.parametrize("pieces", [[torch.ones(2)], [torch.ones(4)], [torch.ones(3), Zeros(1)], [b"abc"]],
                         ids=["short", "long", "long_zeros", "not_a_tensor"])
def test_pieces_breaking_their_promise_leave_no_file(tmp_path, pieces):
    target = tmp_path / "x.pt"
    target.write_bytes(b"old")
    with pytest.raises(ValueError, match="promised|expected a CPU tensor"):
        write_torch_file(target, {"a": LazyTensor((3,), torch.float32, lambda: Pieces(pieces))})
    assert target.read_bytes() == b"old" and not partial_path(target).exists()


class HoleFile:
    """A file that seeks over writes of `hole` instead of writing them: a sparse file of any size."""

    def __init__(self, file, hole: bytes):
        self.file, self.hole = file, hole

    def write(self, data) -> None:
        if isinstance(data, memoryview) and data.obj is self.hole:
            self.file.seek(len(data), os.SEEK_CUR)
        else:
            self.file.write(data)


def test_zip64_layout_equals_torchs_writer(tmp_path):
    """Records at offsets past 4 GiB and a record of more than 4 GiB, against torch's own writer
    (which writes just the headers of a record when told its size): sparse files, nothing real is
    written. Without CRC-32 (as torch writes header-only records), so whole files compare."""
    big = (4 << 30) + 5
    small = [("data/1", b"abcdefghij"), ("data/2", b""), ("data/3", bytes(range(100)))]
    want = tmp_path / "torch.pt"
    writer = torch._C.PyTorchFileWriter(str(want), False, 64)
    writer.write_record("data.pkl", b"x" * 100, 100)
    writer.write_record_metadata("data/0", big)
    for name, data in small:
        writer.write_record(name, data, len(data))
    writer.write_end_of_file()

    hole = bytes(64 << 20)
    got = tmp_path / "ours.pt"
    with open(got, "wb") as file:
        archive = TorchZipWriter(HoleFile(file, hole), "torch", 64, crc32=False)
        archive.write_record("data.pkl", [b"x" * 100], 100)
        archive.write_record("data/0", [hole] * (big // len(hole)) + [bytes(big % len(hole))], big)
        for name, data in small:
            archive.write_record(name, [data], len(data))
        archive.finish()

    assert got.stat().st_size == want.stat().st_size > big
    with open(got, "rb") as ours, open(want, "rb") as theirs:
        for start, length in ((0, 1 << 20), (big - (1 << 20), 4 << 20)):  # all but the big record's middle
            ours.seek(start), theirs.seek(start)
            assert ours.read(length) == theirs.read(length), f"bytes from {start} differ"
    reader = torch._C.PyTorchFileReader(str(got))
    for name, data in small:
        assert bytes(reader.get_record(name)) == data
    with zipfile.ZipFile(got) as archive:
        infos = {info.filename: info for info in archive.infolist()}
    assert infos["torch/data/0"].file_size == big and infos["torch/data/3"].header_offset > big


def test_views_and_shared_storages_are_saved_like_torch_save(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    tree = {"whole": base.view(3, 4), "tail": base[5:9], "t": base.view(3, 4).t(), "again": base.view(3, 4),
            "own": lazy_copy(torch.full((2,), 3.0)), "bf16_view": torch.arange(8.0).to(torch.bfloat16)[2:5]}
    ref, ours = save_both(tmp_path, materialize(tree), tree)
    assert_identical_file(ref, ours)
    got = torch.load(ours, weights_only=True)
    assert_same(got, torch.load(ref, weights_only=True))
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
    from megatron_ms_convert.megatron.torch_writer import LazyTensor, Pieces, write_torch_file
    from megatron_ms_convert.runner import anon_memory_bytes
    mode, count, numel, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    samples = []
    def tensor(i):
        samples.append(anon_memory_bytes())
        value = torch.full((numel,), float(i))
        samples.append(anon_memory_bytes())
        return value
    if mode == "tensors":  # one LazyTensor per tensor
        tree = {"buckets": [LazyTensor((numel,), torch.float32, lambda i=i: tensor(i)) for i in range(count)]}
    else:  # one LazyTensor made of `count` pieces
        tree = {"bucket": LazyTensor((count * numel,), torch.float32,
                                     lambda: Pieces(tensor(i) for i in range(count)))}
    baseline = anon_memory_bytes()
    write_torch_file(path, tree)
    samples.append(anon_memory_bytes())
    print(json.dumps({"baseline": baseline, "peak": max(samples)}))
""")


def peak_growth(tmp_path: Path, mode: str, count: int, numel: int) -> int:
    out = tmp_path / f"m{count}.pt"
    # glibc keeps a freed block of this size for reuse instead of unmapping it, which would hide
    # whether the writer itself still holds the previous tensor; with a low mmap threshold every
    # tensor is its own mapping and RssAnon shows exactly what is alive.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20))
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, mode, str(count), str(numel), str(out)], cwd=ROOT,
                          capture_output=True, text=True, check=True, env=env)
    report = json.loads(proc.stdout)
    assert out.stat().st_size > count * numel * 4
    out.unlink()
    return report["peak"] - report["baseline"]


@pytest.mark.parametrize("mode", ["tensors", "pieces"])
def test_memory_stays_at_one_tensor_or_piece_whatever_the_file_size(tmp_path, mode):
    numel = 2 * 2**20  # 8 MiB per tensor
    tensor_bytes, noise = numel * 4, 3 * 2**20
    small, large = peak_growth(tmp_path, mode, 3, numel), peak_growth(tmp_path, mode, 12, numel)  # 24 vs 96 MiB
    assert large <= tensor_bytes + noise, f"writing 96 MiB raised RssAnon by {large / 2**20:.1f} MiB"
    assert large - small <= noise, f"{small / 2**20:.1f} MiB for 24 MiB vs {large / 2**20:.1f} MiB for 96 MiB"
