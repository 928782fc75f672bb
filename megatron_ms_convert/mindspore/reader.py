"""Streaming reader for MindSpore checkpoint files (``.ckpt`` and ``.safetensors``), the way back.

Opening a file maps it (``mmap``) and builds an index by walking only the protobuf field headers of a
``.ckpt`` (or parsing the JSON header of a ``.safetensors``); tensor bytes are skipped, not read. A
tensor is then handed out as a torch tensor that *is* a view of the mapping, so reading costs no
anonymous memory; only a ``.ckpt`` tensor split over several messages (a Parameter over 512 MiB) is
copied, once, into a tensor of its own. mindspore is not imported (it costs ~1.7 s and is not
needed to read bytes). Whatever does not fit the format raises :class:`ConvertInputError` naming
the file.

Example (runs as a doctest)::

    >>> import numpy as np, tempfile, os
    >>> from megatron_ms_convert.mindspore.writer import TensorEntry, write_mindspore_file
    >>> from megatron_ms_convert.mindspore.reader import open_mindspore_file
    >>> data = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step_num": np.array(5, np.int64)}
    >>> path = os.path.join(tempfile.mkdtemp(), "rank_0.ckpt")
    >>> _ = write_mindspore_file(path, [TensorEntry(n, a.shape, a.dtype.name) for n, a in data.items()],
    ...                          lambda e: data[e.name])
    >>> with open_mindspore_file(path) as f:
    ...     print(f.names(), f.info("w"))
    ...     print(f.read("w"), f.read("step_num"))
    ['w', 'step_num'] StoredTensor(name='w', shape=(2, 3), dtype='float32')
    tensor([[0., 1., 2.],
            [3., 4., 5.]]) tensor(5)

Format facts this reader relies on, checked against mindspore 2.10 (the rest are in
:mod:`megatron_ms_convert.mindspore.format`):

* A ``.ckpt`` is one protobuf ``Checkpoint`` written as many concatenated messages, so it is read as
  one message: top-level field 1 is a ``Value``; protobuf allows any field order and unknown fields at
  every level, and ``dims`` may come packed (one length-delimited field) or one varint field per
  dimension. Field numbers not in the schema are skipped, as protobuf does.
* Consecutive messages with the same tag are one tensor: ``save_checkpoint`` writes 512 MiB byte
  chunks of a Parameter (and numpy values of an asynchronous save cut along axis 0, some empty),
  each with the full dims; the tensor is their bytes joined. The same tag again after another tag
  is not something ``save_checkpoint`` writes (``load_checkpoint`` would silently keep the last).
* ``load_checkpoint`` treats dims ``[0]`` holding one element's bytes as a 0-d tensor; so does this
  reader. ``tensor_type "str"`` entries (``append_dict`` strings) are not tensors: they are listed by
  :meth:`MindSporeFile.strings`, not by :meth:`MindSporeFile.names`.
* A ``crc_check=True`` save ends in a 17-byte trailer: ``b"crc_num"`` and the CRC-32 of every byte
  before it, big-endian in 10 bytes; a ``.safetensors`` save with ``crc_check=True`` has ``crc_num``
  (decimal) in ``__metadata__``: the CRC-32 over each tensor's name (UTF-8) and then its bytes, names
  in sorted order. Indexing skips both; :meth:`MindSporeFile.check_crc` verifies them, reading every
  byte once (the process that copies the tensors calls it; the page cache then serves its copy).
* In a ``.safetensors`` file the data of all tensors must exactly tile the data area, as the
  safetensors library itself demands; ``names()`` follows the data order.

The views share one private (copy-on-write) mapping: writing into a returned tensor never changes the
file, but later reads of the same tensor from the same open file see the change (clone first to
modify). :meth:`MindSporeFile.close` unmaps at once when no view is alive, otherwise the mapping lives
on until the last view is garbage-collected, so a tensor stays valid after close. Truncating the file
while it is open is undefined
(SIGBUS), as for every mmap reader.
"""

from __future__ import annotations

