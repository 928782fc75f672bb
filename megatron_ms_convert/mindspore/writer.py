"""Streaming writer for MindSpore checkpoint files (``.ckpt`` and ``.safetensors``).

The files are byte-identical to what ``mindspore.save_checkpoint`` (mindspore 2.10) writes for a
dict of Parameters, but tensors are pulled one at a time: the caller declares every tensor up
front as a :class:`TensorEntry` and supplies ``fetch(entry)``, which is called once per entry
right before that entry's bytes are written, so at most one tensor is alive inside the writer.
Only numpy and the standard library are imported, because importing mindspore costs ~1.7 s.

Example (runs as a doctest)::

    >>> import numpy as np, tempfile, os
    >>> from megatron_ms_convert.mindspore.writer import TensorEntry, write_mindspore_file
    >>> data = {"w": np.ones((2, 3), np.float32), "step_num": np.array(5, np.int64)}
    >>> entries = [TensorEntry(n, a.shape, a.dtype.name) for n, a in data.items()]
    >>> out = os.path.join(tempfile.mkdtemp(), "rank_0.ckpt")
    >>> write_mindspore_file(out, entries, lambda e: data[e.name])
    77
    >>> os.path.getsize(out)
    77

The format facts it relies on are in :mod:`megatron_ms_convert.mindspore.format`.
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from ..atomic import atomic_target
from .format import (CKPT_CHUNK_BYTES, DTYPES, FORMATS, ITEMSIZE, KEY_CHECKPOINT_VALUE, KEY_TENSOR_CONTENT,
                     KEY_TENSOR_DIMS, KEY_TENSOR_TYPE, KEY_VALUE_TAG, KEY_VALUE_TENSOR, varint)

__all__ = ["TensorEntry", "write_mindspore_file"]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor to be written: its name, shape and numpy dtype name.

    >>> TensorEntry("w", [2, 3], "float32")
    TensorEntry(name='w', shape=(2, 3), dtype='float32')
    """

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name: 'float32', 'float64', 'float16', 'int64', 'int32', 'uint8', 'bool'

    def __post_init__(self):
        # Normalise here so header bytes never depend on whether the caller passed a list or numpy ints.
        if not isinstance(self.name, str):
            raise TypeError(f"tensor name must be str, got {type(self.name).__name__}")
        shape = tuple(int(d) for d in self.shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"tensor {self.name!r}: negative dimension in shape {shape}")
        object.__setattr__(self, "shape", shape)
        if self.dtype not in DTYPES:
            raise ValueError(f"tensor {self.name!r}: unsupported dtype {self.dtype!r} "
                             f"(supported: {', '.join(DTYPES)})")

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * ITEMSIZE[self.dtype]


