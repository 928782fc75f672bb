"""Convert a Megatron-LM core_r0.6.0 distributed-optimizer checkpoint into MindSpore checkpoints.

The story of a conversion, top to bottom, in the same four steps as the way back (`ckpt2pt`):
`main` parses the flags and resolves their paths (--ms-path is locked against a second run once planned); then
1. facts: `read_facts` finds the rank folders and reads their metadata (`pt2ckpt_facts`, mmap'd, no
   tensor data) and the param_map files' layouts, once, into a `SourceFacts`;
2. plan: `plan_conversion` turns facts and options into one `RankPlan` per folder (`pt2ckpt_plan`),
   checking everything before any output is opened (--dry-run prints the plans and stops here);
3. execute: `runner.run_tasks` runs `pt2ckpt_execute.execute_rank` in worker processes, each
   streaming its tensors straight from the mmap'd .pt files into the output file;
4. verify (--verify): the worker reads its output back with MindSpore (`verify_rank`).
The log gets one `... successfully.` line per source folder and a summary. Ctrl-C and SIGTERM stop
the run cleanly (exit 130 / 143). `convert_pt2ckpt.py -h` lists every flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence


from .atomic import write_common_file
from .errors import ConvertInputError
from .flags import pt2ckpt_parser as build_parser
from .command import (check_against_saved, check_minimum, exit_code,
                      log_verified, reading_inputs, run_command, run_plans, run_settings, summary)
from .manifest import check_no_foreign_outputs, plan_fingerprint, rank_status
from .megatron import checkpoint as reader
from .megatron.pt_meta import PT_META_DIR, args_file_name, manifest_file_name
from .naming import NamingFacts, is_expert_key, local_expert_index, naming_facts
from .megatron.layout import (BucketCounts, BufferLayout, check_layouts, expert_param_map_file_name, infer_layouts,
                              layout_differences, list_expert_param_map_files, list_param_map_files,
                              param_map_file_name, param_map_json, read_rank_layouts, state_key_for)
from .plan import RankInfo, RankPlan, TargetRankPlan
from .pt2ckpt_facts import read_rank_info
from .pt2ckpt_execute import execute_rank, work_bytes, write_meta_file
from .pt2ckpt_reshard_execute import execute_target_rank
from .pt2ckpt_plan import (check_layer_counts, check_unique_names, optimizer_scalars, plan_model_tensors,
                           plan_optimizer_tensors, stack_local_experts)
from . import pt2ckpt_reshard as reshard
from .reshard import RankCoord, plan_reshard as reshard_planner
from .shard import Shard, own_share
from .topology import RankFolder, Topology

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Flags


@dataclass(frozen=True)
class Options:
    """The flags, checked for consistency among themselves (no files looked at yet)."""

    megatron_path: Path
    ms_path: Path
    param_map_path: Path | None
    tp_size: int
    pp_size: int
    dp_size: int
    cp_size: int
    vpp_size: int
    stage_list: tuple[int, ...] | None
    num_layers: int | None
    generate_all_dp_cp: bool
    convert_param_only: bool
    file_prefix: str
    fmt: str
    dist_opt_content: tuple[str, ...]
    debug: bool
    multiprocess_off: bool
    process_limit: int
    process_timeout: int
    verify: bool
    overwrite: bool
    save_param_map: Path | None
    trust_layout: str | None = None
    name_style: str = "mindspeed"
    shard: Shard | None = None
    check: bool = False
    ep_size: int | None = None
    dry_run: bool = False
    # the MindSpore run's layout when it differs from the training run's (re-sharding); None = the same
    ms_tp_size: int | None = None
    ms_pp_size: int | None = None
    ms_vpp_size: int | None = None
    ms_stage_list: tuple[int, ...] | None = None
    ms_ep_size: int | None = None
    replica_policy: str | None = None


def options_from_args(ns: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Options:
    """The flags as Options; `environ` is the launcher's environment, read by --shard auto."""
    check_minimum(ns, ("tp_size", "pp_size", "dp_size", "cp_size", "vpp_size", "process_limit", "process_timeout",
                       "ep_size", "ms_tp_size", "ms_pp_size", "ms_vpp_size", "ms_ep_size"), 1)
    if ns.parallel_init_order != "tp-cp-ep-dp-pp":
        raise ConvertInputError(f"--parallel-init-order {ns.parallel_init_order}", expected="tp-cp-ep-dp-pp",
                                fix="drop --parallel-init-order; only tp-cp-ep-dp-pp is supported")
    if ns.stage_list is not None:
        if ns.vpp_size > 1:
            raise ConvertInputError("--stage-list with --vpp-size > 1",
                                    expected="uneven stages only without virtual pipelines",
                                    fix="drop --stage-list (vpp layers are dealt round-robin) or --vpp-size")
        if len(ns.stage_list) != ns.pp_size or min(ns.stage_list) < 1:
            raise ConvertInputError(f"--stage-list {' '.join(map(str, ns.stage_list))}",
                                    expected=f"{ns.pp_size} positive layer counts (one per pipeline stage)",
                                    found=f"{len(ns.stage_list)} numbers", fix="give one count per stage")
    if len(set(ns.dist_opt_content)) != len(ns.dist_opt_content):
        raise ConvertInputError(f"--dist-opt-content {' '.join(ns.dist_opt_content)}", expected="no repeats",
                                fix="name each state once")
    return Options(
        megatron_path=Path(ns.megatron_path), ms_path=Path(ns.ms_path),
        param_map_path=Path(ns.param_map_path) if ns.param_map_path else None,
        tp_size=ns.tp_size, pp_size=ns.pp_size, dp_size=ns.dp_size, cp_size=ns.cp_size, vpp_size=ns.vpp_size,
        stage_list=tuple(ns.stage_list) if ns.stage_list else None, num_layers=ns.num_layers,
        generate_all_dp_cp=ns.generate_all_dp_cp, convert_param_only=ns.convert_param_only,
        file_prefix=ns.file_prefix, fmt=ns.format, dist_opt_content=tuple(ns.dist_opt_content),
        debug=ns.debug, multiprocess_off=ns.multiprocess_off, process_limit=ns.process_limit,
        process_timeout=ns.process_timeout, verify=ns.verify, overwrite=ns.overwrite,
        save_param_map=Path(ns.save_param_map) if ns.save_param_map else None,
        trust_layout=ns.trust_layout,
        name_style=ns.name_style,
        shard=Shard.parse(ns.shard, environ) if ns.shard else None,
        check=ns.check,
        ep_size=getattr(ns, "ep_size", None),
        dry_run=ns.dry_run,
        ms_tp_size=getattr(ns, "ms_tp_size", None), ms_pp_size=getattr(ns, "ms_pp_size", None),
        ms_vpp_size=getattr(ns, "ms_vpp_size", None),
        ms_stage_list=tuple(ns.ms_stage_list) if getattr(ns, "ms_stage_list", None) else None,
        ms_ep_size=getattr(ns, "ms_ep_size", None), replica_policy=getattr(ns, "replica_policy", None),
    )


