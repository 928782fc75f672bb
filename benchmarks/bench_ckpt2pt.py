#!/usr/bin/env python3
"""Benchmark convert_ckpt2pt.py against an I/O floor measured in the same run. Not part of CI.

    python3 benchmarks/bench_ckpt2pt.py [--hidden 1024] [--layers 4 12] [--workdir DIR] [--repeat 2]
                                        [--also CHECKOUT ...] [--crc-check] [--form named|bucket]

For each --hidden and --layers: writes a Megatron-format fixture (tp 2, pp 2, dp 2, bf16, vocab 8000,
buckets of 2M elements, padded) with tests/megatron_fixture.py, converts it to MindSpore with convert_pt2ckpt.py,
then times (a) convert_ckpt2pt.py --process-limit 2 with --debug (each worker logs its peak RssAnon,
sampled as it reads each tensor) and (b) the I/O floor: two processes that read every MindSpore file
and write as many bytes as the conversion wrote, with fsync, using the same interpreter start-up.
Reports the median wall time of each and the largest per-worker peak RssAnon. `--also` times the
convert_ckpt2pt.py of other checkouts (say, an earlier commit unpacked with `git archive`) in the same
rounds, right after this one's, so a before/after comparison sees the same machine load.
`--form bucket` converts back from MindSpeed's DistributedOptimizer bucket form instead, made from the
MindSpore files by tests/mindspeed_bucket_fixture.py (dp 2, buckets of 2M elements, mem align, bf16
slots); the floor then reads every dp rank's bucket file.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FLOOR = textwrap.dedent("""
    import os, sys, torch  # the same interpreter start-up as the converter
    sources, target, nbytes = sys.argv[1:-2], sys.argv[-2], int(sys.argv[-1])
    chunk = 16 << 20
    for path in sources:
        with open(path, "rb") as f:
            while f.read(chunk):
                pass
    with open(target, "wb") as out:
        block = b"\\0" * chunk
        while nbytes > 0:
            out.write(block[:min(chunk, nbytes)]); nbytes -= chunk
        out.flush(); os.fsync(out.fileno())
