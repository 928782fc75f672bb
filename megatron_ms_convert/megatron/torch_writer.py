"""A streaming `torch.save`: the one place that writes torch checkpoint files.

`torch.save` needs every tensor in memory before it writes a byte. Megatron's distrib_optim.pt of a
large model holds tens of GiB of fp32 buckets, so here a tensor leaf may be a `LazyTensor`: its shape
and dtype are known up front (that is all the pickle needs), its bytes are produced by a callback
right before they are written and dropped right after. The callback may return the tensor, or its
bytes as `Pieces` (tensors and `Zeros` runs, in order), each written as it comes: a bucket gathered
from many parameters is then never assembled in memory. Peak memory is one tensor or one piece.

The file is byte for byte the one `torch.save(obj, path)` writes (torch 2.x zip format): `data.pkl`
pickled with protocol 2 and a persistent id per storage, `.format_version`, `.storage_alignment`,
`byteorder`, one record `data/<key>` per storage in the order the pickle first met them, then the
records torch's writer adds at the end (`version`, `.data/serialization_id`). The zip container is
written here, laid out as torch's own writer (miniz in zip64 mode) lays it out: stored entries under
a folder named after the file, each with a data descriptor, an extra field padding every record's
data to the storage alignment, zip64 fields for offsets and sizes from 4 GiB on. Writing it here
rather than through torch's writer lets a record's bytes arrive in pieces, its CRC-32 computed on the
way with `zlib.crc32`. For a tree of eager tensors the file equals torch.save's; so it does when eager
tensors are replaced by LazyTensors of the same shape and dtype (as long as no two leaves shared a
storage). `torch.load`, with or without `weights_only` and `mmap`, and Python's `zipfile` read it
like any other checkpoint.

What is supported: LazyTensor leaves (contiguous, own storage, any dtype, 0-d included) and eager CPU
tensors, which pickle exactly as torch.save pickles them (views and shared storages included: the
whole storage is written once). Everything else is pickled by the standard pickler, as torch.save does.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "x.pt"
    >>> lazy = LazyTensor((2, 3), torch.float32, lambda: torch.ones(2, 3))
    >>> write_torch_file(path, {"w": lazy, "step": 7})
    >>> torch.load(path, weights_only=True)["w"].sum().item()
    6.0
    >>> halves = LazyTensor((4,), torch.float32, lambda: Pieces([torch.ones(2), Zeros(8)]))
    >>> write_torch_file(path, [halves])
    >>> torch.load(path, weights_only=True)[0].tolist()
    [1.0, 1.0, 0.0, 0.0]
"""
from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import sys
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from ..atomic import atomic_target

# torch.save's pickle protocol (torch.serialization.DEFAULT_PROTOCOL).
PICKLE_PROTOCOL = 2


