"""Planning the way back: from the facts (`ckpt2pt_facts.BackFacts`: pt_meta's records, the MindSpore
files' headers and scalars) and the flags, one `BackPlan` per Megatron folder to write. Pure
functions of metadata, like `pt2ckpt_plan`: no file is read.

- At the records' layout (`plan_conversion`): each MindSpore rank file becomes its folder; every tensor
  the Megatron files need is mapped to its MindSpore name and checked there with its shape.
- At another layout, or from MindSpore files the way there re-sharded (`plan_reshard_conversion`):
  `ckpt2pt_reshard.plan_resharded` plans each target folder's tensors from segments of several files.
Both decode the values training changed (iteration, consumed samples, learning rates, scheduler).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .ckpt2pt_facts import BackFacts, MsFileFacts
from .ckpt2pt_reshard import plan_resharded
from .errors import ConvertInputError
from .megatron.checkpoint import optimizer_param_groups
from .megatron.layout import state_key_for
from .megatron.pt_meta import manifest_file_name
from .megatron.writer import OPTIMIZER_STATES, skeleton_specs, target_counts
from .naming import (NamingFacts, is_expert_key, local_expert_index, local_layer_numbers, megatron_name,
                     megatron_state_dict_key, naming_facts, renumber_layers, split_state, stacked_expert_name)
from .plan import BackPlan, BackTarget, RankMeta
from .scalars import EPOCH_NUM, STEP_NUM, decode_number, decode_scheduler, group_scalar, is_number
from .topology import DISTRIB_FILE, MODEL_FILE, RankFolder, Topology, folder_name

if TYPE_CHECKING:
    from .ckpt2pt import Options

MANIFEST_DIR = ".convert_ckpt2pt"


# ---------------------------------------------------------------------------------------------
# Values training changes


def group_updates(ms: MsFileFacts, param_groups: Sequence[dict]) -> tuple[tuple[int, str, Any], ...]:
    """(group, key, value) for each optimizer param-group number MindSpore holds a different value of."""
    out = []
    for i, group in enumerate(param_groups):
        for key, saved in group.items():
            if key == "params" or not is_number(saved):
                continue
            stored = ms.scalar(group_scalar(i, key)[0])
            if stored is not None and decode_number(saved, stored) != saved:
                out.append((i, key, decode_number(saved, stored)))
    return tuple(out)


def scheduler_updates(ms: MsFileFacts, scheduler: dict) -> tuple[tuple[str, Any], ...]:
    """(key, value) for each opt_param_scheduler entry MindSpore holds a different value of."""
    out = []
    for key, saved in scheduler.items():
        stored = ms.scalar(key)
        if stored is None:
            continue
        value = decode_scheduler(key, stored, saved, ms.path)
        if value is not None and value != saved:
            out.append((key, value))
    return tuple(out)


def iteration_of(ms: MsFileFacts, options: "Options") -> int:
    """--iteration, else step_num; a step_num that counts within an epoch (epoch_num != 0) is no iteration."""
    if options.iteration is not None:
        return options.iteration
    step, epoch = ms.scalar(STEP_NUM), ms.scalar(EPOCH_NUM)
    if step is None:
        raise ConvertInputError(f"{ms.path}: no step_num", expected="step_num (the iteration) in the file",
                                fix="pass --iteration N")
    if epoch not in (None, 0):
        raise ConvertInputError(f"{ms.path}: epoch_num is {epoch}, so step_num {step} counts steps within an epoch",
                                expected="epoch_num 0", fix="pass --iteration N (the iteration the run has reached)")
    return int(step)


def consumed_samples(meta: dict, iteration: int, options: "Options", where: Path) -> int | None:
    """args.consumed_train_samples for `iteration`: --consumed-train-samples, or the saved value plus
    the iterations trained since, each of global_batch_size samples. None: keep the saved value."""
    if options.consumed_train_samples is not None:
        return options.consumed_train_samples
    args, saved_iteration = meta.get("args"), meta.get("iteration")
    if iteration == saved_iteration or args is None:
        return None
    if getattr(args, "rampup_batch_size", None):
        raise ConvertInputError(f"{where}: the run ramps up its batch size (rampup_batch_size), so the samples "
                                f"consumed by iteration {iteration} do not follow from it",
                                fix="pass --consumed-train-samples N")
    saved = getattr(args, "consumed_train_samples", 0) or 0
    return saved + (iteration - (saved_iteration or 0)) * args.global_batch_size


# ---------------------------------------------------------------------------------------------
# Names


def megatron_layer(ms_layer: int, noop: Sequence[int]) -> int | None:
    """Megatron's global layer number of a MindSpore global layer number; None for a no-op layer.

    >>> [megatron_layer(i, (1, 3)) for i in range(5)]
    [0, None, 1, None, 2]
    """
    if ms_layer in noop:
        return None
    return ms_layer - sum(1 for n in noop if n < ms_layer)


def ms_name_index(ms: MsFileFacts, facts: NamingFacts, noop: Sequence[int]) -> dict[tuple[str, str], str]:
    """(state, state-dict key with Megatron's global layer numbers) -> name, for every parameter and
    moment in a MindSpore file written in either name style; scalars and no-op layers left out."""
    index = {}
    for name in ms.names():
        if "." not in split_state(name)[1]:
            continue  # step_num, learning_rate_group_0, ...: scalars
        state, megatron = megatron_name(name, facts, where=str(ms.path))
        layers = local_layer_numbers([megatron])
        if layers and megatron_layer(next(iter(layers)), noop) is None:
            continue
        megatron = renumber_layers(megatron, lambda g: megatron_layer(g, noop))
        index[(state, megatron_state_dict_key(megatron, facts))] = name
    return index


def needed_tensors(rank: RankMeta, with_optimizer: bool) -> list[tuple[int, str, str, tuple[int, ...]]]:
    """(chunk, local state-dict key, state, shape) of every tensor the rank's Megatron files take from
    MindSpore: each model parameter's master weight, and with the optimizer its moments."""
    out = {}
    for chunk, skeleton in enumerate(rank.skeletons):
        for key, spec in skeleton_specs(skeleton):
            out[(chunk, key, "param")] = spec.shape
    if with_optimizer:
        for layout in rank.all_layouts():
            for span in layout.params:
                for state in OPTIMIZER_STATES:
                    out[(layout.chunk, state_key_for(span.name), state)] = span.shape
    return [(c, k, s, shape) for (c, k, s), shape in out.items()]


def map_sources(rank: RankMeta, ms: MsFileFacts, topo: Topology, tp_pp: tuple[int, int], options: "Options",
                facts: NamingFacts) -> tuple[tuple[tuple[int, str, str], str], ...]:
    """Each needed tensor's MindSpore name, checked to be there as float32 of the right size."""
    index = ms_name_index(ms, facts, options.noop)
    pp = tp_pp[1]
    out, missing = [], []
    for chunk, key, state, shape in needed_tensors(rank, not options.convert_param_only):
        global_key = renumber_layers(key, topo.layer_map(pp, chunk))
        # a rank's experts are stored stacked under local expert 0's name, local expert k in row k
        row = local_expert_index(global_key) if rank.num_local_experts else None
        name = index.get((state, global_key if row is None else stacked_expert_name(global_key)))
        if name is None:
            missing.append(f"{state} {global_key}")
            continue
        info = ms.info(name)
        want = tuple(shape) if row is None else (rank.num_local_experts, *shape)
        if math.prod(info.shape) != math.prod(want) or info.dtype != "float32" \
                or (row is not None and tuple(info.shape)[:1] != want[:1]):
            raise ConvertInputError(f"{ms.path}: tensor {name} is {info.dtype} {list(info.shape)}",
                                    expected=f"float32 {list(want)} (from {rank.path}"
                                             + (", the rank's experts stacked)" if row is not None else ")"),
                                    found=f"{info.dtype} {list(info.shape)}",
                                    fix="check that --param-map-path is the pt_meta of the run these MindSpore files "
                                        "come from, and --noop" + (" and the rank sizes" if row is not None else ""))
        out.append(((chunk, key, state), (name, row)))
    if missing:
        raise ConvertInputError(f"{ms.path}: {len(missing)} tensors missing, e.g. {', '.join(missing[:3])}",
                                expected=f"every parameter{'' if options.convert_param_only else ' and moment'} of "
                                         f"{rank.path}", found=found_in(ms, index),
                                fix="check --param-map-path (the pt_meta of this run), --noop, the rank sizes" + (
                                    "; or pass --convert-param-only for a file without optimizer state"
                                    if all(not m.startswith("param ") for m in missing) else ""))
    used = {name for _, (name, _row) in out}
    # the dense moments in the file of an ep rank > 0 are copies of ep rank 0's, which its folder saves
    dense_moments_elsewhere = rank.distrib_parts()[0] is None
    unused = [name for (state, key), name in index.items()
              if name not in used and (state == "param" or not (options.convert_param_only or (
                  dense_moments_elsewhere and not is_expert_key(key))))]
    if unused:
        # a parameter the Megatron rank does not have means the two sides disagree on the model
        # (no-op layers, another run): converting anyway would put values at the wrong layers
        raise ConvertInputError(f"{ms.path}: {len(unused)} tensors have no place in {rank.path}'s Megatron rank, "
                                f"e.g. {', '.join(unused[:3])}", expected="exactly this rank's parameters",
                                fix="pass --noop with the MindSpore model's no-op layers, or check --param-map-path "
                                    "and the rank sizes")
    return tuple(out)


def found_in(ms: MsFileFacts, index: dict) -> str:
    """What a file holds, for the message of a file that lacks tensors."""
    if ms.contents:
        return f"{len(index)} parameters and moments in {ms.contents}"
    scalars = [n for n in ms.names() if "." not in n]
    return f"{len(index)} parameters and moments" + (f" (only {len(scalars)} scalars: {', '.join(scalars[:4])}, ...)"
                                                     if not index and scalars else "")


def plan_rank(rank: RankMeta, ms: MsFileFacts, topo: Topology, tp: int, pp: int, options: "Options",
              iteration: int, ep: int = 0) -> BackPlan:
    facts = naming_facts(rank.meta["args"], keys=[k for s in rank.skeletons for k, _ in skeleton_specs(s)])
    sources = map_sources(rank, ms, topo, (tp, pp), options, facts)
    groups = optimizer_param_groups(rank.meta.get("optimizer"))
    plan = folder_plan(rank, ms, (tp, pp, ep), topo.ep_size, options, iteration, group_updates(ms, groups))
    plan = dataclasses.replace(plan, sources=sources)
    return dataclasses.replace(plan, targets=back_targets(rank, plan))


def folder_plan(rank: RankMeta, ms: MsFileFacts, tp_pp_ep: tuple[int, int, int], ep_size: int, options: "Options",
                iteration: int, groups_changed: tuple[tuple[int, str, Any], ...]) -> BackPlan:
    """The plan of output folder (tp, pp, ep) from its rank meta, without its sources: `ms` gives the
    values training changed (iteration, scheduler) and names the folder's MindSpore input."""
    tp, pp, ep = tp_pp_ep
    meta = rank.meta
    args = meta["args"]
    args_updates = []
    consumed = consumed_samples(meta, iteration, options, ms.path)
    if consumed is not None and consumed != getattr(args, "consumed_train_samples", None):
        args_updates.append(("consumed_train_samples", consumed))
    dp_cp = options.dp_size * options.cp_size
    for key, value in (("data_parallel_size", options.dp_size), ("context_parallel_size", options.cp_size),
                       ("world_size", options.tp_size * options.pp_size * options.dp_size * options.cp_size)):
        if getattr(args, key, value) != value:
            args_updates.append((key, value))
    iteration_dir = options.megatron_path / f"iter_{iteration:07d}"
    return BackPlan(
        folder=RankFolder(pp=pp, tp=tp, path=ms.path.parent, ep=ep), source_file=ms.path, fmt=options.fmt,
        pt_meta_file=rank.path, out_dir=iteration_dir / folder_name(tp, pp, options.pp_size, ep, ep_size),
        write_distrib=not options.convert_param_only, dp_cp=dp_cp, sources=(), iteration=iteration,
        args_updates=tuple(args_updates), group_updates=groups_changed,
        scheduler_updates=scheduler_updates(ms, dict(meta.get("opt_param_scheduler") or {})),
        manifest_file=iteration_dir / MANIFEST_DIR / manifest_file_name(tp, pp, ep, ep_size),
        num_chunks=len(rank.skeletons), ep_size=ep_size, bucket=ms.bucket)


def back_targets(rank: RankMeta, plan: BackPlan) -> tuple[BackTarget, ...]:
    """Every tensor the plan writes (what --dry-run prints): each model parameter with its MindSpore
    source, and each optimizer-state bucket with the parameters laid into it (offset: name[row])."""
    sources, reshard = dict(plan.sources), dict(plan.reshard)

    def source_text(chunk: int, key: str, state: str) -> str:
        if reshard:
            return " + ".join(s.describe() for s in reshard[(chunk, key, state)].segments)
        name, row = sources[(chunk, key, state)]
        return name + ("" if row is None else f"[{row}]")

    out = []
    for chunk, skeleton in enumerate(rank.skeletons):
        chunk_key = "model" if len(rank.skeletons) == 1 else f"model{chunk}"
        out += [BackTarget(MODEL_FILE, f"{chunk_key}.{key}", tuple(spec.shape), str(spec.dtype),
                           source_text(chunk, key, "param")) for key, spec in skeleton_specs(skeleton)]
    parts = [part for part in rank.distrib_parts() if part is not None] if plan.write_distrib else []
    for part in parts:
        for gbuf, (layout, target) in enumerate(zip(part.layouts, target_counts(part.counts, plan.padded_for(part)))):
            source = part.counts[gbuf]
            for state in OPTIMIZER_STATES:
                for bucket, numel in enumerate(target.padded):
                    laid = [f"{span.start - source.bucket_start(bucket)}: "
                            + source_text(layout.chunk, state_key_for(span.name), state)
                            for span in layout.params if span.bucket == bucket]
                    out.append(BackTarget(DISTRIB_FILE, f"{part.kind} buffer {gbuf} {target.dtype_key} {state} "
                                          f"bucket {bucket}", (numel,), "torch.float32",
                                          "zeros + " + ", ".join(laid)))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Plans of every folder


@dataclass
class Job:
    plans: list[BackPlan]  # this shard's (all of them without --shard)
    iteration: int
    all_plans: tuple[BackPlan, ...] = ()  # the whole conversion's, to tell when it is complete


def plan_conversion(facts: BackFacts, options: "Options") -> Job:
    """The plans of every rank, from the facts and the flags alone (no file is read)."""
    iteration = common_iteration(facts, options)
    plans = [plan_rank(facts.metas[r], facts.files[r], facts.topology, r[0], r[1], options, iteration, ep=r[2])
             for r in facts.ranks()]
    return Job(plans, iteration)


def common_iteration(facts: BackFacts, options: "Options") -> int:
    """The one iteration every MindSpore file holds (or --iteration)."""
    iterations = {ms.path: iteration_of(ms, options) for ms in facts.files.values()}
    if len(set(iterations.values())) != 1:
        shown = ", ".join(f"{path}: {it}" for path, it in list(iterations.items())[:4])
        raise ConvertInputError(f"the MindSpore files hold different step_num values ({shown})",
                                expected="one iteration", fix="copy every rank's file of the same save, or pass "
                                                              "--iteration N")
    return next(iter(iterations.values()))


def plan_reshard_conversion(facts: BackFacts, options: "Options") -> Job:
    """The plans of every target folder at the flags' layout, from MindSpore files at another layout
    (pt_meta's records', or the one the way there re-sharded them to)."""
    iteration = common_iteration(facts, options)
    ms = facts.files[(0, 0, 0)]

    def plan_folder(rank: RankMeta, coord, ep_size: int, groups_changed) -> BackPlan:
        return folder_plan(rank, ms, (coord.tp, coord.pp, coord.ep), ep_size, options, iteration, groups_changed)
    # a target folder reads several rank_N folders: the log names it by its output folder
    plans = [dataclasses.replace(plan, folder=dataclasses.replace(plan.folder, path=plan.out_dir))
             for plan in plan_resharded(facts, options, plan_folder)]
    return Job([dataclasses.replace(plan, targets=back_targets(plan.rank_meta, plan)) for plan in plans], iteration)
