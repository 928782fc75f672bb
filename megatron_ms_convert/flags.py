"""The flags of both command lines, in a module that imports nothing heavy: `-h` and a flag error
end in argparse before torch, numpy or tqdm is loaded (the entry points parse first, then import
the conversion). docs/usage.md is the full reference of every flag.
"""

from __future__ import annotations

import argparse
import os
import sys

from .naming import STYLES
from .shard import add_shard_flags

EPILOG = "full reference: docs/usage.md"
MS_FORMS = ("bucket", "named")  # the two forms of MindSpore rank files the way back reads (--ms-form)


class ShowDefaults(argparse.HelpFormatter):
    """-h shows each flag's default where it has one, so users can compare with the documented table."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def add_bucket_form_flags(parser: argparse.ArgumentParser) -> None:
    """--ms-form and --opt-shard-info: reading what MindSpeed-Core-MS's DistributedOptimizer saves."""
    group = parser.add_argument_group(title="MindSpeed's DistributedOptimizer files (not in the documented tool)")
    group.add_argument("--ms-form", choices=MS_FORMS, default=None,
                       help="which files to read in rank folders holding both forms (combine_ckpt_dp_zero.py run in "
                            "place): bucket = the buffer_<b>_bucket_<k> shards mindspeed_ms saves with its "
                            "DistributedOptimizer, named = files of named parameters (default: the form of the file "
                            "meta.json names, which must also be the newest file's)")
    group.add_argument("--opt-shard-info", type=str, default=None, metavar="PATH",
                       help="the opt_shard_info folder (or the training output_dir holding it) with the layout JSON "
                            "of the bucket form (default: beside the rank folders, --ms-path/opt_shard_info)")


def add_dry_run_flag(parser: argparse.ArgumentParser) -> None:
    """--dry-run, the same in both directions."""
    parser.add_argument("--dry-run", action="store_true", default=False,
                        help="convert nothing: print the plan (every output tensor's name, shape, dtype and where "
                             "its values come from) without reading tensor data or writing anything, and exit 0")


def program_name(command: str, argv0: str | None = None) -> str:
    """What the user typed to run `command`: the console script `convert_pt2ckpt`, or the checkout
    script `convert_pt2ckpt.py`; any other caller (tests, `python -m`) gets the script's name.

    >>> program_name("convert_pt2ckpt", "/usr/bin/convert_pt2ckpt"), program_name("convert_pt2ckpt", "x/pytest")
    ('convert_pt2ckpt', 'convert_pt2ckpt.py')
    """
    typed = os.path.basename(sys.argv[0] if argv0 is None else argv0)
    return typed if typed in (command, f"{command}.py") else f"{command}.py"


def _parser(command: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=program_name(command), description=description, epilog=EPILOG,
                                   allow_abbrev=False, formatter_class=ShowDefaults)


