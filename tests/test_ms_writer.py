"""The MindSpore writer must write exactly the bytes mindspore.save_checkpoint writes, without holding all tensors.

Every equality test compares real file bytes against a file produced by mindspore itself, so a
change in either side's format shows up as a failure with the first differing offset.
"""

import gc
import stat
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from megatron_ms_convert.atomic import partial_path
from megatron_ms_convert.mindspore.writer import TensorEntry, write_mindspore_file

ROOT = Path(__file__).resolve().parent.parent
FORMATS = ["ckpt", "safetensors"]


def _mixed():
    """Tensors of every supported dtype and awkward shape; insertion order is deliberately not sorted."""
    rng = np.random.default_rng(0)
    return {
        "step_num": np.array(1234, np.int64),
        "learning_rate_group_0": np.array(3e-4, np.float32),
        "max_lr": np.array(1e-3, np.float64),
        "state_step": np.array([7.0], np.float32),
        "layers.0.attention.qkv_proj.weight": rng.standard_normal((4, 3, 5)).astype(np.float32),
        "exp_avg.layers.0.attention.qkv_proj.weight": rng.standard_normal((4, 3, 5)).astype(np.float32),
        "bias16": rng.standard_normal(7).astype(np.float16),
        "counts": np.arange(-3, 3, dtype=np.int32).reshape(2, 3),
        "mask": np.array([True, False, True]),
        "bytes": np.arange(250, 256, dtype=np.uint8),
        "empty": np.zeros((0, 4), np.float32),
        "Zeta.ü": rng.standard_normal(3),  # float64, non-ASCII name, sorts before lower case
        "a_first": np.array([-(2**40), 2**40], np.int64),
    }


def _entries(arrays):
    return [TensorEntry(name, a.shape, a.dtype.name) for name, a in arrays.items()]


def _ms_save(arrays, path, fmt):
    params = {name: ms.Parameter(ms.Tensor.from_numpy(a), name=name) for name, a in arrays.items()}
    ms.save_checkpoint(params, str(path), format=fmt)


def _our_save(arrays, path, fmt, **kw):
    return write_mindspore_file(path, _entries(arrays), lambda e: arrays[e.name], fmt, **kw)


def _assert_same_bytes(ours, theirs, block=1 << 24):
    ours, theirs = Path(ours), Path(theirs)
    assert ours.stat().st_size == theirs.stat().st_size, (ours.stat().st_size, theirs.stat().st_size)
    with open(ours, "rb") as a, open(theirs, "rb") as b:
        offset = 0
        while True:
            x, y = a.read(block), b.read(block)
            if x != y:
                i = next(k for k in range(min(len(x), len(y)) + 1) if k == len(x) or k == len(y) or x[k] != y[k])
                pytest.fail(f"files differ at byte {offset + i}: ours {x[i:i + 16]!r} vs mindspore {y[i:i + 16]!r}")
            if not x:
                return
            offset += len(x)


