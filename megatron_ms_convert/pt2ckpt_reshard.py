"""Re-sharding on the way there, planning: the facts of the Megatron folders (already read and
checked per folder by `pt2ckpt`) become a `reshard.ReshardPlan` at the MindSpore run's own layout
(`--ms-*` flags), and that becomes one `TargetRankPlan` per target rank: each output tensor a
`Gathered` source (the planner's segments, each over a bucket slice of some source folder's
distrib_optim.pt, for each optimizer state), plus the target rank's scalars. Metadata only.

Every `--ms-*` flag defaults to the Megatron run's value; when the target layout equals the source's,
`pt2ckpt` takes its ordinary one-folder-per-file path and this module is not used, so outputs stay
byte-identical to a conversion without the flags.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import ConvertInputError
from .naming import model_relative
from .plan import BucketSlice, Gathered, PlannedTensor, RankInfo, RankPlan, TargetFolder, TargetRankPlan
from .pt2ckpt_plan import check_unique_names, optimizer_scalars
from .reshard import MEGATRON, MINDSPORE, ModelFacts, ParallelLayout, RankCoord, ReshardPlan
from .reshard.megatron_target import model_facts_of
from .reshard.param_groups import (GroupKey, group_key, group_templates, is_keyed, mindspeed_param_groups,
                                   no_weight_decay)
from .reshard.placement import TARGET, layer_placement
from .reshard.planner import SourceTensor, TargetTensor
from .topology import Topology

log = logging.getLogger(__name__)

LAYOUT_FILE = "layout.json"  # pt_meta/layout.json: the source and target layouts of a re-shard
LAYOUT_FORMAT = "megatron_ms_convert.reshard_layout"

SpanKey = tuple[RankCoord, int, str]  # (source rank, chunk, model-relative key)


# ---------------------------------------------------------------------------------------------
# Facts -> model and layouts


def model_facts(args: Any, where: Path, keys: Sequence[str] = ()) -> ModelFacts:
    """The model's dimensions and kinds from the training run's saved args (`megatron_target`'s reading,
    shared with the way back); `keys`: the first folder's tensor keys (they tell the norms' spec)."""
    if args is None:
        raise ConvertInputError(f"{where}: no saved args", expected="the training run's args in model_optim_rng.pt",
                                fix="re-sharding needs them; convert at the training layout (drop the --ms-* flags)")
    return model_facts_of(args, keys)


def source_layout(topo: Topology, stage_list_given: bool) -> ParallelLayout:
    return ParallelLayout(MEGATRON, tp=topo.tp_size, pp=topo.pp_size, vpp=topo.vpp_size, ep=topo.ep_size,
                          stage_list=tuple(topo.stage_list) if stage_list_given else ())


def target_layout(options: Any, topo: Topology) -> ParallelLayout:
    """The MindSpore run's layout: each --ms-* flag, or the Megatron run's value. Without --ms-pp-size
    the stages keep the Megatron run's layer counts (so a tp-only change moves no layer); with it,
    MindSpeed's own split unless --ms-stage-list gives one."""
    pp = options.ms_pp_size or topo.pp_size
    vpp = options.ms_vpp_size or (topo.vpp_size if options.ms_pp_size is None else 1)
    stage_list = tuple(options.ms_stage_list or ())
    if not stage_list and pp == topo.pp_size and vpp == topo.vpp_size == 1:
        stage_list = tuple(topo.stage_list)
    return ParallelLayout(MINDSPORE, tp=options.ms_tp_size or topo.tp_size, pp=pp, vpp=vpp,
                          ep=options.ms_ep_size or topo.ep_size, stage_list=stage_list)


def same_layout(source: ParallelLayout, target: ParallelLayout, num_layers: int) -> bool:
    """Whether the target holds every tensor where the source does: then no re-shard is needed."""
    same_sizes = (source.tp, source.pp, source.vpp, source.ep) == (target.tp, target.pp, target.vpp, target.ep)
    if not same_sizes:
        return False
    src_counts = layer_placement(source, num_layers, "source").counts
    return layer_placement(target, num_layers, TARGET).counts == src_counts