def pt2ckpt_parser() -> argparse.ArgumentParser:
    """The flags of convert_pt2ckpt.py: the documented tool's, in its groups, then ours."""
    parser = _parser("convert_pt2ckpt", "Pt-to-ckpt conversion Arguments")
    group = parser.add_argument_group(title="File Path/Location")
    group.add_argument("--megatron-path", type=str, required=True, help="Path to megatron pt files.")
    group.add_argument("--ms-path", type=str, required=True, help="Path for saving Mindspore Ckpt.")
    group.add_argument("--param-map-path", type=str, default=None,
                       help="Path to param_map files. Without it the bucket layout is inferred from the "
                            "checkpoint and verified against distrib_optim.pt.")

    group = parser.add_argument_group(title="distributed")
    group.add_argument("--pp-size", type=int, default=1, help="Degree of pipeline model parallelism.")
    group.add_argument("--tp-size", type=int, default=1, help="Degree of tensor model parallelism.")
    group.add_argument("--dp-size", type=int, default=1, help="Degree of data model parallelism.")
    group.add_argument("--cp-size", type=int, default=1, help="Degree of context model parallelism.")
    group.add_argument("--ep-size", type=int, default=None,
                       help="Degree of expert parallelism of the training run (MoE; default: the checkpoint's "
                            "expert_model_parallel_size, else 1). MindSpore rank dp gets the experts of ep rank "
                            "dp %% ep-size.")
    group.add_argument("--parallel-init-order", type=str, default="tp-cp-ep-dp-pp",
                       help="expected parallel initialized order, only support tp-cp-ep-dp-pp now")
    group.add_argument("--vpp-size", type=int, default=1,
                       help="equals to virtual_pipeline_model_parallel_size, "
                            "vpp_size * num_layers_per_virtual_pipeline_stage == num_layers // pp_size")
    group.add_argument("--stage-list", type=int, default=None, nargs="+",
                       help="Number of layers per pipeline stage")
    group.add_argument("--num-layers", type=int, default=None,
                       help="Number of layers in Megatron models (default: from the checkpoint's args)")

    group = parser.add_argument_group(title="Advanced feature")
    group.add_argument("--generate-all-dp-cp", action="store_true", default=False,
                       help="Whether generate all dp ckpt, or just dp-cp-0.")
    group.add_argument("--convert-param-only", action="store_true", default=False,
                       help="Convert only `model_optim_rng.pt`, which holds the model parameters in the "
                            "training run's dtype (bf16 for a --bf16 run) and no optimizer; they are written as fp32 "
                            "(integer tensors keep their type), with the step and learning-rate scalars. The fp32 "
                            "master weights and Adam moments are in distrib_optim.pt, which this flag skips (no "
                            "param_map needed either); if you want to convert model with optimizer, optimizer "
                            "scheduler and other args, please do NOT use this argument.")
    group.add_argument("--file-prefix", type=str, default="network", help="Mindspore checkpoint filename")
    group.add_argument("--format", type=str, default="ckpt", choices=["ckpt", "safetensors"],
                       help="Mindspore checkpoint file format")
    group.add_argument("--dist-opt-content", type=str, default=["param", "exp_avg", "exp_avg_sq"], nargs="+",
                       help="Torch distributed file content. i.e exp_avg in Adam optimizer")
    group.add_argument("--debug", action="store_true", default=False, help="print debug info")
    group.add_argument("--multiprocess-off", action="store_true", default=False,
                       help="Turn off multiprocess.")
    group.add_argument("--process-limit", type=int, default=4, help="Max num of processes.")
    group.add_argument("--process_timeout", "--process-timeout", dest="process_timeout", type=int,
                       default=3600, help="Timeout for each process.")

    group = parser.add_argument_group(title="Safety (not in the documented tool)")
    group.add_argument("--verify", action="store_true", default=False,
                       help="re-open every output with mindspore.load_checkpoint and compare each tensor "
                            "with its source, element by element")
    group.add_argument("--overwrite", action="store_true", default=False,
                       help="redo every rank even if a complete output from this source exists, and replace "
                            "outputs written from another source")
    group.add_argument("--trust-layout", choices=["map", "checkpoint"], default=None,
                       help="when the --param-map-path map and the layout the checkpoint implies both fit but "
                            "differ: use the map, or ignore the map and use the checkpoint's layout (default: stop "
                            "with an error listing the differences)")
    group.add_argument("--save-param-map", type=str, default=None, metavar="DIR",
                       help="write the bucket layout used (inferred or given) as param_map JSON files to DIR")
    group.add_argument("--name-style", choices=list(STYLES), default="mindspeed",
                       help="parameter names to write: 'mindspeed' = the names MindSpeed-Core-MS's GPTModel "
                            "loads; 'documented' = the documented tool's names (see docs/names.md)")
    add_reshard_flags(parser)
    add_shard_flags(parser, "--ms-path")
    add_dry_run_flag(parser)
    return parser


REPLICA_POLICIES = ("first", "mean")  # as megatron_ms_convert.reshard.assemble names them