@pytest.mark.parametrize("fmt", FORMATS)
def test_mixed_tensors_byte_identical(tmp_path, fmt):
    arrays = _mixed()
    _ms_save(arrays, tmp_path / f"ms.{fmt}", fmt)
    n = _our_save(arrays, tmp_path / f"ours.{fmt}", fmt)
    _assert_same_bytes(tmp_path / f"ours.{fmt}", tmp_path / f"ms.{fmt}")
    assert n == (tmp_path / f"ours.{fmt}").stat().st_size
    assert stat.S_IMODE((tmp_path / f"ours.{fmt}").stat().st_mode) == 0o400
    assert not partial_path(tmp_path / f"ours.{fmt}").exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_tensors_byte_identical(tmp_path, fmt):
    _ms_save({}, tmp_path / f"ms.{fmt}", fmt)
    _our_save({}, tmp_path / f"ours.{fmt}", fmt)
    _assert_same_bytes(tmp_path / f"ours.{fmt}", tmp_path / f"ms.{fmt}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_checkpoint_returns_inputs(tmp_path, fmt):
    arrays = _mixed()
    path = tmp_path / f"ours.{fmt}"
    _our_save(arrays, path, fmt)
    loaded = ms.load_checkpoint(str(path), format=fmt)
    expected = dict(arrays)
    if fmt == "ckpt":
        # save_checkpoint writes no message for a zero-element tensor, so it cannot come back.
        del expected["empty"]
    assert sorted(loaded) == sorted(expected)
    for name, a in expected.items():
        got = loaded[name].asnumpy()
        assert got.dtype == a.dtype and got.shape == a.shape, name
        assert np.array_equal(got, a), name


def test_large_tensor_split_like_save_checkpoint(tmp_path):
    # 600 MiB in a shape whose axis-0 split would differ from a byte split, so splitting along
    # axis 0 (what np.ndarray values get) instead of by bytes (what Parameters get) fails here.
    shape = (3, 52_428_801)
    big = np.empty(shape, np.float32)
    flat, block = big.reshape(-1), np.arange(1 << 20, dtype=np.float32)
    for start in range(0, flat.size, block.size):  # np.arange over 157M floats takes seconds
        part = flat[start:start + block.size]
        np.add(block[:part.size], np.float32(start >> 20), out=part)
    del flat, part
    arrays = {"z_after": np.array([1.0, 2.0], np.float32), "layers.0.big": big, "a_scalar": np.array(5, np.int64)}
    del big
    try:
        for fmt in FORMATS:
            _ms_save(arrays, tmp_path / f"ms.{fmt}", fmt)
            gc.collect()
            # durable=False: fsyncing 600 MB only measures the disk; the fsync path is covered above.
            _our_save(arrays, tmp_path / f"ours.{fmt}", fmt, durable=False)
            _assert_same_bytes(tmp_path / f"ours.{fmt}", tmp_path / f"ms.{fmt}")
            (tmp_path / f"ms.{fmt}").unlink()
        del arrays
        gc.collect()
        ckpt = tmp_path / "ours.ckpt"
        # Sanity check on the split itself: the first message of the big tensor carries exactly 512 MiB.
        assert ckpt.stat().st_size > shape[0] * shape[1] * 4
        with open(ckpt, "rb") as f:
            head = f.read(4096)
        assert head.count(b"layers.0.big") == 1
        first = head.index(b"layers.0.big")
        assert b"\x1a\x80\x80\x80\x80\x02" in head[first:first + 64]  # tensor_content length varint 2**29
    finally:
        # pytest keeps the last three tmp dirs; do not leave 2.4 GB behind.
        for p in tmp_path.iterdir():
            p.unlink()


@pytest.mark.parametrize("fmt", FORMATS)
def test_only_one_fetched_tensor_alive(tmp_path, fmt):
    arrays = _mixed()
    alive = []

    def fetch(e):
        assert all(r() is None for r in alive), "writer still holds an earlier tensor"
        a = arrays[e.name].copy()
        alive.append(weakref.ref(a))
        return a

    write_mindspore_file(tmp_path / f"x.{fmt}", _entries(arrays), fetch, fmt)
    assert len(alive) == len(arrays)


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_contiguous_and_big_endian_inputs(tmp_path, fmt):
    arrays = _mixed()
    odd = dict(arrays)
    w = arrays["layers.0.attention.qkv_proj.weight"]
    odd["layers.0.attention.qkv_proj.weight"] = np.asfortranarray(w)
    odd["counts"] = np.arange(-3, 9, dtype=np.int32).reshape(2, 6)[:, ::2][:, :3]
    arrays["counts"] = np.ascontiguousarray(odd["counts"])
    odd["Zeta.ü"] = arrays["Zeta.ü"].astype(">f8")
    assert not odd["counts"].flags.c_contiguous
    _our_save(arrays, tmp_path / f"plain.{fmt}", fmt)
    _our_save(odd, tmp_path / f"odd.{fmt}", fmt)
    _assert_same_bytes(tmp_path / f"odd.{fmt}", tmp_path / f"plain.{fmt}")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_fetch_failure_leaves_old_file_and_no_partial(tmp_path, fmt, exc):
    arrays = _mixed()
    path = tmp_path / f"x.{fmt}"
    path.write_bytes(b"old contents")
    path.chmod(0o400)

    def fetch(e):
        if e.name == "counts":
            raise exc
        return arrays[e.name]

    with pytest.raises(type(exc)):
        write_mindspore_file(path, _entries(arrays), fetch, fmt)
    assert path.read_bytes() == b"old contents"
    assert not partial_path(path).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_fetch_failure_without_existing_file(tmp_path):
    path = tmp_path / "x.ckpt"
    with pytest.raises(OSError):
        write_mindspore_file(path, [TensorEntry("a", (2,), "float32")],
                             lambda e: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    assert list(tmp_path.iterdir()) == []


def test_write_error_removes_partial(tmp_path):
    # A real failing write (file size limit => EFBIG), in a child so the limit cannot hit pytest.
    script = textwrap.dedent(f"""
        import resource, signal, sys, numpy as np
        sys.path.insert(0, {str(ROOT)!r})
        from megatron_ms_convert.mindspore.writer import TensorEntry, write_mindspore_file
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        a = np.zeros(1 << 18, np.float32)
        try:
            write_mindspore_file({str(tmp_path / 'x.ckpt')!r}, [TensorEntry('a', a.shape, 'float32')], lambda e: a)
        except OSError as e:
            print('OSError', e.errno)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OSError"), out.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad, what", [
    (np.zeros((4, 3, 6), np.float32), "shape"),
    (np.zeros((4, 3, 5), np.float64), "dtype"),
    (np.zeros(60, np.float32), "shape"),
])
def test_mismatch_raises_value_error_naming_entry(tmp_path, bad, what):
    arrays = _mixed()
    name = "layers.0.attention.qkv_proj.weight"
    path = tmp_path / "x.ckpt"
    fetch = lambda e: bad if e.name == name else arrays[e.name]  # noqa: E731
    with pytest.raises(ValueError, match=what) as info:
        write_mindspore_file(path, _entries(arrays), fetch)
    assert name in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_existing_read_only_file_is_replaced(tmp_path, fmt):
    arrays = _mixed()
    _ms_save(arrays, tmp_path / f"ms.{fmt}", fmt)
    path = tmp_path / f"x.{fmt}"
    _our_save({"old": np.ones(3, np.float32)}, path, fmt)
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    _our_save(arrays, path, fmt, durable=False)
    _assert_same_bytes(path, tmp_path / f"ms.{fmt}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o400


def test_bad_arguments():
    with pytest.raises(ValueError, match="fmt"):
        write_mindspore_file("x.bin", [], lambda e: None, "npz")
    with pytest.raises(ValueError, match="bfloat16"):
        TensorEntry("x", (1,), "bfloat16")
    with pytest.raises(ValueError, match="duplicate"):
        write_mindspore_file("x.ckpt", [TensorEntry("a", (1,), "bool")] * 2, lambda e: None)
    assert partial_path("d/x.ckpt") == Path("d/x.ckpt.partial")
    assert TensorEntry("a", [np.int64(2)], "int32").shape == (2,)


def test_dtype_names_match_mindspore():
    from megatron_ms_convert.mindspore.format import DTYPES as _DTYPES
    for np_name, (ms_name, _, _) in _DTYPES.items():
        assert str(ms.Tensor(np.zeros(1, np_name)).dtype) == ms_name


def test_module_does_not_import_mindspore():
    code = ("import sys, megatron_ms_convert.mindspore.writer; "
            "sys.exit(int(any(m in sys.modules for m in ('mindspore', 'torch'))))")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
