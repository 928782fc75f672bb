"""The MindSpore reader must return, bit for bit, what the real mindspore.load_checkpoint returns for
files written by the real mindspore.save_checkpoint, read only what it is asked for, and reject damaged
input with a ConvertInputError naming the file.

The expected values come from mindspore itself (load_checkpoint, and mindspore's own protobuf schema to
check how a file is laid out) or from the arrays a test wrote, never from the reader's code.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import mindspore as ms
import mindspore.train.serialization as ms_serialization
import numpy as np
import pytest
import torch
from mindspore.train.checkpoint_pb2 import Checkpoint

from megatron_ms_convert.errors import ConvertInputError
from megatron_ms_convert.mindspore.reader import StoredTensor, open_mindspore_file
from megatron_ms_convert.mindspore.writer import TensorEntry, write_mindspore_file

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20
# MindSpore's dtype names -> the reader's dtype names, written out here rather than taken from the reader.
MS_DTYPE_NAMES = {"Float32": "float32", "Float16": "float16", "BFloat16": "bfloat16", "Float64": "float64",
                  "Int32": "int32", "Int64": "int64", "Bool": "bool", "UInt8": "uint8"}


# ---------------------------------------------------------------- helpers

def _rng_values():
    rng = np.random.default_rng(1)
    f32 = rng.standard_normal((3, 4, 5)).astype(np.float32)
    f32.flat[:4] = [np.inf, -0.0, 1e-45, -np.inf]  # specials and a subnormal survive bit for bit
    return {
        "layers.0.attention.qkv.weight": f32,
        "bias16": rng.standard_normal(7).astype(np.float16),
        "bf16.weight": rng.standard_normal((4, 6)).astype(np.float32),  # stored as bfloat16 below
        "step_num": np.array(1234, np.int64),
        "learning_rate": np.array(3e-4, np.float32),
        "bf16_scalar": np.array(2.75, np.float32),  # stored as bfloat16 below
        "state_step": np.array([7], np.int64),
        "counts": np.arange(-3, 3, dtype=np.int32).reshape(2, 3),
        "max_lr": np.array([1e-3, 2e-3], np.float64),
        "mask": np.array([True, False, True]),
    }


BF16_NAMES = {"bf16.weight", "bf16_scalar"}


def _ms_tensor(name, arr):
    return ms.Tensor(arr, ms.bfloat16) if name in BF16_NAMES else ms.Tensor(arr)


def _ms_parameter(name, arr):
    if name in BF16_NAMES:  # Parameter(bf16 Tensor) fails with numpy 2 (no numpy bfloat16); cast afterwards
        p = ms.Parameter(ms.Tensor(arr), name=name)
        p.set_dtype(ms.bfloat16)
        return p
    return ms.Parameter(ms.Tensor(arr), name=name)


def _ms_loaded(path: Path, fmt: str) -> dict:
    """name -> (dtype name, shape, raw bytes) from the real load_checkpoint; bf16 as its exact fp32 widening."""
    out = {}
    for name, value in ms.load_checkpoint(str(path), format=fmt).items():
        if isinstance(value, str):
            out[name] = value
            continue
        dtype = MS_DTYPE_NAMES[str(value.dtype)]
        arr = value.astype(ms.float32).asnumpy() if dtype == "bfloat16" else value.asnumpy()
        out[name] = (dtype, tuple(value.shape), arr.tobytes())
    return out


def _ours(f, name) -> tuple[str, tuple, bytes]:
    t = f.read(name)
    info = f.info(name)
    assert str(t.dtype) == f"torch.{info.dtype}" and tuple(t.shape) == info.shape, (name, t.dtype, t.shape, info)
    arr = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
    return info.dtype, info.shape, arr.tobytes()


def _assert_matches_load_checkpoint(path: Path, fmt: str) -> dict:
    want = _ms_loaded(path, fmt)
    with open_mindspore_file(path) as f:
        assert f.fmt == fmt
        got = {name: _ours(f, name) for name in f.names()}
        got.update(f.strings())
    assert sorted(got) == sorted(want), (list(got), list(want))  # load_checkpoint sorts safetensors names
    for name in want:
        assert got[name] == want[name], name
    return want


def _records(path: Path) -> list[tuple[str, list[int], str, int]]:
    """(tag, dims, tensor_type, content bytes) per message, parsed by mindspore's own protobuf schema."""
    c = Checkpoint()
    c.ParseFromString(path.read_bytes())
    return [(v.tag, list(v.tensor.dims), v.tensor.tensor_type, len(v.tensor.tensor_content)) for v in c.value]