def write_mindspore_file(path, entries: Iterable[TensorEntry], fetch: Callable[[TensorEntry], np.ndarray],
                         fmt: str = "ckpt", *, durable: bool = True) -> int:
    """Write `entries` to `path` ('ckpt' or 'safetensors'); fetch(entry) returns that entry's data as a
    numpy array (any array: the writer checks shape/dtype and raises ValueError naming the entry on mismatch;
    a non-contiguous array is made contiguous for that one tensor only). Returns bytes written.

    The file is written as ``partial_path(path)``, fsynced (if `durable`), renamed over `path` and made
    read-only for the owner, like ``save_checkpoint``. On any failure (including KeyboardInterrupt) the
    partial file is removed and an existing file at `path` is left as it was. Unlike
    ``save_checkpoint``, no extension is appended to `path`.

    >>> import numpy as np, tempfile, os
    >>> a = np.arange(6, dtype=np.float16)
    >>> p = os.path.join(tempfile.mkdtemp(), "x.safetensors")
    >>> write_mindspore_file(p, [TensorEntry("a", a.shape, "float16")], lambda e: a, "safetensors")
    108
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be 'ckpt' or 'safetensors', got {fmt!r}")
    entries = list(entries)
    seen = set()
    for e in entries:
        if not isinstance(e, TensorEntry):
            raise TypeError(f"entries must be TensorEntry, got {type(e).__name__}")
        if e.name in seen:
            raise ValueError(f"duplicate tensor name {e.name!r}")
        seen.add(e.name)

    with atomic_target(path, mode=stat.S_IRUSR, durable=durable) as partial:
        with open(partial, "wb") as f:
            if fmt == "ckpt":
                for e in entries:
                    _write_ckpt_tensor(f, e, fetch)
            else:
                _write_safetensors(f, entries, fetch)
            written = f.tell()
    return written


def _fetch_checked(entry: TensorEntry, fetch) -> np.ndarray:
    """Call fetch and return the data as a C-contiguous little-endian array of the declared shape/dtype."""
    arr = fetch(entry)
    if not isinstance(arr, np.ndarray):
        arr = np.asarray(arr)
    if arr.dtype.name != entry.dtype:
        raise ValueError(f"tensor {entry.name!r}: fetch returned dtype {arr.dtype}, declared {entry.dtype}")
    if tuple(arr.shape) != entry.shape:
        raise ValueError(f"tensor {entry.name!r}: fetch returned shape {tuple(arr.shape)}, declared {entry.shape}")
    # Both formats store little-endian bytes (MindSpore only runs on little-endian hosts).
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and not np.little_endian):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr)


def _byte_view(arr: np.ndarray) -> memoryview:
    # reshape(-1) of a contiguous array is a view, so this exposes the buffer without copying it.
    return memoryview(arr.reshape(-1).view(np.uint8))


# ---------------------------------------------------------------- ckpt (hand-encoded protobuf)

def _ckpt_prefix(tag: bytes, dims: bytes, type_field: bytes, content_len: int) -> bytes:
    """Everything of one Checkpoint message that precedes tensor_content's bytes.

    tensor_content is the last field at every nesting level, so the message is exactly
    prefix + content and the content can be written straight from the array's buffer.
    """
    tensor_len = len(dims) + len(type_field) + 1 + len(varint(content_len)) + content_len
    tensor_head = dims + type_field + bytes([KEY_TENSOR_CONTENT]) + varint(content_len)
    value_head = bytes([KEY_VALUE_TAG]) + varint(len(tag)) + tag + bytes([KEY_VALUE_TENSOR]) + varint(tensor_len)
    value_len = len(value_head) + tensor_len
    return bytes([KEY_CHECKPOINT_VALUE]) + varint(value_len) + value_head + tensor_head


def _write_ckpt_tensor(f, entry: TensorEntry, fetch) -> None:
    arr = _fetch_checked(entry, fetch)
    tag = entry.name.encode("utf-8")
    # proto2 repeated int64 without [packed=true]: one (key 0x08, varint) pair per dimension.
    dims = b"".join(bytes([KEY_TENSOR_DIMS]) + varint(d) for d in entry.shape)
    ms_type = DTYPES[entry.dtype][0].encode("ascii")
    type_field = bytes([KEY_TENSOR_TYPE]) + varint(len(ms_type)) + ms_type
    data = _byte_view(arr)
    # Same loop shape as save_checkpoint, so a zero-element tensor writes no message at all.
    for start in range(0, len(data), CKPT_CHUNK_BYTES):
        chunk = data[start:start + CKPT_CHUNK_BYTES]
        f.write(_ckpt_prefix(tag, dims, type_field, len(chunk)))
        f.write(chunk)


# ---------------------------------------------------------------- safetensors

def _safetensors_order(entries: list[TensorEntry]) -> list[TensorEntry]:
    # Rust sorts by `right.dtype().cmp(&left.dtype()).then(lname.cmp(rname))`; Python str order equals
    # Rust's UTF-8 byte order, so a (−rank, name) key reproduces it.
    return sorted(entries, key=lambda e: (-DTYPES[e.dtype][2], e.name))


def _safetensors_header(ordered: list[TensorEntry]) -> bytes:
    header: dict = {}
    if ordered:
        # save_checkpoint passes metadata only for a non-empty dict; serde writes it first.
        header["__metadata__"] = {"format": "ms"}
    offset = 0
    for e in ordered:
        end = offset + e.nbytes
        header[e.name] = {"dtype": DTYPES[e.dtype][1], "shape": list(e.shape), "data_offsets": [offset, end]}
        offset = end
    # serde_json: compact, raw UTF-8, escapes only '"', '\\' and control characters — the same as
    # json.dumps with ensure_ascii=False and no spaces.
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the library pads the header with spaces to 8 bytes
    return len(text).to_bytes(8, "little") + text


def _write_safetensors(f, entries: list[TensorEntry], fetch) -> None:
    ordered = _safetensors_order(entries)
    f.write(_safetensors_header(ordered))
    for e in ordered:
        _write_raw_tensor(f, e, fetch)


def _write_raw_tensor(f, entry: TensorEntry, fetch) -> None:
    # A function of its own so the array is released before the next fetch runs.
    arr = _fetch_checked(entry, fetch)
    f.write(_byte_view(arr))
