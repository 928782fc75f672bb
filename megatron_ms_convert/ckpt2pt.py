"""Convert per-rank MindSpore checkpoints back into a Megatron-LM core_r0.6.0 checkpoint.

The story, top to bottom, in the same four steps as the way there (`pt2ckpt`): `main` parses the
flags and locks --megatron-path; then
1. facts: `ckpt2pt_facts.read_facts` reads each rank's pt_meta record (`read_rank_meta`), the
   layout the way there re-sharded the MindSpore files to, if it did (`pt_meta/layout.json`), and
   every MindSpore file's header and scalars (`MsFileFacts`), once, into a `BackFacts`;
2. plan (`ckpt2pt_plan`): `plan_conversion` maps every tensor the Megatron files need to its
   MindSpore name, checks that it is there with the right shape, decodes the values training changed
   (`scalars`), and builds one `BackPlan` per (tp, pp[, ep]) rank; when the Megatron layout to write
   is not the MindSpore files', `plan_reshard_conversion` plans each folder's tensors from segments
   of several files (`ckpt2pt_reshard`) -- all before any output is opened (--dry-run prints the
   plans and stops here);
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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from .atomic import write_common_file
from .ckpt2pt_execute import execute_rank, work_bytes
from .ckpt2pt_facts import WrittenLayout, read_facts, read_written_layout
from .ckpt2pt_plan import Job, plan_conversion, plan_reshard_conversion
from .ckpt2pt_reshard import RecordedLayout, recorded_layout, source_options, target_layout_differs
from .command import (check_minimum, exit_code, log_verified, reading_inputs, run_command, run_plans, run_settings,
                      summary)
from .errors import ConvertInputError
from .flags import ckpt2pt_parser as build_parser
from .manifest import check_no_foreign_outputs, plan_fingerprint, rank_status
from .megatron.checkpoint import TRACKER_FILE
from .shard import Shard, own_share

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Flags


@dataclass(frozen=True)
class Options:
    """The flags, checked among themselves (no files looked at yet)."""

    ms_path: Path
    param_map_path: Path
    megatron_path: Path
    # the sizes not given are None here, and the Megatron run's (pt_meta's) once `with_recorded_sizes`
    # has read them; --ms-dp-size / --ms-cp-size default to --dp-size / --cp-size
    tp_size: int | None
    pp_size: int | None
    dp_size: int | None
    cp_size: int | None
    vpp_size: int | None
    ms_dp_size: int | None
    ms_cp_size: int | None
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
    replica_policy: str | None = None  # re-sharding: replicated copies that differ across MindSpore tp ranks
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
        check=ns.check, ep_size=ns.ep_size, replica_policy=ns.replica_policy, dry_run=ns.dry_run, ms_form=ns.ms_form,
        opt_shard_info=Path(ns.opt_shard_info).resolve() if ns.opt_shard_info else None)


# ---------------------------------------------------------------------------------------------
# Facts -> plans


def prepare(options: Options) -> Job:
    """Find -> read pt_meta and scalars -> map names -> plans. Raises ConvertInputError before any
    output exists; a failure to read an input is reported as such, naming the file."""
    return reading_inputs(_prepare, options, "--ms-path / --param-map-path")


def _prepare(options: Options) -> Job:
    """Three ways: the MindSpore files at the records' layout written back at it (one file per folder);
    at another layout (re-shard); or files the way there re-sharded (layout.json), written back at the
    flags' layout, the records' own included (re-shard from the files' layout)."""
    on_disk = options.param_map_path.is_dir()
    recorded = recorded_layout(options.param_map_path) if on_disk else None
    written = read_written_layout(options.param_map_path) if on_disk else None
    options = with_recorded_sizes(options, recorded, written)
    if written is not None:
        job = plan_reshard_conversion(read_facts(source_options(options, recorded), written), options)
    elif target_layout_differs(options, recorded):
        job = plan_reshard_conversion(read_facts(source_options(options, recorded)), options)
    else:
        job = plan_conversion(read_facts(options), options)
    return dataclasses.replace(job, plans=[dataclasses.replace(plan, fingerprint=plan_fingerprint(plan))
                                           for plan in job.plans])


def with_recorded_sizes(options: Options, recorded: RecordedLayout | None, written: WrittenLayout | None) -> Options:
    """The sizes not given: the Megatron run's, as pt_meta's records hold them (the layout to write back
    at, by default); the numbering of the rank_N folders, when neither --ms-dp-size nor --dp-size is
    given: layout.json's, else the Megatron run's. Without records, 1 (the missing record is reported
    when the facts are read)."""
    mine = recorded or RecordedLayout(tp=1, pp=1, vpp=1, ep=1)
    sizes = {"tp_size": mine.tp, "pp_size": mine.pp, "vpp_size": mine.vpp, "dp_size": mine.dp, "cp_size": mine.cp}
    resolved = dataclasses.replace(options, **{k: v for k, v in sizes.items() if getattr(options, k) is None})
    numbering = (written.dp_size, written.cp_size) if written is not None else (resolved.dp_size, resolved.cp_size)
    return dataclasses.replace(resolved, ms_dp_size=options.ms_dp_size or numbering[0],
                               ms_cp_size=options.ms_cp_size or numbering[1])


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
