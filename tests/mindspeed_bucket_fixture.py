#!/usr/bin/env python3
"""Turn name-keyed MindSpore rank files (what convert_pt2ckpt.py writes) into the bucket form that
MindSpeed-Core-MS's DistributedOptimizer saves, for tests and benchmarks of the way back.

Written from the layout rules in ../shared/MINDSPEED_DISTOPT.md §1-§2 (mindspeed_ms 697e48e), not from
the converter's reader (megatron_ms_convert/mindspore/bucket_form.py), so that the two are independent
paths: the reader reads the layout JSON; this builder makes the layout from the rules.

* one buffer per parameter dtype, in first-seen module order (the name-keyed file's order);
* parameters placed in **reverse** order; a new bucket opens before a parameter once the open bucket
  holds >= bucket_size elements;
* with enable_mem_align every parameter takes a slot of ceil((bytes + 32) / 512) * 512 bytes, and a
  bucket is padded to a multiple of dp * 512 bytes; without it a bucket is padded until its byte count
  is divisible by dp (so an odd element count at fp32 and dp 2 keeps its last element in no shard);
* dp rank d holds elements [d*L, (d+1)*L) of each bucket, L = bucket_numel // dp, fp32 for params and
  both Adam moments (`buffer_<b>_bucket_<k>`, `exp_avg.…`, `exp_avg_sq.…`), zeros in gaps and padding;
* every rank file holds the buckets buffer-major, then the scalars; dp rank 0 of each group writes
  opt_shard_info/rank_<r>/dist_opt_shard_info_rank_<r>-0_0.json (json.dump, indent 4); every rank folder
  gets meta.json; ranks are numbered pp*(dp*tp) + dp_rank*tp + tp_rank.

Usage::

    python3 tests/mindspeed_bucket_fixture.py --named ms --out bucket --tp 2 --pp 2 --dp 2 --bucket-size 300
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron_ms_convert.mindspore.reader import open_mindspore_file  # noqa: E402
from megatron_ms_convert.mindspore.writer import TensorEntry, write_mindspore_file  # noqa: E402

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
STATES = ("", "exp_avg.", "exp_avg_sq.")


@dataclass(frozen=True)
class Placed:
    name: str
    shape: tuple[int, ...]
    dtype: str
    buffer: int
    bucket: int
    start: int  # in buffer coordinates
    end: int


@dataclass(frozen=True)
class Built:
    """A group's layout as the rules make it: placed params and each buffer's [(padded, unpadded)] buckets."""

    params: tuple[Placed, ...]
    buckets: tuple[tuple[tuple[int, int], ...], ...]

    def bucket_start(self, b: int, k: int) -> int:
        return sum(n for n, _ in self.buckets[b][:k])


def build_layout(params: list[tuple[str, tuple[int, ...], str]], dp: int, bucket_size: int | None,
                 mem_align: bool) -> Built:
    """`params` = (name, shape, dtype) in module order."""
    dtypes = list(dict.fromkeys(dtype for _, _, dtype in params))
    placed, all_buckets = [], []
    for b, dtype in enumerate(dtypes):
        size = ITEMSIZE[dtype]
        buckets: list[tuple[int, int]] = []
        bucket_start = offset = 0
        in_bucket = 0

        def close(end: int) -> None:
            unpadded = end - bucket_start
            align = dp * 512 if mem_align else dp
            padded_bytes = math.ceil(unpadded * size / align) * align
            buckets.append((padded_bytes // size, unpadded))

        for name, shape, _ in reversed([p for p in params if p[2] == dtype]):
            if bucket_size is not None and in_bucket and offset - bucket_start >= bucket_size:
                close(offset)
                bucket_start = offset = bucket_start + buckets[-1][0]
                in_bucket = 0
            numel = math.prod(shape)
            placed.append(Placed(name, tuple(shape), dtype, b, len(buckets), offset, offset + numel))
            offset += (math.ceil((numel * size + 32) / 512) * 512) // size if mem_align else numel
            in_bucket += 1
        close(offset)
        all_buckets.append(tuple(buckets))
    return Built(tuple(placed), tuple(all_buckets))


def layout_json(built: Built, dp_ranks: list[int]) -> dict:
    return {
        "dp_rank_list": dp_ranks,
        "param_info": {p.name: {"range_map": [p.buffer, p.bucket, p.start, p.end], "shape": list(p.shape),
                                "dtype": p.dtype} for p in built.params},
        "buffer_info": {str(b): {"buckets": {str(k): [n, u] for k, (n, u) in enumerate(buckets)},
                                 "buffer_size": sum(n for n, _ in buckets),
                                 "buffer_numel_unpadded": sum(u for _, u in buckets), "bucket_num": len(buckets)}
                        for b, buckets in enumerate(built.buckets)},
    }


def bucket_values(built: Built, named, b: int, k: int, state: str) -> np.ndarray:
    """The whole bucket of one state as fp32, zeros outside the parameters."""
    out = np.zeros(built.buckets[b][k][0], np.float32)
    start = built.bucket_start(b, k)
    for p in built.params:
        if p.buffer == b and p.bucket == k:
            out[p.start - start:p.end - start] = named.read(state + p.name).numpy().reshape(-1)
    return out


def write_group(named_file: Path, out: Path, dp_ranks: list[int], bucket_size: int | None, mem_align: bool,
                param_dtype: str = "float32", fp32_params: tuple[str, ...] = (), step: int | None = None,
                prefix: str = "network", fmt: str = "ckpt") -> Built:
    """Write the bucket form of one group (its dp ranks' files, meta.json, the dp-rank-0 layout JSON)."""
    with open_mindspore_file(named_file) as named:
        names = named.names()
        params = [n for n in names if f"exp_avg.{n}" in names]
        scalars = [n for n in names if n not in params and not n.startswith(("exp_avg.", "exp_avg_sq."))]
        built = build_layout([(n, tuple(named.info(n).shape), "float32" if n in fp32_params else param_dtype)
                              for n in params], len(dp_ranks), bucket_size, mem_align)
        if step is None:
            step = int(named.read("step_num").item())
        shards = [(b, k, state) for b in range(len(built.buckets)) for k in range(len(built.buckets[b]))
                  for state in STATES]
        for d, rank in enumerate(dp_ranks):
            folder = out / f"rank_{rank}"
            folder.mkdir(parents=True, exist_ok=True)
            entries = [TensorEntry(f"{state}buffer_{b}_bucket_{k}", (built.buckets[b][k][0] // len(dp_ranks),),
                                   "float32") for b, k, state in shards]
            entries += [TensorEntry(n, tuple(named.info(n).shape), named.info(n).dtype) for n in scalars]
            if "epoch_num" not in scalars:
                entries.append(TensorEntry("epoch_num", (), "int64"))

            def fetch(entry: TensorEntry, d=d) -> np.ndarray:
                if entry.name == "epoch_num" and entry.name not in names:
                    return np.array(0, np.int64)
                if entry.name in scalars:
                    return named.read(entry.name).numpy()
                state, _, rest = entry.name.rpartition("buffer_")
                b, k = (int(x) for x in rest.split("_bucket_"))
                shard = built.buckets[b][k][0] // len(dp_ranks)
                return bucket_values(built, named, b, k, state)[d * shard:(d + 1) * shard]

            file_name = f"{prefix}_rank_{rank}-0_{step}.{fmt}"
            write_mindspore_file(folder / file_name, entries, fetch, fmt)
            (folder / "meta.json").write_text(json.dumps({"last_epoch": 0, "last_step": step,
                                                          "last_ckpt_file": file_name}))
    json_dir = out / "opt_shard_info" / f"rank_{dp_ranks[0]}"
    json_dir.mkdir(parents=True, exist_ok=True)
    (json_dir / f"dist_opt_shard_info_rank_{dp_ranks[0]}-0_0.json").write_text(
        json.dumps(layout_json(built, dp_ranks), indent=4))
    return built


def write_bucket_form(named: Path, out: Path, tp: int, pp: int, dp: int, bucket_size: int | None, mem_align: bool,
                      param_dtype: str = "float32", fp32_params: tuple[str, ...] = (), fmt: str = "ckpt"
                      ) -> dict[int, Built]:
    """Every (tp, pp) group of a named-form folder (rank_<pp*dp*tp + tp>/network.<fmt>) in the bucket form
    at `out`; returns each group's layout by its dp-rank-0 rank."""
    built = {}
    for p in range(pp):
        for t in range(tp):
            ranks = [p * dp * tp + d * tp + t for d in range(dp)]
            built[ranks[0]] = write_group(named / f"rank_{ranks[0]}" / f"network.{fmt}", out, ranks, bucket_size,
                                          mem_align, param_dtype, fp32_params, fmt=fmt)
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--named", type=Path, required=True, help="convert_pt2ckpt.py's --ms-path")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--bucket-size", type=int, default=None)
    parser.add_argument("--no-mem-align", action="store_true")
    parser.add_argument("--param-dtype", default="float32", choices=sorted(ITEMSIZE))
    parser.add_argument("--format", default="ckpt", choices=["ckpt", "safetensors"])
    a = parser.parse_args(argv)
    write_bucket_form(a.named, a.out, a.tp, a.pp, a.dp, a.bucket_size, not a.no_mem_align, a.param_dtype,
                      fmt=a.format)
    return 0


if __name__ == "__main__":
    sys.exit(main())