# ---------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class ExpertParallel:
    """The run's expert parallelism: ep_size (1 without it) and num_experts (None: no MoE)."""

    ep_size: int = 1
    num_experts: int | None = None

    @property
    def moe(self) -> bool:
        return bool(self.num_experts)

    @property
    def num_local_experts(self) -> int:
        return (self.num_experts or 0) // self.ep_size


def resolve_expert_parallel(options: Options, args: Any, where: Path) -> ExpertParallel:
    """The pipeline and expert parallel sizes decide which 3-digit parts the folder names have, so they
    are checked against the saved args (read from `where`) before the folders are listed."""
    saved_pp = getattr(args, "pipeline_model_parallel_size", None)
    saved_ep = getattr(args, "expert_model_parallel_size", None)
    num_experts = getattr(args, "num_experts", None)
    check_against_saved({"--pp-size": (options.pp_size, saved_pp)}, where)
    if options.ep_size is not None and saved_ep is not None and options.ep_size != saved_ep:
        raise ConvertInputError(f"--ep-size {options.ep_size} contradicts {where}",
                                expected=f"--ep-size {saved_ep} (the training run's expert_model_parallel_size)",
                                found=str(options.ep_size), fix=f"pass --ep-size {saved_ep} or drop --ep-size")
    ep_size = options.ep_size or saved_ep or 1
    if ep_size > 1 and not num_experts and args is not None:
        raise ConvertInputError(f"--ep-size {ep_size} for {where}", expected="a MoE run (num_experts in its args)",
                                found="no num_experts", fix="drop --ep-size")
    if num_experts and (num_experts < 2 or num_experts % ep_size):
        raise ConvertInputError(f"{where}: num_experts {num_experts} with expert parallel size {ep_size}",
                                expected="at least 2 experts, divisible by the expert parallel size",
                                found=f"{num_experts} % {ep_size} = {num_experts % ep_size}",
                                fix=f"pass --ep-size {saved_ep}" if saved_ep else
                                    "pass --ep-size with the training run's expert_model_parallel_size")
    target_ep = options.ep_size if options.ms_ep_size is None else options.ms_ep_size
    if target_ep not in (None, ep_size):
        return ExpertParallel(ep_size, num_experts or None)  # dp and cp are the target's: checked with its ep
    if num_experts and options.dp_size % ep_size:
        raise ConvertInputError(f"--dp-size {options.dp_size} with expert parallel size {ep_size}",
                                expected=f"a multiple of {ep_size} (MindSpore's ep rank is dp rank mod ep size)",
                                found=str(options.dp_size),
                                fix=f"pass --dp-size {ep_size * max(1, options.dp_size // ep_size)} "
                                    f"or another multiple of {ep_size}")
    if num_experts and ep_size > 1 and options.cp_size > 1:
        raise ConvertInputError(f"--cp-size {options.cp_size} with expert parallel size {ep_size}",
                                expected="--cp-size 1 (MindSpeed-Core-MS refuses expert with context parallelism)",
                                found=str(options.cp_size), fix="pass --cp-size 1")
    dispatcher = getattr(args, "moe_token_dispatcher_type", None)
    if num_experts and dispatcher not in (None, "alltoall"):
        log.info("note: the run used the %r MoE token dispatcher; MindSpeed-Core-MS has only 'alltoall', which "
                 "routes the same parameters: set it in the MindSpore run", dispatcher)
    return ExpertParallel(ep_size, num_experts or None)


