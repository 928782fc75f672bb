"""Reading a Megatron-LM core_r0.6.0 checkpoint without Megatron and without running its pickles.

Three things live here: finding the `mp_rank_*` folders (FORMATS.md section 1), loading a `.pt` file
with `torch.load(weights_only=True)` and an allow-list of exactly the globals Megatron pickles
(section 7), and flattening the model state dicts (section 2). Nothing here writes.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import io
import pickle
import re
import sys
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from convert_errors import ConvertInputError

MODEL_FILE = "model_optim_rng.pt"
DISTRIB_FILE = "distrib_optim.pt"
TRACKER_FILE = "latest_checkpointed_iteration.txt"

_RANK_FOLDER = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


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


def load_pt(path: Path, *, mmap: bool = True) -> Any:
    """torch.load a Megatron .pt file safely; mmap'd where the file allows it, so tensors are views
    of the page cache rather than copies. Damaged, truncated and untrusted files raise ConvertInputError."""
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


@dataclass(frozen=True, order=True)
class RankFolder:
    """One `mp_rank_TT[_PPP]` folder: the model files of one (tensor, pipeline) rank."""

    pp: int
    tp: int
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def distrib_file(self) -> Path:
        return self.path / DISTRIB_FILE


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
        text = tracker.read_text().strip()
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


def parse_rank_folder_name(name: str, pp_size: int) -> tuple[int, int] | None:
    """(tp, pp) of an `mp_rank_*` folder name, None when the name is not one; expert-parallel names
    are refused because their optimizer state is a ChainedOptimizer list this tool does not convert."""
    match = _RANK_FOLDER.match(name)
    if not match:
        return None
    tp, second, third = match.group(1), match.group(2), match.group(3)
    if third is not None or (second is not None and pp_size == 1):
        raise ConvertInputError(
            f"folder {name}: looks like an expert-parallel (MoE) rank or a pipeline rank",
            expected="mp_rank_TT for --pp-size 1" if pp_size == 1 else "mp_rank_TT_PPP",
            found=name,
            fix="set --pp-size to the training run's pipeline size (expert parallelism is not supported)",
        )
    if second is None and pp_size > 1:
        raise ConvertInputError(f"folder {name}: has no pipeline rank",
                                expected=f"mp_rank_TT_PPP folders for --pp-size {pp_size}", found=name,
                                fix="set --pp-size 1 or check --megatron-path")
    return int(tp), int(second or 0)


def find_rank_folders(iteration_dir: Path, tp_size: int, pp_size: int) -> list[RankFolder]:
    """Every (tp, pp) folder, checked against --tp-size/--pp-size before any work starts."""
    found: dict[tuple[int, int], Path] = {}
    for entry in sorted(iteration_dir.iterdir()):
        ranks = parse_rank_folder_name(entry.name, pp_size)
        if ranks is None:
            continue
        if not entry.is_dir():
            raise ConvertInputError(f"{entry}: expected a folder", found="a file", fix="check --megatron-path")
        found[ranks] = entry
    expected = {(t, p) for t in range(tp_size) for p in range(pp_size)}
    missing = sorted(expected - found.keys())
    extra = sorted(found.keys() - expected)
    if missing or extra:
        def names(ranks):
            return ", ".join(_folder_name(t, p, pp_size) for t, p in ranks)
        found_text = f"{len(found)} folders"
        if missing:
            found_text += f"; missing {names(missing)}"
        if extra:
            found_text += f"; unexpected {names(extra)}"
        raise ConvertInputError(
            f"{iteration_dir}: rank folders do not match --tp-size {tp_size} --pp-size {pp_size}",
            expected=f"{len(expected)} folders mp_rank_00.. for tp {tp_size} x pp {pp_size}",
            found=found_text,
            fix="set --tp-size/--pp-size to the training run's sizes, or restore the missing folders",
        )
    return sorted(RankFolder(pp=p, tp=t, path=path) for (t, p), path in found.items())


def _folder_name(tp: int, pp: int, pp_size: int) -> str:
    return f"mp_rank_{tp:02d}" if pp_size == 1 else f"mp_rank_{tp:02d}_{pp:03d}"


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
