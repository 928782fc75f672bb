#!/usr/bin/env python3
"""Benchmark the MindSpore reader against a raw read of the same file and against load_checkpoint. Not CI.

    python3 benchmarks/bench_ms_reader.py [--mib 512] [--tensor-mib 16] [--formats ckpt safetensors]
                                          [--repeat 3] [--workdir DIR] [--no-mindspore]

Writes one file per format (float32 tensors of --tensor-mib each, --mib in all, with this project's
writer, byte-identical to save_checkpoint) and, per format and round, runs three fresh processes:

* raw: reads the file with readinto() into one reusable 16 MiB buffer and CRC-32s it (the I/O floor);
* reader: open_mindspore_file, then read() every tensor and CRC-32 its bytes (one tensor at a time);
* mindspore: mindspore.load_checkpoint, then asnumpy() and CRC-32 of every tensor (skipped with
  --no-mindspore).

Each child reports the seconds of its work (imports excluded) and the growth of its RssAnon over the
baseline after imports, sampled after every tensor (raw: after every block). The file is warm in the
page cache (one uncounted raw read first). Medians, min and max are printed.

Results (2026-11-28 18:59 UTC, 2 cores shared with other jobs, load average ~6, so times are noisy;
defaults: 512 MiB, 32 tensors of 16 MiB, 3 rounds), median seconds / peak RssAnon growth:

    format        raw floor        reader           load_checkpoint
    ckpt          0.52 s / 0 MiB   0.67 s / 0 MiB   1.94 s / 512 MiB
    safetensors   1.13 s / 0 MiB   0.59 s / 0 MiB   0.65 s / 0.1 MiB

The reader runs at the speed of a raw read (the CRC pass dominates both) and adds no anonymous
memory; load_checkpoint of a .ckpt holds the whole file in anonymous memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from megatron_ms_convert.mindspore.writer import TensorEntry, write_mindspore_file  # noqa: E402

PRELUDE = textwrap.dedent("""
    import json, sys, time, zlib
    def rss_anon():
        with open("/proc/self/status") as s:
            return next(int(l.split()[1]) * 1024 for l in s if l.startswith("RssAnon:"))
""")

CHILDREN = {
    "raw": PRELUDE + textwrap.dedent("""
        buf = bytearray(16 << 20); view = memoryview(buf)
        base = rss_anon(); peak = 0; t = time.perf_counter(); crc = 0
        with open(sys.argv[1], "rb", buffering=0) as f:
            while (n := f.readinto(buf)):
                crc = zlib.crc32(view[:n], crc); peak = max(peak, rss_anon() - base)
        print(json.dumps({"s": time.perf_counter() - t, "anon": peak}))
    """),
    "reader": PRELUDE + textwrap.dedent("""
        sys.path.insert(0, sys.argv[2])
        import torch
        from megatron_ms_convert.mindspore.reader import open_mindspore_file
        base = rss_anon(); peak = 0; t = time.perf_counter()
        with open_mindspore_file(sys.argv[1]) as f:
            for name in f.names():
                zlib.crc32(f.read(name).numpy().reshape(-1).view("uint8")); peak = max(peak, rss_anon() - base)
        print(json.dumps({"s": time.perf_counter() - t, "anon": peak}))
    """),
    "mindspore": PRELUDE + textwrap.dedent("""
        import mindspore as ms
        base = rss_anon(); t = time.perf_counter()
        fmt = "safetensors" if sys.argv[1].endswith(".safetensors") else "ckpt"
        peak = 0
        for v in ms.load_checkpoint(sys.argv[1], format=fmt).values():
            zlib.crc32(v.asnumpy().reshape(-1).view("uint8")); peak = max(peak, rss_anon() - base)
        print(json.dumps({"s": time.perf_counter() - t, "anon": peak}))
    """),
}


def write_file(path: Path, mib: int, tensor_mib: int, fmt: str) -> None:
    n = tensor_mib * 2**20 // 4
    entries = [TensorEntry(f"layers.{i}.weight", (n,), "float32") for i in range(mib // tensor_mib)]
    template = np.arange(n, dtype=np.float32)
    write_mindspore_file(path, entries, lambda e: template, fmt, durable=False)


def run_child(kind: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILDREN[kind], str(path), str(ROOT)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--tensor-mib", type=int, default=16)
    ap.add_argument("--formats", nargs="+", default=["ckpt", "safetensors"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ms_reader_bench"))
    ap.add_argument("--no-mindspore", action="store_true")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    kinds = ["raw", "reader"] + ([] if args.no_mindspore else ["mindspore"])
    for fmt in args.formats:
        path = args.workdir / f"bench_{args.mib}mib.{fmt}"
        if not path.exists():
            write_file(path, args.mib, args.tensor_mib, fmt)
        run_child("raw", path)  # warm the page cache
        results = {k: [] for k in kinds}
        for _ in range(args.repeat):
            for kind in kinds:
                results[kind].append(run_child(kind, path))
        print(f"{fmt}: {path.stat().st_size / 2**20:.0f} MiB, {args.mib // args.tensor_mib} tensors")
        for kind, runs in results.items():
            secs = [r["s"] for r in runs]
            anon = max(r["anon"] for r in runs) / 2**20
            print(f"  {kind:9s} median {statistics.median(secs):6.3f} s  (min {min(secs):.3f}, max {max(secs):.3f})"
                  f"  peak RssAnon growth {anon:7.1f} MiB")


if __name__ == "__main__":
    main()
