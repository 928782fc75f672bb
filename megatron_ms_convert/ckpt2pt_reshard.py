"""The way back at another layout: planning Megatron folders at `--tp-size/--pp-size/--vpp-size/
--ep-size` from MindSpore files at another layout -- the one pt_meta's records are at, or the one
the way there re-sharded them to (`pt_meta/layout.json`, `ckpt2pt_facts.WrittenLayout`).

Facts -> plan, metadata only: `recorded_layout` reads the Megatron run's layout off pt_meta's
records; `plan_resharded` plans the re-shard with the one planner, `reshard.plan_reshard` (MindSpore
files' layout as the source, the Megatron target), and gives each target folder a `BackPlan` whose
`rank_meta` is the record of that folder when the target is the records' own layout (a round trip
gets back every byte of its args, rng state and param_groups), else what Megatron r0.6.0 builds at
that layout (`reshard.megatron_target.target_rank_meta`: skeletons, buckets, param_groups, args);
its `reshard` maps each (chunk, state-dict key, state) to the `TargetTensor` assembling it, its
segments' keys resolved to the names in the source files (`source_paths`). The worker
(`ckpt2pt_execute.ReshardSources`) assembles each tensor from those mmap'd files.

rng states cannot be re-sharded: a folder at another layout than the records' carries the record of
folder (tp mod recorded tp, pp mod recorded pp); the log says so.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConvertInputError
from .megatron.checkpoint import load_pt, optimizer_param_groups
from .megatron.pt_meta import args_file_name
from .megatron.writer import skeleton_specs
from .naming import local_layer_numbers, megatron_name, megatron_state_dict_key, naming_facts
from .plan import BackPlan
from .pt2ckpt_reshard import keyed_group_templates, target_groups
from .reshard import MEGATRON, MINDSPORE, ParallelLayout, RankCoord, plan_reshard
from .reshard.megatron_target import (buffer_settings_of, check_megatron_target, check_rules_reproduce,
                                      model_facts_of, target_rank_meta)
from .reshard.param_groups import kind_values, recorded_group_key
from .reshard.placement import TARGET, layer_placement
from .reshard.planner import STATES, TargetTensor

if TYPE_CHECKING:
    from .ckpt2pt import Options
    from .ckpt2pt_facts import BackFacts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecordedLayout:
    """The model-parallel sizes pt_meta's records hold (the Megatron run's layout)."""

    tp: int
    pp: int
    vpp: int
    ep: int
    dp: int = 1
    cp: int = 1


def recorded_layout(param_map_path: Path) -> RecordedLayout | None:
    """The layout of rank 0's pt_meta record; None when there is no record (the caller's checks say so)."""
    for ep_size in (2, 1):  # any ep size > 1 names rank 0's record with _ep000
        path = param_map_path / args_file_name(0, 0, 0, ep_size)
        if path.is_file():
            meta = load_pt(path)
            args = meta.get("args") if isinstance(meta, dict) else None
            if args is None:
                return None
            return RecordedLayout(tp=int(getattr(args, "tensor_model_parallel_size", 1) or 1),
                                  pp=int(getattr(args, "pipeline_model_parallel_size", 1) or 1),
                                  vpp=int(getattr(args, "virtual_pipeline_model_parallel_size", None) or 1),
                                  ep=int(meta.get("ep_size") or 1) if ep_size > 1 else 1,
                                  dp=int(getattr(args, "data_parallel_size", 1) or 1),
                                  cp=int(getattr(args, "context_parallel_size", 1) or 1))
    return None


def target_layout_differs(options: "Options", recorded: RecordedLayout | None) -> bool:
    if recorded is None:
        return False
    wanted = (options.tp_size, options.pp_size, options.vpp_size, options.ep_size or recorded.ep)
    return wanted != (recorded.tp, recorded.pp, recorded.vpp, recorded.ep)


def source_options(options: "Options", recorded: RecordedLayout) -> "Options":
    """The flags as they would read pt_meta's records at their own layout (what `read_facts` takes)."""
    return dataclasses.replace(options, tp_size=recorded.tp, pp_size=recorded.pp, vpp_size=recorded.vpp,
                               ep_size=recorded.ep, num_layers=None, dp_size=options.ms_dp_size,
                               cp_size=options.ms_cp_size)