def _wait_for_async_save():
    ms_serialization._wait_async_thread_save_ckpt()


def _assert_input_error(path: Path, *fragments: str, fmt=None):
    with pytest.raises(ConvertInputError) as e:
        open_mindspore_file(path, fmt).close()
    msg = str(e.value)
    assert str(path) in msg and " -> " in msg, msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    return msg


# ---------------------------------------------------------------- hand-encoded protobuf (independent of the writer)

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        if n < 0x80:
            return bytes(out + bytes([n]))
        out.append(n & 0x7F | 0x80)
        n >>= 7


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _tensor_proto(dims, ms_type: str, content: bytes, *, packed=False, reverse=False, unknown=b"") -> bytes:
    dims_fields = _field(1, b"".join(_varint(d) for d in dims)) if packed else \
        b"".join(_varint(1 << 3) + _varint(d) for d in dims)
    parts = [dims_fields, _field(2, ms_type.encode()), _field(3, content)]
    return unknown + b"".join(reversed(parts) if reverse else parts) + unknown


def _message(tag: str, tensor: bytes, *, reverse=False, unknown=b"") -> bytes:
    parts = [_field(1, tag.encode()), _field(2, tensor)]
    value = unknown + b"".join(reversed(parts) if reverse else parts)
    return _field(1, value)


# Unknown fields of every skippable wire type: varint 99, fixed64, length-delimited, fixed32.
UNKNOWN = (_varint(9 << 3 | 0) + _varint(99) + _varint(10 << 3 | 1) + b"\x01" * 8
           + _field(11, b"junk") + _varint(12 << 3 | 5) + b"\x02" * 4)


# ---------------------------------------------------------------- files written by the real save_checkpoint

@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_dict_of_parameters_matches_load_checkpoint(tmp_path, fmt):
    values = _rng_values()
    if fmt == "safetensors":  # mindspore 2.10 with numpy 2 cannot write bf16 safetensors (see bf16 test below)
        values = {k: v for k, v in values.items() if k not in BF16_NAMES}
    path = tmp_path / f"dict.{fmt}"
    ms.save_checkpoint({k: _ms_parameter(k, v) for k, v in values.items()}, str(path), format=fmt)
    want = _assert_matches_load_checkpoint(path, fmt)
    assert sorted(want) == sorted(values)
    with open_mindspore_file(path) as f:
        assert f.info("step_num") == StoredTensor("step_num", (), "int64")
        assert f.info("state_step").shape == (1,)
        if fmt == "ckpt":
            assert f.names() == list(values)  # file order = save order
            assert f.info("bf16_scalar") == StoredTensor("bf16_scalar", (), "bfloat16")
            assert f.read("bf16.weight").dtype == torch.bfloat16
        else:
            assert f.metadata() == {"format": "ms"}


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_list_of_tensors_matches_load_checkpoint(tmp_path, fmt):
    values = _rng_values()
    if fmt == "safetensors":
        values = {k: v for k, v in values.items() if k not in BF16_NAMES}
    path = tmp_path / f"list.{fmt}"
    ms.save_checkpoint([{"name": k, "data": _ms_tensor(k, v)} for k, v in values.items()], str(path), format=fmt)
    want = _assert_matches_load_checkpoint(path, fmt)
    assert sorted(want) == sorted(values)


