"""The re-sharding plan: for every target rank and every tensor it holds, the source segments its
elements come from. Metadata only: built from the model's facts and the two layouts, printable,
testable without a checkpoint.

One plan entry per *parameter tensor*: the fp32 master and both Adam moments (`exp_avg`,
`exp_avg_sq`) follow the same index map, since Adam is element-wise, so an executor applies each
entry to the three states alike. The map of a parameter is the composition of its tensor-parallel
rule (`rules`), the layer's (stage, chunk) on each side and the expert's ep rank (`placement`).

Tensor keys are each side's own names: Megatron's model-relative `named_parameters()` names with
chunk-local layer numbers (no `module.` wrapper components; the legacy tied head copy is
`word_embeddings.weight`), MindSpore's names with global layer numbers and a rank's experts stacked
on a new axis 0 under the name of local expert 0 (segments then address that axis).

Choices the plan encodes:
- dense parameters (router included) come from source ep rank 0 (the only Megatron folder with the
  dense optimizer state) and go to every target ep rank (each MindSpore rank loads the dense model);
- a replicated parameter is read from source tp rank 0; the other source tp ranks are listed as
  `replicas` of the segment, for the executor to check equal (or average, per the replica policy);
- the tied head copy comes from the source's copy when the source has one (pp > 1), else from the
  source's word embeddings; a source copy with no target copy (target pp 1) is listed in
  `ReshardPlan.dropped`, for the executor to compare with the embedding.

    >>> from megatron_ms_convert.reshard import MEGATRON, ModelFacts
    >>> model = ModelFacts(num_layers=2, hidden=4, heads=2, query_groups=2, ffn=8, padded_vocab=8)
    >>> plan = plan_reshard(model, ParallelLayout(MEGATRON, tp=2), ParallelLayout(MINDSPORE, tp=1))
    >>> qkv = plan.tensor(RankCoord(), "language_model.encoder.layers.1.attention.qkv_proj.weight")
    >>> [(str(s.source), s.key, s.source_box, s.target_box) for s in qkv.segments]  # doctest: +NORMALIZE_WHITESPACE
    [('tp0 pp0 ep0', 'language_model.encoder.layers.1.self_attention.query_key_value.weight', ((0, 6), (0, 4)),
      ((0, 6), (0, 4))),
     ('tp1 pp0 ep0', 'language_model.encoder.layers.1.self_attention.query_key_value.weight', ((0, 6), (0, 4)),
      ((6, 12), (0, 4)))]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..naming import MOMENT_STATES, megatron_name, renumber_layers, stacked_expert_name
from .model import EMBEDDING, HEAD_COPY, WORD_EMBEDDINGS, GlobalParam, ModelFacts, check_fits, check_model, \
    global_params
from .placement import MINDSPORE, SOURCE, TARGET, LayerPlacement, ParallelLayout, RankCoord, \
    expert_owner, layer_placement
from .rules import REP, Box, intersect, local_shape, rank_pieces, to_local

STATES = ("param", *MOMENT_STATES)


@dataclass(frozen=True)
class Strided:
    """Where a box's elements lie in a row-major tensor: `count` runs of `length` contiguous elements,
    the first at element `offset`, each `stride` elements after the previous. A column block of a
    row-parallel weight is one run per row; a row block is a single run."""

    offset: int
    length: int
    count: int
    stride: int


def strided(box: Box, shape: tuple[int, ...]) -> Strided:
    """The runs of `box` in a tensor of `shape` (the boxes of a plan need one level of striding)."""
    partial = [d for d, ((lo, hi), n) in enumerate(zip(box, shape)) if (lo, hi) != (0, n)]
    inner_dim = partial[-1] if partial else 0
    inner = math.prod(shape[inner_dim + 1:])
    length = (box[inner_dim][1] - box[inner_dim][0]) * inner
    offset = sum(lo * math.prod(shape[d + 1:]) for d, (lo, _) in enumerate(box))
    outer = [d for d in range(inner_dim) if box[d][1] - box[d][0] > 1]
    if not outer:
        return Strided(offset, length, 1, length)
    if len(outer) > 1:
        raise ValueError(f"box {box} of {shape} needs more than one level of striding")
    dim = outer[0]
    return Strided(offset, length, box[dim][1] - box[dim][0], math.prod(shape[dim + 1:]))


@dataclass(frozen=True)
class Segment:
    """Elements `source_box` of tensor `key` in chunk `chunk` of source rank `source` (shape
    `source_shape`) go to `target_box` of the target tensor, in row-major order. The boxes have one
    shape, but for the stacking axis (length 1 in the box) that MindSpore's expert tensors add."""

    source: RankCoord
    chunk: int
    key: str
    source_shape: tuple[int, ...]
    source_box: Box
    target_box: Box
    replicas: tuple[RankCoord, ...] = ()  # source ranks holding the same elements under the same key

    @property
    def numel(self) -> int:
        return math.prod(hi - lo for lo, hi in self.source_box)

    def source_runs(self) -> Strided:
        return strided(self.source_box, self.source_shape)

    def describe(self) -> str:
        text = (f"{self.source} chunk{self.chunk} {self.key} {_box_text(self.source_box)} "
                f"-> {_box_text(self.target_box)}")
        return text + (f" (replicas: {', '.join(map(str, self.replicas))})" if self.replicas else "")


