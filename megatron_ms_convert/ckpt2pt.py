"""Convert per-rank MindSpore checkpoints back into a Megatron-LM core_r0.6.0 checkpoint.

The story, top to bottom (the mirror of `pt2ckpt`): `main` parses the flags and locks
--megatron-path; `prepare` finds each rank's MindSpore file and its pt_meta record, reads the
scalars training changes (step, learning rates, scheduler counters), maps every tensor the Megatron
files need to its MindSpore name and checks that it is there with the right shape, and builds one
`BackPlan` per (tp, pp) rank -- all before any output is opened; `run_tasks` (the runner) executes
the plans in worker processes, each streaming `distrib_optim.pt` (one bucket in memory at a time)
and `model_optim_rng.pt` out of the mmap'd MindSpore file; when every rank is complete the parent
writes `latest_checkpointed_iteration.txt`. `convert_ckpt2pt.py -h` lists every flag.

What comes from where (see docs/ckpt2pt.md): tensors (fp32 master weights, Adam moments, the model
weights as the master weights cast to the run's dtype) and the values training changes come from the
MindSpore file; the structure (nesting, keys, dtype keys, bucket layout) and what MindSpore cannot
carry (args, rng state, flops counter) come from pt_meta.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import logging
import os
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .atomic import write_common_file
from .errors import ConvertInputError
from .shard import Shard, add_shard_flags, log_check, own_share
from .megatron.checkpoint import flatten_state_dict, load_pt, megatron_enum_importable, optimizer_param_groups
from .megatron.layout import BucketCounts, BufferLayout, list_param_map_files, read_rank_layouts, state_key_for
from .megatron.pt_meta import DOCUMENTED_KEYS, counts_from_meta, is_moe_record, layouts_from_meta, skeletons_from_meta
from .megatron.rebuild_rules import rule_counts, rule_skeletons
from .megatron.torch_writer import write_torch_file
from .megatron.writer import (OPTIMIZER_STATES, TrainingUpdates, apply_training_updates, distrib_optim_tree,
                              model_optim_rng_tree, skeleton_specs, target_counts)
from .mindspore.bucket_form import (BucketSource, add_bucket_form_flags, describe_source, open_rank_source,
                                    rank_source)
from .mindspore.reader import MindSporeFile
from .naming import (NamingFacts, is_expert_key, local_expert_index, local_layer_numbers, megatron_name, megatron_state_dict_key,
                     naming_facts, renumber_layers, split_state, stacked_expert_name)
from .plan import LR_DECAY_STYLES, SCHEDULER_FLOAT64, SCHEDULER_INT64, WD_INCR_STYLES
from .command import (EXIT_FAILED, EXIT_OK, ShowDefaults, exit_code, log_verified, report_line, run_command,
                      run_plans, summary)
from .runner import (RankResult, RunSettings, anon_memory_bytes, check_no_foreign_outputs, fingerprint_of, rank_status,
                     write_manifest)
from .topology import DISTRIB_FILE, MODEL_FILE, RankFolder, Topology, folder_name

log = logging.getLogger("convert_pt2ckpt")

TRACKER_FILE = "latest_checkpointed_iteration.txt"
MANIFEST_DIR = ".convert_ckpt2pt"
META_JSON = "meta.json"


# ---------------------------------------------------------------------------------------------
# Flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert_ckpt2pt.py", description="Ckpt-to-pt conversion Arguments",
                                     allow_abbrev=False, formatter_class=ShowDefaults)
    group = parser.add_argument_group(title="distributed")
    group.add_argument("--num-layers", type=int, default=None,
                       help="Number of layers in Megatron models (default: from pt_meta's args)")
    group.add_argument("--dp-size", type=int, required=True,
                       help="Degree of data model parallelism of the Megatron run to resume (buckets are padded "
                            "for it)")
    group.add_argument("--cp-size", type=int, required=True, help="Degree of context model parallelism.")
    group.add_argument("--tp-size", type=int, required=True, help="Degree of tensor model parallelism.")
    group.add_argument("--pp-size", type=int, required=True, help="Degree of pipeline model parallelism.")
    group.add_argument("--vpp-size", type=int, required=True,
                       help="virtual_pipeline_model_parallel_size (1 without virtual pipelines)")
    group.add_argument("--src-model-format", type=str, default="ckpt", choices=["ckpt", "safetensors"],
                       help="MindSpore checkpoint file format")
    group.add_argument("--noop", type=int, nargs="+", default=None,
                       help="global layer numbers of no-op layers that exist in the MindSpore model but not in "
                            "Megatron's (skipped)")
    group.add_argument("--ep-size", type=int, default=None,
                       help="expert parallel size of the run (MoE; default: from pt_meta, which records it; given, "
                            "it is checked against that)")
    group.add_argument("--ms-dp-size", type=int, default=None,
                       help="data-parallel size the rank_N folders are numbered with (default: --dp-size)")
    group.add_argument("--ms-cp-size", type=int, default=None,
                       help="context-parallel size the rank_N folders are numbered with (default: --cp-size)")

    group = parser.add_argument_group(title="File Path/Location")
    group.add_argument("--ms-path", type=str, required=True, help="Path to the MindSpore rank_N folders.")
    group.add_argument("--param-map-path", type=str, required=True,
                       help="The pt_meta folder convert_pt2ckpt.py wrote.")
    group.add_argument("--megatron-path", type=str, required=True, help="Path for saving the Megatron checkpoint.")
    group.add_argument("--convert-param-only", action="store_true", default=False,
                       help="write only model_optim_rng.pt")
    group.add_argument("--process-limit", type=int, default=8, help="Max num of processes.")
    group.add_argument("--multiprocess-off", action="store_true", default=False, help="Turn off multiprocess.")
    group.add_argument("--process_timeout", "--process-timeout", dest="process_timeout", type=int,
                       default=3600, help="Timeout for each process.")

    group = parser.add_argument_group(title="Not in the documented tool")
    group.add_argument("--iteration", type=int, default=None,
                       help="the iteration to save as (default: step_num of the MindSpore files; required when "
                            "their epoch_num is not 0)")
    group.add_argument("--consumed-train-samples", type=int, default=None,
                       help="args.consumed_train_samples to save (default: the saved value plus the iterations "
                            "trained since times global_batch_size)")
    group.add_argument("--verify", action="store_true", default=False,
                       help="re-open every written .pt and compare each tensor with the MindSpore file, bit for bit")
    group.add_argument("--overwrite", action="store_true", default=False,
                       help="redo every rank even if a complete output of this conversion exists, and replace "
                            "outputs written from another source")
    group.add_argument("--debug", action="store_true", default=False, help="print debug info (the plans)")
    add_shard_flags(parser, "--megatron-path")
    add_bucket_form_flags(parser)
    return parser


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
    ms_form: str | None = None  # "bucket" / "named": which files of rank folders holding both forms
    opt_shard_info: Path | None = None  # where the bucket form's layout JSON is, when not beside the rank folders


def options_from_args(ns: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Options:
    """The flags as Options; `environ` is the launcher's environment, read by --shard auto."""
    for flag in ("tp_size", "pp_size", "dp_size", "cp_size", "vpp_size", "process_limit", "process_timeout",
                 "ms_dp_size", "ms_cp_size", "ep_size"):
        value = getattr(ns, flag)
        if value is not None and value < 1:
            name = "--" + flag.replace("_", "-")
            raise ConvertInputError(f"{name} {value}", expected="a whole number >= 1", fix=f"pass {name} 1 or more")
    for flag in ("iteration", "consumed_train_samples"):
        value = getattr(ns, flag)
        if value is not None and value < 0:
            name = "--" + flag.replace("_", "-")
            raise ConvertInputError(f"{name} {value}", expected="a number >= 0", fix=f"pass {name} 0 or more")
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
        check=ns.check, ep_size=ns.ep_size, ms_form=ns.ms_form,
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
    stem = f"args_tp{tp:02}_pp{pp:03}" + (f"_ep{ep:03}" if ep_size > 1 else "")
    path = param_map_path / f"{stem}.pt"
    if not path.is_file():
        per_rank = "args_tpTT_ppPPP_epEEE.pt" if ep_size > 1 else "args_tpTT_ppPPP.pt"
        raise ConvertInputError(f"{path}: file is missing",
                                expected=f"the pt_meta folder convert_pt2ckpt.py wrote ({per_rank} per rank)",
                                fix="pass --param-map-path <ms-path of convert_pt2ckpt>/pt_meta, or check "
                                    "--tp-size/--pp-size" + (" (and that no ep folder's record was lost)"
                                                             if ep_size > 1 else ""))
    return path


