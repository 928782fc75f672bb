"""Integrity of a torch.save file: every zip record checked against the CRC-32 in the zip directory.

`torch.load` never checks the CRCs (torch's miniz is built without the check, and mmap'd storages are
never read through the zip reader at all), so a flipped byte in a tensor or in the pickle would pass
silently. Here the zip directory is read once (Python's `zipfile` parses the central directory, zip64
included), each record's data start is found from its local header, and the CRC-32 of the record's
bytes is computed over a read-only mmap of the file: the page cache then serves the converter's own
read of the same bytes. The mmap'd storages torch hands out are matched back to these records (their
addresses differ from the file offsets by one constant), so a damaged record is named by the tensor it
holds, and a pickle that points a tensor outside its record is refused.
"""

from __future__ import annotations

import argparse
import mmap
import struct
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..crc import crc32
from ..errors import ConvertInputError

FIX = "re-copy the file from where it was written (damaged in transfer or on disk?)"
LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # signature ... name length, extra length (30 bytes)
LOCAL_SIGNATURE = b"PK\x03\x04"
ALWAYS_CHECKED_BYTES = 64  # one-element values, which a parent reads as numbers (capturable optimizers)


@dataclass(frozen=True)
class ZipRecord:
    """One stored (uncompressed) record: its name inside the archive folder, data start, size, CRC-32."""

    name: str
    offset: int
    size: int
    crc: int

    @property
    def is_data(self) -> bool:
        return self.name.startswith("data/")


def read_records(path: Path, buf) -> dict[str, ZipRecord]:
    """The records of a torch.save zip by their name inside the archive folder ('data.pkl', 'data/3').
    Every record must be stored uncompressed and lie inside the file, and its local header must name
    the same record as the central directory (torch reads the local header, zipfile the directory)."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, struct.error, UnicodeDecodeError) as err:
        raise _unreadable(path, f"its zip directory is damaged ({err})") from None
    records = {}
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise _unreadable(path, f"record {info.filename} is compressed or has two sizes")
        start = info.header_offset
        if start < 0 or start + LOCAL_HEADER.size > len(buf):
            raise _unreadable(path, f"record {info.filename} starts outside the file")
        fields = LOCAL_HEADER.unpack_from(buf, start)
        name_len, extra_len = fields[-2], fields[-1]
        name = bytes(buf[start + LOCAL_HEADER.size:start + LOCAL_HEADER.size + name_len])
        if fields[0] != LOCAL_SIGNATURE or name != info.orig_filename.encode("utf-8", "replace"):
            raise _unreadable(path, f"record {info.filename}'s local header does not match the zip directory")
        data = start + LOCAL_HEADER.size + name_len + extra_len
        if data + info.file_size > len(buf):
            raise _unreadable(path, f"record {info.filename} ends past the end of the file "
                                    f"({data + info.file_size} > {len(buf)} bytes; truncated?)")
        short = info.filename.split("/", 1)[-1]
        if short in records:
            raise _unreadable(path, f"record {info.filename} is in the zip directory twice")
        records[short] = ZipRecord(short, data, info.file_size, info.CRC)
    if "data.pkl" not in records:
        raise _unreadable(path, "no data.pkl record in it")
    return records


def _unreadable(path: Path, why: str) -> ConvertInputError:
    return ConvertInputError(f"{path}: not a readable torch checkpoint: {why}",
                             expected="a complete torch.save zip archive", fix=FIX)


def check_record(path: Path, buf, record: ZipRecord, holds: str = "") -> None:
    """Raise when the record's bytes do not have the CRC-32 the zip directory recorded for them."""
    found = crc32(memoryview(buf)[record.offset:record.offset + record.size]) & 0xFFFFFFFF
    if found != record.crc:
        damaged = (f"{path}: record {record.name} ({holds}) is damaged: its bytes fail the CRC-32 check" if holds
                   else f"{path}: record {record.name} is damaged: its bytes fail the CRC-32 check")
        raise ConvertInputError(damaged,
                                expected=f"CRC-32 {record.crc:08x} (zip directory)", found=f"{found:08x}", fix=FIX)


