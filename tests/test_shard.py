"""Shares of a conversion as plain data: parsing --shard, reading each launcher's environment, and
splitting folders by bytes (no files involved)."""

from __future__ import annotations

import itertools
import random

import pytest

from megatron_ms_convert.errors import ConvertInputError
from megatron_ms_convert.shard import Shard, assign


@pytest.mark.parametrize("environ, index, count, names", [
    ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_MAX": "8"}, 2, 4, "Slurm"),
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "6",
      "SLURM_ARRAY_TASK_STEP": "2"}, 2, 4, "Slurm"),
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "5"}, 3, 5, "SLURM_PROCID=3"),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "2",
      "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, 3, 6, "SLURM_ARRAY_TASK_ID=1"),
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "3",
      "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, 2, 4, "Slurm"),
    ({"RANK": "2", "WORLD_SIZE": "3", "SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, 2, 3, "torchrun"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}, 0, 2, "Open MPI"),
    ({"PMI_RANK": "5", "PMI_SIZE": "6"}, 5, 6, "PMI"),
])
def test_auto_reads_each_launcher(environ, index, count, names):
    shard = Shard.parse("auto", environ)
    assert (shard.index, shard.count) == (index, count)
    assert shard.origin.startswith("--shard auto (") and names in shard.origin


@pytest.mark.parametrize("text, environ, needle", [
    ("auto", {}, "no launcher's variables are set"),
    ("auto", {"SLURM_ARRAY_TASK_ID": "1"}, "without SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_MAX"),
    ("auto", {"RANK": "4", "WORLD_SIZE": "4"}, "share 4 of 4"),
    ("auto", {"PMI_RANK": "x", "PMI_SIZE": "2"}, "PMI_RANK='x'"),
    ("3/3", {}, "share 3 of 3"),
    ("1-of-2", {}, "expected I/N"),
    ("0/0", {}, "share 0 of 0"),
])
def test_bad_shards_say_what_to_pass(text, environ, needle):
    with pytest.raises(ConvertInputError, match="--shard") as err:
        Shard.parse(text, environ)
    assert needle in str(err.value) and "--shard I/N" in str(err.value)


def test_explicit_shard():
    assert Shard.parse("2/5") == Shard(2, 5, "--shard 2/5") and str(Shard.parse("2/5")) == "2/5"


def test_assignment_covers_every_folder_once_and_balances_bytes():
    rng = random.Random(7)
    items = [(f"mp_rank_{t:02d}_{p:03d}", rng.randrange(1, 10**9)) for t in range(8) for p in range(16)]
    for count in (1, 2, 3, 4, 7):
        shares = assign(items, count)
        flat = list(itertools.chain.from_iterable(shares))
        assert sorted(flat) == sorted(key for key, _ in items) and len(flat) == len(items)
        sizes = dict(items)
        loads = [sum(sizes[k] for k in share) for share in shares]
        # greedy largest-first: no share exceeds the mean by more than the largest item
        assert max(loads) - sum(loads) / count <= max(sizes.values())
        assert shares == assign(list(items), count)  # the same answer for every shard


def test_assignment_is_by_bytes_not_by_count():
    shares = assign([("big", 100), ("s1", 30), ("s2", 30), ("s3", 30)], 2)
    assert shares == (("big",), ("s1", "s2", "s3"))