@dataclass(frozen=True, eq=False)
class LazyTensor:
    """A tensor leaf whose values are produced only when its bytes are written.

    `produce()` must return a tensor of exactly `shape` and `dtype`, or `Pieces` holding exactly its
    bytes; it is called once, and the result is released as soon as it has been written. Identity
    matters: the same LazyTensor object placed twice in a tree is written once, as torch.save writes
    a shared tensor once."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], "torch.Tensor | Pieces"]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def __reduce_ex__(self, protocol):
        # What torch.Tensor pickles for a contiguous CPU tensor that owns its storage.
        return (torch._utils._rebuild_tensor_v2,
                (_LazyStorage(self), 0, tuple(self.shape), contiguous_stride(self.shape), False,
                 collections.OrderedDict()))


@dataclass(frozen=True)
class Zeros:
    """A run of `nbytes` zero bytes among a LazyTensor's pieces (a bucket's padding), never allocated."""

    nbytes: int


@dataclass(frozen=True, eq=False)
class Pieces:
    """What a LazyTensor's `produce()` may return instead of a tensor: its bytes in order, as tensors
    (their raw bytes, whatever their dtype or shape) and `Zeros` runs, consumed once while written.
    Nothing checks their dtypes: the producer vouches for them; their total size is checked."""

    items: Iterable["torch.Tensor | Zeros"]


@dataclass(frozen=True, eq=False)
class _LazyStorage:
    """Stands for a LazyTensor's storage while pickling; only its persistent id is pickled."""

    tensor: LazyTensor


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides of `shape` (what torch gives a contiguous tensor, size-1 dims included).

    >>> contiguous_stride((2, 3, 4)), contiguous_stride(())
    ((12, 4, 1), ())
    """
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= max(size, 1)
    return tuple(reversed(stride))


def _storage_type(dtype: torch.dtype):
    """The legacy typed-storage class torch pickles for a dtype (torch.BFloat16Storage, ...)."""
    return getattr(torch, torch.storage._dtype_to_storage_type_map()[dtype])


class _StorageCollector:
    """Assigns storage keys in first-seen order and remembers what to write under each key."""

    def __init__(self) -> None:
        self.keys: dict[int, str] = {}
        self.records: dict[str, Any] = {}  # key -> LazyTensor or torch.UntypedStorage
        self._keep_alive: list[Any] = []  # ids are only unique while their objects live

    def persistent_id(self, obj):
        if isinstance(obj, _LazyStorage):
            lazy = obj.tensor
            key = self._key(id(lazy), lazy)
            return ("storage", _storage_type(lazy.dtype), key, "cpu", lazy.numel)
        if isinstance(obj, torch.storage.TypedStorage) or torch.is_storage(obj):
            return self._eager_storage_id(obj)
        return None

    def _eager_storage_id(self, obj):
        # The same decisions as torch.serialization._save's persistent_id.
        if isinstance(obj, torch.storage.TypedStorage):
            storage, storage_type, numel = obj._untyped_storage, getattr(torch, obj._pickle_storage_type()), obj._size()
        else:
            storage = obj
            storage_type, numel = torch.serialization.normalize_storage_type(type(obj)), storage.nbytes()
        if storage.device.type != "cpu":
            raise ValueError(f"only CPU tensors are written; got one on {storage.device}")
        key = self._key(storage._cdata, storage)
        return ("storage", storage_type, key, torch.serialization.location_tag(storage), numel)

    def _key(self, identity: int, obj) -> str:
        key = self.keys.get(identity)
        if key is None:
            key = self.keys[identity] = str(len(self.keys))
            self.records[key] = obj
            self._keep_alive.append(obj)
        return key


def pickle_tree(obj: Any) -> tuple[bytes, dict[str, Any]]:
    """The `data.pkl` bytes of `obj` and the storages it refers to by key, nothing produced yet."""
    collector = _StorageCollector()

    class _Pickler(pickle.Pickler):
        def persistent_id(self, item):
            return collector.persistent_id(item)

    buffer = io.BytesIO()
    _Pickler(buffer, protocol=PICKLE_PROTOCOL).dump(obj)
    return buffer.getvalue(), collector.records


def write_torch_file(path, obj: Any, *, on_record: Callable[[str, int], None] | None = None) -> None:
    """Write `obj` to `path` as torch.save would, atomically, producing LazyTensors one at a time.

    `on_record(key, nbytes)` is called after each storage record is written (progress, tests)."""
    data, records = pickle_tree(obj)
    alignment = _storage_alignment()
    with atomic_target(path) as partial, open(partial, "wb", buffering=WRITE_BUFFER) as file:
        archive = TorchZipWriter(EarlyWriteback(file), archive_name(path), alignment, _crc32_enabled())
        archive.write_record("data.pkl", [data], len(data))
        archive.write_record(".format_version", [b"1"], 1)
        archive.write_record(".storage_alignment", [str(alignment).encode()], len(str(alignment)))
        archive.write_record("byteorder", [sys.byteorder.encode()], len(sys.byteorder))
        for key in list(records):
            item = records.pop(key)
            nbytes = item.nbytes if isinstance(item, LazyTensor) else item.nbytes()
            archive.write_record(f"data/{key}", _record_buffers(item), nbytes)
            del item  # released before the next one is produced
            if on_record is not None:
                on_record(key, nbytes)
        archive.finish()


def _record_buffers(item) -> Iterator[memoryview]:
    """The bytes of one storage record, as buffers to write in order (a LazyTensor is produced here)."""
    if not isinstance(item, LazyTensor):
        yield _tensor_bytes(torch.empty(0, dtype=torch.uint8).set_(item))
        return
    produced = _checked_product(item)
    if isinstance(produced, torch.Tensor):
        yield _tensor_bytes(produced)
        return
    for piece in produced.items:
        if isinstance(piece, Zeros):
            yield from _zero_runs(piece.nbytes)
        elif isinstance(piece, torch.Tensor) and piece.device.type == "cpu":
            yield _tensor_bytes(piece)
            del piece  # dropped before the next piece is produced
        else:
            raise ValueError(f"LazyTensor piece is {type(piece).__name__} "
                             f"{getattr(piece, 'device', '')}: expected a CPU tensor or Zeros")


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor in row-major order, without a copy when it is contiguous."""
    flat = tensor.detach().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _zero_runs(nbytes: int) -> Iterator[memoryview]:
    block = memoryview(bytes(min(nbytes, ZERO_BLOCK)))
    while nbytes > 0:
        yield block[:min(nbytes, len(block))]
        nbytes -= len(block)


