"""Damaged input bytes stop the conversion with one line (issue 18 §1): the CRC-32 of every zip record
of a .pt (torch.load checks none), a MindSpore save's crc_check CRC, and param_map JSON that is
truncated or not UTF-8. Each case fails on the code before the checks existed."""

from __future__ import annotations

import json
import re
import shutil
import struct
import zipfile

import numpy as np
import pytest
import torch

from megatron_ms_convert.errors import ConvertInputError
from megatron_ms_convert.megatron.checkpoint import load_pt
from megatron_ms_convert.mindspore.reader import open_mindspore_file
from megatron_ms_convert.pt2ckpt import main as pt2ckpt_main
from tests.expected_outputs import SAMPLE
from tests.helpers import convert, error_lines, in_process, leftovers, success_count

CRC_LINE = re.compile(r"expected CRC-32 ([0-9a-f]{8}) \(zip directory\); found ([0-9a-f]{8}) -> re-copy the file")


def record_span(path, name_end: str) -> tuple[str, int, int]:
    """(name, first data byte, size) of the record whose name ends with `name_end`."""
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(name_end))
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    return info.filename, info.header_offset + 30 + name_len + extra_len, info.file_size


def flip(path, offset: int, count: int = 1) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def largest_data_record(path) -> str:
    with zipfile.ZipFile(path) as archive:
        return max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size).filename


