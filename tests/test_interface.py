"""The documented interface as users meet it: -h, the seed's shell-script usage with its log, and the
progress bar on a terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

from tests.expected_outputs import CLI, VPP_SAMPLE, run_cli

DOCUMENTED = {  # flag -> default as in the documented tool (None: no default shown)
    "--megatron-path": None, "--ms-path": None, "--param-map-path": None, "--pp-size": "1", "--tp-size": "1",
    "--dp-size": "1", "--cp-size": "1", "--parallel-init-order": "tp-cp-ep-dp-pp", "--vpp-size": "1",
    "--stage-list": None, "--num-layers": None, "--generate-all-dp-cp": None, "--convert-param-only": None,
    "--file-prefix": "network", "--format": "ckpt", "--dist-opt-content": "['param', 'exp_avg', 'exp_avg_sq']",
    "--debug": None, "--multiprocess-off": None, "--process-limit": "4", "--process_timeout": "3600",
}
GROUPS = ["File Path/Location:", "distributed:", "Advanced feature:"]


def test_help_lists_every_documented_flag_default_and_group():
    proc = run_cli("-h")
    assert proc.returncode == 0
    text = proc.stdout
    usage = text.split("\n\n")[0]
    for flag, default in DOCUMENTED.items():
        assert re.search(rf"\[?{re.escape(flag)}[ \]\n]", usage), flag
        if default is not None:
            block = text[text.index(f"\n  {flag}"):]
            block = block[:block.index("\n  --", 3)] if "\n  --" in block[3:] else block
            assert f"(default: {default})" in " ".join(block.split()), (flag, block)
    positions = [text.index(g) for g in GROUPS]
    assert positions == sorted(positions)


def test_process_timeout_accepts_both_spellings(tmp_path):
    for spelling in ("--process_timeout", "--process-timeout"):
        proc = run_cli("--megatron-path", tmp_path / "missing", "--ms-path", tmp_path / "o", spelling, 5)
        assert proc.returncode == 2 and "no such folder" in proc.stdout


def test_seed_usage_from_a_shell_script_with_the_log_redirected(tmp_path):
    """The documented example, shape for shape (vpp, --debug, --process-limit 8, background job with
    its log redirected), on the real virtual-pipeline checkpoint; Megatron on PYTHONPATH is optional."""
    script = tmp_path / "convert.sh"
    script.write_text(f"""#!/bin/bash
export PYTHONPATH=/path/to/Megatron-LM:$PYTHONPATH
{sys.executable} {CLI} \\
       --megatron-path {VPP_SAMPLE}/iter_0000002/ \\
       --param-map-path {VPP_SAMPLE}/param_map \\
       --ms-path {tmp_path}/ms_save_sandbox/ \\
       --num-layers 8 \\
       --pp-size 4 \\
       --dp-size 2 \\
       --vpp-size 2 \\
       --tp-size 1 \\
       --process-limit 8 \\
       --debug \\
       > {tmp_path}/convert_ckpt.log 2>&1 &
wait $!
""")
    done = subprocess.run(["bash", str(script)], timeout=600)
    assert done.returncode == 0
    log = (tmp_path / "convert_ckpt.log").read_text()
    folders = [line for line in log.splitlines() if "successfully" in line]
    assert len(folders) == len(list((VPP_SAMPLE / "iter_0000002").iterdir())) == 4, log[-2000:]
    assert sorted(p.name for p in (tmp_path / "ms_save_sandbox").iterdir()) == [
        "pt_meta", "rank_0", "rank_2", "rank_4", "rank_6"]
    assert " DEBUG " in log and "ERROR" not in log


def test_progress_bar_on_a_terminal_and_plain_lines_otherwise(tmp_path):
    args = [sys.executable, str(CLI), "--megatron-path", str(VPP_SAMPLE / "iter_0000002"), "--tp-size", 1,
            "--pp-size", 4, "--dp-size", 2, "--vpp-size", 2, "--num-layers", 8]
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a real terminal's size
    proc = subprocess.Popen([*map(str, args), "--ms-path", str(tmp_path / "tty")], stdin=secondary,
                            stdout=secondary, stderr=secondary, close_fds=True)
    os.close(secondary)
    chunks = []
    while True:
        try:
            data = os.read(primary, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=300) == 0
    terminal = b"".join(chunks).decode(errors="replace")
    # one bar over the bytes of the whole run (not one step per folder), done when every byte is
    assert re.search(r"converting: 100%\|[^\r]*\| ([\d.]+[kMG]?)/\1 \[[^\r]*B/s\]", terminal), terminal[-2000:]
    plain = run_cli(*args[2:], "--ms-path", tmp_path / "plain")
    assert "converting:" not in plain.stdout + plain.stderr and "%|" not in plain.stderr
