"""Re-sharding: moving a checkpoint to another tensor / pipeline / virtual-pipeline / expert-parallel
layout, optimizer state included. One owner per concern:

- `rules`: each parameter kind's tensor-parallel split rule (a table, as data) and its index arithmetic;
- `placement`: layouts, layer counts per (chunk, stage) on either side, expert ownership;
- `model`: a model's parameters as global tensors, and the models / layouts that are refused;
- `planner`: for every target rank and tensor, the source segments its elements come from;
- `assemble`: a target tensor filled from its segments (both directions' executors use it);
- `param_groups`: each rank's optimizer param_groups in its own order, from per-kind templates (both
  directions);
- `megatron_target`: what Megatron r0.6.0 builds at a target layout (parameter order, grad buffers and
  buckets, each rank's param_groups, state-dict skeleton, args): the way back's structure.

The way there's wiring is `pt2ckpt_reshard` (plans) and `pt2ckpt_reshard_execute` (the worker); the
way back's is `ckpt2pt_reshard` (plans, from MindSpore files at the records' layout or at the one
`pt_meta/layout.json` records) and `ckpt2pt_execute.ReshardSources` (docs/resharding.md).
"""

from .model import ModelFacts, megatron_vocab_divisor
from .placement import MEGATRON, MINDSPORE, ParallelLayout, RankCoord
from .planner import ReshardPlan, Segment, TargetTensor, plan_reshard, side_tensors

__all__ = ["MEGATRON", "MINDSPORE", "ModelFacts", "ParallelLayout", "RankCoord", "ReshardPlan", "Segment",
           "TargetTensor", "megatron_vocab_divisor", "plan_reshard", "side_tensors"]
