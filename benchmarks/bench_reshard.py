#!/usr/bin/env python3
"""Benchmark re-sharding with convert_pt2ckpt.py (--ms-tp-size / --ms-pp-size) against an I/O floor
of the same bytes, measured in the same rounds. Not part of CI.

    python3 benchmarks/bench_reshard.py [--sizes default double] [--targets 1x1 4x1] [--processes 2]
                                        [--repeat 3] [--workdir DIR] [--clean]

The fixture is bench.py's (tests/megatron_fixture.py, tp 2 · pp 2 · dp 2, `default` 12 layers / 2.6 GB
of distrib_optim.pt, `double` 24 layers / 4.4 GB); each target TPxPP is converted from it with
`--ms-tp-size TP --ms-pp-size PP --replica-policy first` (the fixture's replicated copies differ by
construction, so the default equality check would stop).

For each (size, target) the converter's own `--dry-run` says which distrib_optim.pt files each target
rank reads (its "optimizer file" lines: a worker maps, CRC-checks and gathers from all of them) and
its tensors' shapes; one uncounted conversion says how many bytes each target rank's file has (and
warms the page cache). Then `--repeat` rounds of

* floor: one interpreter imports torch (the converter's parent does too) and forks min(P, target ranks)
  workers; each takes the target ranks round-robin, as the converter's pool does with equal ranks, and
  for each reads every byte of the files that rank's plan reads and writes as many bytes as the
  converter wrote for that rank, then fsyncs;
* converter: `python3 convert_pt2ckpt.py ... --process-limit P`, exactly as a user runs it, into a fresh
  --ms-path deleted afterwards.

Wall time from start to exit, and the CPU time (user + system) of the processes; memory sampled from
/proc every ~10 ms (tests/process_memory.py via bench.measure): the peak RssAnon of each worker (a
process below the started one) is what must be flat in model size, bounded by the worker's start-up
heap plus a small multiple of the largest target tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the fixture, the measurement and the report pieces are bench.py's)

MIB = bench.MIB
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4}

# `python3 -c FLOOR_SCRIPT WORKERS JOBS_JSON`: JOBS_JSON a list of [sources, target, nbytes], one per
# target rank; the workers take them round-robin.
FLOOR_SCRIPT = r"""
import json, os, sys
import torch  # the converter's parent pays this too, once

def job(sources, target, nbytes):
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    for path in sources:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    with open(target, "wb", buffering=0) as out:
        while nbytes > 0:
            nbytes -= out.write(view[:min(len(buf), nbytes)])
        os.fsync(out.fileno())