def records_layout(facts: "BackFacts") -> ParallelLayout:
    """The Megatron run's layout, as pt_meta's records are."""
    topo = facts.topology
    return ParallelLayout(MEGATRON, tp=topo.tp_size, pp=topo.pp_size, vpp=topo.vpp_size, ep=topo.ep_size)


def record_counts(facts: "BackFacts") -> tuple[tuple[int, ...], ...]:
    """Each (chunk, stage)'s layer count as the records hold it."""
    topo = facts.topology
    return tuple(tuple(len(local_layer_numbers([k for k, _ in skeleton_specs(facts.metas[(0, pp, 0)].skeletons[v])]))
                       for pp in range(topo.pp_size)) for v in range(topo.vpp_size))


def mindspore_source_layout(facts: "BackFacts") -> ParallelLayout:
    """The MindSpore files' layout with each (chunk, stage)'s layer count: as layout.json says when the
    way there re-sharded them, else the records'."""
    if facts.written is not None:
        return facts.written.target
    topo = facts.topology
    counts = tuple(n for row in record_counts(facts) for n in row)
    return ParallelLayout(MINDSPORE, tp=topo.tp_size, pp=topo.pp_size, vpp=topo.vpp_size, ep=topo.ep_size,
                          stage_list=counts)


def plan_resharded(facts: "BackFacts", options: "Options", plan_rank) -> list[BackPlan]:
    """One BackPlan per target (tp, pp, ep) folder; `plan_rank(rank_meta, rank, ep_size, group_updates)`
    is the way back's per-folder planner (outputs, args and scheduler updates)."""
    first = facts.metas[(0, 0, 0)]
    args = first.meta["args"]
    keys = [k for s in first.skeletons for k, _ in skeleton_specs(s)]
    naming = naming_facts(args, keys=keys)
    model = model_facts_of(args, keys)
    source = mindspore_source_layout(facts)
    recorded = records_layout(facts)
    target = ParallelLayout(MEGATRON, tp=options.tp_size, pp=options.pp_size, vpp=options.vpp_size,
                            ep=options.ep_size or recorded.ep)
    check_written_model(facts, model)
    if any(f.bucket is not None for f in facts.files.values()):
        raise ConvertInputError(f"{facts.files[(0, 0, 0)].path}: MindSpeed's DistributedOptimizer bucket form",
                                expected="name-keyed MindSpore files to re-shard",
                                fix="convert back at the recorded layout "
                                    f"(--tp-size {source.tp} --pp-size {source.pp} --vpp-size {source.vpp})")
    groups = [g for meta in facts.metas.values() for g in optimizer_param_groups(meta.meta.get("optimizer"))]
    settings = buffer_settings_of(args, options.dp_size, options.cp_size, target.ep)
    # at the records' own layout each folder's record is its structure: args, rng state and param_groups
    # come back as they were, and the rules that build another layout's structure are not needed (nor
    # their limits: Transformer Engine's fused-norm order, a fork's bucket size)
    own_records = at_records_layout(target, recorded, model, facts)
    check_megatron_target(dataclasses.replace(model, te_norms=False) if own_records else model, target, settings,
                          fp16=bool(getattr(args, "fp16", False)))
    if not own_records:
        check_records_follow_rules(facts, model, recorded, groups)
    reshard = plan_reshard(model, source, target)
    paths = {RankCoord(pp, ep, tp): f.path for (tp, pp, ep), f in facts.files.items()}
    names = {rank: file_names(facts.files[(rank.tp, rank.pp, rank.ep)], naming, options.noop) for rank in paths}
    if own_records:
        log.info("re-sharding %s -> %s: the records' own layout; each folder gets its record's args, rng state "
                 "and param_groups", source, target)
    else:
        log.warning("re-sharding %s -> %s: rng states cannot be re-sharded; each target folder carries the rng "
                    "state of the Megatron run's folder (tp mod %d, pp mod %d) (they matter only with dropout)",
                    source, target, recorded.tp, recorded.pp)
    for copy in reshard.dropped:
        log.info("dropping %s's %s (the tied head copy has no place at pipeline size 1)", copy.rank, copy.key)
    plans = []
    kinds = groups_by_kind(facts, reshard)
    for target_rank in reshard.ranks:
        rank = target_rank.rank
        if own_records:
            meta = facts.metas[(rank.tp, rank.pp, rank.ep)]
        else:
            carried = facts.metas[(rank.tp % recorded.tp, rank.pp % recorded.pp, 0)]
            meta = target_rank_meta(carried, groups, model, target, rank, settings)
        tensors = resolved_tensors(target_rank.tensors, names, naming, not options.convert_param_only)
        used = sorted({r for t in tensors.values() for s in t.segments for r in (s.source, *s.replicas)})
        plan = plan_rank(meta, rank, target.ep, target_group_updates(meta.meta, kinds))
        plans.append(dataclasses.replace(plan, rank_meta=meta, reshard=tuple(sorted(tensors.items())),
                                         source_paths=tuple((r, paths[r]) for r in used),
                                         replica_policy=options.replica_policy))
    check_sources(plans, facts.files)
    return plans


