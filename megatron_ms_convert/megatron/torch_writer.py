"""A streaming `torch.save`: the one place that writes torch checkpoint files.

`torch.save` needs every tensor in memory before it writes a byte. Megatron's distrib_optim.pt of a
large model holds tens of GiB of fp32 buckets, so here a tensor leaf may be a `LazyTensor`: its shape
and dtype are known up front (that is all the pickle needs), its bytes are produced by a callback
right before they are written and dropped right after. Peak memory is one tensor, whatever the file.

The file is the one `torch.save` writes (torch 2.x zip format, written with torch's own
`PyTorchFileWriter`): `data.pkl` pickled with protocol 2 and a persistent id per storage,
`.format_version`, `.storage_alignment`, `byteorder`, then one record `data/<key>` per storage in
the order the pickle first met them. For a tree of eager tensors `data.pkl` is byte-identical to
torch.save's; so it is when eager tensors are replaced by LazyTensors of the same shape and dtype
(as long as no two leaves shared a storage). `torch.load`, with or without `weights_only` and `mmap`,
reads it like any other checkpoint.

What is supported: LazyTensor leaves (contiguous, own storage, any dtype, 0-d included) and eager CPU
tensors, which pickle exactly as torch.save pickles them (views and shared storages included: the
whole storage is written once). Everything else is pickled by the standard pickler, as torch.save does.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "x.pt"
    >>> lazy = LazyTensor((2, 3), torch.float32, lambda: torch.ones(2, 3))
    >>> write_torch_file(path, {"w": lazy, "step": 7})
    >>> torch.load(path, weights_only=True)["w"].sum().item()
    6.0
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..atomic import atomic_target

# torch.save's pickle protocol (torch.serialization.DEFAULT_PROTOCOL).
PICKLE_PROTOCOL = 2


@dataclass(frozen=True, eq=False)
class LazyTensor:
    """A tensor leaf whose values are produced only when its bytes are written.

    `produce()` must return a tensor of exactly `shape` and `dtype`; it is called once, and the result
    is released as soon as it has been written. Identity matters: the same LazyTensor object placed
    twice in a tree is written once, as torch.save writes a shared tensor once."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

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
    with atomic_target(path) as partial:
        writer = torch._C.PyTorchFileWriter(str(partial), _crc32_enabled(), _storage_alignment())
        writer.write_record("data.pkl", data, len(data))
        writer.write_record(".format_version", "1", 1)
        alignment = str(_storage_alignment())
        writer.write_record(".storage_alignment", alignment, len(alignment))
        writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        for key in list(records):
            nbytes = _write_storage(writer, f"data/{key}", records.pop(key))
            if on_record is not None:
                on_record(key, nbytes)
        writer.write_end_of_file()


def _write_storage(writer, name: str, item) -> int:
    if isinstance(item, LazyTensor):
        tensor = produced_tensor(item)
        storage = tensor.untyped_storage()
        if tensor.storage_offset() != 0 or storage.nbytes() != item.nbytes:
            storage = tensor.clone().untyped_storage()  # a view: write just its elements
        writer.write_record(name, storage, item.nbytes)
        del tensor, storage  # released before the next one is produced
        return item.nbytes
    nbytes = item.nbytes()
    writer.write_record(name, item, nbytes)
    return nbytes


def produced_tensor(lazy: LazyTensor) -> torch.Tensor:
    """Call `lazy.produce()` and check the result against the promised shape and dtype: the pickle
    already told the reader what to expect, so a mismatch would be a silently wrong file."""
    tensor = lazy.produce()
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
