#!/usr/bin/env python3
"""Benchmark convert_pt2ckpt against the I/O floor. Not part of CI.

    python3 benchmarks/bench.py [--size default|double|10gb] [--processes 1 2] [--formats ckpt safetensors]
                                [--repeat 3] [--workdir DIR] [--keep] [--clean] [--check-flat]

For each format F and process count P it interleaves three kinds of runs, `--repeat` rounds of
floor -> fork-floor -> converter:

* floor: P fresh `python3 -c` processes, each importing torch (the converter pays that too),
  torch.load(mmap=True, weights_only=True)-ing its share of the ranks' distrib_optim.pt (ranks dealt
  round-robin in the converter's folder order) and writing every bucket tensor of param / exp_avg /
  exp_avg_sq raw with numpy `tofile`, then fsync (the converter fsyncs its outputs too);
* fork-floor: the same work, but one interpreter imports torch once and forks P workers, which is how
  the converter is built; on 2 cores, P concurrent `import torch` make the plain floor slower than that;
* converter: `python3 convert_pt2ckpt.py ... --process-limit P --format F`, exactly as a user runs it,
  into a fresh --ms-path that is deleted afterwards.

Each run is timed from process start to exit; the peak tree RSS / RssAnon is the largest sum over the
process tree, sampled from /proc/<pid>/status every ~10 ms. Source files are always warm in the page
cache: one uncounted run of each kind precedes the counted ones. Medians, min and max are
reported. The fixture is kept in --workdir (default /tmp/convert_pt2ckpt_bench) and reused while its
spec and the generator are unchanged; --clean deletes it at the end, --keep keeps the converter
output of the last run.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import Sequence

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.process_memory import TreeSampler  # noqa: E402  (shared with the memory test)

REPO = Path(__file__).resolve().parent.parent
GENERATOR = REPO / "tests" / "megatron_fixture.py"
CONVERTER = REPO / "convert_pt2ckpt.py"
TP, PP, DP = 2, 2, 2
GIB = 1 << 30
MIB = 1 << 20
WALL_TARGET = 1.3  # converter wall <= 1.3 x floor wall
ANON_TARGET = 1.2 * GIB  # peak tree RssAnon with 2 workers
ANON_TARGET_PROCESSES = 2

# Fixture sizes: the same tp2 pp2 dp2 layout, scaled by layers / hidden size. default: 2.60 GB of
# distrib_optim.pt; double (twice the layers, same largest tensor): 4.42 GB; 10gb: hidden 2048 (4x the
# parameters per layer) and 14 layers, 10.0 GB.
SIZES = MappingProxyType({
    "default": (("num-layers", 12), ("hidden", 1024), ("ffn", 4096), ("heads", 16), ("vocab", 32000)),
    "double": (("num-layers", 24), ("hidden", 1024), ("ffn", 4096), ("heads", 16), ("vocab", 32000)),
    "10gb": (("num-layers", 14), ("hidden", 2048), ("ffn", 8192), ("heads", 16), ("vocab", 32000)),
})

# `run_jobs(workers, jobs)` for a floor script that defines `job`: every job inline when `workers` is 0,
# else in `workers` forked children that take the jobs round-robin (the converter's parent imports
# torch once and forks its workers the same way); exits with 1 if any job failed.
FORK_JOBS = r"""
def run_jobs(workers, jobs):
    if workers == 0:
        for one in jobs:
            job(*one)
        sys.exit(0)
    children = []
    for worker in range(workers):
        pid = os.fork()
        if pid == 0:
            try:
                for one in jobs[worker::workers]:
                    job(*one)
            except BaseException:
                import traceback
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        children.append(pid)
    sys.exit(int(any(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children)))
"""

# The floor's worker code. `python3 -c FLOOR_SCRIPT FORKS SRC DST [SRC DST ...]` imports torch once
# (the converter pays that too), then copies its (distrib_optim.pt, raw file) pairs: inline when
# FORKS is 0, else in FORKS forked children that take pairs round-robin.
FLOOR_SCRIPT = r"""
import os, sys
import torch

