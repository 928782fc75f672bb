"""Convert per-rank MindSpore checkpoints back into a Megatron-LM core_r0.6.0 checkpoint.

The story, top to bottom, in the same four steps as the way there (`pt2ckpt`): `main` parses the
flags and locks --megatron-path; then
1. facts: `read_facts` reads each rank's pt_meta record (`ckpt2pt_facts.read_rank_meta`) and its
   MindSpore file's header and scalars (`MsFileFacts`), once, into a `BackFacts`;
2. plan: `plan_conversion` maps every tensor the Megatron files need to its MindSpore name, checks
   that it is there with the right shape, decodes the values training changed (`scalars`), and
   builds one `BackPlan` per (tp, pp[, ep]) rank -- all before any output is opened (--dry-run
   prints the plans and stops here);
3. execute: `runner.run_tasks` runs `ckpt2pt_execute.execute_rank` in worker processes, each
   streaming `distrib_optim.pt` (one bucket in memory at a time) and `model_optim_rng.pt` out of the
   mmap'd MindSpore file;
4. verify (--verify): the worker reads its outputs back with torch.load (`verify_rank`).
When every rank is complete the parent writes `latest_checkpointed_iteration.txt`.
`convert_ckpt2pt.py -h` lists every flag.

What comes from where (see docs/ckpt2pt.md): tensors (fp32 master weights, Adam moments, the model
weights as the master weights cast to the run's dtype) and the values training changes come from the
MindSpore file; the structure (nesting, keys, dtype keys, bucket layout) and what MindSpore cannot
carry (args, rng state, flops counter) come from pt_meta.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from .atomic import write_common_file
from .ckpt2pt_execute import execute_rank, work_bytes
from .ckpt2pt_facts import MsFileFacts, read_ms_facts, read_rank_meta
from .ckpt2pt_reshard import plan_resharded, recorded_layout, source_options, target_layout_differs
from .command import (check_against_saved, check_minimum, exit_code,
                      log_verified, reading_inputs, run_command, run_plans, run_settings, summary)
from .errors import ConvertInputError
from .flags import ckpt2pt_parser as build_parser
from .manifest import check_no_foreign_outputs, plan_fingerprint, rank_status
from .megatron.checkpoint import TRACKER_FILE, load_pt, optimizer_param_groups
from .megatron.layout import state_key_for
from .megatron.pt_meta import args_file_name, args_file_pattern, manifest_file_name
from .megatron.writer import OPTIMIZER_STATES, skeleton_specs, target_counts
from .mindspore.bucket_form import BucketSource, describe_source, open_rank_source, rank_source
from .naming import (NamingFacts, is_expert_key, local_expert_index, local_layer_numbers, megatron_name,
                     megatron_state_dict_key, naming_facts, renumber_layers, split_state, stacked_expert_name)
from .plan import BackPlan, BackTarget, RankMeta
from .scalars import EPOCH_NUM, STEP_NUM, decode_number, decode_scheduler, group_scalar, is_number
from .shard import Shard, own_share
from .topology import DISTRIB_FILE, MODEL_FILE, RankFolder, Topology, folder_name

log = logging.getLogger(__name__)

MANIFEST_DIR = ".convert_ckpt2pt"
META_JSON = "meta.json"


# ---------------------------------------------------------------------------------------------
# Flags


@dataclass(frozen=True)
class Options:
    """The flags, checked among themselves (no files looked at yet)."""

    ms_path: Path
    param_map_path: Path
    megatron_path: Path
    tp_size: int
    pp_size: int
    dp_size: int
    cp_size: int
    vpp_size: int
    ms_dp_size: int
    ms_cp_size: int
    num_layers: int | None
    fmt: str
    noop: tuple[int, ...]
    convert_param_only: bool
    process_limit: int
    multiprocess_off: bool
    process_timeout: int
    iteration: int | None
    consumed_train_samples: int | None
    verify: bool
    overwrite: bool
    debug: bool
    shard: Shard | None = None
    check: bool = False
    ep_size: int | None = None
    dry_run: bool = False
    ms_form: str | None = None  # "bucket" / "named": which files of rank folders holding both forms
    opt_shard_info: Path | None = None  # where the bucket form's layout JSON is, when not beside the rank folders


def options_from_args(ns: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Options:
    """The flags as Options; `environ` is the launcher's environment, read by --shard auto."""
    check_minimum(ns, ("tp_size", "pp_size", "dp_size", "cp_size", "vpp_size", "process_limit", "process_timeout",
                       "ms_dp_size", "ms_cp_size", "ep_size"), 1)
    check_minimum(ns, ("iteration", "consumed_train_samples"), 0)
    noop = tuple(sorted(set(ns.noop or ())))
    if noop and noop[0] < 0:
        raise ConvertInputError(f"--noop {' '.join(map(str, ns.noop))}", expected="layer numbers >= 0",
                                fix="list the global layer numbers of the no-op layers")
    return Options(
        ms_path=Path(ns.ms_path).resolve(), param_map_path=Path(ns.param_map_path).resolve(),
        megatron_path=Path(ns.megatron_path).resolve(), tp_size=ns.tp_size, pp_size=ns.pp_size,
        dp_size=ns.dp_size, cp_size=ns.cp_size, vpp_size=ns.vpp_size,
        ms_dp_size=ns.ms_dp_size or ns.dp_size, ms_cp_size=ns.ms_cp_size or ns.cp_size, num_layers=ns.num_layers,
        fmt=ns.src_model_format, noop=noop, convert_param_only=ns.convert_param_only,
        process_limit=ns.process_limit, multiprocess_off=ns.multiprocess_off, process_timeout=ns.process_timeout,
        iteration=ns.iteration, consumed_train_samples=ns.consumed_train_samples, verify=ns.verify,
        overwrite=ns.overwrite, debug=ns.debug, shard=Shard.parse(ns.shard, environ) if ns.shard else None,
        check=ns.check, ep_size=ns.ep_size, dry_run=ns.dry_run, ms_form=ns.ms_form,
        opt_shard_info=Path(ns.opt_shard_info).resolve() if ns.opt_shard_info else None)