def test_bf16_safetensors_match_the_safetensors_library(tmp_path):
    # mindspore 2.10 cannot write or read a bf16 .safetensors with numpy 2 (asnumpy has no bfloat16), so the
    # oracle is the safetensors library, which MindSpore itself uses to write the format.
    from safetensors.torch import load_file, save_file
    src = {"w": torch.randn(5, 3).to(torch.bfloat16), "s": torch.tensor(1.5, dtype=torch.bfloat16),
           "f": torch.randn(4), "i": torch.arange(3)}
    path = tmp_path / "bf.safetensors"
    save_file(src, str(path), metadata={"format": "ms"})
    want = load_file(str(path))
    with open_mindspore_file(path) as f:
        assert sorted(f.names()) == sorted(want)
        for name, t in want.items():
            got = f.read(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name


def test_append_dict_strings_and_crc_trailer(tmp_path):
    values = _rng_values()
    path = tmp_path / "extra.ckpt"
    params = {k: _ms_parameter(k, v) for k, v in values.items()}
    params["note"] = "a str value"
    ms.save_checkpoint(params, str(path), append_dict={"comment": "héllo ✓", "epoch_num": 3, "lr": 0.5},
                       crc_check=True)
    assert path.read_bytes()[-17:-10] == b"crc_num"  # the trailer really is there
    want = _assert_matches_load_checkpoint(path, "ckpt")
    assert want["comment"] == "héllo ✓"
    with open_mindspore_file(path) as f:
        assert f.strings() == {"note": "a str value", "comment": "héllo ✓"}
        assert "note" not in f and "epoch_num" in f and f.info("epoch_num").shape == ()


@pytest.mark.parametrize("async_save", [False, True], ids=["byte_chunks", "async_axis0"])
def test_split_parameters_match_load_checkpoint(tmp_path, monkeypatch, async_save):
    # save_checkpoint splits above SLICE_SIZE KiB; a 1 KiB limit makes its real splitting code run on small
    # tensors: byte chunks for Parameters, np.array_split along axis 0 (with empty pieces) for async saves.
    monkeypatch.setattr(ms_serialization, "SLICE_SIZE", 1)
    values = {"a": np.arange(1000, dtype=np.float32).reshape(10, 100) * 0.5,
              "row": np.arange(700, dtype=np.int64).reshape(1, 700),
              "small": np.arange(3, dtype=np.float16),
              "h": np.linspace(-1, 1, 1536).astype(np.float32).reshape(3, 512)}
    path = tmp_path / "split.ckpt"
    params = {k: _ms_parameter(k, v) for k, v in values.items()}
    if not async_save:  # an async save goes through asnumpy, which has no bfloat16 with numpy 2
        params["bf"] = _ms_parameter("bf16.weight", np.linspace(-3, 3, 1200, dtype=np.float32).reshape(40, 30))
    ms.save_checkpoint(params, str(path), async_save=async_save)
    _wait_for_async_save()
    records = _records(path)
    assert all(sum(1 for r in records if r[0] == name) > 1 for name in params if name != "small")
    if async_save:
        assert any(r[0] == "row" and r[3] == 0 for r in records)  # array_split of a length-1 axis 0
    _assert_matches_load_checkpoint(path, "ckpt")
    with open_mindspore_file(path) as f:
        a1, a2 = f.read("a"), f.read("a")
        assert a1.data_ptr() != a2.data_ptr()  # a joined tensor is a fresh copy each time
        s1, s2 = f.read("small"), f.read("small")
        assert s1.data_ptr() == s2.data_ptr()  # a one-message tensor is a view of the mapping
        # rows (a rank's stacked experts are read one at a time), also where a row crosses messages;
        # read() was just checked against load_checkpoint
        rows = 0
        for name in f.names():
            whole = f.read(name)
            for row in range(whole.shape[0] if whole.dim() else 0):
                got = f.read_row(name, row)
                assert got.dtype == whole.dtype
                assert got.reshape(-1).view(torch.uint8).equal(whole[row].reshape(-1).view(torch.uint8))
                rows += 1
        assert rows == 10 + 1 + 3 + 3 + (0 if async_save else 40)
        with pytest.raises(IndexError):
            f.read_row("a", 10)


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory):
    """One 600 MiB fp32 Parameter saved by the real save_checkpoint (two messages: 512 MiB + 88 MiB),
    between two small ones; every element has a distinct bit pattern."""
    path = tmp_path_factory.mktemp("big") / "big.ckpt"
    big = np.arange(600 * 262144, dtype=np.int32).view(np.float32).reshape(600, 262144)
    params = {"before": ms.Parameter(ms.Tensor(np.arange(5, dtype=np.float32)), name="before"),
              "big": ms.Parameter(ms.Tensor(big), name="big"),
              "after": ms.Parameter(ms.Tensor(np.array(9, np.int64)), name="after")}
    ms.save_checkpoint(params, str(path))
    del params, big
    return path


