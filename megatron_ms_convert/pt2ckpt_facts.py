"""Reading the facts of the forward direction, at the edge: one Megatron rank folder's metadata as a
`RankInfo` (model tensors' keys, shapes and dtypes, optimizer numbers, bucket sizes). The .pt files
are mmap'd, so no tensor data is read. The mirror of `ckpt2pt_facts`; planning (in `pt2ckpt` and
`pt2ckpt_plan`) is a function of these.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from .errors import ConvertInputError
from .megatron import checkpoint as reader
from .megatron.layout import BucketCounts
from .plan import RankInfo
from .topology import RankFolder


def read_rank_info(folder: RankFolder, need_distrib: bool) -> RankInfo:
    """Metadata of one rank folder; the .pt files are mmap'd, so no tensor data is read."""
    if need_distrib and not folder.distrib_file.is_file():
        raise ConvertInputError(f"{folder.distrib_file}: file is missing",
                                expected="distrib_optim.pt in every mp_rank folder (distributed optimizer)",
                                fix="copy it from the training run, or pass --convert-param-only to convert "
                                    "the model weights alone")
    model_sd = reader.load_pt(folder.model_file)
    if not isinstance(model_sd, dict):
        raise ConvertInputError(f"{folder.model_file}: expected a dict", found=type(model_sd).__name__,
                                fix="check --megatron-path")
    chunk_keys = reader.model_chunk_keys(model_sd, folder.model_file)
    chunk_tensors = tuple(
        tuple((key, tuple(t.shape), str(t.dtype)) for key, t in reader.model_tensors(model_sd[ck]).items())
        for ck in chunk_keys)
    param_groups = tuple(_plain_numbers(g) for g in reader.optimizer_param_groups(model_sd.get("optimizer")))
    iteration = model_sd.get("iteration")
    if iteration is None and folder.path.parent.name == "release":
        iteration = 0  # as Megatron does when it loads a release checkpoint without one
    if not isinstance(iteration, int):
        raise ConvertInputError(f"{folder.model_file}: no iteration number", expected="an int 'iteration' entry",
                                found=repr(iteration)[:40], fix="check --megatron-path")
    info = RankInfo(folder=folder, iteration=iteration, args=model_sd.get("args"), chunk_keys=tuple(chunk_keys),
                    chunk_tensors=chunk_tensors, param_groups=param_groups,
                    scheduler=dict(model_sd.get("opt_param_scheduler") or {}))
    if not need_distrib:
        return info
    distrib = reader.load_pt(folder.distrib_file)
    if not isinstance(distrib, list):
        counts, states = read_bucket_counts(distrib, folder.distrib_file)
        return dataclasses.replace(info, counts=counts, states=states)
    # MoE: [dense, expert]; the dense state is None on ep ranks > 0 (filled in from ep rank 0's folder)
    expert_buffers = reader.decode_optimizer_part(distrib, folder.distrib_file, reader.EXPERT)
    dense_buffers = (reader.decode_optimizer_part(distrib, folder.distrib_file, reader.DENSE)
                     if folder.ep == 0 else [])
    return dataclasses.replace(info, counts=_counts_of(dense_buffers), expert_counts=_counts_of(expert_buffers),
                               states=_common_states(dense_buffers + expert_buffers),
                               dense_distrib_file=folder.distrib_file if folder.ep == 0 else None)


def _plain_numbers(group: dict) -> dict:
    """Optimizer values saved as one-element tensors (capturable optimizers) become plain numbers."""
    return {key: value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
            for key, value in group.items()}


def read_bucket_counts(distrib: Any, path: Path) -> tuple[tuple[BucketCounts, ...], tuple[str, ...]]:
    """Bucket sizes per grad buffer and the optimizer states every buffer holds."""
    buffers = reader.decode_distrib_optim(distrib, path)
    return _counts_of(buffers), _common_states(buffers)


def _counts_of(buffers) -> tuple[BucketCounts, ...]:
    return tuple(BucketCounts(b.gbuf_idx, b.dtype_names, b.padded, b.unpadded) for b in buffers)


def _common_states(buffers) -> tuple[str, ...]:
    return tuple(s for s in (buffers[0].states if buffers else ()) if all(s in b.states for b in buffers))
