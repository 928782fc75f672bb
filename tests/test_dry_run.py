"""--dry-run in both directions: exit 0, nothing written, and the printed plan names every output
tensor with the shape and dtype the real conversion writes (read back with MindSpore's and torch's
own loaders)."""

from __future__ import annotations

import re

import numpy as np

from tests.expected_outputs import SAMPLE, load_ms, run_cli
from tests.helpers import SAMPLE_SIZE_FLAGS, model_tensors_of, run_back

TENSOR_LINE = re.compile(r"^  (\S+) (\[[\d, ]*\]) (\S+) <- ", re.M)
BACK_LINE = re.compile(r"^  model_optim_rng\.pt (\S+) (\[[\d, ]*\]) (\S+) <- ", re.M)


def test_forward_dry_run_prints_what_the_conversion_writes(tmp_path):
    flags = ["--megatron-path", SAMPLE / "iter_0000010", *SAMPLE_SIZE_FLAGS, "--param-map-path", SAMPLE / "param_map"]
    dry = run_cli(*flags, "--ms-path", tmp_path / "dry", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert not (tmp_path / "dry").exists()
    printed = {}
    for plan in dry.stdout.split("plan for ")[1:]:
        rank = re.search(r"rank_(\d+)/network\.ckpt", plan.splitlines()[0]).group(1)
        printed[rank] = {name: (shape, dtype) for name, shape, dtype in TENSOR_LINE.findall(plan)}
    real = run_cli(*flags, "--ms-path", tmp_path / "real")
    assert real.returncode == 0, real.stdout
    assert sorted(printed) == sorted(p.name.removeprefix("rank_") for p in (tmp_path / "real").glob("rank_*"))
    for rank, tensors in printed.items():
        loaded = load_ms(tmp_path / "real" / f"rank_{rank}" / "network.ckpt")
        assert set(loaded) == set(tensors)
        for name, value in loaded.items():
            shape, dtype = tensors[name]
            assert str(list(np.shape(value))) == shape and value.dtype == np.dtype(dtype), name


def test_back_dry_run_prints_what_the_conversion_writes(tmp_path):
    forward = run_cli("--megatron-path", SAMPLE / "iter_0000010", *SAMPLE_SIZE_FLAGS, "--param-map-path",
                      SAMPLE / "param_map", "--ms-path", tmp_path / "ms")
    assert forward.returncode == 0, forward.stdout
    flags = ["--ms-path", tmp_path / "ms", "--param-map-path", tmp_path / "ms" / "pt_meta", *SAMPLE_SIZE_FLAGS,
             "--vpp-size", 1]
    dry = run_back(*flags, "--megatron-path", tmp_path / "dry", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert not (tmp_path / "dry").exists()
    printed = {}
    for plan in dry.stdout.split("plan for ")[1:]:
        folder = re.search(r"(mp_rank_\d\d_\d\d\d)", plan.splitlines()[0]).group(1)
        printed[folder] = {key.removeprefix("model."): (shape, dtype) for key, shape, dtype in BACK_LINE.findall(plan)}
        assert plan.count("distrib_optim.pt dense buffer") >= 3  # a bucket line per state at least
    for folder, tensors in printed.items():
        original = model_tensors_of(SAMPLE / "iter_0000010" / folder / "model_optim_rng.pt")
        assert {key: (str(list(t.shape)), str(t.dtype)) for key, t in original.items()} == tensors
    assert sorted(printed) == sorted(p.name for p in (SAMPLE / "iter_0000010").iterdir())
