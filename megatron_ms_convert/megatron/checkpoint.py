"""Reading a Megatron-LM core_r0.6.0 checkpoint without Megatron and without running its pickles.

What lives here: finding the `mp_rank_*` folders of an iteration, loading a `.pt` file with
`torch.load(weights_only=True)` and an allow-list of exactly the globals Megatron pickles, flattening
the model state dicts (nested for legacy models, flat for Megatron-core ones), and decoding
`distrib_optim.pt` (the distributed optimizer's bucketed parameter state). Nothing here writes.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import io
import pickle
import sys
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..errors import ConvertInputError
from ..topology import MODEL_FILE, RankFolder, folder_name, parse_folder_ranks
from .zip_records import BackgroundChecks, CheckedPt, check_record

TRACKER_FILE = "latest_checkpointed_iteration.txt"


class ModelType(enum.Enum):
    """Stand-in for `megatron.core.enums.ModelType`, which every model_optim_rng.pt pickles in its args."""

    encoder_or_decoder = 1
    encoder_and_decoder = 2
    retro_encoder = 3
    retro_decoder = 4


# The pickles name the class by Megatron's path; the allow-list matches on that name.
ModelType.__module__ = "megatron.core.enums"
ModelType.__qualname__ = "ModelType"


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def safe_globals() -> list:
    """The allow-list: what Megatron's model_optim_rng.pt pickles besides tensors and plain data.

    numpy's RNG state is pickled under `numpy.core` by numpy 1.x and `numpy._core` by numpy 2.x, so
    both spellings are allowed; `io.BytesIO` is what Transformer Engine layers store as `_extra_state`.
    """
    reconstruct = _numpy_reconstruct()
    return [
        argparse.Namespace,
        ModelType,
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        io.BytesIO,
    ]


def load_pt(path: Path, *, mmap: bool = True, check_all_data: bool = False,
            background: BackgroundChecks | None = None) -> Any:
    """torch.load a Megatron .pt file safely; mmap'd where the file allows it, so tensors are views
    of the page cache rather than copies. Damaged, truncated and untrusted files raise ConvertInputError.

    Integrity (torch checks no CRC): the pickle records are checked against the zip directory's CRC-32
    before they are unpickled, and so are the data records of single values (read as numbers) after; the
    rest only with check_all_data, which the process that copies the tensors asks for (a parent that
    reads shapes and sizes would otherwise read every byte once more), or, given `background`, in a
    thread of it while the caller copies them (the caller waits for it before finishing an output)."""
    path = Path(path)
    if not path.is_file():
        raise ConvertInputError(f"{path}: file is missing", fix="check --megatron-path")
    if not zipfile.is_zipfile(path):
        raise ConvertInputError(
            f"{path}: not a readable torch checkpoint",
            expected="a torch.save zip archive",
            found=f"{path.stat().st_size} bytes that are not one (truncated or not a .pt file)",
            fix="re-copy the file from the training run",
        )
    checked = CheckedPt(path)
    try:
        checked.check_pickle()
        loaded = _torch_load(path, mmap)
        if mmap and background is not None:
            background.start(checked, loaded)  # closes `checked` when done
            checked = None
        elif mmap:
            checked.check_tensors(loaded, check_all_data)
        else:  # the tensors are copies: check the records themselves
            for record in checked.records.values():
                check_record(path, checked.buf, record)
        return loaded
    finally:
        if checked is not None:
            checked.close()


def _torch_load(path: Path, mmap: bool) -> Any:
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConvertInputError(
            f"{path}: refused to unpickle it ({reason})",
            expected="only tensors, plain data, argparse.Namespace, numpy RNG state and "
            "megatron.core.enums.ModelType",
            found="a global outside that allow-list (a pickle that would run code)",
            fix="convert only checkpoints written by Megatron-LM; report the global if it is benign",
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise ConvertInputError(
            f"{path}: cannot read it ({str(err).splitlines()[0] if str(err) else type(err).__name__})",
            expected="a complete torch.save file",
            found="a damaged or truncated file",
            fix="re-copy the file from the training run",
        ) from None


@contextlib.contextmanager
def megatron_enum_importable() -> Iterator[None]:
    """Make `megatron.core.enums.ModelType` resolvable while pickling args into pt_meta/, so the file
    loads later where Megatron is installed; the previous sys.modules entries come back afterwards."""
    names = ("megatron", "megatron.core", "megatron.core.enums")
    saved = {name: sys.modules.get(name) for name in names}
    try:
        for name in names[:-1]:
            sys.modules.setdefault(name, types.ModuleType(name))
        enums = types.ModuleType("megatron.core.enums")
        enums.ModelType = ModelType
        sys.modules["megatron.core.enums"] = enums
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def resolve_iteration_dir(megatron_path: Path) -> Path:
    """--megatron-path should be `iter_XXXXXXX/` or `release/`; a `--save` root is accepted too and
    resolved through its latest_checkpointed_iteration.txt, as Megatron itself does."""
    megatron_path = Path(megatron_path)
    if not megatron_path.is_dir():
        raise ConvertInputError(f"--megatron-path {megatron_path}: no such folder",
                                fix="pass the iter_XXXXXXX (or release) folder of the checkpoint")
    if any(p.name.startswith("mp_rank_") for p in megatron_path.iterdir()):
        return megatron_path
    tracker = megatron_path / TRACKER_FILE
    if tracker.is_file():
        text = tracker.read_bytes().decode("utf-8", "replace").strip()  # damaged bytes: not a number, no crash
        sub = "release" if text == "release" else (f"iter_{int(text):07d}" if text.isdigit() else None)
        if sub and (megatron_path / sub).is_dir():
            return megatron_path / sub
    names = sorted(p.name for p in megatron_path.iterdir())
    distributed_format = ".metadata" in names or "common.pt" in names
    raise ConvertInputError(
        f"--megatron-path {megatron_path}: no mp_rank_* folders in it",
        expected="the iter_XXXXXXX or release folder that holds mp_rank_TT[_PPP] folders",
        found=(", ".join(names[:8]) or "an empty folder")
        + (" (a torch_dist/zarr distributed checkpoint)" if distributed_format else ""),
        fix="save the checkpoint in Megatron's torch format (without --use-dist-ckpt) and convert that"
        if distributed_format else "point --megatron-path at the iteration folder",
    )


def saved_args_of(iteration_dir: Path) -> tuple[Any, Path | None]:
    """(args, the file they came from) of the first `mp_rank_*` folder's model_optim_rng.pt (args None
    when it has none). Which 3-digit parts a folder name has depends on the run's pipeline and expert
    parallel sizes, so they are read before the folder names are."""
    folders = sorted(p for p in Path(iteration_dir).iterdir() if p.name.startswith("mp_rank_") and p.is_dir())
    if not folders:
        return None, None
    model_sd = load_pt(folders[0] / MODEL_FILE)
    return (model_sd.get("args") if isinstance(model_sd, dict) else None), folders[0] / MODEL_FILE


def find_rank_folders(iteration_dir: Path, tp_size: int, pp_size: int, ep_size: int = 1) -> list[RankFolder]:
    """Every (tp, pp, ep) folder, checked against --tp-size/--pp-size/--ep-size before any work starts."""
    found: dict[tuple[int, int, int], Path] = {}
    for entry in sorted(iteration_dir.iterdir()):
        ranks = parse_folder_ranks(entry.name, pp_size, ep_size)
        if ranks is None:
            continue
        if not entry.is_dir():
            raise ConvertInputError(f"{entry}: expected a folder", found="a file", fix="check --megatron-path")
        found[ranks] = entry
    expected = {(t, p, e) for t in range(tp_size) for p in range(pp_size) for e in range(ep_size)}
    missing = sorted(expected - found.keys())
    extra = sorted(found.keys() - expected)
    if missing or extra:
        def names(ranks):
            return ", ".join(folder_name(t, p, pp_size, e, ep_size) for t, p, e in ranks)
        found_text = f"{len(found)} folders"
        if missing:
            found_text += f"; missing {names(missing)}"
        if extra:
            found_text += f"; unexpected {names(extra)}"
        sizes = f"tp {tp_size} x pp {pp_size}" + (f" x ep {ep_size}" if ep_size > 1 else "")
        raise ConvertInputError(
            f"{iteration_dir}: rank folders do not match --tp-size {tp_size} --pp-size {pp_size}"
            + (f" --ep-size {ep_size}" if ep_size > 1 else ""),
            expected=f"{len(expected)} folders mp_rank_00.. for {sizes}",
            found=found_text,
            fix="set --tp-size/--pp-size" + ("/--ep-size" if ep_size > 1 else "")
                + " to the training run's sizes, or restore the missing folders",
        )
    return sorted(RankFolder(pp=p, tp=t, path=path, ep=e) for (t, p, e), path in found.items())


def model_chunk_keys(model_sd: dict, model_file: Path) -> list[str]:
    """`model` or `model0`, `model1`, ...: one state dict per virtual-pipeline chunk, in chunk order."""
    if "model" in model_sd:
        return ["model"]
    keys = []
    while f"model{len(keys)}" in model_sd:
        keys.append(f"model{len(keys)}")
    if not keys:
        raise ConvertInputError(f"{model_file}: no model state dict in it",
                                expected="a 'model' or 'model0' entry", found=f"keys {sorted(map(str, model_sd))}",
                                fix="check --megatron-path")
    return keys


def flatten_state_dict(state: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Dotted keys of a nested (legacy) or flat (mcore) model state dict, in saved order."""
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from flatten_state_dict(value, name + ".")
        else:
            yield name, value