import json
import math
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..crc import crc32
from ..errors import ConvertInputError
from .format import (CKPT_CRC_MARK, CKPT_CRC_TRAILER_BYTES, FORMATS, ITEMSIZE, MS_STRING_TYPE, MS_TYPE_TO_DTYPE,
                     SAFETENSORS_LEN_BYTES, SAFETENSORS_MAX_HEADER, SAFETENSORS_TO_DTYPE, WIRE_FIXED32,
                     WIRE_FIXED64, WIRE_LEN, WIRE_VARINT)

__all__ = ["StoredTensor", "MindSporeFile", "open_mindspore_file"]

TORCH_DTYPES = {
    "bool": torch.bool, "uint8": torch.uint8, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int32": torch.int32, "float32": torch.float32, "float64": torch.float64, "int64": torch.int64,
}

FIX_RECOPY = "re-copy the file from where it was written (it is damaged or incomplete)"
FIX_FORMAT = "check --src-model-format and the file's suffix (.ckpt or .safetensors)"


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as stored in the file: name, shape and dtype name ('float32', 'bfloat16', ...).

    >>> StoredTensor("w", (2, 3), "float32").nbytes
    24
    """

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class _Located:
    """Where a tensor's bytes are: (file offset, length) pieces, in order; empty pieces dropped."""

    info: StoredTensor
    pieces: tuple[tuple[int, int], ...]