@dataclass(frozen=True)
class TargetTensor:
    """One parameter tensor of a target rank (and, under the same map, its two Adam moments)."""

    key: str
    chunk: int
    shape: tuple[int, ...]
    rule: str
    params: tuple[str, ...]  # the global parameters in it: one, or a rank's stacked experts
    segments: tuple[Segment, ...]

    def describe(self) -> str:
        lines = [f"  chunk{self.chunk} {self.key} {list(self.shape)} {self.rule}"]
        lines.extend(f"    <- {s.describe()}" for s in self.segments)
        return "\n".join(lines)


@dataclass(frozen=True)
class TargetRank:
    rank: RankCoord
    tensors: tuple[TargetTensor, ...]

    def describe(self) -> str:
        return "\n".join([f"target {self.rank}:"] + [t.describe() for t in self.tensors])


@dataclass(frozen=True)
class SourceTensor:
    rank: RankCoord
    chunk: int
    key: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ReshardPlan:
    model: ModelFacts
    source: ParallelLayout
    target: ParallelLayout
    source_layers: LayerPlacement
    target_layers: LayerPlacement
    ranks: tuple[TargetRank, ...]
    dropped: tuple[SourceTensor, ...]  # source tensors no target takes: the tied head copy at target pp 1

    def rank(self, rank: RankCoord) -> TargetRank:
        return next(r for r in self.ranks if r.rank == rank)

    def tensor(self, rank: RankCoord, key: str, chunk: int = 0) -> TargetTensor:
        return next(t for t in self.rank(rank).tensors if (t.chunk, t.key) == (chunk, key))

    def describe(self) -> str:
        """The plan as text (what `--dry-run` prints): every target rank's tensors and their sources."""
        lines = [f"re-shard {self.source} -> {self.target}",
                 f"  source stage list {list(self.source_layers.stage_list())}, "
                 f"target stage list {list(self.target_layers.stage_list())} (chunk-major)",
                 f"  each tensor below moves with one index map for {', '.join(STATES)}"]
        lines.extend(f"  dropped: {t.rank} chunk{t.chunk} {t.key}" for t in self.dropped)
        lines.extend(r.describe() for r in self.ranks)
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# One side: where each parameter lives and what it is called there