def model_tensors(chunk_sd: dict) -> dict[str, torch.Tensor]:
    """The parameters of one chunk's state dict by dotted key. Non-tensors are skipped, and so is every
    `_extra_state`: Transformer Engine versions store it as a uint8 tensor, which is no parameter."""
    return {name: value for name, value in flatten_state_dict(chunk_sd)
            if isinstance(value, torch.Tensor) and not name.endswith("_extra_state")}


# ---------------------------------------------------------------------------------------------
# distrib_optim.pt


@dataclass(frozen=True)
class DistribBuffer:
    """One grad buffer of distrib_optim.pt: its dtype key, bucket sizes and per-state bucket tensors."""

    gbuf_idx: int
    dtype_key: tuple[torch.dtype, torch.dtype]
    padded: tuple[int, ...]
    unpadded: tuple[int, ...]
    states: dict  # state name ('param', 'exp_avg', ...) -> list of 1-D fp32 tensors, one per bucket

    @property
    def dtype_names(self) -> tuple[str, str]:
        """The dtype key as text ('torch.bfloat16', 'torch.float32'), as param_map files spell dtypes."""
        return str(self.dtype_key[0]), str(self.dtype_key[1])


DENSE, EXPERT = 0, 1  # the elements of a MoE run's distrib_optim.pt list (ChainedOptimizer order)