def test_flipped_bytes_in_a_distrib_optim_bucket_stop_that_rank_only(ckpt, clean_outputs, tmp_path):  # noqa: F811
    """The issue's case: 64 bytes flipped in the middle of a bucket record. Before: exit 0 and the
    damaged values in rank_5."""
    target = ckpt / "iter_0000010/mp_rank_01_001/distrib_optim.pt"
    name, start, size = record_span(target, largest_data_record(target).split("/", 1)[1])
    flip(target, start + size // 2, 64)
    out = tmp_path / "out"
    proc = convert(ckpt, out)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    [line] = error_lines(proc)
    assert "mp_rank_01_001" in line and str(target) in line and f"record {name.split('/', 1)[1]}" in line
    assert "state 'param'" in line or "state 'exp_avg" in line, line  # names the tensor the record holds
    expected, found = CRC_LINE.search(line).groups()
    assert expected != found
    assert "Traceback" not in proc.stdout + proc.stderr and success_count(proc) == 3
    assert not (out / "rank_5").exists() or not list((out / "rank_5").iterdir())
    manifest = out / "pt_meta" / "manifest_tp01_pp001.json"
    assert not manifest.exists() or json.loads(manifest.read_text())["state"] != "complete"
    assert not (out / "pt_meta" / "args_tp01_pp001.pt").exists()
    assert not leftovers(out)
    for rank in (0, 1, 4):  # the other ranks converted as in a clean run
        assert (out / f"rank_{rank}/network.ckpt").read_bytes() == clean_outputs[rank]


def test_a_flipped_pickle_byte_is_refused_before_unpickling(tmp_path):
    """A changed character in a key of data.pkl still unpickles (into another key): before, silently."""
    target = tmp_path / "model_optim_rng.pt"
    shutil.copy(SAMPLE / "iter_0000010/mp_rank_00_000/model_optim_rng.pt", target)
    _, start, size = record_span(target, "/data.pkl")
    where = target.read_bytes().index(b"iteration", start, start + size)
    data = bytearray(target.read_bytes())
    data[where] = ord("I")
    target.write_bytes(bytes(data))
    with pytest.raises(ConvertInputError, match=r"record data\.pkl \(the pickle\) is damaged.*re-copy the file"):
        load_pt(target)


def test_a_flipped_tensor_byte_is_named_by_its_key(tmp_path):
    target = tmp_path / "args_tp00_pp000.pt"
    torch.save({"model": {"layer.weight": torch.arange(1000.0), "layer.bias": torch.ones(3)}}, target)
    _, start, size = record_span(target, "data/0")
    flip(target, start + size // 2)
    assert torch.equal(torch.load(target, weights_only=True, mmap=True)["model"]["layer.bias"], torch.ones(3))
    with pytest.raises(ConvertInputError, match=r"record data/0 \(holds model\.layer\.weight\) is damaged"):
        load_pt(target, check_all_data=True)
    load_pt(target)  # a parent that reads no tensor data does not read the record either


def test_a_zip_directory_that_points_elsewhere_is_refused(tmp_path):
    target = tmp_path / "x.pt"
    torch.save({"w": torch.arange(100.0)}, target)
    with zipfile.ZipFile(target) as archive:
        start_dir = archive.start_dir
    data = bytearray(target.read_bytes())
    data[start_dir + 42] ^= 0x40  # the first record's local header offset (central directory field)
    target.write_bytes(bytes(data))
    with pytest.raises(ConvertInputError, match="re-copy the file"):
        load_pt(target, check_all_data=True)


def _mindspore_save(path, fmt: str) -> None:
    import mindspore as ms
    params = [{"name": "w", "data": ms.Parameter(ms.Tensor(np.arange(512, dtype=np.float32)), name="w")},
              {"name": "b", "data": ms.Parameter(ms.Tensor(np.ones(8, dtype=np.float16)), name="b")}]
    ms.save_checkpoint(params, str(path), crc_check=True, format=fmt)


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_mindspore_crc_check_save_is_verified(tmp_path, fmt):
    path = tmp_path / f"net.{fmt}"
    _mindspore_save(path, fmt)
    with open_mindspore_file(path) as ms_file:
        assert ms_file.check_crc() is True
    flip(path, path.stat().st_size - (300 if fmt == "ckpt" else 40))  # inside w's bytes
    with open_mindspore_file(path) as ms_file:
        with pytest.raises(ConvertInputError, match=r"fail the CRC-32 check of .*crc_num.*re-copy the file"):
            ms_file.check_crc()


def test_a_save_without_crc_has_nothing_to_verify(tmp_path):
    import mindspore as ms
    path = tmp_path / "net.ckpt"
    ms.save_checkpoint([{"name": "w", "data": ms.Tensor(np.ones(4, np.float32))}], str(path))
    with open_mindspore_file(path) as ms_file:
        assert ms_file.check_crc() is False


@pytest.mark.parametrize("damage", ["truncated", "not utf-8", "sidecar field"])
def test_damaged_param_map_is_one_line(tmp_path, damage):
    """Before: a JSONDecodeError / UnicodeDecodeError traceback (dp1's copy is parsed raw), or a
    damaged sidecar copied into pt_meta/ unread."""
    ckpt_copy = tmp_path / "save"
    shutil.copytree(SAMPLE, ckpt_copy)
    param_map = ckpt_copy / "param_map"
    target = param_map / "param_map_buffer0_dp1tp0pp0vpp0.json"
    if damage == "truncated":
        target.write_bytes(target.read_bytes()[:-40])
    elif damage == "not utf-8":
        target.write_bytes(target.read_bytes()[:10] + b"\xff" + target.read_bytes()[11:])
    else:
        for dp in (0, 1):
            meta = json.loads((param_map / f"param_map_buffer0_dp{dp}tp0pp0vpp0.json").read_text())
            sidecar = {"format": "convert_pt2ckpt.param_map_meta", "version": 1, "param_dtype": "torch.bfloat16",
                       "grad_dtype": "torch.float32", "data_parallel_size": 2, "bucket_size": None,
                       "numel": 0, "buckets": [], "model_chunk": 0, "buffer_index": 0, "tp_rank": 0,
                       "pp_rank": 0, "dp_rank": dp + 7}  # a damaged rank field the conversion does not use
            assert meta
            target = param_map / f"param_map_buffer0_dp{dp}tp0pp0vpp0.meta.json"
            target.write_text(json.dumps(sidecar))
    proc = in_process(pt2ckpt_main, "--megatron-path", ckpt_copy / "iter_0000010", "--ms-path", tmp_path / "out",
                      "--tp-size", 2, "--pp-size", 2, "--dp-size", 2, "--param-map-path", param_map)
    assert proc.returncode == 2, proc.stdout
    [line] = error_lines(proc)
    assert "Traceback" not in proc.stdout
    if damage == "sidecar field":
        assert ".meta.json" in line and "'dp_rank': 7" in line, line
    else:
        assert target.name in line and "not valid JSON" in line, line