def recorded_ep_size(options: Options) -> int:
    """The expert parallel size pt_meta records (1 when its records carry no `_epEEE`), checked
    against --ep-size: it decides which records, rank_N folders and output folders there are."""
    first = options.param_map_path / "args_tp00_pp000_ep000.pt"
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


def read_scalar(ms: MindSporeFile, name: str) -> float | int | None:
    if name not in ms:
        return None
    tensor = ms.read(name)
    if tensor.numel() != 1:
        raise ConvertInputError(f"{ms.path}: {name} has shape {list(tensor.shape)}", expected="one value",
                                fix="re-copy the file (damaged?) or check --ms-path")
    value = tensor.reshape(()).item()
    return value


def changed(saved: Any, stored: float | int) -> Any:
    """The value to restore for a number MindSpore stores with less precision (float32) than Megatron
    saved it (a Python float or int): the saved value when MindSpore's equals it rounded to float32
    (training did not change it), else MindSpore's, in the saved value's type."""
    if isinstance(saved, bool):
        return saved if float(saved) == stored else bool(stored)
    if isinstance(saved, (int, float)) and float(np.float32(saved)) == float(np.float32(stored)):
        return saved
    if isinstance(saved, int):
        return int(round(stored))
    return float(stored)


def group_updates(ms: MindSporeFile, param_groups: Sequence[dict]) -> tuple[tuple[int, str, Any], ...]:
    """(group, key, value) for each optimizer param-group number MindSpore holds a different value of."""
    out = []
    for i, group in enumerate(param_groups):
        for key, saved in group.items():
            if key == "params" or not isinstance(saved, (int, float)):
                continue
            name = {"step": "state_step", "lr": f"learning_rate_group_{i}"}.get(key, f"{key}_group_{i}")
            stored = read_scalar(ms, name)
            if stored is not None and changed(saved, stored) != saved:
                out.append((i, key, changed(saved, stored)))
    return tuple(out)