def check_target_options(options: Any, target: ParallelLayout, model: ModelFacts) -> None:
    """What the re-sharding path does not take, refused before any output."""
    if options.convert_param_only:
        raise ConvertInputError("--convert-param-only with a re-shard (--ms-* flags)",
                                expected="the optimizer state (re-sharding moves fp32 masters and Adam moments)",
                                found="--convert-param-only", fix="drop --convert-param-only or the --ms-* flags")
    if options.name_style != "mindspeed":
        raise ConvertInputError(f"--name-style {options.name_style} with a re-shard (--ms-* flags)",
                                expected="--name-style mindspeed (the names MindSpeed's model loads)",
                                found=options.name_style, fix="drop --name-style")
    if model.num_experts and options.dp_size % target.ep:
        raise ConvertInputError(f"--dp-size {options.dp_size} with --ms-ep-size {target.ep}",
                                expected=f"a multiple of {target.ep} (MindSpore's ep rank is dp rank mod ep size)",
                                found=str(options.dp_size), fix=f"pass --dp-size {target.ep} or another multiple")
    if model.num_experts and target.ep > 1 and options.cp_size > 1:
        raise ConvertInputError(f"--cp-size {options.cp_size} with --ms-ep-size {target.ep}",
                                expected="--cp-size 1 (MindSpeed-Core-MS refuses expert with context parallelism)",
                                found=str(options.cp_size), fix="pass --cp-size 1")


def check_padded_vocab(model: ModelFacts, infos: Sequence[RankInfo], tp: int) -> None:
    """The saved padded_vocab_size must be what the embedding holds (it is kept, not re-padded)."""
    for info in infos:
        for key, shape, _ in info.chunk_tensors[0]:
            if key.endswith("word_embeddings.weight") and shape[0] * tp != model.padded_vocab:
                raise ConvertInputError(f"{info.folder.model_file}: {key} has {shape[0]} rows at tp {tp}",
                                        expected=f"padded_vocab_size {model.padded_vocab} from the saved args",
                                        found=f"{shape[0] * tp} rows", fix="check --megatron-path")
            return


# ---------------------------------------------------------------------------------------------
# Where each source tensor's optimizer state is


@dataclasses.dataclass(frozen=True)
class SourceSpans:
    """Every source tensor in a grad buffer: (source rank, chunk, key) -> (shape, {state: slice}),
    the slice's `optimizer` an index into `parts` ((distrib_optim.pt, list element or None))."""

    spans: dict
    parts: tuple[tuple[Path, int | None], ...]


def source_spans(plans: Sequence[RankPlan], infos: Sequence[RankInfo], states: Sequence[str]) -> SourceSpans:
    parts: dict[tuple[Path, int | None], int] = {}
    spans: dict[SpanKey, tuple[tuple[int, ...], dict[str, BucketSlice]]] = {}
    for plan, info in zip(plans, infos):
        sources = plan.distrib_sources()
        for optimizer, (layouts, counts) in enumerate(((plan.layouts, info.counts),
                                                       (plan.expert_layouts, info.expert_counts))):
            if not layouts:
                continue
            part = parts.setdefault(sources[optimizer], len(parts))
            rank = RankCoord(plan.folder.pp, plan.folder.ep, plan.folder.tp)
            for gbuf, layout in enumerate(layouts):
                count = counts[gbuf]
                for span in layout.params:
                    base = count.bucket_start(span.bucket)
                    slices = {state: BucketSlice(gbuf, count.dtype_key, state, span.bucket, span.start - base,
                                                 span.end - base, part) for state in states}
                    spans[(rank, layout.chunk, model_relative(span.name))] = (tuple(span.shape), slices)
    return SourceSpans(spans, tuple(parts))


def check_sources_cover(plan: ReshardPlan, spans: SourceSpans, folders: dict) -> None:
    """Every source tensor the re-shard reads must be in a grad buffer of its folder, with its shape."""
    for rank, tensors in plan.source_tensors().items():
        for t in tensors:
            if rank.ep and "local_experts" not in t.key:
                continue  # dense state: only ep rank 0's folder has it
            found = spans.spans.get((rank, t.chunk, t.key))
            if found is None or found[0] != tuple(t.shape):
                where = folders.get(rank, rank)
                raise ConvertInputError(
                    f"{where}: chunk {t.chunk} tensor {t.key} {list(t.shape)} is not in its grad buffers",
                    expected="every parameter of the model the saved args describe, with optimizer state",
                    found="missing" if found is None else f"shape {list(found[0])}",
                    fix="re-sharding needs every parameter trained (no frozen ones, no extra parameters); "
                        "convert at the training layout (drop the --ms-* flags)")


# ---------------------------------------------------------------------------------------------
# Target ranks