# ---------------------------------------------------------------------------------------------
# Finding the inputs


def pick_ms_file(rank_dir: Path, fmt: str) -> Path:
    """The file MindSpeed's own resume would load: the one `meta.json` names (`last_ckpt_file`), else
    the newest `*.ckpt` / `*.safetensors`."""
    if not rank_dir.is_dir():
        raise ConvertInputError(f"{rank_dir}: no such folder",
                                expected="one rank_N folder per (tp, pp) rank, numbered as convert_pt2ckpt numbers "
                                         "them (dp = cp = 0)",
                                fix="check --ms-path and --tp-size/--pp-size/--dp-size/--cp-size (or "
                                    "--ms-dp-size/--ms-cp-size), or copy the missing folder")
    meta_json = rank_dir / META_JSON
    if meta_json.is_file():
        import json
        try:
            named = json.loads(meta_json.read_text()).get("last_ckpt_file")
        except (ValueError, AttributeError):
            named = None
        if named:
            path = rank_dir / Path(named).name
            if path.is_file():
                return path
            log.warning("%s names %s, which is not there; using the newest *.%s instead", meta_json, named, fmt)
    files = [p for p in rank_dir.glob(f"*.{fmt}") if p.is_file()]
    if not files:
        others = sorted(p.name for p in rank_dir.iterdir())[:5]
        raise ConvertInputError(f"{rank_dir}: no *.{fmt} file", expected=f"a MindSpore checkpoint (*.{fmt})",
                                found=", ".join(others) or "an empty folder",
                                fix="check --src-model-format and --ms-path")
    return max(files, key=lambda p: (p.stat().st_mtime_ns, p.name))


def read_source(options: Options, ms_rank: int, rank: "RankMeta") -> tuple[Path, BucketSource | None]:
    """The file of rank_<ms_rank> and, when it is MindSpeed's DistributedOptimizer bucket form, its
    group's inputs (docs/bucket-form.md). That form saves only the dense grad buffers' parameters."""
    path, bucket = rank_source(options.ms_path / f"rank_{ms_rank}", options.ms_path, options.fmt, options.ms_form,
                               options.opt_shard_info, pick_ms_file, options.ms_dp_size * options.ms_cp_size)
    if bucket is not None and rank.num_local_experts:
        raise ConvertInputError(f"{path}: MindSpeed's DistributedOptimizer bucket form of a MoE run ({rank.path})",
                                expected="every expert parameter",
                                found="none: mindspeed_ms hands only the dense grad buffers to its "
                                      "DistributedOptimizer, so expert weights and moments are not saved in this form",
                                fix="convert a name-keyed checkpoint of the run (saved without "
                                    "use_distributed_optimizer)")
    return path, bucket