def scheduler_updates(ms: MindSporeFile, scheduler: dict) -> tuple[tuple[str, Any], ...]:
    """(key, value) for each opt_param_scheduler entry MindSpore holds a different value of."""
    out = []
    for key, saved in scheduler.items():
        stored = read_scalar(ms, key)
        if stored is None:
            continue
        if key in ("lr_decay_style", "wd_incr_style"):
            styles = LR_DECAY_STYLES if key == "lr_decay_style" else WD_INCR_STYLES
            if not 0 <= int(stored) < len(styles):
                raise ConvertInputError(f"{ms.path}: {key} is {stored}", expected=f"an index into {styles}",
                                        fix="re-copy the file (damaged?)")
            value = styles[int(stored)]
        elif key in SCHEDULER_INT64:
            value = int(stored)
        elif key in SCHEDULER_FLOAT64:
            value = float(stored)
        elif isinstance(saved, (int, float)):
            value = changed(saved, stored)
        else:
            continue
        if value != saved:
            out.append((key, value))
    return tuple(out)


def iteration_of(ms: MindSporeFile, options: Options) -> int:
    """--iteration, else step_num; a step_num that counts within an epoch (epoch_num != 0) is no iteration."""
    if options.iteration is not None:
        return options.iteration
    step, epoch = read_scalar(ms, "step_num"), read_scalar(ms, "epoch_num")
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


@dataclass(frozen=True)
class BackPlan:
    """Everything one worker does for one (tp, pp[, ep]) rank: read `source_file`, write `out_dir`."""

    folder: RankFolder  # the MindSpore rank_N folder, with the Megatron (tp, pp, ep) it becomes
    source_file: Path
    fmt: str
    pt_meta_file: Path
    out_dir: Path
    write_distrib: bool
    dp_cp: int
    # (chunk, state-dict key with local layer numbers, state) -> (MindSpore name, row): row None for
    # a tensor stored as it is, k for local expert k of experts stored stacked on axis 0
    sources: tuple[tuple[tuple[int, str, str], tuple[str, int | None]], ...]
    iteration: int
    args_updates: tuple[tuple[str, Any], ...]
    group_updates: tuple[tuple[int, str, Any], ...]
    scheduler_updates: tuple[tuple[str, Any], ...]
    manifest_file: Path
    num_chunks: int = 1
    ep_size: int = 1  # the expert buffers are padded for dp_cp // ep_size (the expert-data-parallel size)
    bucket: BucketSource | None = None  # MindSpeed's bucket form: source_file is dp rank 0's of these files
    fingerprint: str = field(default="", compare=False)

    @property
    def outputs(self) -> tuple[Path, ...]:
        return (self.out_dir / MODEL_FILE,) + ((self.out_dir / DISTRIB_FILE,) if self.write_distrib else ())

    @property
    def output_files(self) -> tuple[Path, ...]:
        return self.outputs

    def describe(self) -> str:
        lines = [f"plan for {self.source_file} -> {self.out_dir} (iteration {self.iteration}, dp x cp {self.dp_cp})"]
        lines += [f"  set args.{k} = {v!r}" for k, v in self.args_updates]
        lines += [f"  set param_groups[{i}][{k!r}] = {v!r}" for i, k, v in self.group_updates]
        lines += [f"  set opt_param_scheduler[{k!r}] = {v!r}" for k, v in self.scheduler_updates]
        lines += [f"  chunk {c} {key} {state} <- {name}" + ("" if row is None else f"[{row}]")
                  for (c, key, state), (name, row) in self.sources]
        return "\n".join(lines)


