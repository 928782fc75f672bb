"""Assembling one target tensor from its source segments: the executor's half of a re-shard plan,
shared by both directions (each supplies how to read a source tensor).

A segment names a box of a source tensor and the box of the target tensor it fills. Only the box's
elements are touched: the source block is taken as `Segment.source_runs()` strided runs of the
source tensor's flat view (a row-parallel column block is one run per row, the rest a single run), so
with mmap'd sources a segment costs the bytes of its box, and memory stays bounded by the target
tensor. The boxes have one shape, but for a stacking axis of length 1 (MindSpore's expert tensors)
that one side adds: the block is reshaped, which keeps row-major order.

Replicated parameters (`Segment.replicas`): the source block is read from the segment's own rank;
`replica_check`, when given, also gets the replicas' blocks and returns what to place (the check for
equality, or a policy). Without it the replicas are not read.

    >>> from megatron_ms_convert.reshard import MEGATRON, MINDSPORE, ModelFacts, ParallelLayout, RankCoord
    >>> from megatron_ms_convert.reshard import plan_reshard
    >>> model = ModelFacts(num_layers=1, hidden=4, heads=2, query_groups=2, ffn=8, padded_vocab=8)
    >>> plan = plan_reshard(model, ParallelLayout(MEGATRON, tp=2), ParallelLayout(MINDSPORE, tp=1))
    >>> target = plan.tensor(RankCoord(), "language_model.encoder.layers.0.attention.out_proj.weight")
    >>> sources = {0: torch.arange(8.), 1: torch.arange(8.) + 100}  # each rank's [4, 2] columns, flat
    >>> assemble_tensor(target, lambda seg: sources[seg.source.tp]).tolist()[0]
    [0.0, 1.0, 100.0, 101.0]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch

from ..errors import ConvertInputError
from ..flags import REPLICA_POLICIES
from .planner import Segment, TargetTensor

ReadFlat = Callable[[Segment], torch.Tensor]
# (segment, its block from segment.source, the blocks of segment.replicas) -> the block to place
ReplicaCheck = Callable[[Segment, torch.Tensor, Sequence[torch.Tensor]], torch.Tensor]


def box_slices(box) -> tuple[slice, ...]:
    return tuple(slice(lo, hi) for lo, hi in box)


def box_shape(box) -> tuple[int, ...]:
    return tuple(hi - lo for lo, hi in box)


def segment_block(segment: Segment, flat: torch.Tensor) -> torch.Tensor:
    """The source box's elements as a tensor of the *target* box's shape, read from `flat` (the whole
    source tensor, 1-D) through its strided runs: a view where the box allows one."""
    numel = math.prod(segment.source_shape)
    if flat.dim() != 1 or flat.numel() != numel:
        raise ValueError(f"{segment.key}: source read as {tuple(flat.shape)}, expected {numel} elements, flat")
    runs = segment.source_runs()
    block = flat.as_strided((runs.count, runs.length), (runs.stride, 1), flat.storage_offset() + runs.offset)
    return block.reshape(box_shape(segment.target_box))


def replica_segment(segment: Segment, rank) -> Segment:
    """The same elements read from replica `rank` (same key, chunk and boxes)."""
    return dataclasses.replace(segment, source=rank, replicas=())


def assemble_tensor(target: TargetTensor, read_flat: ReadFlat, out: torch.Tensor | None = None,
                    replica_check: ReplicaCheck | None = None) -> torch.Tensor:
    """The target tensor (shape `target.shape`) filled from every segment; `read_flat(segment)` gives
    a 1-D view of that segment's whole source tensor (mmap'd: only the box is read). `out`, when
    given, is filled in place (its dtype wins); else a new tensor of the first source's dtype.
    Every target element must be covered exactly once, which the plan guarantees and this checks by
    count."""
    covered = 0
    for segment in target.segments:
        block = segment_block(segment, read_flat(segment))
        if replica_check is not None and segment.replicas:
            copies = [segment_block(segment, read_flat(replica_segment(segment, r))) for r in segment.replicas]
            block = replica_check(segment, block, copies)
        if out is None:
            out = torch.empty(target.shape, dtype=block.dtype)
        place_block(out[box_slices(segment.target_box)], block)
        covered += block.numel()
    if out is None:
        out = torch.empty(target.shape, dtype=torch.float32)
    if tuple(out.shape) != tuple(target.shape) or covered != math.prod(target.shape):
        raise ValueError(f"{target.key}: segments cover {covered} of {math.prod(target.shape)} elements "
                         f"(out shape {tuple(out.shape)}, planned {target.shape})")
    return out


def place_block(target: torch.Tensor, block: torch.Tensor) -> None:
    """target[...] = block. With numpy where both have a numpy dtype: its copy runs in one thread front to
    back, so the kernel's readahead serves the mmap'd source pages in order; torch splits a large copy
    over threads that fault the pages in at several places at once (slower, and on a loaded machine
    the threads wait for each other)."""
    if target.dtype == block.dtype and target.dtype not in _NOT_IN_NUMPY:
        target.numpy()[...] = block.numpy()
    else:
        target.copy_(block)


_NOT_IN_NUMPY = (torch.bfloat16,)


def replica_policy_check(policy: str | None, where: Callable[[Segment], str] = lambda s: s.key) -> ReplicaCheck:
    """The replica handling of `--replica-policy`: None = the copies must be bit-equal (else a
    ConvertInputError saying by how much they differ), "first" = tp rank 0's copy, "mean" = the
    element-wise mean of all copies (in float64, then the block's dtype)."""
    if policy not in (None, *REPLICA_POLICIES):
        raise ValueError(f"replica policy {policy!r}")

    def check(segment: Segment, first: torch.Tensor, copies: Sequence[torch.Tensor]) -> torch.Tensor:
        if policy == "first":
            return first
        if policy == "mean":
            total = first.to(torch.float64)
            for copy in copies:
                total = total + copy.to(torch.float64)
            return (total / (1 + len(copies))).to(first.dtype)
        for rank, copy in zip(segment.replicas, copies):
            if not _bit_equal(first, copy):
                raise replica_mismatch(segment, rank, first, copy, where(segment))
        return first
    return check


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bytes: a NaN equals the same NaN, and -0.0 is not 0.0 (the copies must be the same state)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool((a.contiguous().view(torch.uint8) == b.contiguous().view(torch.uint8)).all()) if a.numel() else True


def replica_mismatch(segment: Segment, rank, first: torch.Tensor, copy: torch.Tensor, where: str) -> ConvertInputError:
    differ = (first != copy) & ~(torch.isnan(first) & torch.isnan(copy))
    diff = (first.to(torch.float64) - copy.to(torch.float64)).abs()
    finite = diff[torch.isfinite(diff)]
    largest = float(finite.max()) if finite.numel() else float("nan")
    return ConvertInputError(
        f"{where}: the replicated copies of {segment.key} on source {segment.source} and {rank} differ",
        expected="equal copies on every source tp rank (a replicated parameter)",
        found=f"{int(differ.sum())} of {first.numel()} elements differ, by up to {largest:.6g}",
        fix="pass --replica-policy first (tp rank 0's copy) or --replica-policy mean (their average)")