def plan_target_ranks(reshard: ReshardPlan, spans: SourceSpans, topo_out: Topology, options: Any,
                      infos: Sequence[RankInfo], folders: dict) -> list[TargetRankPlan]:
    """One plan per target rank (pp, ep, tp): its tensors gathered from the source segments, for each
    state of --dist-opt-content, then its scalars."""
    groups = source_group_templates(infos)
    first = infos[0]
    out = []
    for target in reshard.ranks:
        rank = target.rank
        used: dict[int, int] = {}  # global part index -> this plan's
        tensors = []
        sources = set()
        for t in target.tensors:
            for state in options.dist_opt_content:
                mapped = []
                for seg in t.segments:
                    for src in (seg.source, *seg.replicas):
                        _, slices = spans.spans[(src, seg.chunk, seg.key)]
                        piece = slices[state]
                        piece = dataclasses.replace(piece, optimizer=used.setdefault(piece.optimizer, len(used)))
                        mapped.append(((src, seg.chunk, seg.key), piece))
                        sources.add(folders[src])
                name = t.key if state == "param" else f"{state}.{t.key}"
                tensors.append(PlannedTensor(name, t.shape, "float32", Gathered(t, tuple(dict(mapped).items()))))
        checks = tied_checks(reshard, spans, used) if rank == RankCoord() else ()
        tensors += optimizer_scalars(first.iteration,
                                     target_groups(target.tensors, groups, first.param_groups, first.folder.model_file),
                                     first.scheduler, first.folder.model_file)
        outputs = output_paths(options, topo_out, rank)
        check_unique_names(tensors, outputs[0].parent)
        parts = tuple(spans.parts[i] for i, _ in sorted(used.items(), key=lambda item: item[1]))
        out.append(TargetRankPlan(
            folder=TargetFolder(rank.tp, rank.pp, rank.ep, outputs[0].parent), fmt=options.fmt, outputs=outputs,
            tensors=tuple(tensors), distrib_parts=parts, sources=tuple(sorted(sources)),
            replica_policy=options.replica_policy, tied_checks=checks,
            manifest_file=options.ms_path / "pt_meta" / f"manifest_target_tp{rank.tp:02d}_pp{rank.pp:03d}"
                                                        f"_ep{rank.ep:03d}.json"))
    return out


def tied_checks(reshard: ReshardPlan, spans: SourceSpans, used: dict[int, int]) -> tuple:
    """The dropped tied head copies (target pp 1), each with the source embedding of its tp rank: the
    master weights of the two should be equal in a healthy run (pitfall: a drifted copy)."""
    out = []
    for dropped in reshard.dropped:
        embedding = next(((key, value) for key, value in spans.spans.items()
                          if key[0] == RankCoord(0, 0, dropped.rank.tp) and key[1] == 0
                          and key[2].endswith("embedding.word_embeddings.weight")), None)
        copy = spans.spans.get((dropped.rank, dropped.chunk, dropped.key))
        if embedding is None or copy is None or "param" not in copy[1]:
            continue
        pair = [dataclasses.replace(s, optimizer=used.setdefault(s.optimizer, len(used)))
                for s in (copy[1]["param"], embedding[1][1]["param"])]
        out.append((f"source {dropped.rank} chunk{dropped.chunk} {dropped.key}", *pair))
    return tuple(out)


def output_paths(options: Any, topo: Topology, rank: RankCoord) -> tuple[Path, ...]:
    filename = f"{options.file_prefix}.{options.fmt}"
    return tuple(options.ms_path / f"rank_{r}" / filename
                 for r in topo.target_ranks(rank.tp, rank.pp, options.generate_all_dp_cp, ep=rank.ep))


def target_topology(options: Any, target: ParallelLayout, reshard: ReshardPlan, moe: bool) -> Topology:
    """The MindSpore rank numbers of the target layout (tp-cp-ep-dp-pp, with the target's sizes)."""
    counts = reshard.target_layers.counts
    per_stage = tuple(sum(row[p] for row in counts) for p in range(target.pp))
    return Topology(target.tp, target.pp, options.dp_size, options.cp_size, target.vpp, reshard.model.num_layers,
                    per_stage, ep_size=target.ep, moe=moe)


# ---------------------------------------------------------------------------------------------
# Optimizer param groups of a target rank


def keyed_group_templates(group_lists: Iterable[Sequence[dict]], where: Path | str) -> dict[GroupKey, dict]:
    """Every rank's param groups (one list per Megatron rank) by kind (`param_groups.group_templates`):
    the groups of one kind carry the same hyper-parameters on every rank, only their order differs per
    rank (RESHARDING.md §6.2). Empty for groups that carry no key (an older format). The way back reads
    the same templates off pt_meta's records (`ckpt2pt_reshard.mindspore_file_groups`)."""
    recorded = [group for groups in group_lists for group in groups]
    return group_templates(recorded, str(where)) if is_keyed(recorded) else {}


