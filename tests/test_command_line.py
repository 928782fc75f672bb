"""The two command lines before any conversion starts: `-h` and a wrong flag answer without loading
torch, numpy, MindSpore or tqdm; -h's groups and wording say what the code does; and each direction
logs under its own name."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import pytest

from megatron_ms_convert.ckpt2pt import main as ckpt2pt_main
from megatron_ms_convert.pt2ckpt import main as pt2ckpt_main
from tests.expected_outputs import REPO, SAMPLE
from tests.helpers import assert_nothing_heavy, in_process, run_importtime

SCRIPTS = ("convert_pt2ckpt.py", "convert_ckpt2pt.py")


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("args, code", [(["-h"], 0), (["--no-such-flag", "1"], 2), (["--tp-size", "x"], 2)])
def test_help_and_flag_errors_load_nothing_heavy(script, args, code):
    proc, seconds = run_importtime([script, *args])
    assert proc.returncode == code, proc.stdout + proc.stderr[-2000:]
    assert_nothing_heavy(proc)
    if code == 0:
        assert proc.stdout.startswith(f"usage: {script} ")
    else:
        assert f"{script}: error:" in proc.stderr
    # Wall clock on a shared machine is noise; the import check above is the test. Keep it visible anyway.
    print(f"{script} {' '.join(args)}: {seconds:.2f} s")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_ends_with_the_full_reference(script):
    text = subprocess.run([sys.executable, script, "-h"], capture_output=True, text=True, timeout=120,
                          cwd=REPO).stdout
    assert text.rstrip().endswith("full reference: docs/usage.md")
    assert (REPO / "docs" / "usage.md").is_file()


def help_groups(text: str) -> dict[str, list[str]]:
    """-h's argument groups -> the flags listed under each."""
    groups: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = groups.setdefault(line[:-1], [])
        elif current is not None and line.startswith("  -"):
            current.append(line.split()[0].rstrip(","))
    return groups


def test_ckpt2pt_help_lists_run_control_flags_outside_file_paths():
    text = subprocess.run([sys.executable, "convert_ckpt2pt.py", "-h"], capture_output=True, text=True, timeout=120,
                          cwd=REPO).stdout
    groups = help_groups(text)
    assert groups["File Path/Location"] == ["--ms-path", "--param-map-path", "--megatron-path"]
    assert groups["Advanced feature"] == ["--convert-param-only", "--process-limit", "--multiprocess-off",
                                          "--process_timeout"]


def test_pt2ckpt_help_wording():
    text = " ".join(subprocess.run([sys.executable, "convert_pt2ckpt.py", "-h"], capture_output=True, text=True,
                                   timeout=120, cwd=REPO).stdout.split())
    assert "euqals" not in text and "equals to virtual_pipeline_model_parallel_size" in text
    start = text.index("--convert-param-only Convert")
    entry = text[start:text.index("--file-prefix FILE_PREFIX", start)]
    # which file holds which dtype: model_optim_rng.pt the training dtype, written as fp32; the fp32
    # master weights and moments in distrib_optim.pt, which the flag skips
    assert "only contains bf16" not in entry
    for words in ("`model_optim_rng.pt`", "training run's dtype", "written as fp32", "fp32 master weights",
                  "distrib_optim.pt"):
        assert words in entry, (words, entry)


def test_each_direction_logs_under_its_own_name(tmp_path, monkeypatch):
    """The names of the loggers that emitted each record: ckpt2pt's lines never carry pt2ckpt's name."""
    emitted: list[tuple[str, str]] = []
    handle = logging.Logger.handle

    def recording(logger, record):
        emitted.append((record.name, record.getMessage()))
        return handle(logger, record)

    monkeypatch.setattr(logging.Logger, "handle", recording)
    sizes = ["--tp-size", 2, "--pp-size", 2, "--dp-size", 2]
    there = in_process(pt2ckpt_main, "--megatron-path", SAMPLE / "iter_0000010", "--ms-path", tmp_path / "ms", *sizes,
                       "--multiprocess-off", "--save-param-map", tmp_path / "param_map")
    assert there.returncode == 0, there.stdout
    forward, emitted[:] = list(emitted), []
    back = in_process(ckpt2pt_main, "--ms-path", tmp_path / "ms", "--param-map-path", tmp_path / "ms" / "pt_meta",
                      "--megatron-path", tmp_path / "back", *sizes, "--cp-size", 1, "--vpp-size", 1,
                      "--multiprocess-off")
    assert back.returncode == 0, back.stdout
    for run, other in ((forward, "ckpt2pt"), (emitted, "pt2ckpt")):
        names = {name for name, _ in run}
        assert not any(re.search(other, name) for name in names), names
        assert all(name.startswith("megatron_ms_convert.") for name in names), names
    assert any(name == "megatron_ms_convert.pt2ckpt" and "param_map files" in message for name, message in forward)
    assert any(name == "megatron_ms_convert.ckpt2pt" and "latest_checkpointed_iteration.txt" in message
               for name, message in emitted)