def test_parameter_over_512_mib_matches_load_checkpoint(big_ckpt):
    assert big_ckpt.stat().st_size > 600 * MIB
    loaded = ms.load_checkpoint(str(big_ckpt))
    with open_mindspore_file(big_ckpt) as f:
        assert f.names() == ["before", "big", "after"]
        assert f.info("big") == StoredTensor("big", (600, 262144), "float32")
        for name in f.names():
            want = loaded.pop(name).asnumpy()
            got = f.read(name).numpy()
            assert got.shape == want.shape and got.dtype == want.dtype
            assert np.array_equal(got.reshape(-1).view(np.uint8), want.reshape(-1).view(np.uint8)), name
            del want, got


# ---------------------------------------------------------------- memory, measured from outside the reader

CHILD = textwrap.dedent("""
    import json, sys, zlib
    from megatron_ms_convert.mindspore.reader import open_mindspore_file

    def rss_anon():
        with open("/proc/self/status") as s:
            return next(int(l.split()[1]) * 1024 for l in s if l.startswith("RssAnon:"))

    base = rss_anon()
    peak = 0
    crcs = {}
    with open_mindspore_file(sys.argv[1]) as f:
        for name in f.names():
            t = f.read(name)
            crcs[name] = zlib.crc32(t.numpy().reshape(-1).view("uint8"))
            peak = max(peak, rss_anon() - base)
            del t
    print(json.dumps({"peak": peak, "crcs": crcs, "mindspore": "mindspore" in sys.modules}))
""")