def source_group_templates(infos: Sequence[RankInfo]) -> dict[GroupKey, dict]:
    """The source folders' `keyed_group_templates`; a run with decoupled-lr groups is refused."""
    templates = keyed_group_templates((info.param_groups for info in infos), infos[0].folder.model_file)
    decoupled = [key for key in templates if key[3]]
    if decoupled:
        # MindSpeed numbers a decoupled group among the others: left out, group i would take another
        # kind's learning rate and weight decay
        raise ConvertInputError(f"{infos[0].folder.model_file}: param groups with is_decoupled_lr",
                                expected="a run without --decoupled-lr", found=f"{len(decoupled)} decoupled groups",
                                fix="re-sharding does not rebuild decoupled-lr groups; convert at the training "
                                    "layout (drop the --ms-* flags)")
    return templates


def target_groups(tensors: Sequence[TargetTensor | SourceTensor], templates: dict[GroupKey, dict],
                  unkeyed: Sequence[dict], where: Path | str) -> list[dict]:
    """The param groups of a MindSpore rank holding `tensors` (the planner's, in model order), as
    MindSpeed-Core-MS builds them at the target layout (`param_groups.mindspeed_param_groups`: one
    group per weight-decay kind in order of first appearance, experts inside them at any ep), each with
    the template's hyper-parameters. MindSpore reads only each group's learning rate and weight decay
    (`learning_rate_group_i`, `weight_decay_group_i`), so copying a source stage's order to a stage
    whose first parameter is of the other kind would swap weight decay between matrices and norms.
    Without keyed groups in the source (an older format), `unkeyed` (the first folder's groups) are
    used as they are. The way back calls it too, to tell which kind each group of a file the way there
    re-sharded is (`ckpt2pt_reshard.mindspore_file_groups`)."""
    if not templates:
        return list(unkeyed)
    return mindspeed_param_groups((tensor_group_key(t) for t in tensors), templates, str(where))


def tensor_group_key(tensor: TargetTensor | SourceTensor) -> GroupKey:
    """A MindSpore rank's tensor's group key; none is decoupled (`source_group_templates` refuses such
    sources, so no re-sharded file has one)."""
    expert = "local_experts" in tensor.key
    shape = tensor.shape[1:] if expert else tensor.shape  # a rank's experts stacked on a new axis 0
    return group_key(no_weight_decay=no_weight_decay(tensor.key, shape), expert_parallel=expert)


# ---------------------------------------------------------------------------------------------
# pt_meta/layout.json


def layout_record(reshard: ReshardPlan, topo_out: Topology, replica_policy: str | None) -> dict:
    """What the way back needs to know about the MindSpore files' layout: both layouts, their layer
    counts, the model, and which MindSpore rank numbers hold which target rank."""
    return {
        "format": LAYOUT_FORMAT, "version": 1,
        "source": dataclasses.asdict(reshard.source), "target": dataclasses.asdict(reshard.target),
        "source_stage_list": list(reshard.source_layers.stage_list()),
        "target_stage_list": list(reshard.target_layers.stage_list()),
        "model": dataclasses.asdict(reshard.model),
        "dp_size": topo_out.dp_size, "cp_size": topo_out.cp_size, "replica_policy": replica_policy,
        "target_ranks": [{"tp": r.rank.tp, "pp": r.rank.pp, "ep": r.rank.ep,
                          "ms_ranks": topo_out.target_ranks(r.rank.tp, r.rank.pp, True, ep=r.rank.ep)}
                         for r in reshard.ranks],
    }


def log_target(reshard: ReshardPlan) -> None:
    """What the MindSpore run must be launched with (a different stage list renames layers silently)."""
    target = reshard.target
    log.info("re-sharding %s -> %s", reshard.source, target)
    log.info("launch the MindSpore run with tp %d, pp %d, vpp %d, ep %d, num_layer_list %s and vocab_size "
             "(padded_vocab_size) %d; rng states are not re-sharded (they matter only with dropout)",
             target.tp, target.pp, target.vpp, target.ep, list(reshard.target_layers.stage_list()),
             reshard.model.padded_vocab)
    for t in reshard.dropped:
        log.info("the tied head copy %s chunk%d %s is not needed at pp %d: dropped (the first stage's embedding "
                 "is kept)", t.rank, t.chunk, t.key, target.pp)