def decode_optimizer_part(distrib: Any, path: Path, element: int | None) -> list[DistribBuffer]:
    """The grad buffers of one optimizer of a loaded distrib_optim.pt: the whole file (element None),
    or element DENSE / EXPERT of a MoE run's list `[dense_state, expert_state]` (the ChainedOptimizer
    saves one state per optimizer, None where this rank is not its dp group's rank 0)."""
    if element is None:
        return decode_distrib_optim(distrib, path)
    if not isinstance(distrib, list) or len(distrib) != 2:
        raise ConvertInputError(f"{path}: not a MoE optimizer state",
                                expected="a list [dense state, expert state] (Megatron's ChainedOptimizer)",
                                found=type(distrib).__name__
                                + (f" of {len(distrib)}" if isinstance(distrib, list) else ""),
                                fix="check --megatron-path (is this a MoE checkpoint?)")
    if distrib[element] is None:
        which = "dense" if element == DENSE else "expert"
        raise ConvertInputError(f"{path}: holds no {which} optimizer state (None)",
                                expected=f"the {which} state in this folder",
                                found="None (saved by a rank that is not the optimizer's dp rank 0)",
                                fix="re-copy the folder from the training run, or check --ep-size")
    return decode_distrib_optim(distrib[element], path)


def decode_distrib_optim(distrib: Any, path: Path) -> list[DistribBuffer]:
    """The grad buffers of a loaded distrib_optim.pt, checked for internal consistency: one dtype key
    per buffer, as many unpadded as padded bucket sizes, and every state's bucket tensors of the
    recorded sizes. The tensors stay views of the (mmap'd) file."""
    if isinstance(distrib, list):
        raise ConvertInputError(f"{path}: holds a list of optimizer states (ChainedOptimizer, MoE)",
                                expected="one DistributedOptimizer state dict", found="a list",
                                fix="a MoE checkpoint needs the run's args (num_experts) in model_optim_rng.pt; "
                                    "check --megatron-path")
    if not isinstance(distrib, dict) or "per_bucket_numel" not in distrib:
        raise ConvertInputError(f"{path}: not a distributed-optimizer parameter state",
                                expected="per_bucket_numel, per_bucket_numel_unpadded and grad buffers 0, 1, ...",
                                found=f"keys {sorted(map(str, distrib))[:6]}" if isinstance(distrib, dict)
                                else type(distrib).__name__, fix="check --megatron-path")
    padded_all, unpadded_all = distrib["per_bucket_numel"], distrib.get("per_bucket_numel_unpadded")
    if unpadded_all is None:
        raise ConvertInputError(f"{path}: no per_bucket_numel_unpadded",
                                expected="a file saved by Megatron-LM core_r0.6.0", fix="check the Megatron version")
    if len(padded_all) != len(unpadded_all):
        raise ConvertInputError(f"{path}: per_bucket_numel and per_bucket_numel_unpadded disagree",
                                expected=f"{len(padded_all)} grad buffers in both",
                                found=f"{len(padded_all)} and {len(unpadded_all)}",
                                fix="re-copy the file from the training run (damaged?)")
    return [_decode_buffer(distrib, gbuf, padded, unpadded, path)
            for gbuf, (padded, unpadded) in enumerate(zip(padded_all, unpadded_all))]