@dataclass(frozen=True)
class StatePart:
    """One optimizer's grad buffers: the dense optimizer's, or (MoE) the experts'."""

    kind: str  # "dense" or "expert"
    layouts: list[BufferLayout] | None
    counts: list[BucketCounts] | None


@dataclass(frozen=True)
class RankMeta:
    """What one rank's pt_meta says, decoded."""

    path: Path
    meta: dict
    skeletons: list[dict]
    layouts: list[BufferLayout] | None
    counts: list[BucketCounts] | None
    expert_layouts: list[BufferLayout] | None = None
    expert_counts: list[BucketCounts] | None = None

    @property
    def list_form(self) -> bool:
        """distrib_optim.pt is `[dense, expert]` (a MoE run with expert parallelism), not one dict."""
        return self.meta.get("distrib_form") == "list"

    @property
    def num_local_experts(self) -> int:
        """Experts per rank (stacked in the MindSpore file), 0 without experts."""
        return int(self.meta.get("num_local_experts") or 0) if is_moe_record(self.meta) else 0

    def distrib_parts(self) -> list[StatePart | None]:
        """distrib_optim.pt's optimizers in saved order; None where Megatron saves None (the dense
        element in the folders of ep ranks > 0: the dense optimizer's dp rank 0 is ep rank 0)."""
        dense = StatePart("dense", self.layouts, self.counts)
        if not self.list_form:
            return [dense]
        return [dense if int(self.meta.get("ep_rank") or 0) == 0 else None,
                StatePart("expert", self.expert_layouts, self.expert_counts)]

    def all_layouts(self) -> list[BufferLayout]:
        return [layout for part in self.distrib_parts() if part is not None for layout in part.layouts or ()]


def read_rank_meta(path: Path, need_layouts: bool, tp: int, pp: int, num_chunks: int) -> RankMeta:
    """A rank's pt_meta decoded. A record of the documented tool (no skeletons, layouts or bucket
    sizes) is completed by rules from the param_map JSON files beside it (rebuild_rules)."""
    meta = load_pt(path)
    if not isinstance(meta, dict) or "args" not in meta:
        raise ConvertInputError(f"{path}: not a pt_meta record", expected="a dict with args, iteration, ...",
                                fix="pass the pt_meta folder convert_pt2ckpt.py wrote as --param-map-path")
    skeletons = skeletons_from_meta(meta)
    if skeletons is None:
        return documented_rank_meta(path, meta, tp, pp, num_chunks)
    rank = RankMeta(path, meta, skeletons, layouts_from_meta(meta, str(path)), counts_from_meta(meta),
                    layouts_from_meta(meta, str(path), "expert_"), counts_from_meta(meta, "expert_"))
    missing = [part.kind for part in rank.distrib_parts()
               if part is not None and (part.layouts is None or part.counts is None)]
    if need_layouts and missing:
        raise ConvertInputError(f"{path}: no {' or '.join(missing)} grad-buffer layout in it (convert_pt2ckpt.py ran "
                                "with --convert-param-only)", expected="layouts and per_bucket_numel",
                                fix="pass --convert-param-only to write model_optim_rng.pt alone")
    return rank