""" + bench.FORK_JOBS + r"""
run_jobs(int(sys.argv[1]), json.loads(sys.argv[2]))
"""


@dataclass(frozen=True)
class TargetRank:
    output: str  # rank_N/<file>, relative to --ms-path
    sources: tuple[str, ...]  # the distrib_optim.pt files its plan reads
    largest_tensor: int  # bytes


@dataclass(frozen=True)
class Case:
    fixture: bench.Fixture
    tp: int
    pp: int
    ranks: tuple[TargetRank, ...]

    @property
    def name(self) -> str:
        return f"tp{self.tp} pp{self.pp}"

    @property
    def read_bytes(self) -> int:
        return sum(Path(s).stat().st_size for r in self.ranks for s in r.sources)


def converter_command(case: Case, out_dir: Path, processes: int) -> list[str]:
    return [sys.executable, str(bench.CONVERTER), "--megatron-path", str(case.fixture.megatron_path),
            "--ms-path", str(out_dir), "--tp-size", str(bench.TP), "--pp-size", str(bench.PP),
            "--dp-size", str(bench.DP), "--ms-tp-size", str(case.tp), "--ms-pp-size", str(case.pp),
            "--replica-policy", "first", "--process-limit", str(processes)]


PLAN_LINE = re.compile(r"^plan for target \S+ \S+ \S+ -> (.*)$")
OPTIMIZER_LINE = re.compile(r"^  optimizer file \d+: (.*)$")
TENSOR_LINE = re.compile(r"^  \S+ \[([\d, ]*)\] (\w+) <- gather")


def plan_case(fixture: bench.Fixture, tp: int, pp: int, workdir: Path) -> Case:
    """Each target rank's source files and largest tensor, from the converter's --dry-run."""
    out_dir = workdir / "out-dry"
    cmd = converter_command(Case(fixture, tp, pp, ()), out_dir, 1) + ["--dry-run"]
    text = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=bench.REPO).stdout
    ranks, current = [], None
    for line in text.splitlines():
        if (m := PLAN_LINE.match(line)):
            current = dict(output=str(Path(m.group(1)).relative_to(out_dir)), sources=[], largest=0)
            ranks.append(current)
        elif current and (m := OPTIMIZER_LINE.match(line)):
            current["sources"].append(m.group(1))
        elif current and (m := TENSOR_LINE.match(line)):
            numel = 1
            for dim in m.group(1).split(","):
                numel *= int(dim) if dim.strip() else 1
            current["largest"] = max(current["largest"], numel * DTYPE_BYTES[m.group(2)])
    if len(ranks) != tp * pp or not all(r["sources"] for r in ranks):
        raise SystemExit(f"--dry-run printed {len(ranks)} target plans, expected {tp * pp}:\n{text[-2000:]}")
    return Case(fixture, tp, pp, tuple(TargetRank(r["output"], tuple(r["sources"]), r["largest"]) for r in ranks))


def floor_command(case: Case, out_dir: Path, processes: int, written: dict[str, int]) -> list[str]:
    out_dir.mkdir(parents=True)
    jobs = [[list(r.sources), str(out_dir / f"target{i}.raw"), written[r.output]] for i, r in enumerate(case.ranks)]
    return [sys.executable, "-c", FLOOR_SCRIPT, str(min(processes, len(jobs))), json.dumps(jobs)]


def run_once(kind: str, case: Case, workdir: Path, processes: int, written: dict[str, int]) -> Timed:
    out_dir = workdir / f"out-{kind}"
    shutil.rmtree(out_dir, ignore_errors=True)
    if kind == "floor":
        command = floor_command(case, out_dir, processes, written)
    else:
        command = converter_command(case, out_dir, processes)
    try:
        return Timed.of(lambda: bench.measure([command], out_dir, workdir / f"{kind}.log"))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


@dataclass(frozen=True)
class Timed:
    """A run and the CPU time (user + system) of its processes: on a shared machine the wall time
    of a CPU-hungry run stretches with the load more than an I/O-bound one's, the CPU time does not."""

    run: bench.Run
    cpu: float  # seconds

    @staticmethod
    def of(measure) -> "Timed":
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        run = measure()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return Timed(run, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)

    def __getattr__(self, name):
        return getattr(self.run, name)


def written_per_rank(case: Case, workdir: Path, processes: int) -> dict[str, int]:
    """One uncounted conversion: the bytes of each target rank's file (the floor writes as many), and
    a warm page cache for the counted runs."""
    out_dir = workdir / "out-warm"
    shutil.rmtree(out_dir, ignore_errors=True)
    bench.measure([converter_command(case, out_dir, processes)], out_dir, workdir / "warm.log")
    sizes = {r.output: (out_dir / r.output).stat().st_size for r in case.ranks}
    shutil.rmtree(out_dir)
    return sizes


@dataclass(frozen=True)
class Row:
    case: Case
    processes: int
    conv: tuple[Timed, ...]
    floor: tuple[Timed, ...]
    load: tuple[float, ...]  # 1-minute load average before each round


def bench_case(case: Case, workdir: Path, processes: int, repeat: int) -> Row:
    written = written_per_rank(case, workdir, processes)
    run_once("floor", case, workdir, processes, written)  # uncounted: its interpreter's caches
    conv, floor, load = [], [], []
    for i in range(repeat):
        load.append(os.getloadavg()[0])
        floor.append(run_once("floor", case, workdir, processes, written))
        conv.append(run_once("conv", case, workdir, processes, written))
        bench.log(f"  {case.fixture.size} -> {case.name} P={processes} #{i + 1} (load {load[-1]:.1f}): "
                  f"floor {floor[-1].wall:5.2f} s ({floor[-1].cpu:.1f} s CPU) | conv {conv[-1].wall:5.2f} s "
                  f"({conv[-1].cpu:.1f} s CPU), worker RssAnon "
                  f"{conv[-1].peak_worker_anon / MIB:.0f} MiB")
    return Row(case, processes, tuple(conv), tuple(floor), tuple(load))


def median(values) -> float:
    return statistics.median(values)