def pt_meta_file(param_map_path: Path, tp: int, pp: int, ep: int = 0, ep_size: int = 1) -> Path:
    """The record of one source folder: args_tpTT_ppPPP.pt, or args_tpTT_ppPPP_epEEE.pt with expert
    parallelism (one per (tp, pp, ep) folder, as Megatron writes them)."""
    path = param_map_path / args_file_name(tp, pp, ep, ep_size)
    if not path.is_file():
        per_rank = args_file_pattern(ep_size)
        raise ConvertInputError(f"{path}: file is missing",
                                expected=f"the pt_meta folder convert_pt2ckpt.py wrote ({per_rank} per rank)",
                                fix="pass --param-map-path <ms-path of convert_pt2ckpt>/pt_meta, or check "
                                    "--tp-size/--pp-size" + (" (and that no ep folder's record was lost)"
                                                             if ep_size > 1 else ""))
    return path


def recorded_ep_size(options: Options) -> int:
    """The expert parallel size pt_meta records (1 when its records carry no `_epEEE`), checked
    against --ep-size: it decides which records, rank_N folders and output folders there are."""
    first = options.param_map_path / args_file_name(0, 0, 0, ep_size=2)  # any ep size > 1 names it so
    recorded = 1
    if first.is_file():
        meta = load_pt(first)
        recorded = int(meta.get("ep_size") or 0) if isinstance(meta, dict) else 0
        if recorded < 2:
            raise ConvertInputError(f"{first}: ep_size {recorded}", expected="the expert parallel size (2 or more)",
                                    fix="pass the pt_meta folder convert_pt2ckpt.py wrote as --param-map-path")
    if options.ep_size is not None and options.ep_size != recorded:
        raise ConvertInputError(f"--ep-size {options.ep_size} contradicts {options.param_map_path}",
                                expected=f"--ep-size {recorded} (the training run's, as pt_meta records it)",
                                found=str(options.ep_size), fix=f"pass --ep-size {recorded} or drop --ep-size")
    for flag, size in (("--dp-size", options.dp_size), ("--ms-dp-size", options.ms_dp_size)):
        if size % recorded:
            raise ConvertInputError(f"{flag} {size} with expert parallel size {recorded}",
                                    expected=f"a multiple of {recorded} (the expert-parallel group is carved out of "
                                             "the data-parallel one)", found=str(size),
                                    fix=f"pass {flag} {recorded * max(1, size // recorded)} or another multiple of "
                                        f"{recorded}")
    return recorded


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


def iteration_of(ms: MsFileFacts, options: Options) -> int:
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


def consumed_samples(meta: dict, iteration: int, options: Options, where: Path) -> int | None:
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
# Planning


def resolve_topology(options: Options, metas: dict[tuple[int, int, int], RankMeta], ep_size: int = 1) -> Topology:
    """Flags against the saved args; layers per stage from the skeletons (uneven stages need no flag)."""
    first = metas[(0, 0, 0)]
    args = first.meta["args"]
    saved = {"--tp-size": getattr(args, "tensor_model_parallel_size", None),
             "--pp-size": getattr(args, "pipeline_model_parallel_size", None),
             "--vpp-size": getattr(args, "virtual_pipeline_model_parallel_size", None) or 1,
             "--num-layers": getattr(args, "num_layers", None)}
    given = {"--tp-size": options.tp_size, "--pp-size": options.pp_size, "--vpp-size": options.vpp_size,
             "--num-layers": options.num_layers}
    check_against_saved({flag: (given[flag], saved[flag]) for flag in given}, first.path,
                        fix_also=", or the pt_meta of this run as --param-map-path")
    for rank in metas.values():
        if len(rank.skeletons) != options.vpp_size:
            raise ConvertInputError(f"{rank.path}: {len(rank.skeletons)} model chunks",
                                    expected=f"{options.vpp_size} (--vpp-size)", found=str(len(rank.skeletons)),
                                    fix="pass the training run's --vpp-size")
    num_layers = options.num_layers or saved["--num-layers"]
    stage_list = tuple(len(local_layer_numbers([k for k, _ in skeleton_specs(metas[(0, pp, 0)].skeletons[0])]))
                       for pp in range(options.pp_size))
    if options.vpp_size == 1 and num_layers is not None and sum(stage_list) != num_layers:
        raise ConvertInputError(f"--param-map-path {options.param_map_path}: the stages hold {list(stage_list)} layers",
                                expected=f"{num_layers} in all (num_layers)", found=str(sum(stage_list)),
                                fix="pass the pt_meta of this run as --param-map-path")
    return Topology(tp_size=options.tp_size, pp_size=options.pp_size, dp_size=options.ms_dp_size,
                    cp_size=options.ms_cp_size, vpp_size=options.vpp_size, num_layers=num_layers or sum(stage_list),
                    stage_list=stage_list, ep_size=ep_size, moe=first.num_local_experts > 0)


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