@dataclass(frozen=True)
class SideView:
    """A layout with its layer counts: where a parameter's tensor is and under which key."""

    model: ModelFacts
    layout: ParallelLayout
    layers: LayerPlacement

    def holds(self, param: GlobalParam) -> bool:
        return param.where != HEAD_COPY or self.layout.pp > 1

    def home(self, param: GlobalParam) -> tuple[int, int, int | None]:
        """(stage, chunk, local layer or None) of a parameter."""
        if param.layer is not None:
            return self.layers.place(param.layer)
        stage, chunk = self.layers.first if param.where == EMBEDDING else self.layers.last
        return stage, chunk, None

    def expert_slot(self, param: GlobalParam) -> tuple[int, int] | None:
        """(ep rank, local expert) of an expert parameter, None for a dense one."""
        if param.expert is None:
            return None
        return expert_owner(param.expert, self.model.num_experts, self.layout.ep)

    def key(self, param: GlobalParam) -> str:
        _, _, local = self.home(param)
        slot = self.expert_slot(param)
        name = param.name if slot is None else _with_expert_index(param.name, slot[1])
        if self.layout.side == MINDSPORE:
            return name if slot is None else stacked_expert_name(name)
        _, megatron = megatron_name(name, self.model.naming())
        return megatron if local is None else renumber_layers(megatron, lambda _: local)

    def shape(self, param: GlobalParam) -> tuple[int, ...]:
        """The tensor's shape at a rank (MindSpore experts: the stacked tensor's)."""
        shape = local_shape(param.rule, param.shape, self.layout.tp)
        if self.layout.side == MINDSPORE and param.expert is not None:
            return (self.model.num_experts // self.layout.ep, *shape)
        return shape

    def prefix(self, param: GlobalParam) -> Box:
        """The box on the stacking axis of a MindSpore expert tensor; empty otherwise."""
        slot = self.expert_slot(param)
        if self.layout.side == MINDSPORE and slot is not None:
            return ((slot[1], slot[1] + 1),)
        return ()

    def ep_ranks(self, param: GlobalParam) -> range:
        slot = self.expert_slot(param)
        return range(self.layout.ep) if slot is None else range(slot[0], slot[0] + 1)


def _with_expert_index(name: str, index: int) -> str:
    parts = name.split(".")
    for i in range(1, len(parts)):
        if parts[i - 1] == "local_experts":
            parts[i] = str(index)
    return ".".join(parts)


def side_tensors(view: SideView, params: tuple[GlobalParam, ...]) -> dict[RankCoord, tuple[SourceTensor, ...]]:
    """Every rank's parameter tensors at a layout (dense ones on every ep rank), in model order: the
    inventory a source's files must match, or a target's files will hold."""
    out: dict[RankCoord, dict[tuple[int, str], SourceTensor]] = {rank: {} for rank in view.layout.ranks()}
    for param in params:
        if not view.holds(param):
            continue
        stage, chunk, _ = view.home(param)
        key = view.key(param)
        for ep in view.ep_ranks(param):
            for tp in range(view.layout.tp):
                rank = RankCoord(stage, ep, tp)
                out[rank].setdefault((chunk, key), SourceTensor(rank, chunk, key, view.shape(param)))
    return {rank: tuple(tensors.values()) for rank, tensors in out.items()}


# ---------------------------------------------------------------------------------------------
# The planner


def plan_reshard(model: ModelFacts, source: ParallelLayout, target: ParallelLayout) -> ReshardPlan:
    """The plan moving a checkpoint at layout `source` to layout `target`; refuses (ConvertInputError)
    a model or layout it cannot move, before anything is read."""
    check_model(model)
    check_fits(model, source)
    check_fits(model, target)
    src = SideView(model, source, layer_placement(source, model.num_layers, SOURCE))
    tgt = SideView(model, target, layer_placement(target, model.num_layers, TARGET))
    params = global_params(model)
    by_name = {p.name: p for p in params}
    # keyed by (chunk, key): with virtual pipelines a Megatron stage has a layer 0 in every chunk
    tensors: dict[RankCoord, dict[tuple[int, str], dict]] = {rank: {} for rank in target.ranks()}
    for param in params:
        if not tgt.holds(param):
            continue
        origin = param if src.holds(param) else by_name[WORD_EMBEDDINGS]
        stage, chunk, _ = tgt.home(param)
        for ep in tgt.ep_ranks(param):
            for tp in range(target.tp):
                entry = tensors[RankCoord(stage, ep, tp)].setdefault(
                    (chunk, tgt.key(param)), {"shape": tgt.shape(param), "rule": param.rule, "params": [],
                                              "segments": []})
                entry["params"].append(param.name)
                entry["segments"].extend(_segments(src, origin, tgt, param, tp))
    ranks = tuple(TargetRank(rank, tuple(
        TargetTensor(key, chunk, e["shape"], e["rule"], tuple(e["params"]),
                     tuple(sorted(e["segments"], key=lambda s: s.target_box)))
        for (chunk, key), e in sorted(by_key.items(), key=lambda item: item[0][0])))
        for rank, by_key in tensors.items())
    return ReshardPlan(model, source, target, src.layers, tgt.layers, ranks, _dropped(src, tgt, params))


def _segments(src: SideView, origin: GlobalParam, tgt: SideView, param: GlobalParam, tgt_tp: int) -> list[Segment]:
    """The segments filling tp rank `tgt_tp`'s tensor of `param` from the source's tensor of `origin`
    (the same parameter, or the word embeddings for a new tied head copy)."""
    stage, chunk, _ = src.home(origin)
    ep = src.ep_ranks(origin)[0]
    key, shape, src_prefix = src.key(origin), src.shape(origin), src.prefix(origin)
    tgt_prefix = tgt.prefix(param)
    source_ranks = [RankCoord(stage, ep, tp) for tp in range(src.layout.tp)]
    if param.rule == REP:
        full = tuple((0, n) for n in param.shape)
        return [Segment(source_ranks[0], chunk, key, shape, src_prefix + full, tgt_prefix + full,
                        tuple(source_ranks[1:]))]
    out = []
    for tgt_piece in rank_pieces(param.rule, param.shape, tgt.layout.tp, tgt_tp):
        for rank in source_ranks:
            for src_piece in rank_pieces(origin.rule, origin.shape, src.layout.tp, rank.tp):
                common = intersect(tgt_piece.global_ranges, src_piece.global_ranges)
                if common is not None:
                    out.append(Segment(rank, chunk, key, shape, src_prefix + to_local(common, src_piece),
                                       tgt_prefix + to_local(common, tgt_piece)))
    return out


def _dropped(src: SideView, tgt: SideView, params: tuple[GlobalParam, ...]) -> tuple[SourceTensor, ...]:
    out = []
    for param in params:
        if src.holds(param) and not tgt.holds(param):
            stage, chunk, _ = src.home(param)
            out.extend(SourceTensor(RankCoord(stage, 0, tp), chunk, src.key(param), src.shape(param))
                       for tp in range(src.layout.tp))
    return tuple(out)


def _box_text(box: Box) -> str:
    return "[" + ", ".join(f"{lo}:{hi}" for lo, hi in box) + "]"