def _decode_buffer(distrib: dict, gbuf: int, padded: dict, unpadded: dict, path: Path) -> DistribBuffer:
    if len(padded) != 1:
        raise ConvertInputError(f"{path}: grad buffer {gbuf} has {len(padded)} dtype keys {list(padded)}",
                                expected="one (param dtype, grad dtype) key per grad buffer, as core_r0.6.0 saves",
                                found=str(list(padded)), fix="convert a checkpoint saved by Megatron-LM core_r0.6.0")
    [(key, sizes)] = padded.items()
    unpadded_sizes = unpadded.get(key) if isinstance(unpadded, dict) else None
    if unpadded_sizes is None or len(unpadded_sizes) != len(sizes):
        raise ConvertInputError(f"{path}: grad buffer {gbuf} {key}: per_bucket_numel_unpadded",
                                expected=f"{len(sizes)} bucket sizes under the same key as per_bucket_numel",
                                found=repr(unpadded_sizes)[:80],
                                fix="re-copy the file from the training run (damaged?)")
    buffer = distrib.get(gbuf, {}).get(key) if isinstance(distrib.get(gbuf), dict) else None
    if buffer is None:
        raise ConvertInputError(f"{path}: grad buffer {gbuf} {key} has no state",
                                expected="an entry per grad buffer", fix="re-copy the file from the training run")
    for state, tensors in buffer.items():
        lengths = [t.numel() for t in tensors]
        if lengths != list(sizes):
            raise ConvertInputError(f"{path}: grad buffer {gbuf} state {state!r} bucket sizes {lengths}",
                                    expected=f"per_bucket_numel {list(sizes)}", found=str(lengths),
                                    fix="re-copy the file from the training run (damaged?)")
    return DistribBuffer(gbuf, tuple(key), tuple(sizes), tuple(unpadded_sizes), dict(buffer))


def optimizer_param_groups(optimizer: Any) -> list[dict]:
    """The optimizer's param groups as model_optim_rng.pt saved them (the dicts themselves, so a copy
    of the optimizer entry can be updated through them); a MoE run's ChainedOptimizer saves a list
    (dense optimizer, experts' optimizer), whose groups are numbered on in that order."""
    groups = []
    for part in optimizer if isinstance(optimizer, list) else [optimizer]:
        inner = part.get("optimizer", {}) if isinstance(part, dict) else {}
        groups += list(inner.get("param_groups", ())) if isinstance(inner, dict) else []
    return groups