def map_sources(rank: RankMeta, ms: MsFileFacts, topo: Topology, tp_pp: tuple[int, int], options: Options,
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


def plan_rank(rank: RankMeta, ms: MsFileFacts, topo: Topology, tp: int, pp: int, options: Options,
              iteration: int, ep: int = 0) -> BackPlan:
    facts = naming_facts(rank.meta["args"], keys=[k for s in rank.skeletons for k, _ in skeleton_specs(s)])
    sources = map_sources(rank, ms, topo, (tp, pp), options, facts)
    groups = optimizer_param_groups(rank.meta.get("optimizer"))
    plan = folder_plan(rank, ms, (tp, pp, ep), topo.ep_size, options, iteration, group_updates(ms, groups))
    plan = dataclasses.replace(plan, sources=sources)
    return dataclasses.replace(plan, targets=back_targets(rank, plan))


def folder_plan(rank: RankMeta, ms: MsFileFacts, tp_pp_ep: tuple[int, int, int], ep_size: int, options: Options,
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


@dataclass
class Job:
    plans: list[BackPlan]  # this shard's (all of them without --shard)
    iteration: int
    all_plans: tuple[BackPlan, ...] = ()  # the whole conversion's, to tell when it is complete


def prepare(options: Options) -> Job:
    """Find -> read pt_meta and scalars -> map names -> plans. Raises ConvertInputError before any
    output exists; a failure to read an input is reported as such, naming the file."""
    return reading_inputs(_prepare, options, "--ms-path / --param-map-path")


def _prepare(options: Options) -> Job:
    recorded = recorded_layout(options.param_map_path) if options.param_map_path.is_dir() else None
    if target_layout_differs(options, recorded):
        job = plan_reshard_conversion(read_facts(source_options(options, recorded)), options)
    else:
        job = plan_conversion(read_facts(options), options)
    return dataclasses.replace(job, plans=[dataclasses.replace(plan, fingerprint=plan_fingerprint(plan))
                                           for plan in job.plans])


@dataclass(frozen=True)
class BackFacts:
    """Everything the way back's planning reads, read once: per (tp, pp, ep) rank its pt_meta record
    and its MindSpore file's header and scalars, and the MindSpore run's layout they imply."""

    topology: Topology
    metas: dict[tuple[int, int, int], RankMeta]
    files: dict[tuple[int, int, int], MsFileFacts]

    def ranks(self) -> list[tuple[int, int, int]]:
        return list(self.metas)


def read_facts(options: Options) -> BackFacts:
    """pt_meta records, then the layout (checked against the flags), then the MindSpore files."""
    if not options.param_map_path.is_dir():
        raise ConvertInputError(f"--param-map-path {options.param_map_path}: no such folder",
                                fix="pass the pt_meta folder convert_pt2ckpt.py wrote")
    ep_size = recorded_ep_size(options)
    ranks = [(tp, pp, ep) for pp in range(options.pp_size) for tp in range(options.tp_size) for ep in range(ep_size)]
    metas = {(tp, pp, ep): read_rank_meta(pt_meta_file(options.param_map_path, tp, pp, ep, ep_size),
                                          not options.convert_param_only, tp, pp, options.vpp_size)
             for tp, pp, ep in ranks}
    topo = resolve_topology(options, metas, ep_size)
    files = {}
    for tp, pp, ep in ranks:
        # ep rank e's experts are in the file of dp rank e (whose ep rank is e mod ep_size), cp 0
        path, bucket = read_source(options, topo.ms_rank(tp, pp, dp=ep), metas[(tp, pp, ep)])
        log.info("rank tp %d pp %d%s: reading %s", tp, pp, f" ep {ep}" if ep_size > 1 else "",
                 describe_source(path, bucket))
        with open_rank_source(path, options.fmt, bucket) as ms:
            if bucket is not None:
                log.debug("%s", ms.layout.describe())
            files[(tp, pp, ep)] = read_ms_facts(ms, bucket)
    return BackFacts(topo, metas, files)


def plan_conversion(facts: BackFacts, options: Options) -> Job:
    """The plans of every rank, from the facts and the flags alone (no file is read)."""
    iteration = common_iteration(facts, options)
    plans = [plan_rank(facts.metas[r], facts.files[r], facts.topology, r[0], r[1], options, iteration, ep=r[2])
             for r in facts.ranks()]
    return Job(plans, iteration)


def common_iteration(facts: BackFacts, options: Options) -> int:
    """The one iteration every MindSpore file holds (or --iteration)."""
    iterations = {facts.files[r].path: iteration_of(facts.files[r], options) for r in facts.ranks()}
    if len(set(iterations.values())) != 1:
        shown = ", ".join(f"{path}: {it}" for path, it in list(iterations.items())[:4])
        raise ConvertInputError(f"the MindSpore files hold different step_num values ({shown})",
                                expected="one iteration", fix="copy every rank's file of the same save, or pass "
                                                              "--iteration N")
    return next(iter(iterations.values()))


def plan_reshard_conversion(facts: BackFacts, options: Options) -> Job:
    """The plans of every target folder at the flags' layout, from MindSpore files at pt_meta's."""
    iteration = common_iteration(facts, options)
    ms = facts.files[(0, 0, 0)]

    def plan_folder(rank: RankMeta, coord, ep_size: int, groups_changed) -> BackPlan:
        return folder_plan(rank, ms, (coord.tp, coord.pp, coord.ep), ep_size, options, iteration, groups_changed)
    # a target folder reads several rank_N folders: the log names it by its output folder
    plans = [dataclasses.replace(plan, folder=dataclasses.replace(plan.folder, path=plan.out_dir))
             for plan in plan_resharded(facts, options, plan_folder)]
    return Job([dataclasses.replace(plan, targets=back_targets(plan.rank_meta, plan)) for plan in plans], iteration)


# ---------------------------------------------------------------------------------------------
# main


def prepare_outputs(options: Options, job: Job) -> tuple[Job, dict]:
    """This shard's share of the whole conversion's plans; which of those an earlier run finished,
    and no foreign outputs among them."""
    mine = own_share(job.plans, options.shard, lambda plan: plan.source_file.stat().st_size)
    job = dataclasses.replace(job, plans=list(mine), all_plans=tuple(job.plans))
    if options.shard is not None:
        log.info("shard %s (%s): %d of the folders", options.shard, options.shard.origin, len(job.plans))
    statuses = {plan.folder: ("todo" if options.overwrite else rank_status(plan)) for plan in job.plans}
    if not options.overwrite:
        check_no_foreign_outputs(job.plans, statuses, flag="--megatron-path", root=options.megatron_path)
    return job, statuses


def write_tracker_when_complete(job: Job, options: Options) -> None:
    """latest_checkpointed_iteration.txt, last: only once every folder of the whole conversion is
    complete (with shards, whichever finishes last writes it; two finishing together write the same
    bytes), so Megatron never finds a tracker pointing at an incomplete iteration."""
    if all(rank_status(plan) == "done" for plan in (job.all_plans or job.plans)):
        write_common_file(options.megatron_path / TRACKER_FILE, str(job.iteration).encode())
        log.info("wrote %s: %d", options.megatron_path / TRACKER_FILE, job.iteration)
    else:
        log.info("not writing %s yet: other shards' folders are not complete (--check tells which)",
                 options.megatron_path / TRACKER_FILE)


def main(argv: Sequence[str] | None = None) -> int:
    """parse, then `run`; returns the exit code."""
    return run(build_parser().parse_args(argv))


def run(ns: argparse.Namespace) -> int:
    """options -> plan -> lock --megatron-path -> run -> tracker file -> report; returns the exit code."""
    return run_command(ns, options_of=lambda ns: options_from_args(ns, os.environ),
                       describe=lambda options: (options.ms_path, options.megatron_path),
                       output_flag="--megatron-path", output_of=lambda options: options.megatron_path,
                       prepare=prepare, prepare_outputs=prepare_outputs, run_and_report=run_and_report)


def run_and_report(job: Job, statuses: dict, options: Options, started: float) -> int:
    """Convert the folders not done yet (verify the done ones with --verify), write the tracker file
    once the whole conversion is complete, log one line per folder and the summary."""
    results, stopped = run_plans(job.plans, statuses, run_settings(options), execute=execute_rank, work=work_bytes,
                                 where=lambda plan: plan.out_dir)
    if stopped is None and all(r.status != "failed" for r in results):
        write_tracker_when_complete(job, options)
    if options.verify and stopped is None:
        log_verified(results)
    summary(results, len(job.plans), started, options.shard)
    return stopped if stopped is not None else exit_code(results)


def cli() -> None:
    """`python -m megatron_ms_convert.ckpt2pt` (the commands enter through convert_ckpt2pt.py)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
