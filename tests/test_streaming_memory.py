"""The streaming property, guarded cheaply: a worker's peak anonymous memory does not grow with the
checkpoint. Converting a checkpoint twice as large may raise it by no more than one tensor (plus
allocator noise), where a converter that builds the whole rank in memory would add ~150 MB."""

from __future__ import annotations

import re

import pytest

from tests.expected_outputs import run_cli
from tests.megatron_fixture import FixtureSpec, write_fixture

NOISE = 16 * 2**20


def peak_anon(fixture, out, *extra) -> float:
    proc = run_cli("--megatron-path", fixture.megatron_path, "--ms-path", out, "--debug", "--process-limit", 1,
                   *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [peak] = re.findall(r"peak anonymous memory ([0-9.]+) MiB", proc.stdout)
    return float(peak) * 2**20


@pytest.mark.parametrize("extra", [[], ["--convert-param-only"]], ids=["optimizer", "param_only"])
def test_peak_memory_is_flat_in_model_size(tmp_path, extra):
    base = dict(hidden=512, ffn=2048, heads=4, vocab=512, param_map="none")
    small = write_fixture(tmp_path / "small", FixtureSpec(num_layers=4, **base), record=False)
    large = write_fixture(tmp_path / "large", FixtureSpec(num_layers=8, **base), record=False)
    largest_tensor = 2048 * 512 * 4  # the fp32 MLP weight
    data_growth = sum(p.stat().st_size for p in large.megatron_path.rglob("*.pt")) - \
        sum(p.stat().st_size for p in small.megatron_path.rglob("*.pt"))
    assert data_growth > 4 * (largest_tensor + NOISE)  # the check below could catch a whole-rank copy
    growth = peak_anon(large, tmp_path / "out_large", *extra) - peak_anon(small, tmp_path / "out_small", *extra)
    assert growth <= largest_tensor + NOISE, f"peak anonymous memory grew by {growth / 2**20:.1f} MiB"