def results_table(rows: Sequence[Row]) -> str:
    header = ("| size | target | P | target ranks | read GB | written GB | converter wall s | floor wall s "
              "| conv/floor | CPU s conv / floor | load (1 min) | worker peak RssAnon MiB | floor worker RssAnon MiB "
              "| largest target tensor MiB | conv/floor ≤ 1.3 |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        ratio = median(r.wall for r in row.conv) / median(r.wall for r in row.floor)
        largest = max(r.largest_tensor for r in row.case.ranks)
        lines.append(
            f"| {row.case.fixture.size} | {row.case.name} | {row.processes} | {len(row.case.ranks)} "
            f"| {row.case.read_bytes / 1e9:.2f} | {median(r.bytes_written for r in row.conv) / 1e9:.2f} "
            f"| {bench.spread([r.wall for r in row.conv])} | {bench.spread([r.wall for r in row.floor])} "
            f"| {ratio:.2f} | {median(r.cpu for r in row.conv):.1f} / {median(r.cpu for r in row.floor):.1f} "
            f"| {bench.spread(row.load, '{:.1f}')} | {bench.mib([r.peak_worker_anon for r in row.conv])} "
            f"| {bench.mib([r.peak_worker_anon for r in row.floor])} | {largest / MIB:.0f} "
            f"| {bench.check_mark(ratio <= bench.WALL_TARGET)} |")
    return "\n".join(lines)


def flat_table(rows: Sequence[Row]) -> str:
    """Per target layout: the worker's peak RssAnon at each size, and its excess over the floor's
    worker (the same interpreter, forked after `import torch`) in units of the largest target tensor.
    A forked worker's RssAnon counts the pages it shares with its parent (the plans of every target
    rank, in the converter), hence the parents' peaks beside it."""
    lines = ["| target | P | size | worker peak RssAnon MiB | floor worker MiB | excess MiB | largest target "
             "tensor MiB | excess / largest | converter parent MiB | floor parent MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r.case.name, r.processes, r.case.fixture.size)):
        conv = median(r.peak_worker_anon for r in row.conv)
        base = median(r.peak_worker_anon for r in row.floor)
        largest = max(r.largest_tensor for r in row.case.ranks)
        lines.append(f"| {row.case.name} | {row.processes} | {row.case.fixture.size} | {conv / MIB:.0f} "
                     f"| {base / MIB:.0f} | {(conv - base) / MIB:.0f} | {largest / MIB:.0f} "
                     f"| {(conv - base) / largest:.2f} | {median(r.peak_parent_anon for r in row.conv) / MIB:.0f} "
                     f"| {median(r.peak_parent_anon for r in row.floor) / MIB:.0f} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=list(bench.SIZES), default=["default", "double"])
    parser.add_argument("--targets", nargs="+", default=["1x1", "4x1"], metavar="TPxPP",
                        help="target layouts (--ms-tp-size x --ms-pp-size)")
    parser.add_argument("--processes", type=int, nargs="+", default=[2], help="--process-limit values")
    parser.add_argument("--repeat", type=int, default=3, help="counted rounds of floor and converter")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/convert_pt2ckpt_bench"))
    parser.add_argument("--clean", action="store_true", help="delete the fixtures when done")
    args = parser.parse_args(argv)
    if args.repeat < 1 or min(args.processes) < 1:
        parser.error("--repeat and --processes must be >= 1")
    for target in args.targets:
        if not re.fullmatch(r"\d+x\d+", target):
            parser.error(f"--targets {target}: expected TPxPP, e.g. 4x1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started, load_start = time.monotonic(), os.getloadavg()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        fixture = bench.ensure_fixture(workdir, size)
        for target in args.targets:
            tp, pp = map(int, target.split("x"))
            case = plan_case(fixture, tp, pp, workdir)
            for processes in args.processes:
                rows.append(bench_case(case, workdir, processes, args.repeat))
    print()
    print("### convert_pt2ckpt re-sharding benchmark")
    print()
    print("Machine: " + ", ".join(f"{k} {v}" for k, v in bench.machine_info(workdir).items()))
    print(f"Load average (1/5/15 min) at start {bench.fmt_load(load_start)}, at end {bench.fmt_load(os.getloadavg())}; "
          f"benchmark took {(time.monotonic() - started) / 60:.1f} min. Medians of {args.repeat} rounds "
          "(min–max), each round floor then converter; warm page cache; outputs fsynced.")
    print()
    print(results_table(rows))
    print()
    print(flat_table(rows))
    print()
    if args.clean:
        for size in args.sizes:
            shutil.rmtree(workdir / f"fixture-{size}", ignore_errors=True)
            (workdir / f"fixture-{size}.json").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