def job(src, dst):
    state = torch.load(src, map_location="cpu", mmap=True, weights_only=True)
    with open(dst, "wb") as f:
        for gbuf in sorted(k for k in state if isinstance(k, int)):
            for states in state[gbuf].values():
                for name in ("param", "exp_avg", "exp_avg_sq"):
                    for bucket in states[name]:
                        bucket.numpy().tofile(f)
        f.flush()
        os.fsync(f.fileno())
""" + FORK_JOBS + r"""
args = sys.argv[2:]
run_jobs(int(sys.argv[1]), list(zip(args[0::2], args[1::2])))
"""

# ---------------------------------------------------------------------------------------------
# Fixture


@dataclass(frozen=True)
class Fixture:
    size: str
    root: Path
    megatron_path: Path
    rank_dirs: tuple[Path, ...]  # in the converter's order: sorted by (pp, tp)

    @property
    def distrib_files(self) -> list[Path]:
        return [d / "distrib_optim.pt" for d in self.rank_dirs]

    @property
    def distrib_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.distrib_files)


def generator_args(size: str) -> list[str]:
    args = ["--tp", str(TP), "--pp", str(PP), "--dp", str(DP)]
    for flag, value in SIZES[size]:
        args += [f"--{flag}", str(value)]
    return args


def fixture_stamp(size: str) -> dict:
    # The generator's hash is part of the stamp: a changed generator may lay files out differently.
    return {"args": generator_args(size), "generator_sha256": hashlib.sha256(GENERATOR.read_bytes()).hexdigest()}


def list_files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def ensure_fixture(workdir: Path, size: str) -> Fixture:
    """Reuse workdir/fixture-SIZE when its stamp matches and no file changed size, else regenerate."""
    root = workdir / f"fixture-{size}"
    stamp_file = workdir / f"fixture-{size}.json"
    stamp = fixture_stamp(size)
    if stamp_file.is_file() and root.is_dir():
        saved = json.loads(stamp_file.read_text())
        if saved.get("stamp") == stamp and saved.get("files") == list_files(root):
            log(f"reusing fixture {root}")
            return open_fixture(size, root)
    shutil.rmtree(root, ignore_errors=True)
    stamp_file.unlink(missing_ok=True)
    log(f"generating fixture {root} ({' '.join(stamp['args'])}) ...")
    started = time.monotonic()
    subprocess.run([sys.executable, str(GENERATOR), "--out", str(root), *stamp["args"], "--no-record"],
                   check=True, stdout=subprocess.DEVNULL, cwd=REPO)
    log(f"  generated in {time.monotonic() - started:.0f} s")
    stamp_file.write_text(json.dumps({"stamp": stamp, "files": list_files(root)}, indent=1))
    return open_fixture(size, root)


def open_fixture(size: str, root: Path) -> Fixture:
    [megatron_path] = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("iter_")]

    def pp_tp(d: Path) -> tuple[int, int]:
        tp, pp = re.fullmatch(r"mp_rank_(\d+)_(\d+)", d.name).groups()
        return int(pp), int(tp)
    rank_dirs = sorted((d for d in megatron_path.iterdir() if d.name.startswith("mp_rank_")), key=pp_tp)
    return Fixture(size, root, megatron_path, tuple(rank_dirs))


def largest_output_tensor_bytes(fixture: Fixture) -> int:
    """fp32 bytes of the biggest parameter: the most the writer may hold at once. Read in a subprocess so
    that this process never imports torch (its memory would compete with the page cache)."""
    code = ("import sys\nfrom megatron_ms_convert.megatron import checkpoint as r\n"
            "best = 0\n"
            "for path in sys.argv[1:]:\n"
            "    sd = r.load_pt(path)\n"
            "    for key in r.model_chunk_keys(sd, path):\n"
            "        best = max([best] + [t.numel() for t in r.model_tensors(sd[key]).values()])\n"
            "print(best * 4)\n")
    files = [str(d / "model_optim_rng.pt") for d in fixture.rank_dirs]
    out = subprocess.run([sys.executable, "-c", code, *files], check=True, capture_output=True, text=True, cwd=REPO)
    return int(out.stdout.strip())


# ---------------------------------------------------------------------------------------------
# Measuring one run


@dataclass(frozen=True)
class Run:
    wall: float  # seconds
    bytes_written: int
    peak_rss: int  # bytes, summed over the process tree
    peak_anon: int
    samples: int
    peak_worker_anon: int = 0  # the largest peak RssAnon of one process below the started ones (a worker)
    peak_parent_anon: int = 0  # the largest peak RssAnon of one started process

    @property
    def gb_per_s(self) -> float:
        return self.bytes_written / self.wall / 1e9


def measure(commands: Sequence[Sequence[str]], out_dir: Path, log_file: Path) -> Run:
    """Start every command at once, wait for all, and measure wall time, memory and output bytes."""
    with open(log_file, "w") as sink:
        started = time.monotonic()
        processes = [subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO) for cmd in commands]
        with TreeSampler([p.pid for p in processes]) as sampler:
            codes = [p.wait() for p in processes]
        wall = time.monotonic() - started
    if any(codes):
        tail = log_file.read_text()[-3000:]
        raise SystemExit(f"run failed (exit codes {codes}): {' '.join(commands[0])}\n--- {log_file} ---\n{tail}")
    written = sum(list_files(out_dir).values())
    roots = {p.pid for p in processes}
    worker = max((peak for pid, peak in sampler.peak_anon_by_pid.items() if pid not in roots), default=0)
    parent = max(sampler.peak_anon_by_pid.get(pid, 0) for pid in roots)
    return Run(wall, written, sampler.peak_rss, sampler.peak_anon, sampler.samples, worker, parent)


def converter_commands(fixture: Fixture, out_dir: Path, processes: int, fmt: str,
                       converter: Path = CONVERTER) -> list[list[str]]:
    return [[sys.executable, str(converter), "--megatron-path", str(fixture.megatron_path), "--ms-path",
             str(out_dir), "--tp-size", str(TP), "--pp-size", str(PP), "--dp-size", str(DP),
             "--process-limit", str(processes), "--format", fmt]]


def floor_commands(fixture: Fixture, out_dir: Path, processes: int, forked: bool) -> list[list[str]]:
    """The floor as P fresh interpreters (each imports torch), or, with `forked`, as one interpreter that
    imports torch once and forks P workers. Ranks are dealt round-robin in the converter's folder
    order, which is what its worker pool does with equal-sized ranks."""
    out_dir.mkdir(parents=True)
    pairs = [[str(src), str(out_dir / f"rank{index}.raw")] for index, src in enumerate(fixture.distrib_files)]
    if forked:
        return [[sys.executable, "-c", FLOOR_SCRIPT, str(processes), *sum(pairs, [])]]
    shares = [sum(pairs[worker::processes], []) for worker in range(processes)]
    return [[sys.executable, "-c", FLOOR_SCRIPT, "0", *share] for share in shares if share]


def run_once(kind: str, fixture: Fixture, workdir: Path, processes: int, fmt: str, keep: bool = False,
             converter: Path = CONVERTER) -> Run:
    out_dir = workdir / f"out-{kind}"
    shutil.rmtree(out_dir, ignore_errors=True)
    if kind in ("floor", "fork-floor"):
        commands = floor_commands(fixture, out_dir, processes, forked=kind == "fork-floor")
    else:
        commands = converter_commands(fixture, out_dir, processes, fmt, converter)
    try:
        return measure(commands, out_dir, workdir / f"{kind}.log")
    finally:
        if not keep:
            shutil.rmtree(out_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Benchmark


@dataclass(frozen=True)
class Row:
    size: str
    fmt: str
    processes: int
    conv: tuple[Run, ...]
    floor: tuple[Run, ...]  # P fresh interpreters
    fork_floor: tuple[Run, ...]  # one interpreter, P forked workers
    also: tuple[tuple[Run, ...], ...] = ()  # the converter of each --also checkout


def bench_row(fixture: Fixture, workdir: Path, fmt: str, processes: int, repeat: int, keep: bool,
              others: Sequence[Path] = ()) -> Row:
    """floor, fork floor, conv, (each --also checkout's conv), floor, ...: interleaved so that
    background noise hits all kinds alike."""
    conv, floor, fork_floor, also = [], [], [], [[] for _ in others]
    for i in range(repeat):
        floor.append(run_once("floor", fixture, workdir, processes, fmt))
        fork_floor.append(run_once("fork-floor", fixture, workdir, processes, fmt))
        conv.append(run_once("conv", fixture, workdir, processes, fmt, keep=keep and i == repeat - 1))
        for runs, other in zip(also, others):
            runs.append(run_once("conv-also", fixture, workdir, processes, fmt, converter=other / CONVERTER.name))
            log(f"  {other.name} #{i + 1}: {runs[-1].wall:5.2f} s")
        log(f"  {fixture.size} {fmt:11} P={processes} #{i + 1}: "
            + " | ".join(f"{name} {run.wall:5.2f} s {run.peak_anon / MIB:4.0f} MiB anon"
                         for name, run in (("floor", floor[-1]), ("fork-floor", fork_floor[-1]),
                                           ("conv", conv[-1]))))
    return Row(fixture.size, fmt, processes, tuple(conv), tuple(floor), tuple(fork_floor), tuple(map(tuple, also)))


def warm_up(fixture: Fixture, workdir: Path, processes: int, fmt: str) -> None:
    """One uncounted run of each kind: pulls both .pt files of every rank into the page cache (all
    counted runs are warm) and lets Python write its bytecode caches."""
    started = time.monotonic()
    for kind in ("floor", "fork-floor", "conv"):
        run_once(kind, fixture, workdir, processes, fmt)
    log(f"  warm-up (uncounted) {time.monotonic() - started:.1f} s")


def median_min_max(values: Sequence[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def spread(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    med, low, high = median_min_max(values)
    return f"{fmt.format(med)} ({fmt.format(low)}–{fmt.format(high)})"


def mib(values: Sequence[int]) -> str:
    return spread([v / MIB for v in values], "{:.0f}")


def wall_ratio(row: Row, floor: Sequence[Run]) -> float:
    return statistics.median(r.wall for r in row.conv) / statistics.median(r.wall for r in floor)


def check_mark(ok: bool) -> str:
    return "✅" if ok else "❌"


def results_table(rows: Sequence[Row]) -> str:
    header = ("| size | format | P | converter wall s | floor wall s | fork-floor wall s | conv/floor "
              "| conv/fork-floor | conv GB/s | floor GB/s | conv peak tree RssAnon MiB | floor peak tree RssAnon MiB "
              "| fork-floor peak tree RssAnon MiB | conv peak tree RSS MiB | floor peak tree RSS MiB "
              "| wall ≤ 1.3× floor / fork-floor | RssAnon ≤ 1.2 GiB (P=2) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        ratio, fork_ratio = wall_ratio(row, row.floor), wall_ratio(row, row.fork_floor)
        anon = statistics.median(r.peak_anon for r in row.conv)
        anon_check = check_mark(anon <= ANON_TARGET) if row.processes == ANON_TARGET_PROCESSES else "—"
        lines.append(
            f"| {row.size} | {row.fmt} | {row.processes} | {spread([r.wall for r in row.conv])} "
            f"| {spread([r.wall for r in row.floor])} | {spread([r.wall for r in row.fork_floor])} "
            f"| {ratio:.2f} | {fork_ratio:.2f} "
            f"| {statistics.median(r.gb_per_s for r in row.conv):.2f} "
            f"| {statistics.median(r.gb_per_s for r in row.floor):.2f} "
            f"| {mib([r.peak_anon for r in row.conv])} | {mib([r.peak_anon for r in row.floor])} "
            f"| {mib([r.peak_anon for r in row.fork_floor])} "
            f"| {mib([r.peak_rss for r in row.conv])} | {mib([r.peak_rss for r in row.floor])} "
            f"| {check_mark(ratio <= WALL_TARGET)} / {check_mark(fork_ratio <= WALL_TARGET)} | {anon_check} |")
    return "\n".join(lines)


def also_table(rows: Sequence[Row], others: Sequence[Path]) -> str:
    """This checkout's converter against each --also checkout's, both as ratios to the same floors."""
    lines = ["| size | format | P | checkout | wall s | /floor | /fork-floor |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        for name, runs in (("this", row.conv), *zip((o.name for o in others), row.also)):
            wall = statistics.median(r.wall for r in runs)
            lines.append(f"| {row.size} | {row.fmt} | {row.processes} | {name} | {spread([r.wall for r in runs])} "
                         f"| {wall / statistics.median(r.wall for r in row.floor):.3f} "
                         f"| {wall / statistics.median(r.wall for r in row.fork_floor):.3f} |")
    return "\n".join(lines)


def flat_table(rows: Sequence[Row], largest: int, small: str, big: str) -> str:
    """Peak RssAnon of the converter must not grow with the model: the growth from `small` to `big`
    (twice the layers) has to stay below one largest tensor, the most a streaming writer may hold."""
    lines = [f"| format | P | RssAnon {small} MiB | RssAnon {big} MiB | difference MiB | largest tensor MiB | flat |",
             "|---|---|---|---|---|---|---|"]
    by_key = {(r.size, r.fmt, r.processes): r for r in rows}
    for (size, fmt, processes), row in by_key.items():
        if size != small or (big, fmt, processes) not in by_key:
            continue
        a = statistics.median(r.peak_anon for r in row.conv)
        b = statistics.median(r.peak_anon for r in by_key[(big, fmt, processes)].conv)
        lines.append(f"| {fmt} | {processes} | {a / MIB:.0f} | {b / MIB:.0f} | {(b - a) / MIB:+.0f} "
                     f"| {largest / MIB:.0f} | {check_mark(b - a < largest)} |")
    return "\n".join(lines)


def machine_info(workdir: Path) -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": len(os.sched_getaffinity(0)),
        "RAM": f"{psutil.virtual_memory().total / GIB:.1f} GiB",
        "CPU": model.group(1).strip() if model else platform.processor() or "unknown",
        "python": platform.python_version(),
        "torch": metadata.version("torch"),
        "numpy": metadata.version("numpy"),
        "filesystem": filesystem_of(workdir),
        "kernel": platform.release(),
    }


def filesystem_of(path: Path) -> str:
    """The mount (device, type) holding `path`: fsync cost depends on it."""
    best = ("?", "?", "")
    for part in psutil.disk_partitions(all=True):
        mount = Path(part.mountpoint)
        if (path == mount or mount in path.parents) and len(part.mountpoint) >= len(best[2]):
            best = (part.device, part.fstype, part.mountpoint)
    return f"{best[1]} on {best[0]} ({best[2]})"


def print_report(info: dict, fixtures: Sequence[Fixture], rows: Sequence[Row], repeat: int,
                 load: tuple[tuple[float, ...], tuple[float, ...]], elapsed: float) -> None:
    print()
    print("### convert_pt2ckpt benchmark")
    print()
    print("Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"Load average (1/5/15 min) at start {fmt_load(load[0])}, at end {fmt_load(load[1])}; "
          f"benchmark took {elapsed / 60:.1f} min.")
    for fixture in fixtures:
        total = fixture.distrib_bytes
        written = {f"{r.fmt} converter": r.conv[0].bytes_written for r in rows if r.size == fixture.size}
        written["floor"] = next(r.floor[0].bytes_written for r in rows if r.size == fixture.size)
        print(f"Fixture `{fixture.size}` (tp{TP} pp{PP} dp{DP}, {' '.join(generator_args(fixture.size)[6:])}): "
              f"{len(fixture.rank_dirs)} distrib_optim.pt, {total / 1e9:.2f} GB ({total / GIB:.2f} GiB); "
              "bytes written per run: " + ", ".join(f"{k} {v:,}" for k, v in written.items()))
    every_run = [run for row in rows for run in (*row.conv, *row.floor, *row.fork_floor)]
    interval = statistics.median(run.wall / run.samples for run in every_run) * 1000
    print(f"Medians over {repeat} runs (min–max in brackets); warm page cache; outputs fsynced; runs interleaved "
          "floor, fork-floor, converter. floor = P fresh interpreters, each `import torch` + its ranks; fork-floor "
          "= one `import torch`, then P forked workers (the converter's structure). GB/s = 1e9 bytes written / "
          f"wall. Memory: peak of the sum over the process tree, sampled every {interval:.0f} ms (median).")
    print()
    print(results_table(rows))
    print()


def fmt_load(load: Sequence[float]) -> str:
    return "/".join(f"{x:.1f}" for x in load)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="default",
                        help="fixture: default (2.6 GB of distrib_optim.pt), double (24 layers, 4.4 GB), "
                             "10gb (10.0 GB)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="--process-limit values")
    parser.add_argument("--formats", nargs="+", choices=["ckpt", "safetensors"], default=["ckpt", "safetensors"])
    parser.add_argument("--repeat", type=int, default=3,
                        help="counted rounds per (format, P) of floor, fork-floor and converter")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/convert_pt2ckpt_bench"))
    parser.add_argument("--keep", action="store_true", help="keep the converter output of the last run")
    parser.add_argument("--clean", action="store_true", help="delete the fixtures when done")
    parser.add_argument("--check-flat", action="store_true",
                        help="also run the double-size fixture (24 layers) and check that peak RssAnon is flat")
    parser.add_argument("--also", type=Path, nargs="*", default=[], metavar="CHECKOUT",
                        help="also time the convert_pt2ckpt.py of these checkouts (e.g. an earlier commit "
                             "unpacked with git archive) in the same rounds, right after this one's")
    args = parser.parse_args(argv)
    if args.repeat < 1 or min(args.processes) < 1:
        parser.error("--repeat and --processes must be >= 1")
    if args.check_flat and args.size != "default":
        parser.error("--check-flat compares the default and the double fixture; drop --size")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started, load_start = time.monotonic(), os.getloadavg()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    sizes = [args.size] + (["double"] if args.check_flat else [])
    fixtures, rows = [], []
    for size in sizes:
        fixture = ensure_fixture(workdir, size)
        fixtures.append(fixture)
        log(f"fixture {size}: {fixture.distrib_bytes / 1e9:.2f} GB of distrib_optim.pt in {fixture.megatron_path}")
        warm_up(fixture, workdir, max(args.processes), args.formats[0])
        for fmt in args.formats:
            for processes in args.processes:
                rows.append(bench_row(fixture, workdir, fmt, processes, args.repeat, args.keep,
                                      [o.resolve() for o in args.also]))
    print_report(machine_info(workdir), fixtures, rows, args.repeat, (load_start, os.getloadavg()),
                 time.monotonic() - started)
    if args.also:
        print("This checkout against --also checkouts (medians; same rounds, same floors):")
        print()
        print(also_table(rows, args.also))
        print()
    if args.check_flat:
        print(f"Flat in model size (converter peak tree RssAnon, {sizes[0]} vs {sizes[1]}):")
        print()
        print(flat_table(rows, largest_output_tensor_bytes(fixtures[0]), sizes[0], sizes[1]))
        print()
    if args.clean:
        for fixture in fixtures:
            shutil.rmtree(fixture.root, ignore_errors=True)
            (workdir / f"fixture-{fixture.size}.json").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