# ---------------------------------------------------------------------------------------------
# The file: a zip container as torch's writer (miniz, zip64 mode, no timestamps) lays it out

WRITE_BUFFER = 1 << 20
WRITEBACK_STEP = 64 << 20
CHUNK = 4 << 20  # CRC-32 and write a piece in slices that stay in cache between the two
ZERO_BLOCK = 1 << 20
U32_MAX = 0xFFFFFFFF
FLAG_UTF8, FLAG_DATA_DESCRIPTOR = 0x0800, 0x0008
# signature, version, flags, method, time, date, crc, sizes, name/extra lengths
LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
CENTRAL_HEADER = struct.Struct("<IHHHHHHIIIHHHHHII")
DESCRIPTOR_32, DESCRIPTOR_64 = struct.Struct("<IIII"), struct.Struct("<IIQQ")
ZIP64_END = struct.Struct("<IQHHIIQQQQ")
ZIP64_LOCATOR = struct.Struct("<IIQI")
END = struct.Struct("<IHHHHIIH")
DESCRIPTOR_SIGNATURE = 0x08074B50
SERIALIZATION_ID = ".data/serialization_id"


class EarlyWriteback:
    """A binary file that has the kernel start writing its data to disk every WRITEBACK_STEP bytes.

    Left alone, the kernel keeps a file's data in memory until the fsync that makes the file durable
    (below its dirty-memory threshold, which is gigabytes), so the disk idles while buckets are read
    and checksummed and the fsync then waits for all of it. Started early, the disk writes while the
    next bytes are prepared. POSIX_FADV_DONTNEED is the standard call that starts writeback of a
    range on Linux (it also drops pages already on disk from the cache: nothing here reads them)."""

    def __init__(self, file) -> None:
        self._file = file
        self._written = self._started = 0

    def write(self, data) -> None:
        self._file.write(data)
        self._written += len(data)
        if self._written - self._started >= WRITEBACK_STEP and hasattr(os, "posix_fadvise"):
            self._file.flush()
            os.posix_fadvise(self._file.fileno(), self._started, self._written - self._started,
                             os.POSIX_FADV_DONTNEED)
            self._started = self._written


@dataclass(frozen=True)
class ZipEntry:
    """One record as the central directory lists it."""

    name: bytes  # with the archive folder
    offset: int  # of its local header
    size: int
    crc: int


def archive_name(path) -> str:
    """The folder torch.save puts every record in: the file name without its last suffix, or
    'archive' when torch would write through a Python file object (a name that is not ASCII).

    >>> archive_name("/ckpt/iter_0000010/mp_rank_00/distrib_optim.pt"), archive_name("a.b.pt")
    ('distrib_optim', 'a.b')
    """
    text = str(path)
    base = text[max(text.rfind("/"), text.rfind("\\")) + 1:]
    stem = base[:base.rfind(".")] if "." in base else base
    return stem if stem and text.isascii() else "archive"


def zip64_extra(size: int, offset: int, compressed_size: int) -> bytes:
    """The zip64 extended-information field miniz adds once a size or offset reaches 4 GiB - 1."""
    fields = ([size, compressed_size] if size >= U32_MAX else []) + ([offset] if offset >= U32_MAX else [])
    return struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""