""")


def run(cmd: list[str], cwd: Path = ROOT) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout + proc.stderr)
    return time.perf_counter() - start, proc.stdout


def prepare(workdir: Path, hidden: int, layers: int, form: str = "named") -> tuple[Path, Path]:
    """(the folder to convert back, its pt_meta)."""
    ms = prepare_named(workdir, hidden, layers)
    if form == "named":
        return ms, ms / "pt_meta"
    bucket = ms.parent / "bucket"
    if not bucket.is_dir():
        run([sys.executable, "tests/mindspeed_bucket_fixture.py", "--named", str(ms), "--out", str(bucket),
             "--tp", "2", "--pp", "2", "--dp", "2", "--bucket-size", "2000000", "--param-dtype", "bfloat16"])
    return bucket, ms / "pt_meta"


def prepare_named(workdir: Path, hidden: int, layers: int) -> Path:
    save, ms = workdir / f"h{hidden}_l{layers}" / "save", workdir / f"h{hidden}_l{layers}" / "ms"
    if not ms.is_dir():
        run([sys.executable, "tests/megatron_fixture.py", "--out", str(save), "--tp", "2", "--pp", "2", "--dp", "2",
             "--num-layers", str(layers), "--hidden", str(hidden), "--ffn", str(4 * hidden), "--heads", "8", "--vocab",
             "8000", "--overlap-grad-reduce", "--bucket-size", "2000000", "--no-record"])
        run([sys.executable, "convert_pt2ckpt.py", "--megatron-path", str(save / "iter_0000010"), "--ms-path",
             str(ms), "--tp-size", "2", "--pp-size", "2", "--dp-size", "2"])
        shutil.rmtree(save)
    return ms


def with_crc_trailers(ms: Path) -> Path:
    """A copy of `ms` whose .ckpt files end as `save_checkpoint(..., crc_check=True)` ends them: b"crc_num"
    and the CRC-32 of every byte before it in 10 big-endian bytes (which the way back verifies)."""
    crc_ms = ms.with_name(ms.name + "_crc")
    if not crc_ms.is_dir():
        shutil.copytree(ms, crc_ms)
        for path in crc_ms.glob("rank_*/*.ckpt"):
            data = path.read_bytes()
            path.write_bytes(data + b"crc_num" + zlib.crc32(data).to_bytes(10, "big"))
    return crc_ms


def convert_back(ms: Path, out: Path, checkout: Path, pt_meta: Path | None = None) -> tuple[float, str]:
    shutil.rmtree(out, ignore_errors=True)
    return run([sys.executable, "convert_ckpt2pt.py", "--ms-path", str(ms), "--param-map-path",
                str(pt_meta or ms / "pt_meta"),
                "--megatron-path", str(out), "--tp-size", "2", "--pp-size", "2", "--dp-size", "2", "--cp-size", "1",
                "--vpp-size", "1", "--process-limit", "2", "--debug"], cwd=checkout)


def measure(ms: Path, workdir: Path, repeat: int, others: list[Path], pt_meta: Path | None = None) -> dict:
    conv, floor, peaks, written, also = [], [], [], 0, {other: [] for other in others}
    for _ in range(repeat):
        out = workdir / "back"
        seconds, log = convert_back(ms, out, ROOT, pt_meta)
        conv.append(seconds)
        peaks += [float(m) for m in re.findall(r"peak anonymous memory ([0-9.]+) MiB", log)]
        written = sum(p.stat().st_size for p in out.rglob("*.pt"))
        for other in others:
            also[other].append(convert_back(ms, out, other, pt_meta)[0])
        shutil.rmtree(out)
        files = sorted(str(p) for p in ms.glob("rank_*/*.ckpt"))
        start = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", FLOOR, *files[i::2], str(workdir / f"floor{i}"),
                                   str(written // 2)], cwd=ROOT) for i in range(2)]
        assert all(p.wait() == 0 for p in procs)
        floor.append(time.perf_counter() - start)
    source = sum(p.stat().st_size for p in ms.glob("rank_*/*.ckpt"))
    return {"source_mib": source / 2**20, "written_mib": written / 2**20, "conv_s": statistics.median(conv),
            "floor_s": statistics.median(floor), "peak_worker_anon_mib": max(peaks),
            "also_s": [statistics.median(also[other]) for other in others]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 12])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--form", choices=["named", "bucket"], default="named",
                        help="convert back from the name-keyed files or from MindSpeed's bucket form")
    parser.add_argument("--also", type=Path, nargs="*", default=[], metavar="CHECKOUT",
                        help="other checkouts whose convert_ckpt2pt.py to time in the same rounds")
    parser.add_argument("--crc-check", action="store_true",
                        help="give the MindSpore files the crc_num trailer of save_checkpoint(crc_check=True)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_ckpt2pt_"))
    extra = "".join(f" {other.name} s | ratio |" for other in args.also)
    print("| hidden | layers | MindSpore MiB | written MiB | ckpt2pt s | I/O floor s | ratio "
          f"| peak RssAnon per worker MiB |{extra}")
    print("|---|---|---|---|---|---|---|---|" + "---|---|" * len(args.also))
    for hidden in args.hidden:
        for layers in args.layers:
            source, pt_meta = prepare(workdir, hidden, layers, args.form)
            source = with_crc_trailers(source) if args.crc_check else source
            r = measure(source, workdir, args.repeat, args.also, pt_meta)
            others = "".join(f" {s:.2f} | {s / r['floor_s']:.2f} |" for s in r["also_s"])
            print(f"| {hidden} | {layers} | {r['source_mib']:.0f} | {r['written_mib']:.0f} | {r['conv_s']:.2f} "
                  f"| {r['floor_s']:.2f} | {r['conv_s'] / r['floor_s']:.2f} | {r['peak_worker_anon_mib']:.0f} |"
                  f"{others}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