def documented_rank_meta(path: Path, meta: dict, tp: int, pp: int, num_chunks: int) -> RankMeta:
    if getattr(meta["args"], "num_experts", None):
        raise ConvertInputError(f"{path}: a MoE run's record without the expert layouts (written by the documented "
                                "tool?)", expected="the pt_meta folder convert_pt2ckpt.py of this package wrote",
                                fix="convert the Megatron checkpoint with this package's convert_pt2ckpt.py and "
                                    "pass its pt_meta as --param-map-path")
    files = list_param_map_files(path.parent)
    if not files:
        raise ConvertInputError(f"{path}: written by the documented tool, and no param_map_buffer*.json beside it",
                                expected="the param_map files the documented tool copies into pt_meta/",
                                fix="copy the run's param_map files into the pt_meta folder")
    layouts = read_rank_layouts(files, tp, pp, num_chunks, path.parent)
    family = naming_facts(meta["args"], keys=[state_key_for(s.name) for lay in layouts for s in lay.params]).family
    log.warning("%s: written by the documented tool; model_optim_rng.pt's nesting and bucket sizes follow "
                "Megatron's rules, and _extra_state entries are left out (see docs/ckpt2pt.md)", path)
    return RankMeta(path, meta, rule_skeletons(layouts, num_chunks, family), layouts,
                    rule_counts(layouts, meta["args"]))


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
    for flag, value in given.items():
        if value is not None and saved[flag] is not None and value != saved[flag]:
            raise ConvertInputError(f"{flag} {value} contradicts {first.path}",
                                    expected=f"{flag} {saved[flag]} (the training run's value)", found=str(value),
                                    fix=f"pass {flag} {saved[flag]}, or the pt_meta of this run as --param-map-path")
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


def ms_name_index(ms: MindSporeFile, facts: NamingFacts, noop: Sequence[int]) -> dict[tuple[str, str], str]:
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