def local_header(name: bytes, offset: int, size: int, alignment: int) -> bytes:
    """A record's local header up to its first data byte. Sizes and CRC follow the data (descriptor);
    torch's extra field 'FB' pads with 'Z' so the data starts at a multiple of `alignment`."""
    zip64 = zip64_extra(size, offset, compressed_size=0)  # miniz writes it before compressing: size 0
    start = offset + LOCAL_HEADER.size + len(name) + len(zip64) + 4
    padding = -start % alignment
    extra = zip64 + b"FB" + struct.pack("<H", padding) + b"Z" * padding
    return LOCAL_HEADER.pack(0x04034B50, 0, _flags(size), 0, 0, 0, 0, 0, 0, len(name), len(extra)) + name + extra


def data_descriptor(entry: ZipEntry) -> bytes:
    """What follows a record's data (none for an empty record): CRC and sizes, 64-bit ones when the
    local header has a zip64 field."""
    if not entry.size:
        return b""
    if zip64_extra(entry.size, entry.offset, 0):
        return DESCRIPTOR_64.pack(DESCRIPTOR_SIGNATURE, entry.crc, entry.size, entry.size)
    return DESCRIPTOR_32.pack(DESCRIPTOR_SIGNATURE, entry.crc, entry.size, entry.size)


def central_directory(entries: Iterable[ZipEntry]) -> bytes:
    out = bytearray()
    for e in entries:
        extra = zip64_extra(e.size, e.offset, compressed_size=e.size)
        out += CENTRAL_HEADER.pack(0x02014B50, 0, 0, _flags(e.size), 0, 0, 0, e.crc, min(e.size, U32_MAX),
                                   min(e.size, U32_MAX), len(e.name), len(extra), 0, 0, 0, 0,
                                   min(e.offset, U32_MAX))
        out += e.name + extra
    return bytes(out)


def end_of_archive(count: int, directory_offset: int, directory_size: int) -> bytes:
    """The zip64 end record and its locator (miniz in zip64 mode always writes them), then the classic
    end record with its fields capped."""
    zip64_end_offset = directory_offset + directory_size
    return (ZIP64_END.pack(0x06064B50, ZIP64_END.size - 12, 0x031E, 0x002D, 0, 0, count, count,
                           directory_size, directory_offset)
            + ZIP64_LOCATOR.pack(0x07064B50, 0, zip64_end_offset, 1)
            + END.pack(0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF), min(directory_size, U32_MAX),
                       min(directory_offset, U32_MAX), 0))


def _flags(size: int) -> int:
    return FLAG_UTF8 | (FLAG_DATA_DESCRIPTOR if size else 0)


def hash_combine(seed: int, value: int) -> int:
    """c10::hash_combine on 64-bit size_t, which torch's writer folds record CRCs with."""
    return (seed ^ (value + 0x9E3779B9 + (seed << 6) + (seed >> 2))) & 0xFFFFFFFFFFFFFFFF


class TorchZipWriter:
    """Writes records into an open binary file exactly as torch's `PyTorchFileWriter` would."""

    def __init__(self, file, archive: str, alignment: int, crc32: bool) -> None:
        self._file, self._prefix, self._alignment, self._crc32 = file, archive + "/", alignment, crc32
        self._offset = 0
        self._entries: list[ZipEntry] = []
        self._names: list[str] = []
        self._combined_crc = 0  # what torch folds into the second half of the serialization id

    def write_record(self, name: str, buffers: Iterable, nbytes: int) -> None:
        """Write record `name` whose data is the concatenation of `buffers` (bytes-like), `nbytes` long."""
        full = (self._prefix + name).encode("utf-8")
        offset = self._offset
        self._write(local_header(full, offset, nbytes, self._alignment))
        self._note_write(full)
        crc, written, head = 0, 0, b""
        for buffer in buffers:
            view = memoryview(buffer).cast("B")
            del buffer  # every reference is dropped before the next piece is produced
            for start in range(0, len(view), CHUNK):
                chunk = view[start:start + CHUNK]
                written += len(chunk)
                if written > nbytes:
                    raise ValueError(f"LazyTensor {name}: produced more than the {nbytes} bytes promised")
                if len(head) < 8:
                    head += bytes(chunk[:8 - len(head)])
                if self._crc32:
                    crc = zlib.crc32(chunk, crc)
                self._write(chunk)
                del chunk
            del view
        if written != nbytes:
            raise ValueError(f"LazyTensor {name}: produced {written} bytes, promised {nbytes}")
        self._note_write(head, nbytes)  # torch hands a record's data to the file in one write
        entry = ZipEntry(full, offset, nbytes, crc)
        descriptor = data_descriptor(entry)
        self._write(descriptor)
        self._note_write(descriptor)
        self._entries.append(entry)
        self._names.append(name)

    def finish(self) -> None:
        """Write the records torch's writer ends a file with, then the central directory."""
        name_hash, closing = _closing_records(self._names)
        for name, data in closing:
            if name == SERIALIZATION_ID:
                data = f"{name_hash}{self._combined_crc:020d}".encode()
            self.write_record(name, [data], len(data))
        directory_offset = self._offset
        directory = central_directory(self._entries)
        self._write(directory)
        self._write(end_of_archive(len(self._entries), directory_offset, len(directory)))

    def _write(self, data) -> None:
        self._file.write(data)
        self._offset += len(data)

    def _note_write(self, head, length: int | None = None) -> None:
        # torch's writer takes any write of 8 bytes or more that starts like a data descriptor for
        # one, and folds the 4 bytes after the signature into the id (a record's data included).
        length = len(head) if length is None else length
        if length >= 8 and len(head) >= 8 and int.from_bytes(head[:4], "little") == DESCRIPTOR_SIGNATURE:
            self._combined_crc = hash_combine(self._combined_crc, int.from_bytes(head[4:8], "little"))


