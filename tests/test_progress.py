"""Progress in bytes: the bookkeeping (summed over workers, only growing, reaching the total), the
workers' throttled reports, and a whole run in a terminal (a pty) of each direction: one bar over
the bytes of the whole conversion that moves more than once per rank, and the verify step as a bar
of its own."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from megatron_ms_convert.progress import ByteProgress, progress_line
from megatron_ms_convert.runner import PROGRESS_EVERY_BYTES, PROGRESS_EVERY_S, ThrottledProgress
from tests.helpers import BACK_CLI, back_flags, size_flags
from tests.expected_outputs import CLI
from tests.megatron_fixture import FixtureSpec, write_fixture

MiB = 2**20


def test_bytes_are_summed_over_workers_only_grow_and_reach_the_total():
    progress = ByteProgress()
    progress.expect("rank_0", "write", 100)
    progress.expect("rank_1", "write", 50)
    progress.expect("rank_1", "verify", 50)
    assert progress.phases() == ["write", "verify"]
    assert (progress.total("write"), progress.total("verify")) == (150, 50)
    seen = []
    for key, done in [("rank_0", 30), ("rank_1", 20), ("rank_0", 10), ("rank_1", 45), ("rank_0", 80)]:
        progress.update(key, "write", done)
        seen.append(progress.done("write"))
    assert seen == [30, 50, 50, 75, 125]  # rank_0's report behind its earlier one moves nothing
    assert progress.update("rank_1", "write", 999) == 5  # a report past the plan's size stops at it
    assert progress.update("rank_9", "write", 10) == 0  # a plan nobody expected counts for nothing
    assert progress.finish("rank_0") == {"write": 20}
    assert progress.finish("rank_1") == {"write": 0, "verify": 50}
    assert (progress.done("write"), progress.done("verify")) == (150, 50)
    assert progress_line(progress, 2.0) == "progress: converting 0.00 of 0.00 GB (100 %), verifying 0.00 of 0.00 " \
                                           "GB (100 %), 0.00 GB/s"


def test_a_log_line_says_gb_done_of_total_and_the_rate():
    progress = ByteProgress()
    progress.expect("rank_0", "write", 4 * 10**9)
    progress.update("rank_0", "write", 10**9)
    assert progress_line(progress, 2.0) == "progress: converting 1.00 of 4.00 GB (25 %), 0.50 GB/s"


def test_workers_report_at_most_every_64_mib_or_half_second_and_each_new_phase():
    sent, now = [], [0.0]
    report = ThrottledProgress(sent.append, clock=lambda: now[0])
    report("write", 0)
    for done in range(MiB, 200 * MiB, MiB):  # 1 MiB at a time, 1 ms apart
        now[0] += 0.001
        report("write", done)
    assert [done for _, done in sent] == [0, 64 * MiB, 128 * MiB, 192 * MiB]
    assert PROGRESS_EVERY_BYTES == 64 * MiB
    now[0] += PROGRESS_EVERY_S
    report("write", 192 * MiB + 1)  # little written, but half a second passed
    report("verify", 0)  # a new phase is reported at once
    assert sent[-2:] == [("write", 192 * MiB + 1), ("verify", 0)]


# ---------------------------------------------------------------------------------------------
# In a terminal

BAR = re.compile(r"(converting|verifying): +(\d+)%\|[^|]*\| *([\d.]+)([kMG]?)/([\d.]+)([kMG]?) \[[^]]*B/s\]")
UNITS = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}


def run_in_terminal(command: list) -> str:
    """The command's terminal output, run in a pty of 150 columns (a terminal with a size)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: its stdin, stdout and stderr are the pty
        os.execv(sys.executable, [sys.executable, *map(str, command)])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))
    output = bytearray()
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the child has closed the pty
            break
        if not data:
            break
        output += data
    _, status = os.waitpid(pid, 0)
    text = output.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    return text


def bar_states(text: str, label: str) -> list[tuple[int, float, float]]:
    """Every state a bar was drawn in: (percent, bytes done, bytes total)."""
    return [(int(m[2]), float(m[3]) * UNITS[m[4]], float(m[5]) * UNITS[m[6]])
            for m in BAR.finditer(text) if m[1] == label]


def assert_bar_moves_in_bytes(text: str, label: str, ranks: int) -> None:
    states = bar_states(text, label)
    assert states, text
    percents = [p for p, _, _ in states]
    assert percents == sorted(percents) and percents[-1] == 100, percents
    between = {done for p, done, _ in states if 0 < p < 100}
    assert len(between) > ranks, (label, states)  # more than once per rank folder
    assert {total for _, _, total in states} == {states[0][2]} and states[0][2] > 100e6  # one bar for the run


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """Two ranks of ~160 MB each (2.5 x 64 MiB): large enough for several progress reports each."""
    spec = FixtureSpec(pp=2, num_layers=2, hidden=1024, ffn=4096, heads=8, vocab=1024, bucket_size=None)
    return spec, write_fixture(tmp_path_factory.mktemp("progress") / "save", spec, record=False)


def test_a_terminal_shows_one_bar_in_bytes_per_step_both_ways(big, tmp_path):
    spec, fixture = big
    ms = tmp_path / "ms"
    forward = run_in_terminal([CLI, "--megatron-path", fixture.megatron_path, "--ms-path", ms, *size_flags(spec),
                               "--verify"])
    assert_bar_moves_in_bytes(forward, "converting", ranks=2)
    assert_bar_moves_in_bytes(forward, "verifying", ranks=2)
    assert forward.count("successfully") == 2
    back = run_in_terminal([BACK_CLI, "--ms-path", ms, "--param-map-path", ms / "pt_meta",
                            "--megatron-path", tmp_path / "back", *back_flags(pp=2), "--verify"])
    assert_bar_moves_in_bytes(back, "converting", ranks=2)
    assert_bar_moves_in_bytes(back, "verifying", ranks=2)
    assert back.count("successfully") == 2


def test_a_log_file_gets_no_bar(big, tmp_path):
    spec, fixture = big
    proc = subprocess.run([sys.executable, str(CLI), "--megatron-path", str(fixture.megatron_path),
                           "--ms-path", str(tmp_path / "ms"), *map(str, size_flags(spec))],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "converting:" not in proc.stdout + proc.stderr and "\r" not in proc.stdout + proc.stderr
    assert Path(tmp_path / "ms" / "rank_1" / "network.ckpt").is_file()