def at_records_layout(target: ParallelLayout, recorded: ParallelLayout, model, facts: "BackFacts") -> bool:
    """Whether the target is the layout of pt_meta's records, layer counts included (a fork's uneven
    stages are not what Megatron builds at the same sizes)."""
    if (target.tp, target.pp, target.vpp, target.ep) != (recorded.tp, recorded.pp, recorded.vpp, recorded.ep):
        return False
    return layer_placement(target, model.num_layers, TARGET).counts == record_counts(facts)


def check_written_model(facts: "BackFacts", model) -> None:
    """layout.json's model must be the one the records describe (files and records of one run)."""
    written = facts.written
    if written is not None and written.model != model:
        diff = [f"{k} {v} != {getattr(model, k)}" for k, v in dataclasses.asdict(written.model).items()
                if getattr(model, k) != v]
        raise ConvertInputError(f"{written.path}: the model it was written for differs from the records' "
                                f"({', '.join(diff[:3])})", expected="the model of the records beside it",
                                fix="pass the pt_meta folder of the convert_pt2ckpt.py run that wrote --ms-path")


def check_records_follow_rules(facts: "BackFacts", model, recorded: ParallelLayout, groups: list[dict]) -> None:
    """The rules must rebuild every recorded folder at its own layout before they build another."""
    first = facts.metas[(0, 0, 0)]
    args = first.meta["args"]
    settings = buffer_settings_of(args, int(getattr(args, "data_parallel_size", 1) or 1),
                                  int(getattr(args, "context_parallel_size", 1) or 1), recorded.ep)
    for (tp, pp, ep), meta in facts.metas.items():
        mine = target_rank_meta(first, groups, model, recorded, RankCoord(pp, ep, tp), settings)
        check_rules_reproduce(meta, mine, str(meta.path))


def file_names(ms, naming, noop) -> dict[tuple[str, str], str]:
    """(state, Megatron state-dict key with global layer numbers) -> the name in one MindSpore file."""
    from .ckpt2pt_plan import ms_name_index  # the way back's name index, shared with the same-layout path
    return ms_name_index(ms, naming, noop)