class MindSporeFile:
    """An open, indexed MindSpore checkpoint file; use as a context manager or call close()."""

    def __init__(self, path: Path, fmt: str, mapping, index: dict[str, _Located], strings: dict[str, str],
                 metadata: dict[str, str], crc_trailer: int | None = None):
        self.path = path
        self.fmt = fmt
        self._crc_trailer = crc_trailer  # a .ckpt's crc_num trailer, None without one
        self._mm = mapping
        self._index = index
        self._strings = strings
        self._metadata = metadata

    def names(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._index)

    def info(self, name: str) -> StoredTensor:
        return self._located(name).info

    def strings(self) -> dict[str, str]:
        """Non-tensor string entries of a ``.ckpt`` (``save_checkpoint(append_dict={k: "text"})``)."""
        return dict(self._strings)

    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` of a ``.safetensors`` header (``{"format": "ms"}`` from MindSpore)."""
        return dict(self._metadata)

    def read(self, name: str) -> torch.Tensor:
        """The tensor as stored (dtype and shape); a view of the mapping unless it is split over messages."""
        loc = self._located(name)
        if self._mm is None:
            raise ValueError(f"{self.path}: file is closed")
        shape, dtype = loc.info.shape, TORCH_DTYPES[loc.info.dtype]
        return self._bytes(loc.pieces).view(dtype).reshape(shape)

    def read_row(self, name: str, row: int) -> torch.Tensor:
        """`read(name)[row]` reading only that row's bytes: a rank's stacked experts are read one
        expert at a time, and a stack split over messages (over 512 MiB) is not copied whole for each."""
        loc = self._located(name)
        if self._mm is None:
            raise ValueError(f"{self.path}: file is closed")
        shape, dtype = loc.info.shape, TORCH_DTYPES[loc.info.dtype]
        if not shape or not 0 <= row < shape[0]:
            raise IndexError(f"{self.path}: {name} of shape {list(shape)} has no row {row}")
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        return self._bytes(byte_range(loc.pieces, row * row_bytes, row_bytes)).view(dtype).reshape(shape[1:])

    def check_crc(self) -> bool:
        """Verify the CRC-32 that ``save_checkpoint(crc_check=True)`` stored, reading every byte once;
        False when the file has none (saved without crc_check). A mismatch raises ConvertInputError."""
        if self._mm is None:
            raise ValueError(f"{self.path}: file is closed")
        view = memoryview(self._mm)
        try:
            if self.fmt == "ckpt":
                if self._crc_trailer is None:
                    return False
                expected = self._crc_trailer
                damaged = f"{self.path}: damaged: its bytes fail the CRC-32 check of its crc_num trailer"
                found = crc32(view[:len(view) - CKPT_CRC_TRAILER_BYTES])
            else:
                if "crc_num" not in self._metadata:
                    return False
                text = self._metadata["crc_num"]
                damaged = f"{self.path}: damaged: its bytes fail the CRC-32 check of crc_num in its __metadata__"
                expected = int(text) if text.isdigit() else -1
                found = 0
                for name in sorted(self._index):
                    found = crc32(name.encode("utf-8"), found)
                    for offset, length in self._index[name].pieces:
                        found = crc32(view[offset:offset + length], found)
        finally:
            view.release()
        if found & 0xFFFFFFFF != expected:
            shown = f"{expected:08x}" if expected >= 0 else repr(self._metadata["crc_num"])[:40]
            raise ConvertInputError(damaged,
                                    expected=f"CRC-32 {shown} (saved with crc_check=True)",
                                    found=f"{found & 0xFFFFFFFF:08x}", fix=FIX_RECOPY)
        return True

    def read_elements(self, name: str, start: int, count: int) -> torch.Tensor:
        """Elements [start, start + count) of the flattened tensor, reading only their bytes: a slice
        of a shard over 512 MiB (split over messages) is not copied whole for each parameter in it."""
        loc = self._located(name)
        if self._mm is None:
            raise ValueError(f"{self.path}: file is closed")
        dtype = TORCH_DTYPES[loc.info.dtype]
        if start < 0 or count < 0 or start + count > math.prod(loc.info.shape):
            raise IndexError(f"{self.path}: {name} of shape {list(loc.info.shape)} has no elements "
                             f"[{start}, {start + count})")
        if count == 0:
            return torch.empty(0, dtype=dtype)
        return self._bytes(byte_range(loc.pieces, start * dtype.itemsize, count * dtype.itemsize)).view(dtype)

    def _bytes(self, pieces) -> torch.Tensor:
        """The bytes of `pieces`: a view of the mapping for one piece, else a joined copy."""
        if len(pieces) == 1:
            offset, length = pieces[0]
            return torch.from_numpy(np.frombuffer(self._mm, np.uint8, length, offset))
        return self._joined_copy(pieces)

    def _joined_copy(self, pieces) -> torch.Tensor:
        out = torch.empty(sum(n for _, n in pieces), dtype=torch.uint8)
        pos = 0
        for offset, length in pieces:
            out[pos:pos + length] = torch.from_numpy(np.frombuffer(self._mm, np.uint8, length, offset))
            pos += length
        return out

    def _located(self, name: str) -> _Located:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def __contains__(self, name) -> bool:
        return name in self._index

    def __len__(self) -> int:
        return len(self._index)

    def close(self) -> None:
        """Release the mapping; tensors already read stay valid (they keep it mapped until freed)."""
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # views are alive; the mapping is unmapped when the last one is freed

    def __enter__(self) -> "MindSporeFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MindSporeFile({str(self.path)!r}, fmt={self.fmt!r}, tensors={len(self._index)})"


def open_mindspore_file(path, fmt: str | None = None) -> MindSporeFile:
    """Map and index `path`; `fmt` is 'ckpt' or 'safetensors', taken from the suffix when None."""
    path = Path(path)
    fmt = _format_of(path, fmt)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            # ACCESS_COPY (private, writable) so views are ordinary writable tensors; writes never reach the file.
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise ConvertInputError(f"{path}: cannot open the checkpoint file", expected="a readable file",
                                found=f"{type(e).__name__}: {e.strerror}", fix="check the path") from None
    try:
        buf = memoryview(mapping) if mapping is not None else memoryview(b"")
        try:
            crc_trailer = None
            if fmt == "ckpt":
                (index, strings), metadata = _index_ckpt(buf, path), {}
                if len(buf) >= CKPT_CRC_TRAILER_BYTES and _has_crc_trailer(buf, len(buf) - CKPT_CRC_TRAILER_BYTES,
                                                                           len(buf)):
                    crc_trailer = int.from_bytes(buf[len(buf) - CKPT_CRC_TRAILER_BYTES + len(CKPT_CRC_MARK):], "big")
            else:
                index, metadata = _index_safetensors(buf, path)
                strings = {}
        finally:
            buf.release()
    except BaseException:
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                pass  # a slice is still referenced by the traceback; unmapped when that goes
        raise
    return MindSporeFile(path, fmt, mapping, index, strings, metadata, crc_trailer)


def _format_of(path: Path, fmt: str | None) -> str:
    if fmt is None:
        fmt = path.suffix.lstrip(".")
        if fmt not in FORMATS:
            raise ConvertInputError(f"{path}: cannot tell the checkpoint format from the file name",
                                    expected="a name ending in .ckpt or .safetensors", found=f"suffix {path.suffix!r}",
                                    fix="rename the file or pass the format (--src-model-format)")
    elif fmt not in FORMATS:
        raise ValueError(f"fmt must be 'ckpt' or 'safetensors', got {fmt!r}")
    return fmt


def _looks_like(buf) -> str:
    """A guess at what a file that failed to parse is, for the error message."""
    n = len(buf)
    if n >= SAFETENSORS_LEN_BYTES + 2 and buf[SAFETENSORS_LEN_BYTES] == ord("{") \
            and int.from_bytes(buf[:SAFETENSORS_LEN_BYTES], "little") <= n - SAFETENSORS_LEN_BYTES:
        return "the file looks like a .safetensors file"
    if n and buf[0] == 0x0A:
        return "the file starts like a .ckpt file"
    return "the file is neither .ckpt nor .safetensors (encrypted with enc_key, or not a checkpoint)"


# ---------------------------------------------------------------- ckpt (hand-decoded protobuf)

class _Malformed(Exception):
    """A structural fault at a byte offset; turned into a ConvertInputError naming the file."""

    def __init__(self, offset: int, expected: str, found: str):
        super().__init__(offset, expected, found)
        self.offset, self.expected, self.found = offset, expected, found


@dataclass
class _Record:
    """One Checkpoint.Value message: its tag, dims, tensor_type and where its content is."""

    at: int
    tag: str | None = None
    dims: list | None = None
    ms_type: str | None = None
    content: tuple[int, int] | None = None
    has_tensor: bool = False
    has_maptensor: bool = False


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    start = pos
    while True:
        if pos >= end:
            raise _Malformed(start, "a complete varint", "the end of the message or file")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise _Malformed(start, "a varint of at most 10 bytes", "a longer one")


def _length_delimited(buf, pos: int, end: int) -> tuple[int, int]:
    """(start, end) of the payload of a length-delimited field whose length varint is at pos."""
    length, pos = _varint(buf, pos, end)
    if pos + length > end:
        raise _Malformed(pos, f"{length} bytes of field data", f"only {end - pos} bytes left")
    return pos, pos + length


def _skip(buf, pos: int, end: int, wire: int) -> int:
    if wire == WIRE_VARINT:
        return _varint(buf, pos, end)[1]
    if wire == WIRE_LEN:
        return _length_delimited(buf, pos, end)[1]
    width = {WIRE_FIXED64: 8, WIRE_FIXED32: 4}.get(wire)
    if width is None:
        raise _Malformed(pos, "a protobuf wire type 0, 1, 2 or 5", f"wire type {wire}")
    if pos + width > end:
        raise _Malformed(pos, f"{width} bytes of a fixed-width field", f"only {end - pos} bytes left")
    return pos + width


def _walk(buf, pos: int, end: int, handle) -> None:
    """Call handle(field, wire, pos) -> end of field or None (unknown: skipped) for each field."""
    while pos < end:
        key_at = pos
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _Malformed(key_at, "a protobuf field key", "field number 0")
        after = handle(field, wire, pos)
        pos = _skip(buf, pos, end, wire) if after is None else after


def _utf8(buf, start: int, end: int, what: str) -> str:
    try:
        return bytes(buf[start:end]).decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed(start, f"a UTF-8 {what}", "invalid UTF-8") from None


def _parse_tensor_proto(buf, start: int, end: int, rec: _Record) -> None:
    # Fields merge as protobuf merges them: dims accumulate, the last tensor_type/tensor_content wins.
    def handle(field, wire, pos):
        if field == 1 and wire == WIRE_VARINT:
            dim, pos = _varint(buf, pos, end)
            rec.dims.append(dim)
            return pos
        if field == 1 and wire == WIRE_LEN:
            p, stop = _length_delimited(buf, pos, end)
            while p < stop:
                dim, p = _varint(buf, p, stop)
                rec.dims.append(dim)
            return stop
        if field == 2 and wire == WIRE_LEN:
            a, b = _length_delimited(buf, pos, end)
            rec.ms_type = _utf8(buf, a, b, "tensor_type")
            return b
        if field == 3 and wire == WIRE_LEN:
            a, b = _length_delimited(buf, pos, end)
            rec.content = (a, b - a)
            return b
        return None

    _walk(buf, start, end, handle)


def _parse_value(buf, start: int, end: int, at: int) -> _Record:
    rec = _Record(at=at, dims=[])

    def handle(field, wire, pos):
        if wire != WIRE_LEN or field not in (1, 2, 3):
            return None
        a, b = _length_delimited(buf, pos, end)
        if field == 1:
            rec.tag = _utf8(buf, a, b, "tag")
        elif field == 2:
            rec.has_tensor = True
            _parse_tensor_proto(buf, a, b, rec)
        else:
            rec.has_maptensor = True
        return b

    _walk(buf, start, end, handle)
    return rec


def _has_crc_trailer(buf, pos: int, end: int) -> bool:
    return end - pos == CKPT_CRC_TRAILER_BYTES and bytes(buf[pos:pos + len(CKPT_CRC_MARK)]) == CKPT_CRC_MARK


def _ckpt_records(buf) -> list[_Record]:
    records: list[_Record] = []
    end = len(buf)
    pos = 0
    # The file is walked field by field here (not with _walk) so the crc trailer is recognised
    # where a field would start.
    while pos < end:
        if _has_crc_trailer(buf, pos, end):
            break
        key_at = pos
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _Malformed(key_at, "a protobuf field key", "field number 0")
        if field == 1 and wire == WIRE_LEN:
            a, pos = _length_delimited(buf, pos, end)
            records.append(_parse_value(buf, a, pos, key_at))
        else:
            pos = _skip(buf, pos, end, wire)
    return records


def _index_ckpt(buf, path: Path) -> tuple[dict[str, _Located], dict[str, str]]:
    try:
        records = _ckpt_records(buf)
    except _Malformed as m:
        raise ConvertInputError(f"{path}: not a readable MindSpore .ckpt (protobuf) at byte {m.offset}",
                                expected=m.expected, found=f"{m.found}; {_looks_like(buf)}",
                                fix=f"{FIX_RECOPY}, or {FIX_FORMAT}") from None
    if len(buf) and not records:
        raise ConvertInputError(f"{path}: no tensor in a non-empty .ckpt", expected="Checkpoint.value messages",
                                found=f"{len(buf)} bytes without one; {_looks_like(buf)}",
                                fix=f"{FIX_RECOPY}, or {FIX_FORMAT}")
    return _join_records(buf, records, path)


def _consecutive_groups(records: list[_Record]) -> list[list[_Record]]:
    groups: list[list[_Record]] = []
    for rec in records:
        if groups and groups[-1][0].tag == rec.tag:
            groups[-1].append(rec)
        else:
            groups.append([rec])
    return groups


def _join_records(buf, records: list[_Record], path: Path) -> tuple[dict[str, _Located], dict[str, str]]:
    for rec in records:
        _check_record(rec, path)
    index: dict[str, _Located] = {}
    strings: dict[str, str] = {}
    for group in _consecutive_groups(records):
        first = group[0]
        if first.tag in index or first.tag in strings:
            raise ConvertInputError(f"{path}: tag {first.tag!r} appears again at byte {first.at} after other tags",
                                    expected="each tensor's messages one after another",
                                    found="a second, separate entry with the same name",
                                    fix=f"{FIX_RECOPY}; a file written by save_checkpoint never has this")
        for rec in group[1:]:
            if rec.dims != first.dims or rec.ms_type != first.ms_type:
                raise ConvertInputError(
                    f"{path}: the messages of {first.tag!r} disagree at byte {rec.at}",
                    expected=f"dims {first.dims} and tensor_type {first.ms_type!r} as in its first message",
                    found=f"dims {rec.dims}, tensor_type {rec.ms_type!r}", fix=FIX_RECOPY)
        pieces = tuple(r.content for r in group if r.content[1])
        if first.ms_type == MS_STRING_TYPE:
            raw = b"".join(bytes(buf[a:a + n]) for a, n in pieces)
            strings[first.tag] = _decode_ms_string(raw, first, path)
        else:
            index[first.tag] = _located_tensor(first, pieces, path)
    return index, strings


def _check_record(rec: _Record, path: Path) -> None:
    def bad(expected, found, fix=FIX_RECOPY):
        name = f"message {rec.tag!r}" if rec.tag is not None else "a message"
        return ConvertInputError(f"{path}: {name} at byte {rec.at}", expected=expected, found=found, fix=fix)

    if rec.has_maptensor and not rec.has_tensor:
        raise bad("a tensor", "a MapParameter (Value.maptensor)",
                  "MapParameters cannot be converted; save the checkpoint without them")
    if rec.tag is None:
        raise bad("a tag (tensor name)", "none")
    if not rec.has_tensor:
        raise bad("a tensor field", "none")
    if rec.ms_type is None or rec.content is None:
        raise bad("tensor_type and tensor_content", f"tensor_type {rec.ms_type!r}, "
                  f"tensor_content {'present' if rec.content else 'missing'}")
    if rec.ms_type != MS_STRING_TYPE and rec.ms_type not in MS_TYPE_TO_DTYPE:
        raise bad(f"tensor_type one of {', '.join(sorted(MS_TYPE_TO_DTYPE))}", f"{rec.ms_type!r}",
                  "convert the checkpoint to one of those dtypes in MindSpore first")
    if any(d >= 1 << 63 for d in rec.dims):
        raise bad("non-negative dims", f"dims {[d - (1 << 64) if d >= 1 << 63 else d for d in rec.dims]}")


def byte_range(pieces: tuple[tuple[int, int], ...], start: int, length: int) -> tuple[tuple[int, int], ...]:
    """The (file offset, length) pieces holding bytes [start, start + length) of a tensor stored in
    `pieces`.

    >>> byte_range(((100, 10), (500, 10)), 8, 4)
    ((108, 2), (500, 2))
    """
    out, pos = [], 0
    for offset, size in pieces:
        lo, hi = max(start, pos), min(start + length, pos + size)
        if lo < hi:
            out.append((offset + lo - pos, hi - lo))
        pos += size
    if sum(n for _, n in out) != length:
        raise ValueError(f"bytes [{start}, {start + length}) are beyond the tensor's {pos} bytes")
    return tuple(out) or ((0, 0),)


def _located_tensor(first: _Record, pieces, path: Path) -> _Located:
    dtype = MS_TYPE_TO_DTYPE[first.ms_type]
    itemsize = ITEMSIZE[dtype]
    total = sum(n for _, n in pieces)
    shape = tuple(first.dims)
    # load_checkpoint reads dims [0] as a 0-d tensor; with one element's bytes that is what it is.
    if shape == (0,) and total == itemsize:
        shape = ()
    want = math.prod(shape) * itemsize
    if total != want:
        raise ConvertInputError(
            f"{path}: tensor {first.tag!r} (message at byte {first.at}) has the wrong amount of data",
            expected=f"{want} bytes for dims {list(shape)} of {first.ms_type}",
            found=f"{total} bytes in {max(len(pieces), 1)} message(s)", fix=FIX_RECOPY)
    return _Located(StoredTensor(first.tag, shape, dtype), pieces)


def _decode_ms_string(raw: bytes, first: _Record, path: Path) -> str:
    # numpy 'U' storage: UTF-32-LE code points, padded with NULs that numpy strips on access.
    if len(raw) % 4:
        raise ConvertInputError(f"{path}: string entry {first.tag!r} at byte {first.at}",
                                expected="a multiple of 4 bytes (UTF-32)", found=f"{len(raw)} bytes", fix=FIX_RECOPY)
    try:
        return raw.decode("utf-32-le").rstrip("\x00")
    except UnicodeDecodeError:
        raise ConvertInputError(f"{path}: string entry {first.tag!r} at byte {first.at}",
                                expected="UTF-32 text", found="invalid code points", fix=FIX_RECOPY) from None


# ---------------------------------------------------------------- safetensors

def _index_safetensors(buf, path: Path) -> tuple[dict[str, _Located], dict[str, str]]:
    size = len(buf)

    def bad(expected, found, fix=f"{FIX_RECOPY}, or {FIX_FORMAT}"):
        return ConvertInputError(f"{path}: not a valid .safetensors file", expected=expected, found=found, fix=fix)

    if size < SAFETENSORS_LEN_BYTES:
        raise bad("an 8-byte header length", f"a file of {size} bytes")
    header_len = int.from_bytes(buf[:SAFETENSORS_LEN_BYTES], "little")
    if header_len > min(size - SAFETENSORS_LEN_BYTES, SAFETENSORS_MAX_HEADER):
        raise bad(f"a header length of at most {min(size - SAFETENSORS_LEN_BYTES, SAFETENSORS_MAX_HEADER)} bytes",
                  f"{header_len}; {_looks_like(buf)}")
    data_start = SAFETENSORS_LEN_BYTES + header_len
    try:
        header = json.loads(bytes(buf[SAFETENSORS_LEN_BYTES:data_start]).decode("utf-8"),
                            object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as e:
        raise bad("a JSON object as header", f"{type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(header, dict):
        raise bad("a JSON object as header", type(header).__name__)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ mapping names to strings", repr(metadata)[:200])
    entries = sorted((_safetensors_entry(name, e, bad) for name, e in header.items()), key=lambda t: t[1])
    pos = 0
    for info, (begin, stop) in entries:
        if begin != pos:
            raise bad("tensor data that tiles the data area without gaps or overlaps",
                      f"{info.name!r} at data offset {begin} where {pos} was expected")
        pos = stop
    if pos != size - data_start:
        raise bad(f"a data area of {pos} bytes after the {header_len}-byte header (what the header describes)",
                  f"{size - data_start} bytes")
    index = {info.name: _Located(info, ((data_start + b, e - b),) if e > b else ())
             for info, (b, e) in entries}
    return index, metadata


def _reject_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _safetensors_entry(name: str, entry, bad) -> tuple[StoredTensor, tuple[int, int]]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise bad("{dtype, shape, data_offsets} for every tensor", f"{name!r}: {str(entry)[:200]}")
    dtype = SAFETENSORS_TO_DTYPE.get(entry["dtype"])
    if dtype is None:
        raise bad(f"dtype one of {', '.join(sorted(SAFETENSORS_TO_DTYPE))}", f"{name!r}: {entry['dtype']!r}",
                  "convert the checkpoint to one of those dtypes first")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise bad("a shape of non-negative integers", f"{name!r}: {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise bad("data_offsets [begin, end] with 0 <= begin <= end", f"{name!r}: {offsets!r}")
    info = StoredTensor(name, tuple(shape), dtype)
    if offsets[1] - offsets[0] != info.nbytes:
        raise bad(f"{info.nbytes} bytes for {name!r} ({entry['dtype']} {shape})",
                  f"data_offsets {offsets} ({offsets[1] - offsets[0]} bytes)")
    return info, (offsets[0], offsets[1])
