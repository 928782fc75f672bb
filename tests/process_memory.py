"""Memory of a process tree measured from outside, by sampling /proc/<pid>/status: used by the
streaming-memory test and by the benchmark, so neither trusts the converter's own figures."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Sequence

import psutil

SAMPLE_INTERVAL = 0.010


class TreeSampler:
    """Peak of the summed VmRSS / RssAnon over some root processes and all their descendants, and the
    peak RssAnon of each process seen (so a test can look at the converter's workers alone).

    Sums double-count pages shared between processes (the converter's forked workers share the parent's
    pages), so they are an upper bound of the memory the run holds."""

    def __init__(self, roots: Sequence[int], interval: float = SAMPLE_INTERVAL):
        self.roots = list(roots)
        self.interval = interval
        self.peak_rss = 0
        self.peak_anon = 0
        self.peak_anon_by_pid: dict[int, int] = {}
        self.samples = 0
        own = os.getpid()
        self._children = child_pids if os.path.exists(f"/proc/{own}/task/{own}/children") else psutil_child_pids
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "TreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss, anon = 0, 0
            for pid in self._tree():
                pid_rss, pid_anon = read_status_kib(pid)
                rss, anon = rss + pid_rss, anon + pid_anon
                self.peak_anon_by_pid[pid] = max(self.peak_anon_by_pid.get(pid, 0), pid_anon * 1024)
            self.peak_rss, self.peak_anon = max(self.peak_rss, rss * 1024), max(self.peak_anon, anon * 1024)
            self.samples += 1
            self._stop.wait(self.interval)

    def _tree(self) -> set[int]:
        pids, todo = set(), list(self.roots)
        while todo:
            pid = todo.pop()
            if pid not in pids:
                pids.add(pid)
                todo += self._children(pid)
        return pids


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc/PID/task/TID/children (~0.05 ms per sample here)."""
    children = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:  # the process is gone
        return []
    for tid in tasks:
        try:
            children += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:  # the thread ended meanwhile
            pass
    return children


def psutil_child_pids(pid: int) -> list[int]:
    # psutil scans every process on the machine (~1.6 ms here), which at 100 samples/s would take a
    # sixth of one of the two cores from the run being measured: only for kernels without the file above.
    try:
        return [child.pid for child in psutil.Process(pid).children()]
    except psutil.NoSuchProcess:
        return []


def read_status_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) in KiB; (0, 0) for a process that is gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # the process is gone
        return 0, 0
    fields = dict(re.findall(r"^(VmRSS|RssAnon):\s+(\d+) kB", text, re.M))
    return int(fields.get("VmRSS", 0)), int(fields.get("RssAnon", 0))
