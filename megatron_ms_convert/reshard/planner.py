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
from .placement import MINDSPORE, SOURCE, TARGET, LayerPlacement, ParallelLayout, RankCoord, expert_owner, \
    layer_placement
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

    def source_tensors(self) -> dict[RankCoord, tuple[SourceTensor, ...]]:
        """What every source rank must hold for this plan: check it against the files before reading."""
        return side_tensors(SideView(self.model, self.source, self.source_layers), global_params(self.model))

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
class Located:
    """Where a parameter's tensor is at a layout: the (stage, chunk) of every rank holding it, the ep
    ranks holding it (all of them for a dense parameter), its key and per-rank shape, and `prefix`, the
    box on the stacking axis of a MindSpore expert tensor (empty otherwise)."""

    stage: int
    chunk: int
    ep_ranks: tuple[int, ...]
    key: str
    shape: tuple[int, ...]
    prefix: Box


@dataclass(frozen=True)
class SideView:
    """A layout with its layer counts: where a parameter's tensor is and under which key."""

    model: ModelFacts
    layout: ParallelLayout
    layers: LayerPlacement

    def holds(self, param: GlobalParam) -> bool:
        return param.where != HEAD_COPY or self.layout.pp > 1

    def locate(self, param: GlobalParam) -> Located:
        if param.layer is not None:
            stage, chunk, local = self.layers.place(param.layer)
        else:
            (stage, chunk), local = self.layers.first if param.where == EMBEDDING else self.layers.last, None
        shape = local_shape(param.rule, param.shape, self.layout.tp)
        if param.expert is None:
            return Located(stage, chunk, tuple(range(self.layout.ep)), self._key(param.name, local), shape, ())
        ep, index = expert_owner(param.expert, self.model.num_experts, self.layout.ep)
        name = _with_expert_index(param.name, index)
        if self.layout.side == MINDSPORE:  # a rank's experts stacked on a new axis 0
            stacked = (self.model.num_experts // self.layout.ep, *shape)
            return Located(stage, chunk, (ep,), stacked_expert_name(name), stacked, ((index, index + 1),))
        return Located(stage, chunk, (ep,), self._key(name, local), shape, ())

    def _key(self, ms_name: str, local_layer: int | None) -> str:
        if self.layout.side == MINDSPORE:
            return ms_name
        _, megatron = megatron_name(ms_name, self.model.naming())
        return megatron if local_layer is None else renumber_layers(megatron, lambda _: local_layer)


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
        at = view.locate(param)
        for ep in at.ep_ranks:
            for tp in range(view.layout.tp):
                rank = RankCoord(at.stage, ep, tp)
                out[rank].setdefault((at.chunk, at.key), SourceTensor(rank, at.chunk, at.key, at.shape))
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
    embedding = next(p for p in params if p.name == WORD_EMBEDDINGS)
    # keyed by (chunk, key): with virtual pipelines a Megatron stage has a layer 0 in every chunk
    tensors: dict[RankCoord, dict[tuple[int, str], _Entry]] = {rank: {} for rank in target.ranks()}
    for param in params:
        if not tgt.holds(param):
            continue
        origin = param if src.holds(param) else embedding
        there = tgt.locate(param)
        reader = _SourceReader(origin, src.locate(origin), src.layout.tp)
        for tp in range(target.tp):
            segments = reader.segments(param, there.prefix, target.tp, tp)
            for ep in there.ep_ranks:
                entry = tensors[RankCoord(there.stage, ep, tp)].setdefault(
                    (there.chunk, there.key), _Entry(there.shape, param.rule, [], []))
                entry.params.append(param.name)
                entry.segments.extend(segments)
    ranks = tuple(TargetRank(rank, tuple(
        TargetTensor(key, chunk, e.shape, e.rule, tuple(e.params),
                     tuple(sorted(e.segments, key=lambda s: s.target_box)))
        for (chunk, key), e in sorted(by_key.items(), key=lambda item: item[0][0])))
        for rank, by_key in tensors.items())
    return ReshardPlan(model, source, target, src.layers, tgt.layers, ranks, _dropped(src, tgt, params))


@dataclass
class _Entry:
    """A target tensor while its segments are collected (a stacked expert tensor gathers several)."""

    shape: tuple[int, ...]
    rule: str
    params: list[str]
    segments: list[Segment]


class _SourceReader:
    """The source side of one parameter: its tensor on each source tp rank and the global boxes each
    holds, computed once for all target ranks."""

    def __init__(self, origin: GlobalParam, at: Located, tp_size: int):
        ep = at.ep_ranks[0]  # dense parameters: ep rank 0, the only Megatron folder with their optimizer state
        self.at = at
        self.ranks = tuple(RankCoord(at.stage, ep, tp) for tp in range(tp_size))
        self.pieces = tuple(rank_pieces(origin.rule, origin.shape, tp_size, tp) for tp in range(tp_size))

    def segments(self, param: GlobalParam, target_prefix: Box, target_tp_size: int, target_tp: int) -> list[Segment]:
        """The segments filling target tp rank `target_tp`'s tensor of `param`."""
        at = self.at
        if param.rule == REP:
            full = tuple((0, n) for n in param.shape)
            return [Segment(self.ranks[0], at.chunk, at.key, at.shape, at.prefix + full, target_prefix + full,
                            self.ranks[1:])]
        out = []
        for tgt_piece in rank_pieces(param.rule, param.shape, target_tp_size, target_tp):
            for rank, pieces in zip(self.ranks, self.pieces):
                for src_piece in pieces:
                    common = intersect(tgt_piece.global_ranges, src_piece.global_ranges)
                    if common is not None:
                        out.append(Segment(rank, at.chunk, at.key, at.shape, at.prefix + to_local(common, src_piece),
                                           target_prefix + to_local(common, tgt_piece)))
        return out


def _dropped(src: SideView, tgt: SideView, params: tuple[GlobalParam, ...]) -> tuple[SourceTensor, ...]:
    out = []
    for param in params:
        if src.holds(param) and not tgt.holds(param):
            at = src.locate(param)
            out.extend(SourceTensor(RankCoord(at.stage, 0, tp), at.chunk, at.key, at.shape)
                       for tp in range(src.layout.tp))
    return tuple(out)


def _box_text(box: Box) -> str:
    return "[" + ", ".join(f"{lo}:{hi}" for lo, hi in box) + "]"