class CheckedPt:
    """A read-only mapping of one .pt file and its zip records, for checking them as they are used."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as file:
            size = file.seek(0, 2)
            self.buf = mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ) if size else b""
        self.records = read_records(self.path, self.buf)

    def check_pickle(self) -> None:
        """Every record that is not tensor data (data.pkl, version, byteorder, ...): read before unpickling."""
        for record in self.records.values():
            if not record.is_data:
                check_record(self.path, self.buf, record, "the pickle" if record.name == "data.pkl" else "")

    def check_tensors(self, loaded: Any, all_sizes: bool) -> None:
        """Check the data records of the tensors `torch.load(mmap=True)` returned (every one with
        all_sizes, else the single values); a damaged one is named by the first tensor found in it."""
        for record, where in self.tensor_records(loaded):
            if all_sizes or record.size <= ALWAYS_CHECKED_BYTES:
                check_record(self.path, self.buf, record, f"holds {where}")

    def tensor_records(self, loaded: Any) -> list[tuple[ZipRecord, str]]:
        """(data record, the first tensor in it) for every storage of the loaded pickle, which must each
        be exactly one data record of the zip directory (torch maps the file at one address, so the
        storages' addresses are the records' offsets plus one constant)."""
        data = sorted((r for r in self.records.values() if r.is_data), key=lambda r: r.offset)
        storages = {}
        for where, tensor in tensors_in(loaded):
            storage = tensor.untyped_storage()
            storages.setdefault(storage.data_ptr(), (storage.nbytes(), where))
        if not data or not storages:
            if data or storages:
                raise _unreadable(self.path, f"{len(storages)} tensor storages for {len(data)} data records")
            return []
        base = min(storages) - data[0].offset
        by_offset = {r.offset: r for r in data}
        found = []
        for pointer, (nbytes, where) in sorted(storages.items()):
            record = by_offset.get(pointer - base)
            if record is None or record.size != nbytes:
                raise _unreadable(self.path, f"tensor {where} does not match a data record of the zip directory")
            found.append((record, where))
        return found

    def close(self) -> None:
        if isinstance(self.buf, mmap.mmap):
            self.buf.close()


def tensors_in(obj: Any, where: tuple = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """(description, tensor) of every tensor in a loaded pickle, in the pickle's own order."""
    if isinstance(obj, torch.Tensor):
        yield describe(where), obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from tensors_in(value, (*where, key))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from tensors_in(value, (*where, index))
    elif isinstance(obj, argparse.Namespace):
        yield from tensors_in(vars(obj), (*where, "args"))


def describe(where: tuple) -> str:
    """A tensor's place in the pickle, in the words of the file it came from: distrib_optim.pt's
    `buffer 0 (torch.bfloat16, torch.float32) state 'exp_avg' bucket 2`, a model's dotted key."""
    if len(where) == 4 and isinstance(where[0], int) and isinstance(where[1], tuple):
        gbuf, dtypes, state, bucket = where
        return f"grad buffer {gbuf} {tuple(map(str, dtypes))} state {state!r} bucket {bucket}"
    if len(where) == 5 and isinstance(where[0], int) and isinstance(where[2], tuple):  # MoE [dense, expert]
        part, gbuf, dtypes, state, bucket = where
        return (f"{'expert' if part else 'dense'} optimizer grad buffer {gbuf} {tuple(map(str, dtypes))} "
                f"state {state!r} bucket {bucket}")
    return ".".join(map(str, where)) or "the top-level tensor"


class BackgroundChecks:
    """CRC checks of data records that run in a thread while the caller copies the same bytes.

    A worker waits for its output file's writes most of the time; checking the records meanwhile
    (crc32 releases the GIL) hides the check's ~0.1 s of CPU per GB. `wait()` must be called before
    anything derived from the records is put at a final path: it raises the first mismatch."""

    def __init__(self):
        self._threads: list[threading.Thread] = []
        self._errors: list[ConvertInputError] = []

    def start(self, checked: CheckedPt, loaded: Any) -> None:
        """Check every data record of `loaded` (matched to the zip directory now), then close `checked`."""
        records = checked.tensor_records(loaded)

        def run():
            try:
                for record, where in records:
                    check_record(checked.path, checked.buf, record, f"holds {where}")
            except ConvertInputError as err:
                self._errors.append(err)
            finally:
                checked.close()
        thread = threading.Thread(target=run, name=f"crc {checked.path.name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def wait(self) -> None:
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        if self._errors:
            raise self._errors[0]
