"""Input the converter must decode exactly or refuse in one line: distrib_optim.pt files whose bucket
records disagree with themselves, input files that cannot be read, and integer tensors in
--convert-param-only. Each case runs the CLI on a writable copy of the Megatron-written sample."""

from __future__ import annotations

import shutil

import numpy as np
import torch

from tests.expected_outputs import load_ms, run_cli
from tests.megatron_fixture import _megatron_enums_module, load_megatron_file

SIZES = ["--tp-size", 2, "--pp-size", 2, "--dp-size", 2]
DISTRIB = "iter_0000010/mp_rank_01_000/distrib_optim.pt"


def convert(ckpt, out, *extra):
    return run_cli("--megatron-path", ckpt / "iter_0000010", "--ms-path", out, *SIZES, *extra)


def one_error(proc) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    [line] = [line for line in proc.stdout.splitlines() if " ERROR " in line]
    return line


def rewrite_distrib(path, change) -> None:
    state = load_megatron_file(path)
    change(state)
    torch.save(state, path)


def test_unpadded_sizes_for_more_buffers_than_padded_ones_are_refused(ckpt, tmp_path):
    """zip() over the two lists used to drop the extra entry without a word."""
    path = ckpt / DISTRIB
    rewrite_distrib(path, lambda s: s["per_bucket_numel_unpadded"].append(dict(s["per_bucket_numel_unpadded"][0])))
    line = one_error(convert(ckpt, tmp_path / "out"))
    assert str(path) in line and "per_bucket_numel_unpadded disagree" in line and "1 and 2" in line


def test_a_bucket_count_that_differs_between_padded_and_unpadded_is_refused(ckpt, tmp_path):
    path = ckpt / DISTRIB

    def drop_last_unpadded(state):
        [(key, sizes)] = state["per_bucket_numel_unpadded"][0].items()
        state["per_bucket_numel_unpadded"][0][key] = sizes[:-1]

    rewrite_distrib(path, drop_last_unpadded)
    line = one_error(convert(ckpt, tmp_path / "out"))
    assert str(path) in line and "per_bucket_numel_unpadded" in line and "bucket sizes" in line


def test_a_grad_buffer_with_two_dtype_keys_is_one_line_not_a_traceback(ckpt, tmp_path):
    path = ckpt / DISTRIB

    def add_key(state):
        [(key, sizes)] = state["per_bucket_numel"][0].items()
        state["per_bucket_numel"][0][(torch.float16, torch.float16)] = list(sizes)

    rewrite_distrib(path, add_key)
    line = one_error(convert(ckpt, tmp_path / "out"))
    assert str(path) in line and "grad buffer 0 has 2 dtype keys" in line


def test_an_unreadable_input_is_reported_as_a_read_error(ckpt, tmp_path):
    """An OSError while reading inputs used to be reported as a failure to write under --ms-path."""
    param_map = tmp_path / "param_map"
    shutil.copytree(ckpt / "param_map", param_map)
    broken = param_map / "param_map_buffer0_dp0tp1pp0vpp0.json"
    broken.unlink()
    broken.mkdir()  # reading it raises IsADirectoryError, an OSError
    line = one_error(convert(ckpt, tmp_path / "out", "--param-map-path", param_map))
    assert f"cannot read {broken}" in line and "--ms-path" not in line.split("->")[0]
    assert "--param-map-path" in line


def test_param_only_keeps_integer_tensors_integer(ckpt, tmp_path):
    model_file = ckpt / "iter_0000010/mp_rank_00_000/model_optim_rng.pt"
    state = load_megatron_file(model_file)
    counter = torch.arange(5, dtype=torch.int64) * 3_000_000_001  # not exactly representable in fp32
    state["model"]["language_model"]["embedding"]["token_counter"] = counter
    with _megatron_enums_module():
        torch.save(state, model_file)
    # a tensor MindSpeed-Core-MS has no parameter for: only the documented names can carry it
    proc = convert(ckpt, tmp_path / "out", "--convert-param-only", "--name-style", "documented")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    loaded = load_ms(tmp_path / "out" / "rank_0" / "network.ckpt")
    [name] = [n for n in loaded if n.endswith("token_counter")]
    assert loaded[name].dtype == np.int64
    assert loaded[name].tolist() == counter.tolist()