def _closing_records(names: list[str]) -> tuple[str, list[tuple[str, bytes]]]:
    """What torch's writer appends after `names` when it finishes a file, and the first half of the
    serialization id (a hash over the record names, walked in the order of a C++ unordered_set).
    Both come from torch itself: its writer is run on empty records of the same names, in memory."""
    buffer = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(buffer, True, 64)
    for name in names:
        writer.write_record(name, b"", 0)
    writer.write_end_of_file()
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        records = [(info.filename.split("/", 1)[1], archive.read(info)) for info in archive.infolist()]
    closing = records[len(names):]
    ids = [data for name, data in closing if name == SERIALIZATION_ID]
    if [name for name, _ in records[:len(names)]] != names or len(ids) != 1 or len(ids[0]) != 40:
        raise RuntimeError("this torch version ends its files differently; the writer needs updating")
    return ids[0][:20].decode(), closing


def produced_tensor(lazy: LazyTensor) -> torch.Tensor:
    """`lazy` produced as one tensor (Pieces are joined): what torch.save would be given (tests)."""
    produced = _checked_product(lazy)
    if isinstance(produced, torch.Tensor):
        return produced
    data = b"".join(bytes(piece) for piece in _record_buffers(LazyTensor(lazy.shape, lazy.dtype, lambda: produced)))
    if len(data) != lazy.nbytes:
        raise ValueError(f"LazyTensor pieces gave {len(data)} bytes, promised {lazy.nbytes}")
    return torch.frombuffer(bytearray(data), dtype=lazy.dtype).reshape(lazy.shape) if data \
        else torch.empty(lazy.shape, dtype=lazy.dtype)


def _checked_product(lazy: LazyTensor) -> "torch.Tensor | Pieces":
    """Call `lazy.produce()` and check a tensor against the promised shape and dtype: the pickle
    already told the reader what to expect, so a mismatch would be a silently wrong file."""
    tensor = lazy.produce()
    if isinstance(tensor, Pieces):
        return tensor
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(lazy.shape) \
            or tensor.dtype != lazy.dtype or tensor.device.type != "cpu":
        found = (f"{type(tensor).__name__}" if not isinstance(tensor, torch.Tensor)
                 else f"{tuple(tensor.shape)} {tensor.dtype} on {tensor.device}")
        raise ValueError(f"LazyTensor produced {found}, promised {tuple(lazy.shape)} {lazy.dtype} on cpu")
    return tensor.contiguous()


def _crc32_enabled() -> bool:
    options = getattr(torch.serialization, "get_crc32_options", None)
    return options() if options is not None else True


def _storage_alignment() -> int:
    alignment = getattr(torch.serialization, "_get_storage_alignment", None)
    return alignment() if alignment is not None else 64


def materialize(obj: Any) -> Any:
    """`obj` with every LazyTensor produced (small trees, tests): what torch.save would be given."""
    if isinstance(obj, LazyTensor):
        return produced_tensor(obj)
    if isinstance(obj, dict):
        return type(obj)((k, materialize(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [materialize(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(materialize(v) for v in obj)
    return obj