def add_reshard_flags(parser: argparse.ArgumentParser) -> None:
    """The MindSpore run's own layout (docs/resharding.md): each defaults to the Megatron run's, so
    without them the output is today's, byte for byte."""
    group = parser.add_argument_group(title="Re-sharding: the MindSpore run's layout (not in the documented tool)")
    group.add_argument("--ms-tp-size", type=int, default=None,
                       help="tensor-parallel size of the MindSpore run (default: --tp-size)")
    group.add_argument("--ms-pp-size", type=int, default=None,
                       help="pipeline size of the MindSpore run (default: --pp-size)")
    group.add_argument("--ms-vpp-size", type=int, default=None,
                       help="virtual pipeline chunks per stage of the MindSpore run (default: --vpp-size when "
                            "--ms-pp-size is not given, else 1)")
    group.add_argument("--ms-stage-list", type=int, default=None, nargs="+",
                       help="the MindSpore run's num_layer_list: layers per stage (with --ms-vpp-size V, V x pp "
                            "counts, chunk-major) (default: the Megatron stages at the same pp, else "
                            "MindSpeed's own split, logged)")
    group.add_argument("--ms-ep-size", type=int, default=None,
                       help="expert-parallel size of the MindSpore run (MoE; default: the Megatron run's)")
    add_replica_policy_flag(group)


def add_replica_policy_flag(group) -> None:
    """--replica-policy, the same in both directions (the source tp ranks: Megatron's on the way there,
    the MindSpore files' on the way back)."""
    group.add_argument("--replica-policy", choices=REPLICA_POLICIES, default=None,
                       help="when re-sharding, a replicated parameter (norm, row-parallel bias, position table, "
                            "router) whose copies differ between source tp ranks: take tp rank 0's (first) or "
                            "their average (mean) (default: stop and say by how much they differ)")


def ckpt2pt_parser() -> argparse.ArgumentParser:
    """The flags of convert_ckpt2pt.py: the documented tool's, then ours."""
    parser = _parser("convert_ckpt2pt", "Ckpt-to-pt conversion Arguments")
    group = parser.add_argument_group(title="distributed")
    group.add_argument("--num-layers", type=int, default=None,
                       help="Number of layers in Megatron models (default: from pt_meta's args)")
    group.add_argument("--dp-size", type=int, default=None,
                       help="Degree of data model parallelism of the Megatron run to resume (buckets are padded "
                            "for it) (default: the Megatron run's, from pt_meta)")
    group.add_argument("--cp-size", type=int, default=None,
                       help="Degree of context model parallelism (default: the Megatron run's, from pt_meta)")
    group.add_argument("--tp-size", type=int, default=None,
                       help="Degree of tensor model parallelism to write (default: the Megatron run's, from pt_meta)")
    group.add_argument("--pp-size", type=int, default=None,
                       help="Degree of pipeline model parallelism to write (default: the Megatron run's, from "
                            "pt_meta)")
    group.add_argument("--vpp-size", type=int, default=None,
                       help="virtual_pipeline_model_parallel_size to write, 1 without virtual pipelines (default: the "
                            "Megatron run's, from pt_meta)")
    group.add_argument("--src-model-format", type=str, default="ckpt", choices=["ckpt", "safetensors"],
                       help="MindSpore checkpoint file format")
    group.add_argument("--noop", type=int, nargs="+", default=None,
                       help="global layer numbers of no-op layers that exist in the MindSpore model but not in "
                            "Megatron's (skipped)")
    group.add_argument("--ep-size", type=int, default=None,
                       help="expert parallel size of the run (MoE; default: from pt_meta, which records it; given, "
                            "it is checked against that)")
    group.add_argument("--ms-dp-size", type=int, default=None,
                       help="data-parallel size the rank_N folders are numbered with (default: --dp-size; without "
                            "either, the dp pt_meta/layout.json records, else the Megatron run's)")
    group.add_argument("--ms-cp-size", type=int, default=None,
                       help="context-parallel size the rank_N folders are numbered with (default: --cp-size; without "
                            "either, as for --ms-dp-size)")

    group = parser.add_argument_group(title="File Path/Location")
    group.add_argument("--ms-path", type=str, required=True, help="Path to the MindSpore rank_N folders.")
    group.add_argument("--param-map-path", type=str, required=True,
                       help="The pt_meta folder convert_pt2ckpt.py wrote.")
    group.add_argument("--megatron-path", type=str, required=True, help="Path for saving the Megatron checkpoint.")

    group = parser.add_argument_group(title="Advanced feature")
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
    add_replica_policy_flag(parser.add_argument_group(
        title="Re-sharding: writing Megatron at another layout than the MindSpore files' (not in the documented "
              "tool)"))
    add_shard_flags(parser, "--megatron-path")
    add_bucket_form_flags(parser)
    add_dry_run_flag(parser)
    return parser