def _child_read_all(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_reading_every_tensor_costs_at_most_one_tensor(tmp_path, fmt):
    tensor_bytes = 8 * MIB
    arrays = {f"t{i}": np.arange(i, i + tensor_bytes // 4, dtype=np.float32) for i in range(12)}  # 96 MiB in all
    path = tmp_path / f"many.{fmt}"
    write_mindspore_file(path, [TensorEntry(n, a.shape, "float32") for n, a in arrays.items()],
                         lambda e: arrays[e.name], fmt, durable=False)
    result = _child_read_all(path)
    assert result["crcs"] == {n: zlib.crc32(a.view(np.uint8)) for n, a in arrays.items()}
    assert not result["mindspore"]
    assert result["peak"] < tensor_bytes + 16 * MIB, f"RssAnon grew by {result['peak'] / MIB:.1f} MiB"


def test_split_parameter_costs_one_copy(big_ckpt):
    result = _child_read_all(big_ckpt)
    assert set(result["crcs"]) == {"before", "big", "after"}
    want = np.arange(600 * 262144, dtype=np.int32).view(np.uint8)
    assert result["crcs"]["big"] == zlib.crc32(want)
    del want
    assert result["peak"] < 600 * MIB + 32 * MIB, f"RssAnon grew by {result['peak'] / MIB:.1f} MiB"


# ---------------------------------------------------------------- our writer's files

WRITER_VALUES = {
    "step_num": np.array(1234, np.int64),
    "lr": np.array(3e-4, np.float32),
    "max_lr": np.array(1e-3, np.float64),
    "state_step": np.array([7.0], np.float32),
    "w": np.random.default_rng(2).standard_normal((4, 3, 5)).astype(np.float32),
    "bias16": np.random.default_rng(3).standard_normal(7).astype(np.float16),
    "counts": np.arange(-3, 3, dtype=np.int32).reshape(2, 3),
    "mask": np.array([True, False, True]),
    "bytes": np.arange(250, 256, dtype=np.uint8),
    "empty": np.zeros((0, 4), np.float32),
    "Zeta.ü": np.random.default_rng(4).standard_normal(3),
}


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_our_writer_round_trips(tmp_path, fmt):
    path = tmp_path / f"ours.{fmt}"
    write_mindspore_file(path, [TensorEntry(n, a.shape, a.dtype.name) for n, a in WRITER_VALUES.items()],
                         lambda e: WRITER_VALUES[e.name], fmt, durable=False)
    # A zero-element tensor has no message in a .ckpt (as with save_checkpoint); safetensors keeps it.
    expected = {k: v for k, v in WRITER_VALUES.items() if fmt == "safetensors" or v.size}
    with open_mindspore_file(path) as f:
        assert sorted(f.names()) == sorted(expected) and len(f) == len(expected)
        if fmt == "ckpt":
            assert f.names() == list(expected)
        for name, want in expected.items():
            got = f.read(name)
            assert f.info(name) == StoredTensor(name, want.shape, want.dtype.name)
            assert got.numpy().dtype == want.dtype and got.numpy().tobytes() == want.tobytes(), name


def test_views_outlive_close_and_writes_stay_private(tmp_path):
    path = tmp_path / "v.safetensors"
    a = np.arange(8, dtype=np.float32)
    write_mindspore_file(path, [TensorEntry("a", a.shape, "float32")], lambda e: a, "safetensors", durable=False)
    before = path.read_bytes()
    f = open_mindspore_file(path)
    t = f.read("a")
    f.close()
    t += 1  # copy-on-write: the file is not touched
    assert t.tolist() == (a + 1).tolist() and path.read_bytes() == before
    with pytest.raises(ValueError, match="closed"):
        f.read("a")
    with open_mindspore_file(path) as g:
        assert g.read("a").tolist() == a.tolist()
        with pytest.raises(KeyError, match="nope"):
            g.read("nope")


# ---------------------------------------------------------------- protobuf robustness (oracle: load_checkpoint)

def test_field_order_packed_dims_and_unknown_fields(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([5, -6], np.int64)
    data = (_message("a", _tensor_proto([2, 3], "Float32", a.tobytes(), packed=True, reverse=True, unknown=UNKNOWN),
                     reverse=True, unknown=UNKNOWN)
            + UNKNOWN  # a top-level unknown field between messages
            + _message("b", _tensor_proto([2], "Int64", b.tobytes()[:8]), unknown=UNKNOWN)
            + _message("b", _tensor_proto([2], "Int64", b.tobytes()[8:], packed=True)))
    path = tmp_path / "odd.ckpt"
    path.write_bytes(data)
    want = _assert_matches_load_checkpoint(path, "ckpt")
    assert want["a"] == ("float32", (2, 3), a.tobytes()) and want["b"] == ("int64", (2,), b.tobytes())


def test_dims_zero_with_one_element_is_a_scalar_like_load_checkpoint(tmp_path):
    path = tmp_path / "old_scalar.ckpt"
    path.write_bytes(_message("s", _tensor_proto([0], "Float32", np.float32(2.5).tobytes())))
    want = _assert_matches_load_checkpoint(path, "ckpt")
    assert want["s"][1] == ()


def test_empty_ckpt_has_no_tensors(tmp_path):
    path = tmp_path / "none.ckpt"
    write_mindspore_file(path, [], lambda e: None, durable=False)
    with open_mindspore_file(path) as f:
        assert f.names() == [] and f.strings() == {}


# ---------------------------------------------------------------- bad input

def _good_ckpt(tmp_path) -> Path:
    path = tmp_path / "good.ckpt"
    ms.save_checkpoint({"w": _ms_parameter("w", np.arange(64, dtype=np.float32)),
                        "v": _ms_parameter("v", np.arange(3, dtype=np.int64))}, str(path))
    return path


def _good_safetensors(tmp_path) -> Path:
    path = tmp_path / "good.safetensors"
    ms.save_checkpoint({"w": _ms_parameter("w", np.arange(64, dtype=np.float32)),
                        "v": _ms_parameter("v", np.arange(3, dtype=np.int64))}, str(path), format="safetensors")
    return path


def _copy_with(tmp_path, name, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("cut", [3, 20, 100, -5])
def test_truncated_ckpt(tmp_path, cut):
    data = _good_ckpt(tmp_path).read_bytes()
    _assert_input_error(_copy_with(tmp_path, "cut.ckpt", data[:cut] if cut > 0 else data[:len(data) + cut]),
                        "re-copy the file")


@pytest.mark.parametrize("cut", [4, 30, -5])
def test_truncated_safetensors(tmp_path, cut):
    data = _good_safetensors(tmp_path).read_bytes()
    _assert_input_error(_copy_with(tmp_path, "cut.safetensors", data[:cut] if cut > 0 else data[:len(data) + cut]),
                        "re-copy the file")


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_garbage(tmp_path, fmt):
    data = np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    _assert_input_error(_copy_with(tmp_path, f"junk.{fmt}", b"\xff" + data), "check --src-model-format")


def test_wrong_format_is_named(tmp_path):
    st = _good_safetensors(tmp_path)
    _assert_input_error(st, "looks like a .safetensors file", fmt="ckpt")
    _assert_input_error(_good_ckpt(tmp_path), "starts like a .ckpt file", fmt="safetensors")
    _assert_input_error(_copy_with(tmp_path, "model.bin", st.read_bytes()), "suffix '.bin'")
    _assert_input_error(tmp_path / "missing.ckpt", "check the path")


@pytest.mark.parametrize("content_len", [20, 28, 0])
def test_content_length_disagrees_with_dims(tmp_path, content_len):
    path = _copy_with(tmp_path, "len.ckpt", _message("w", _tensor_proto([2, 3], "Float32", b"\0" * content_len)))
    _assert_input_error(path, "'w'", "24 bytes", f"found {content_len} bytes")


def test_split_tensor_total_disagrees_with_dims(tmp_path):
    data = (_message("w", _tensor_proto([2, 3], "Float32", b"\0" * 16))
            + _message("w", _tensor_proto([2, 3], "Float32", b"\0" * 4)))
    _assert_input_error(_copy_with(tmp_path, "len2.ckpt", data), "24 bytes", "20 bytes in 2 message(s)")


def test_split_messages_disagree_on_dims(tmp_path):
    data = (_message("w", _tensor_proto([2, 3], "Float32", b"\0" * 12))
            + _message("w", _tensor_proto([6], "Float32", b"\0" * 12)))
    _assert_input_error(_copy_with(tmp_path, "dims.ckpt", data), "disagree")


def test_unknown_tensor_type(tmp_path):
    path = _copy_with(tmp_path, "type.ckpt", _message("z", _tensor_proto([2], "Complex64", b"\0" * 16)))
    _assert_input_error(path, "'Complex64'", "Float32")


def test_duplicate_non_consecutive_tags(tmp_path):
    one = np.float32(1).tobytes()
    data = (_message("a", _tensor_proto([1], "Float32", one)) + _message("b", _tensor_proto([1], "Float32", one))
            + _message("a", _tensor_proto([1], "Float32", one)))
    _assert_input_error(_copy_with(tmp_path, "dup.ckpt", data), "'a'", "appears again")


def test_missing_required_fields(tmp_path):
    no_content = _field(1, _field(1, b"w") + _field(2, _varint(8) + _varint(2) + _field(2, b"Float32")))
    _assert_input_error(_copy_with(tmp_path, "nocontent.ckpt", no_content), "tensor_content missing")
    no_tag = _field(1, _field(2, _tensor_proto([1], "Float32", b"\0" * 4)))
    _assert_input_error(_copy_with(tmp_path, "notag.ckpt", no_tag), "a tag")


def _safetensors_bytes(header: dict, data: bytes, header_len_override=None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if header_len_override is None else header_len_override) + text + data


@pytest.mark.parametrize("case", ["beyond_end", "shape_vs_offsets", "gap", "overlap", "dtype", "header_len",
                                  "duplicate_key", "not_json", "short_data", "long_data", "negative_dim"])
def test_safetensors_header_that_lies(tmp_path, case):
    data = np.arange(6, dtype=np.float32).tobytes()
    a = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    b = {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}
    header, raw, override = {"a": a, "b": b}, data, None
    if case == "beyond_end":
        header["b"] = {**b, "shape": [4], "data_offsets": [16, 32]}
    elif case == "shape_vs_offsets":
        header["a"] = {**a, "shape": [3, 2]}
    elif case == "gap":
        header["b"] = {**b, "shape": [1], "data_offsets": [20, 24]}
    elif case == "overlap":
        header["b"] = {**b, "data_offsets": [12, 20]}
    elif case == "dtype":
        header["b"] = {**b, "dtype": "C64"}
    elif case == "header_len":
        override = 10**6
    elif case == "short_data":
        raw = data[:-4]
    elif case == "long_data":
        raw = data + b"\0" * 8
    elif case == "negative_dim":
        header["b"] = {**b, "shape": [-2]}
    blob = _safetensors_bytes(header, raw, override)
    if case == "duplicate_key":
        text = b'{"a":' + json.dumps(a).encode() + b',"a":' + json.dumps(a).encode() + b"}"
        blob = struct.pack("<Q", len(text)) + text + data[:16]
    elif case == "not_json":
        blob = struct.pack("<Q", 5) + b"{nope" + data
    _assert_input_error(_copy_with(tmp_path, "lie.safetensors", blob), "not a valid .safetensors")