def resolve_topology(options: Options, first: RankInfo, experts: ExpertParallel = ExpertParallel()) -> Topology:
    """Check the flags against the args stored in the checkpoint and fill in what the flags leave open."""
    args = first.args
    check_against_saved({
        "--tp-size": (options.tp_size, getattr(args, "tensor_model_parallel_size", None)),
        "--pp-size": (options.pp_size, getattr(args, "pipeline_model_parallel_size", None)),
        "--vpp-size": (options.vpp_size, getattr(args, "virtual_pipeline_model_parallel_size", None) or 1
                       if args is not None else None),
        "--num-layers": (options.num_layers, getattr(args, "num_layers", None)),
    }, first.folder.model_file)
    if len(first.chunk_keys) != options.vpp_size:
        raise ConvertInputError(f"--vpp-size {options.vpp_size} contradicts {first.folder.model_file}",
                                expected=f"{options.vpp_size} model chunks", found=f"{len(first.chunk_keys)}",
                                fix=f"pass --vpp-size {len(first.chunk_keys)}")
    num_layers = options.num_layers or getattr(args, "num_layers", None)
    if not num_layers:
        raise ConvertInputError(f"{first.folder.model_file}: no num_layers in its args",
                                fix="pass --num-layers")
    stage_list = options.stage_list
    if stage_list is None:
        if num_layers % (options.pp_size * options.vpp_size):
            raise ConvertInputError(
                f"--num-layers {num_layers} is not divisible by --pp-size {options.pp_size}"
                + (f" x --vpp-size {options.vpp_size}" if options.vpp_size > 1 else ""),
                expected="equal pipeline stages", fix="pass --stage-list for uneven stages or check --num-layers")
        stage_list = (num_layers // options.pp_size,) * options.pp_size
    elif sum(stage_list) != num_layers:
        raise ConvertInputError(f"--stage-list {' '.join(map(str, stage_list))} sums to {sum(stage_list)}",
                                expected=f"--num-layers {num_layers}", fix="make the stage counts add up")
    saved_dp = getattr(args, "data_parallel_size", None)
    if saved_dp is not None and saved_dp != options.dp_size:
        log.info("note: --dp-size %d differs from the training run's data_parallel_size %d; MindSpore rank "
                 "numbers follow --dp-size", options.dp_size, saved_dp)
    return Topology(options.tp_size, options.pp_size, options.dp_size, options.cp_size, options.vpp_size,
                    num_layers, tuple(stage_list), ep_size=experts.ep_size, moe=experts.moe)


@dataclass(frozen=True)
class OptimizerPart:
    """The grad buffers of one optimizer of a rank: the dense one, or the experts' in a MoE run."""

    kind: str  # "dense" or "expert"
    chunk_params: tuple  # per model chunk, (key, shape, dtype) of the parameters in these buffers
    counts: tuple[BucketCounts, ...]
    distrib_file: str


def optimizer_parts(info: RankInfo) -> list[OptimizerPart]:
    dense_file = str(info.dense_distrib_file or info.folder.distrib_file)
    parts = [OptimizerPart("dense", tuple(info.dense_tensors()), info.counts, dense_file)]
    if info.expert_counts:
        parts.append(OptimizerPart("expert", tuple(info.expert_tensors()), info.expert_counts,
                                   str(info.folder.distrib_file)))
    return parts


def infer_rank_layouts(info: RankInfo, part: OptimizerPart) -> list[BufferLayout]:
    args = info.args
    wrapped = bool(getattr(args, "fp16", False) or getattr(args, "bf16", False))
    grad_in_fp32 = bool(getattr(args, "accumulate_allreduce_grads_in_fp32", False))
    what = "expert layout" if part.kind == "expert" else "layout"
    return infer_layouts(part.chunk_params, part.counts, grad_in_fp32=grad_in_fp32, wrapped=wrapped,
                         source=f"{what} inferred from {info.folder.model_file}")


def mapped_layouts(info: RankInfo, options: Options, map_files,
                   expert_map_files=None) -> tuple[tuple[BufferLayout, ...] | None, ...]:
    """Facts: per optimizer part of the rank (dense, then the experts'), the layouts its param_map
    files give, or None where no map is used for it (then the layout is inferred). Expert buffers use
    the expert param_map files when the folder has any (the documented patch records none)."""
    out = []
    for part in optimizer_parts(info):
        files = map_files if part.kind == "dense" else expert_files_of(info, expert_map_files, options)
        out.append(None if files is None else tuple(read_rank_layouts(files, info.folder.tp, info.folder.pp,
                                                                      len(info.chunk_keys), options.param_map_path)))
    return tuple(out)


def rank_layouts(info: RankInfo, options: Options,
                 mapped: Sequence[Sequence[BufferLayout] | None]) -> tuple[list[BufferLayout], list[BufferLayout]]:
    """The bucket layouts of one rank, dense and (MoE) expert ones: the param_map's when given
    (`mapped`, from mapped_layouts), cross-checked against the layout the checkpoint itself implies;
    the inferred one otherwise. A map and an inferred layout that both pass every check yet differ
    mean one of them is wrong, so that is an error unless --trust-layout says which to believe."""
    tensors = [info.tensors_by_key(c) for c in range(len(info.chunk_keys))]
    out = []
    for part, given in zip(optimizer_parts(info), mapped):
        if given is None:
            layouts = infer_rank_layouts(info, part)
            check_layouts(layouts, part.counts, tensors, part.distrib_file)
        else:
            layouts = list(given)
            check_layouts(layouts, part.counts, tensors, part.distrib_file)
            check_map_against_checkpoint(layouts, info, tensors, options.trust_layout, part)
        out.append(layouts)
    dense, expert = (out + [[]])[:2]
    warn_unmapped_tensors(dense + expert, info)
    return dense, expert


def expert_files_of(info: RankInfo, expert_map_files, options: Options):
    """This ep rank's expert param_map files, None when the folder holds no expert maps at all."""
    if not expert_map_files:
        return None
    files = expert_map_files.get(info.folder.ep)
    if files is None:
        raise ConvertInputError(
            f"--param-map-path {options.param_map_path}: no param_map_expert_buffer*_ep{info.folder.ep}* files",
            expected=f"expert param_map files for every ep rank (ep {info.folder.ep} of {info.folder.name})",
            found=f"files for ep ranks {sorted(expert_map_files)}",
            fix="restore the missing files, or delete all param_map_expert_buffer* files to infer the expert layout")
    return files


def check_map_against_checkpoint(layouts: Sequence[BufferLayout], info: RankInfo, tensors, trust: str | None,
                                 part: OptimizerPart) -> None:
    try:
        inferred = infer_rank_layouts(info, part)
        check_layouts(inferred, part.counts, tensors, part.distrib_file)
    except ConvertInputError as err:  # e.g. a frozen parameter: only the map knows the layout
        log.warning("%s: the layout cannot be inferred to cross-check the param_map, which is used as given (%s)",
                    info.folder.model_file, err)
        return
    differences = layout_differences(layouts, inferred)
    if not differences:
        return
    shown = "; ".join(differences[:5]) + (f"; and {len(differences) - 5} more" if len(differences) > 5 else "")
    if trust == "map":
        for line in differences[:10]:
            log.warning("param_map differs from the checkpoint's own layout (--trust-layout map): %s", line)
        return
    raise ConvertInputError(
        f"{info.folder.model_file}: the param_map and the layout this checkpoint implies differ in "
        f"{len(differences)} places, and both fit distrib_optim.pt: {shown}",
        expected="one layout", found="two that would give different values",
        fix="pass --trust-layout map (the map is this run's, e.g. a custom bucketing) or --trust-layout checkpoint "
            "(the map is stale or foreign)")


def warn_unmapped_tensors(layouts: Sequence[BufferLayout], info: RankInfo) -> None:
    mapped = {state_key_for(p.name) for layout in layouts for p in layout.params}
    unmapped = [key for tensors in info.chunk_tensors for key, _, _ in tensors if key not in mapped]
    if unmapped:
        log.warning("%s: %d model tensors are in no grad buffer (frozen?) and get no optimizer state in the "
                    "output: %s", info.folder.model_file, len(unmapped), ", ".join(unmapped[:5]))


def warn_position_table_rows(infos: Sequence[RankInfo]) -> None:
    """MindSpeed-Core-MS sizes the learned position-embedding table by seq_length, Megatron by
    max_position_embeddings: a MindSpore run with other rows than the checkpoint fails to load it."""
    for info in infos:
        for chunk in info.chunk_tensors:
            for key, shape, _ in chunk:
                if key.endswith("position_embeddings.weight"):
                    seq_length = getattr(info.args, "seq_length", None)
                    if seq_length is not None and shape[0] != seq_length:
                        log.warning("%s: %s has %d rows (max_position_embeddings) but the run's seq_length is %d; "
                                    "MindSpeed-Core-MS sizes this table by seq_length, so the MindSpore run must "
                                    "use seq_length %d to load it", info.folder.model_file, key, shape[0],
                                    seq_length, shape[0])
                    return


def output_paths(options: Options, topo: Topology, folder: RankFolder) -> tuple[Path, ...]:
    filename = f"{options.file_prefix}.{options.fmt}"
    return tuple(options.ms_path / f"rank_{rank}" / filename
                 for rank in topo.target_ranks(folder.tp, folder.pp, options.generate_all_dp_cp, ep=folder.ep))


def plan_rank(info: RankInfo, topo: Topology, options: Options, layouts: Sequence[BufferLayout],
              facts: NamingFacts, expert_layouts: Sequence[BufferLayout] = (),
              experts: ExpertParallel = ExpertParallel()) -> RankPlan:
    check_layer_counts(info, topo)
    if options.convert_param_only:
        tensors, name_lists = plan_model_tensors(info, topo, facts)
    else:
        tensors = plan_optimizer_tensors(info, layouts, topo, options.dist_opt_content, facts, expert_layouts)
        name_lists = None
    if experts.moe:
        tensors = stack_local_experts(tensors, experts.num_local_experts, info.folder.model_file)
    tensors = tensors + optimizer_scalars(info.iteration, info.param_groups, info.scheduler, info.folder.model_file)
    check_unique_names(tensors, info.folder.path)
    rank = (info.folder.tp, info.folder.pp, info.folder.ep, topo.ep_size)
    moe = ((("ep_rank", info.folder.ep), ("ep_size", experts.ep_size), ("num_local_experts", experts.num_local_experts))
           if experts.moe else ())
    distrib_parts = (((info.dense_distrib_file, reader.DENSE), (info.folder.distrib_file, reader.EXPERT))
                     if info.expert_counts and not options.convert_param_only else ())
    return RankPlan(folder=info.folder, fmt=options.fmt, outputs=output_paths(options, topo, info.folder),
                    meta_file=options.ms_path / PT_META_DIR / args_file_name(*rank), tensors=tuple(tensors),
                    reads_distrib=not options.convert_param_only, param_name_list=name_lists,
                    layouts=tuple(layouts), manifest_file=options.ms_path / PT_META_DIR / manifest_file_name(*rank),
                    distrib_parts=distrib_parts, expert_layouts=tuple(expert_layouts), moe=moe)


@dataclass
class Job:
    plans: list  # RankPlan per source folder; TargetRankPlan per target rank when re-sharding
    param_map_files: dict | None
    first_args: Any
    topology: Topology | None = None
    # re-sharding: the plan, the per-folder plans (for pt_meta's records) and the target's rank numbers
    reshard: Any = None
    folder_plans: list = dataclasses.field(default_factory=list)
    target_topology: Topology | None = None

    @property
    def source_plans(self) -> list[RankPlan]:
        """One plan per source folder (pt_meta's records and param_map copies are per folder)."""
        return self.folder_plans if self.reshard is not None else self.plans


def prepare(options: Options) -> Job:
    """Discover -> read metadata -> layouts -> plans. Raises ConvertInputError before any output exists;
    a failure to read an input (permissions, I/O error) is reported as such, naming the file."""
    return reading_inputs(_prepare, options, "--megatron-path / --param-map-path")


def _prepare(options: Options) -> Job:
    job = plan_conversion(read_facts(options), options)
    return dataclasses.replace(job, plans=[dataclasses.replace(plan, fingerprint=plan_fingerprint(plan))
                                           for plan in job.plans])


@dataclass(frozen=True)
class SourceFacts:
    """Everything the forward planning reads, read once: the saved args, the expert parallelism they
    imply, each rank folder's metadata, and (per folder and optimizer part) the layouts the given
    param_map files hold (None where the layout is to be inferred)."""

    iteration_dir: Path
    args: Any
    experts: ExpertParallel
    infos: tuple[RankInfo, ...]
    mapped: tuple[tuple[tuple[BufferLayout, ...] | None, ...], ...] = ()
    param_map_files: Any = None  # the param_map files found (None: no map used), copied into pt_meta/


def read_facts(options: Options) -> SourceFacts:
    """Folders (named by the pipeline and expert parallel sizes, checked against the saved args),
    their metadata, and the param_map files' layouts."""
    iteration_dir = reader.resolve_iteration_dir(options.megatron_path)
    args, args_file = reader.saved_args_of(iteration_dir)
    experts = resolve_expert_parallel(options, args, args_file or iteration_dir)
    folders = reader.find_rank_folders(iteration_dir, options.tp_size, options.pp_size, experts.ep_size)
    need_distrib = not options.convert_param_only
    use_map = need_distrib and options.param_map_path is not None and options.trust_layout != "checkpoint"
    map_files = list_param_map_files(options.param_map_path) if use_map else None
    expert_map_files = list_expert_param_map_files(options.param_map_path) if use_map else None
    infos = [read_rank_info(folder, need_distrib) for folder in folders]
    if experts.ep_size > 1 and need_distrib:
        infos = with_dense_state_of_ep_rank_0(infos)
    mapped = tuple(mapped_layouts(info, options, map_files, expert_map_files) if need_distrib else ()
                   for info in infos)
    return SourceFacts(iteration_dir, args, experts, tuple(infos), mapped, map_files)


def plan_conversion(facts: SourceFacts, options: Options) -> Job:
    """The plans of every rank folder, from the facts and the flags alone (no file is read)."""
    infos, experts = facts.infos, facts.experts
    topo = resolve_topology(options, infos[0], experts)
    iterations = {info.iteration for info in infos}
    if len(iterations) != 1:
        raise ConvertInputError(f"{facts.iteration_dir}: rank folders hold different iterations {sorted(iterations)}",
                                expected="one iteration", fix="copy all folders from the same checkpoint")
    facts_of_names = naming_facts(infos[0].args, options.name_style,
                                  keys=[key for tensors in infos[0].chunk_tensors for key, _, _ in tensors])
    warn_position_table_rows(infos)
    plans = []
    for info, mapped in zip(infos, facts.mapped):
        check_expert_keys(info, experts)
        layouts, expert_layouts = rank_layouts(info, options, mapped) if mapped else ([], [])
        plans.append(plan_rank(info, topo, options, layouts, facts_of_names, expert_layouts, experts))
    job = Job(plans, facts.param_map_files, infos[0].args, topo)
    return plan_resharding(job, facts, options) if resharding_requested(options) else job


def resharding_requested(options: Options) -> bool:
    return any(value is not None for value in (options.ms_tp_size, options.ms_pp_size, options.ms_vpp_size,
                                               options.ms_stage_list, options.ms_ep_size))


def plan_resharding(job: Job, facts: SourceFacts, options: Options) -> Job:
    """The --ms-* flags: the per-folder plans (already checked) become per-target-rank plans, unless
    the target layout is the source's after all (then the job is today's, byte for byte)."""
    topo = job.topology
    source = reshard.source_layout(topo, options.stage_list is not None)
    target = reshard.target_layout(options, topo)
    if reshard.same_layout(source, target, topo.num_layers):
        log.info("the --ms-* flags give the training run's own layout: converting without re-sharding")
        return job
    model = reshard.model_facts(facts.args, facts.iteration_dir,
                                [key for tensors in facts.infos[0].chunk_tensors for key, _, _ in tensors])
    if model.num_layers != topo.num_layers:
        raise ConvertInputError(f"{facts.iteration_dir}: num_layers {model.num_layers} in the saved args",
                                expected=f"--num-layers {topo.num_layers}", found=str(model.num_layers),
                                fix="check --num-layers")
    reshard.check_target_options(options, target, model)
    reshard.check_padded_vocab(model, facts.infos, topo.tp_size)
    plan = reshard_planner(model, source, target)
    folders = {RankCoord(p.folder.pp, p.folder.ep, p.folder.tp): p.folder.path for p in job.plans}
    spans = reshard.source_spans(job.plans, facts.infos, options.dist_opt_content)
    reshard.check_sources_cover(plan, spans, folders)
    target_topo = reshard.target_topology(options, target, plan, bool(model.num_experts))
    plans = reshard.plan_target_ranks(plan, spans, target_topo, options, facts.infos, folders)
    return dataclasses.replace(job, plans=plans, reshard=plan, folder_plans=job.plans, target_topology=target_topo)


def with_dense_state_of_ep_rank_0(infos: Sequence[RankInfo]) -> list[RankInfo]:
    """Expert parallelism: only ep rank 0's folder holds the dense optimizer state of its (tp, pp); the
    other ep ranks' folders take their dense bucket sizes (and file) from it."""
    dense = {(i.folder.tp, i.folder.pp): i for i in infos if i.folder.ep == 0}
    out = []
    for info in infos:
        first = dense[(info.folder.tp, info.folder.pp)]
        if info.folder.ep != 0:
            info = dataclasses.replace(info, counts=first.counts, dense_distrib_file=first.dense_distrib_file,
                                       states=tuple(s for s in info.states if s in first.states))
        if not info.expert_counts:
            raise ConvertInputError(f"{info.folder.distrib_file}: holds no expert optimizer state",
                                    expected="a list [dense state, expert state] (expert parallel size > 1)",
                                    found="a single optimizer state", fix="check --megatron-path")
        out.append(info)
    return out


def check_expert_keys(info: RankInfo, experts: ExpertParallel) -> None:
    """The expert parameters of a folder must be exactly its num_experts / ep_size local experts."""
    found = {local_expert_index(key) for tensors in info.chunk_tensors for key, _, _ in tensors if is_expert_key(key)}
    if not experts.moe:
        if found:
            raise ConvertInputError(f"{info.folder.model_file}: holds expert parameters",
                                    expected="no experts (the saved args have no num_experts)",
                                    found=f"{len(found)} local experts", fix="check --megatron-path")
        return
    if found != set(range(experts.num_local_experts)):
        raise ConvertInputError(
            f"{info.folder.model_file}: local experts {sorted(found, key=str)}",
            expected=f"local experts 0..{experts.num_local_experts - 1} (num_experts {experts.num_experts} / "
                     f"ep size {experts.ep_size})", found=f"{len(found)} local experts",
            fix="pass --ep-size with the training run's expert_model_parallel_size (SequentialMLP experts only)")


# ---------------------------------------------------------------------------------------------
# Output-side bookkeeping (parent process)


def write_param_map_copies(job: Job, options: Options) -> None:
    """pt_meta/ gets the param_map used: copies of the given files, or the inferred layout as files."""
    meta_dir = options.ms_path / PT_META_DIR
    meta_dir.mkdir(parents=True, exist_ok=True)
    copied = set()
    if job.param_map_files is not None:
        for pattern in ("param_map_buffer*.json", "param_map_expert_buffer*.json"):
            for path in sorted(options.param_map_path.glob(pattern)):
                write_common_file(meta_dir / path.name, path.read_bytes(), mode=0o644)
                copied.add(path.name)
    # what no map file recorded (all of it without a map; the experts with a dense-only map) is inferred
    write_layout_files(job, meta_dir, dp_ranks=[0], skip=copied)


def write_layout_files(job: Job, target: Path, dp_ranks: Sequence[int], skip: set = frozenset(),
                       expert_dp_ranks: Sequence[int] | None = None) -> int:
    """The layouts of every plan as param_map files, dense ones for `dp_ranks`, expert ones (named by
    ep rank) for `expert_dp_ranks` (default: `dp_ranks`). Files named in `skip` (copied from the given
    map) are left alone, and so are the dense layouts when there are any: they came from that map."""
    target.mkdir(parents=True, exist_ok=True)
    expert_dp_ranks = dp_ranks if expert_dp_ranks is None else expert_dp_ranks
    files: dict[str, str] = {}
    for plan in job.source_plans:
        tp, pp, ep = plan.folder.tp, plan.folder.pp, plan.folder.ep
        for layout in () if skip else plan.layouts:
            text = param_map_json(layout)
            files.update({param_map_file_name(layout.buffer_index, dp, tp, pp, layout.chunk): text for dp in dp_ranks})
        for layout in plan.expert_layouts:
            text = param_map_json(layout)
            files.update({expert_param_map_file_name(layout.buffer_index, ep, dp, tp, pp, layout.chunk): text
                          for dp in expert_dp_ranks})
    written = 0
    for name, text in files.items():
        if name not in skip:
            write_common_file(target / name, text.encode())
            written += 1
    return written


def save_param_maps(job: Job, options: Options) -> None:
    """--save-param-map: one file per data-parallel rank of the training run, as the patch writes them
    (expert files per rank of the experts' data-parallel group, whose size is dp x cp / ep)."""
    args = job.first_args
    dp_world = (getattr(args, "data_parallel_size", 1) or 1) * (getattr(args, "context_parallel_size", 1) or 1)
    ep_size = job.topology.ep_size if job.topology is not None else 1
    count = write_layout_files(job, options.save_param_map, dp_ranks=range(dp_world),
                               expert_dp_ranks=range(max(1, dp_world // ep_size)))
    log.info("wrote %d param_map files to %s", count, options.save_param_map)


# ---------------------------------------------------------------------------------------------
# main


def canonical_paths(options: Options) -> Options:
    """The path flags made absolute with symlinks resolved, so that a conversion is recognised as the
    same one (to resume it) however its paths were spelled, e.g. `o1` or `$PWD/o1`."""
    def resolved(path: Path | None) -> Path | None:
        return path.resolve() if path is not None else None
    return dataclasses.replace(options, megatron_path=resolved(options.megatron_path),
                               ms_path=resolved(options.ms_path), param_map_path=resolved(options.param_map_path),
                               save_param_map=resolved(options.save_param_map))


def prepare_outputs(options: Options, job: Job) -> tuple[Job, dict]:
    """Keep this shard's share of the whole conversion's plans (all of them without --shard), then
    look at --ms-path: which of those ranks an earlier run finished (by folder), no foreign outputs,
    and only then the files common to every shard in pt_meta/. Raises ConvertInputError for bad input."""
    share = dataclasses.replace(job, plans=list(own_share(job.plans, options.shard, source_bytes)))
    if options.shard is not None:
        log.info("shard %s (%s): %d of the folders, %d bytes of input", options.shard, options.shard.origin,
                 len(share.plans), sum(source_bytes(plan) for plan in share.plans))
    statuses = {plan.folder: ("todo" if options.overwrite else rank_status(plan)) for plan in share.plans}
    if not options.overwrite:
        check_no_foreign_outputs(share.plans, statuses)
    write_common_outputs(job, options)
    return share, statuses


def write_common_outputs(job: Job, options: Options) -> None:
    """pt_meta/'s param_map copies (and --save-param-map): the same bytes from every shard."""
    if options.debug and options.shard is not None:
        shares = own_share_table(job.plans, options.shard.count)
        for index, plans in enumerate(shares):
            log.debug("shard %d/%d: %s", index, options.shard.count, ", ".join(p.folder.name for p in plans))
    if not options.convert_param_only:
        write_param_map_copies(job, options)
        if options.save_param_map:
            save_param_maps(job, options)
    if job.reshard is not None:
        write_reshard_records(job, options)


def write_reshard_records(job: Job, options: Options) -> None:
    """Re-sharding: pt_meta/ keeps today's record per source folder (args_tpTT_ppPPP.pt, for the way
    back's skeletons and args) and adds layout.json, the source and target layouts."""
    reshard.log_target(job.reshard)
    for plan in job.folder_plans:
        write_meta_file(plan, reader.load_pt(plan.folder.model_file))
    record = reshard.layout_record(job.reshard, job.target_topology, options.replica_policy)
    write_common_file(options.ms_path / PT_META_DIR / reshard.LAYOUT_FILE,
                      (json.dumps(record, indent=1) + "\n").encode(), mode=0o644)


def own_share_table(plans: Sequence[RankPlan], count: int) -> list[tuple[RankPlan, ...]]:
    return [own_share(plans, Shard(index, count, ""), source_bytes) for index in range(count)]


def source_bytes(plan: RankPlan | TargetRankPlan) -> int:
    """What a rank costs to convert: the bytes of its source files (re-sharding: of its tensors)."""
    if isinstance(plan, TargetRankPlan):
        return plan.total_bytes
    files = {plan.folder.model_file} | ({path for path, _ in plan.distrib_sources()} if plan.reads_distrib else set())
    return sum(path.stat().st_size for path in files)


def main(argv: Sequence[str] | None = None) -> int:
    """parse, then `run`; returns the exit code."""
    return run(build_parser().parse_args(argv))


def run(ns: argparse.Namespace) -> int:
    """options -> plan -> lock --ms-path -> outputs -> run -> report; returns the exit code."""
    return run_command(ns,
                       options_of=lambda ns: canonical_paths(options_from_args(ns, os.environ)),
                       describe=lambda options: (options.megatron_path, options.ms_path),
                       output_flag="--ms-path", output_of=lambda options: options.ms_path,
                       prepare=prepare, prepare_outputs=prepare_outputs, run_and_report=run_and_report,
                       verify_needs="mindspore")


def run_and_report(job: Job, statuses: dict, options: Options, started: float) -> int:
    """Convert the ranks not done yet (verify the done ones with --verify), log one line per folder
    and the summary; returns the exit code."""
    execute = execute_target_rank if job.reshard is not None else execute_rank
    results, stopped = run_plans(job.plans, statuses, run_settings(options), execute=execute, work=work_bytes,
                                 where=lambda plan: plan.folder.path)
    if options.verify and stopped is None:
        log_verified(results)
    summary(results, len(job.plans), started, options.shard)
    return stopped if stopped is not None else exit_code(results)


def cli() -> None:
    """`python -m megatron_ms_convert.pt2ckpt` (the commands enter through convert_pt2ckpt.py)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
