"""The forward direction's worker when re-sharding: executing one `TargetRankPlan` (one target rank
of the MindSpore layout, gathered from several Megatron folders' distrib_optim.pt -> one MindSpore file
and its copies), then, with --verify, reading the output back with MindSpore (`pt2ckpt_execute.verify_rank`: each
tensor compared with the one assembled again). Writing, copies and the end are the per-folder worker's
(`pt2ckpt_execute.write_outputs`, `rank_outputs`).

Each output tensor is assembled by `reshard.assemble.assemble_tensor` from views of the mmap'd
buckets: a segment reads only its box (row-parallel blocks as strided runs), so a worker holds one
target tensor at a time, whatever the model's size. Replicated parameters are checked equal across
the source tp ranks (or taken per --replica-policy) as they are read.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .manifest import write_manifest
from .megatron import checkpoint as reader
from .megatron.zip_records import BackgroundChecks
from .mindspore.writer import TensorEntry
from .plan import BucketSlice, Gathered, PlannedTensor, Scalar, TargetRankPlan
from .reshard.assemble import assemble_tensor, replica_policy_check
from .pt2ckpt_execute import verify_rank, write_outputs
from .rank_outputs import log_rank_end, mark_complete, verify_if_asked
from .runner import Progress, RankResult, RunSettings, no_progress

log = logging.getLogger(__name__)


class GatheredSources:
    """The target rank's source buckets (mmap'd, CRC-checked in the background) and the tensors
    assembled from them."""

    def __init__(self, plan: TargetRankPlan):
        self.checks = BackgroundChecks()
        self.buffers = [reader.decode_optimizer_part(reader.load_pt(path, background=self.checks), path, element)
                        for path, element in plan.distrib_parts]
        self.check = replica_policy_check(plan.replica_policy, lambda seg: f"source {seg.source} chunk {seg.chunk}")
        self._by_name = {t.name: t for t in plan.tensors}

    def array(self, planned: PlannedTensor) -> np.ndarray:
        source = planned.source
        if isinstance(source, Scalar):
            return np.array(source.value, dtype=planned.dtype).reshape(planned.shape)
        if not isinstance(source, Gathered):
            raise TypeError(f"{planned.name}: a re-sharded rank has no {type(source).__name__} source")
        spans = dict(source.spans)

        def read_flat(seg) -> torch.Tensor:
            return self.flat(spans[(seg.source, seg.chunk, seg.key)])
        out = torch.empty(planned.shape, dtype=getattr(torch, planned.dtype))
        return assemble_tensor(source.tensor, read_flat, out=out, replica_check=self.check).numpy()

    def flat(self, piece: BucketSlice) -> torch.Tensor:
        """A source tensor's elements, 1-D, as a view of its mmap'd bucket."""
        bucket = self.buffers[piece.optimizer][piece.gbuf_idx].states[piece.state][piece.bucket]
        return bucket[piece.start:piece.end]

    def fetch(self, entry: TensorEntry) -> np.ndarray:
        return self.array(self._by_name[entry.name])


def warn_if_differ(what: str, copy: torch.Tensor, embedding: torch.Tensor) -> None:
    """The dropped tied head copy should equal the embedding it was tied to; the embedding is kept."""
    if copy.shape == embedding.shape and torch.equal(copy, embedding):
        return
    # count_nonzero: a bool tensor's sum() would go through an int64 copy of it (8 bytes per element)
    differ = int(torch.count_nonzero(copy != embedding)) if copy.shape == embedding.shape else copy.numel()
    log.warning("%s (the tied head copy, not needed at pp 1) differs from the first stage's embedding in %d of %d "
                "elements; the embedding's values are kept", what, differ, copy.numel())


def execute_target_rank(plan: TargetRankPlan, settings: RunSettings, write: bool = True,
                        progress: Progress = no_progress) -> RankResult:
    """Write one target rank's output and its copies (or, with write=False, only verify a complete
    output an earlier run left), reporting the bytes done to `progress`. An output that fails --verify
    is removed."""
    sources = GatheredSources(plan)
    result = RankResult(plan.folder.name, "skipped")
    if write:
        write_manifest(plan, "writing")
        write_outputs(plan, sources, settings, result, progress)
        mark_complete(plan, result, len(plan.tensors))
    sources.checks.wait()
    for what, copy, embedding in plan.tied_checks:
        warn_if_differ(what, sources.flat(copy), sources.flat(embedding))
    verify_if_asked(plan, result, settings, progress, lambda counter: verify_rank(plan, sources, counter))
    log_rank_end(plan, result)
    return result