def resolved_tensors(tensors: tuple[TargetTensor, ...], names: dict, naming, with_moments: bool
                     ) -> dict[tuple[int, str, str], TargetTensor]:
    """(chunk, state-dict key, state) -> the TargetTensor, its segments keyed by the names the source
    files hold the state under (checked there as float32 of the planned size)."""
    out = {}
    for tensor in tensors:
        key = megatron_state_dict_key(tensor.key, naming)
        for state in STATES if with_moments else ("param",):
            segments = tuple(dataclasses.replace(s, key=source_name(s, state, names, naming)) for s in tensor.segments)
            out[(tensor.chunk, key, state)] = dataclasses.replace(tensor, segments=segments)
    return out


def source_name(segment, state: str, names: dict, naming) -> str:
    global_key = megatron_state_dict_key(megatron_name(segment.key, naming)[1], naming)
    index = names[segment.source]
    name = index.get((state, global_key))
    if name is None:
        raise ConvertInputError(f"source {segment.source}: no {state} of {global_key}",
                                expected="every parameter and moment the re-shard reads",
                                fix="check --param-map-path (the pt_meta of this run), --noop, or pass "
                                    "--convert-param-only for files without optimizer state")
    return name


def check_sources(plans: list[BackPlan], files: dict) -> None:
    """Every segment's source tensor is in its file as float32 of the planned size."""
    for plan in plans:
        for _, tensor in plan.reshard:
            for s in tensor.segments:
                ms = files[(s.source.tp, s.source.pp, s.source.ep)]
                info = ms.info(s.key)
                if info.dtype != "float32" or math.prod(info.shape) != math.prod(s.source_shape):
                    raise ConvertInputError(f"{ms.path}: tensor {s.key} is {info.dtype} {list(info.shape)}",
                                            expected=f"float32 {list(s.source_shape)}",
                                            found=f"{info.dtype} {list(info.shape)}",
                                            fix="check that --param-map-path is the pt_meta of this run")


def groups_by_kind(facts: "BackFacts", reshard) -> dict[tuple, dict]:
    """The values training changed of each param-group kind (wd_mult, lr_mult, expert, decoupled lr),
    read from every MindSpore file: a target rank's groups are numbered its own way."""
    from .ckpt2pt_plan import group_updates
    out: dict[tuple, dict] = {}
    for key, groups in mindspore_file_groups(facts, reshard).items():
        for i, name, value in group_updates(facts.files[key], groups):
            out.setdefault(recorded_group_key(groups[i]), {})[name] = value
    return out


def mindspore_file_groups(facts: "BackFacts", reshard) -> dict[tuple[int, int, int], list[dict]]:
    """The param groups each MindSpore file numbers (`learning_rate_group_i`, ...): the record's at the
    records' layout; in a file the way there re-sharded, the groups it built for that rank's own
    tensors (`pt2ckpt_reshard.target_groups`: the way there's call of the one rule,
    `reshard.param_groups`)."""
    if facts.written is None:
        return {key: optimizer_param_groups(meta.meta.get("optimizer")) for key, meta in facts.metas.items()}
    first = facts.metas[(0, 0, 0)]
    templates = keyed_group_templates((optimizer_param_groups(meta.meta.get("optimizer"))
                                       for meta in facts.metas.values()), first.path)
    unkeyed = optimizer_param_groups(first.meta.get("optimizer"))
    return {(rank.tp, rank.pp, rank.ep): target_groups(sorted(tensors, key=lambda t: t.chunk), templates, unkeyed,
                                                       facts.files[(rank.tp, rank.pp, rank.ep)].path)
            for rank, tensors in reshard.source_tensors().items()}


def target_group_updates(meta, by_kind: dict[tuple, dict]) -> tuple[tuple[int, str, object], ...]:
    groups = optimizer_param_groups(meta.get("optimizer"))
    return tuple((i, name, value) for i, group in enumerate(groups)
                 for name, value in kind_values(by_kind, recorded_group_key(group)).items())