def map_sources(rank: RankMeta, ms: MindSporeFile, topo: Topology, tp_pp: tuple[int, int], options: Options,
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


def found_in(ms: MindSporeFile, index: dict) -> str:
    """What a file holds, for the message of a file that lacks tensors."""
    if hasattr(ms, "describe_contents"):
        return f"{len(index)} parameters and moments in {ms.describe_contents()}"
    scalars = [n for n in ms.names() if "." not in n]
    return f"{len(index)} parameters and moments" + (f" (only {len(scalars)} scalars: {', '.join(scalars[:4])}, ...)"
                                                     if not index and scalars else "")


def plan_rank(rank: RankMeta, ms: MindSporeFile, topo: Topology, tp: int, pp: int, options: Options,
              iteration: int, ep: int = 0) -> BackPlan:
    meta = rank.meta
    facts = naming_facts(meta["args"], keys=[k for s in rank.skeletons for k, _ in skeleton_specs(s)])
    sources = map_sources(rank, ms, topo, (tp, pp), options, facts)
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
    groups = optimizer_param_groups(meta.get("optimizer"))
    iteration_dir = options.megatron_path / f"iter_{iteration:07d}"
    stem = f"tp{tp:02}_pp{pp:03}" + (f"_ep{ep:03}" if topo.ep_size > 1 else "")
    return BackPlan(
        folder=RankFolder(pp=pp, tp=tp, path=ms.path.parent, ep=ep), source_file=ms.path, fmt=options.fmt,
        pt_meta_file=rank.path, out_dir=iteration_dir / folder_name(tp, pp, options.pp_size, ep, topo.ep_size),
        write_distrib=not options.convert_param_only, dp_cp=dp_cp, sources=sources, iteration=iteration,
        args_updates=tuple(args_updates), group_updates=group_updates(ms, groups),
        scheduler_updates=scheduler_updates(ms, dict(meta.get("opt_param_scheduler") or {})),
        manifest_file=iteration_dir / MANIFEST_DIR / f"manifest_{stem}.json",
        num_chunks=len(rank.skeletons), ep_size=topo.ep_size)


@dataclass
class Job:
    plans: list[BackPlan]  # this shard's (all of them without --shard)
    iteration: int
    all_plans: tuple[BackPlan, ...] = ()  # the whole conversion's, to tell when it is complete


def prepare(options: Options) -> Job:
    """Find -> read pt_meta and scalars -> map names -> plans. Raises ConvertInputError before any
    output exists; a failure to read an input is reported as such, naming the file."""
    try:
        return _prepare(options)
    except OSError as err:
        raise ConvertInputError(f"cannot read {err.filename or 'an input file'}: {err.strerror or err}",
                                fix="check --ms-path / --param-map-path, their permissions and the disk") from None


def _prepare(options: Options) -> Job:
    if not options.param_map_path.is_dir():
        raise ConvertInputError(f"--param-map-path {options.param_map_path}: no such folder",
                                fix="pass the pt_meta folder convert_pt2ckpt.py wrote")
    ep_size = recorded_ep_size(options)
    ranks = [(tp, pp, ep) for pp in range(options.pp_size) for tp in range(options.tp_size) for ep in range(ep_size)]
    metas = {(tp, pp, ep): read_rank_meta(pt_meta_file(options.param_map_path, tp, pp, ep, ep_size),
                                          not options.convert_param_only, tp, pp, options.vpp_size)
             for tp, pp, ep in ranks}
    topo = resolve_topology(options, metas, ep_size)
    # ep rank e's experts are in the file of dp rank e (whose ep rank is e mod ep_size), cp 0
    found = {r: read_source(options, topo.ms_rank(r[0], r[1], dp=r[2]), metas[r]) for r in ranks}
    files = {r: path for r, (path, _) in found.items()}
    plans, iterations = [], {}
    with contextlib.ExitStack() as stack:
        opened = {r: stack.enter_context(open_rank_source(files[r], options.fmt, found[r][1])) for r in ranks}
        for r in ranks:
            log.info("rank tp %d pp %d%s: reading %s", r[0], r[1], f" ep {r[2]}" if ep_size > 1 else "",
                     describe_source(*found[r]))
            if found[r][1] is not None:
                log.debug("%s", opened[r].layout.describe())
            iterations[files[r]] = iteration_of(opened[r], options)
        if len(set(iterations.values())) != 1:
            shown = ", ".join(f"{path}: {it}" for path, it in list(iterations.items())[:4])
            raise ConvertInputError(f"the MindSpore files hold different step_num values ({shown})",
                                    expected="one iteration", fix="copy every rank's file of the same save, or pass "
                                                                  "--iteration N")
        iteration = next(iter(iterations.values()))
        for r in ranks:
            plan = dataclasses.replace(plan_rank(metas[r], opened[r], topo, r[0], r[1], options, iteration, ep=r[2]),
                                       bucket=found[r][1])
            sources = [plan.source_file, plan.pt_meta_file, *(plan.bucket.inputs if plan.bucket else ())]
            plans.append(dataclasses.replace(plan, fingerprint=fingerprint_of(plan, sources)))
    return Job(plans, iteration)


# ---------------------------------------------------------------------------------------------
# Executing a plan (worker process)


def restored_entries(meta: dict, plan: BackPlan) -> dict:
    """model_optim_rng.pt's non-model entries: pt_meta's, with the values training changed."""
    entries = {key: meta.get(key) for key in DOCUMENTED_KEYS}
    updates = dict(plan.args_updates)
    iteration = plan.iteration if plan.iteration != meta.get("iteration") else None
    entries = apply_training_updates(entries, TrainingUpdates(
        iteration=iteration, consumed_train_samples=updates.pop("consumed_train_samples", None)))
    if updates:
        args = copy.copy(entries["args"])
        for key, value in updates.items():
            setattr(args, key, value)
        entries["args"] = args
    if plan.group_updates:
        entries["optimizer"] = copy.deepcopy(entries["optimizer"])
        groups = optimizer_param_groups(entries["optimizer"])  # numbered on across a MoE run's two optimizers
        for i, key, value in plan.group_updates:
            groups[i][key] = value
    if plan.scheduler_updates:
        entries["opt_param_scheduler"] = dict(entries["opt_param_scheduler"], **dict(plan.scheduler_updates))
    return entries


class RankSources:
    """The MindSpore tensors of one plan, by (chunk, local state-dict key, state), as flat fp32 views
    (one row of a stacked expert tensor for an expert parameter)."""

    def __init__(self, plan: BackPlan, ms: MindSporeFile):
        self.ms = ms
        self.names = dict(plan.sources)
        self.peak_anon_bytes = 0  # sampled as each tensor is handed out, while a bucket is being filled

    def value(self, chunk: int, key: str, state: str) -> torch.Tensor:
        source = self.names.get((chunk, key, state))
        if source is None:
            raise ValueError(f"{self.ms.path}: no source planned for chunk {chunk} {key} {state}")
        self.peak_anon_bytes = max(self.peak_anon_bytes, anon_memory_bytes())
        name, row = source
        return (self.ms.read(name) if row is None else self.ms.read_row(name, row)).reshape(-1)

    def state_value(self, chunk: int, ddp_name: str, state: str) -> torch.Tensor:
        return self.value(chunk, state_key_for(ddp_name), state)

    def model_value(self, chunk: int, key: str) -> torch.Tensor:
        return self.value(chunk, key, "param")


def execute_back_plan(plan: BackPlan, settings: RunSettings, write: bool = True) -> RankResult:
    """Write one rank's distrib_optim.pt and model_optim_rng.pt (or, with write=False, only verify a
    complete output of an earlier run). Files appear under their final names only when complete; an
    output that fails --verify is removed."""
    rank = read_rank_meta(plan.pt_meta_file, plan.write_distrib, plan.folder.tp, plan.folder.pp, plan.num_chunks)
    result = RankResult(plan.folder.name, "skipped")
    with open_rank_source(plan.source_file, plan.fmt, plan.bucket) as ms:
        sources = RankSources(plan, ms)
        if write:
            write_manifest(plan, "writing")
            plan.out_dir.mkdir(parents=True, exist_ok=True)
            if plan.write_distrib:
                write_torch_file(plan.out_dir / DISTRIB_FILE, distrib_optim_content(rank, plan, sources.state_value))
            tree = model_optim_rng_tree(restored_entries(rank.meta, plan), rank.skeletons, sources.model_value,
                                        rank.meta.get("state_keys"))
            with megatron_enum_importable():
                write_torch_file(plan.out_dir / MODEL_FILE, tree)
            result.status, result.tensors = "converted", len(plan.sources)
            result.bytes_written = sum(p.stat().st_size for p in plan.outputs)
        if settings.verify:
            try:
                result.verified_tensors = verify_rank(plan, rank, sources)
                result.verified_files = len(plan.outputs)
            except VerificationError:
                for path in plan.outputs:
                    path.unlink(missing_ok=True)
                write_manifest(plan, "writing")
                raise
        result.peak_anon_bytes = sources.peak_anon_bytes
    if write:
        write_manifest(plan, "complete", {str(p): p.stat().st_size for p in plan.outputs})
    log.debug("%s: %d tensors, %d bytes written, peak anonymous memory %.1f MiB", plan.folder.name,
              result.tensors, result.bytes_written, result.peak_anon_bytes / 2**20)
    return result


def part_dp(part: StatePart, plan: BackPlan) -> int:
    """The data-parallel size a part's buckets are padded for: DP x CP for the dense optimizer, the
    expert-data-parallel size (DP x CP / EP) for the experts'."""
    return plan.dp_cp // plan.ep_size if part.kind == "expert" else plan.dp_cp


def distrib_optim_content(rank: RankMeta, plan: BackPlan, state_value) -> Any:
    """distrib_optim.pt's tree: one dict, or for a MoE run with expert parallelism the list
    `[dense, expert]` Megatron's ChainedOptimizer saves (None where it saves None)."""
    trees = [None if part is None else distrib_optim_tree(part.layouts, part.counts, part_dp(part, plan), state_value)
             for part in rank.distrib_parts()]
    return trees if rank.list_form else trees[0]


class VerificationError(RuntimeError):
    """A written .pt, read back with torch.load, differs from the MindSpore file."""


def verify_rank(plan: BackPlan, rank: RankMeta, sources: RankSources) -> int:
    """Re-open the written files and compare every tensor with its MindSpore source, bit for bit
    (buckets outside their parameters must be zeros); returns how many tensors were compared."""
    problems: list[str] = []
    compared = 0
    model = load_pt(plan.out_dir / MODEL_FILE)
    for chunk, skeleton in enumerate(rank.skeletons):
        chunk_key = "model" if len(rank.skeletons) == 1 else f"model{chunk}"
        flat = dict(flatten_state_dict(model.get(chunk_key, {})))
        for key, spec in skeleton_specs(skeleton):
            got = flat.get(key)
            want = sources.model_value(chunk, key).reshape(spec.shape).to(spec.dtype)
            if got is None or not _bitwise_equal(got, want):
                problems.append(f"{MODEL_FILE} {chunk_key}.{key}")
            compared += 1
    if model.get("iteration") != plan.iteration:
        problems.append(f"{MODEL_FILE} iteration {model.get('iteration')} != {plan.iteration}")
    if plan.write_distrib:
        distrib = load_pt(plan.out_dir / DISTRIB_FILE)
        saved = distrib if rank.list_form else [distrib]
        for part, tree in zip(rank.distrib_parts(), saved):
            if part is None:
                if tree is not None:
                    problems.append(f"{DISTRIB_FILE}: a dense state where Megatron saves None")
                continue
            compared += verify_state_part(part, tree, part_dp(part, plan), sources, problems)
    if problems:
        raise VerificationError(f"verification of {plan.out_dir} failed (outputs removed): " + "; ".join(problems[:10]))
    return compared


def verify_state_part(part: StatePart, tree: dict, dp_cp: int, sources: RankSources, problems: list[str]) -> int:
    """Compare one optimizer's buckets with the MindSpore values, parameter by parameter; the padding
    must be zeros. Appends what differs to `problems`; returns how many tensors were compared."""
    compared = 0
    for gbuf, (layout, target) in enumerate(zip(part.layouts, target_counts(part.counts, dp_cp))):
        [(dtype_key, by_state)] = tree[gbuf].items()
        for state in OPTIMIZER_STATES:
            for bucket, tensor in enumerate(by_state[state]):
                covered = torch.zeros(tensor.numel(), dtype=torch.bool)
                source = part.counts[gbuf]
                for span in layout.params:
                    if span.bucket != bucket:
                        continue
                    offset = span.start - source.bucket_start(bucket)
                    want = sources.state_value(layout.chunk, span.name, state)
                    if not _bitwise_equal(tensor[offset:offset + span.numel], want):
                        problems.append(f"{DISTRIB_FILE} {span.name} {state}")
                    covered[offset:offset + span.numel] = True
                    compared += 1
                if tensor.numel() != target.padded[bucket] or tensor[~covered].view(torch.int32).any():
                    problems.append(f"{DISTRIB_FILE} {part.kind} buffer {gbuf} {state} bucket {bucket}: size or padding")
    return compared


def _bitwise_equal(got: Any, want: torch.Tensor) -> bool:
    if not isinstance(got, torch.Tensor) or got.dtype != want.dtype or got.numel() != want.numel():
        return False
    return got.reshape(-1).contiguous().view(torch.uint8).equal(want.reshape(-1).contiguous().view(torch.uint8))


# ---------------------------------------------------------------------------------------------
# main


def run_settings(options: Options) -> RunSettings:
    return RunSettings(verify=options.verify, debug=options.debug, multiprocess_off=options.multiprocess_off,
                       process_limit=options.process_limit, process_timeout=options.process_timeout)


def prepare_outputs(options: Options) -> tuple[Job, dict]:
    """Plan the whole conversion and keep this shard's share of it; which of those an earlier run
    finished, and no foreign outputs among them."""
    job = prepare(options)
    mine = own_share(job.plans, options.shard, lambda plan: plan.source_file.stat().st_size)
    job = dataclasses.replace(job, plans=list(mine), all_plans=tuple(job.plans))
    if options.shard is not None:
        log.info("shard %s (%s): %d of the folders", options.shard, options.shard.origin, len(job.plans))
    statuses = {plan.folder: ("todo" if options.overwrite else rank_status(plan)) for plan in job.plans}
    if not options.overwrite:
        check_no_foreign_outputs(job.plans, statuses, flag="--megatron-path", root=options.megatron_path)
    return job, statuses


def check_conversion(options: Options) -> int:
    """--check: the state of every output folder of the whole conversion, from the manifests."""
    job = prepare(options)
    statuses = {plan.folder: rank_status(plan) for plan in job.plans}
    complete = log_check(job.plans, statuses, lambda plan: (plan.source_file, plan.out_dir), log)
    return EXIT_OK if complete else EXIT_FAILED


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
    """parse -> options -> lock --megatron-path -> prepare -> run -> tracker file -> report."""
    return run_command(build_parser().parse_args(argv), options_of=lambda ns: options_from_args(ns, os.environ),
                       describe=lambda options: (options.ms_path, options.megatron_path),
                       output_flag="--megatron-path", output_of=lambda options: options.megatron_path,
                       check=check_conversion, prepare_outputs=prepare_outputs, run_and_report=run_and_report)


def run_and_report(job: Job, statuses: dict, options: Options, started: float) -> int:
    """Convert the folders not done yet (verify the done ones with --verify), write the tracker file
    once the whole conversion is complete, log one line per folder and the summary."""
    results, stopped = run_plans(job.plans, statuses, run_settings(options), execute=execute_back_plan,
                                 report=report, where=lambda plan: plan.out_dir)
    if stopped is None and all(r.status != "failed" for r in results):
        write_tracker_when_complete(job, options)
    if options.verify and stopped is None:
        log_verified(results)
    summary(results, len(job.plans), started, options.shard)
    return stopped if stopped is not None else exit_code(results)


def report(plan: BackPlan, result: RankResult) -> None:
    report_line(plan.source_file, plan.out_dir, result)


def cli() -> None:
    """Entry point of the installed `convert_ckpt2pt` command."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
