"""Reading the facts of the way back, at the edge, once: each rank's pt_meta record decoded into a
`RankMeta` (the model skeletons, grad-buffer layouts and bucket sizes the Megatron files are rebuilt
from), each MindSpore file's header and scalar values as `MsFileFacts`, and, when the way there
re-sharded the MindSpore files, the layout it wrote them at (`pt_meta/layout.json`, a
`WrittenLayout`). `read_facts` gathers them into a `BackFacts`; planning (`ckpt2pt_plan`) is a
function of these; the worker (`ckpt2pt_execute`) re-reads its rank's pt_meta itself.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .command import check_against_saved
from .errors import ConvertInputError
from .megatron.checkpoint import load_pt
from .megatron.layout import list_param_map_files, read_rank_layouts, state_key_for
from .megatron.pt_meta import (args_file_name, args_file_pattern, counts_from_meta, layouts_from_meta,
                               skeletons_from_meta)
from .megatron.rebuild_rules import rule_counts, rule_skeletons
from .megatron.writer import skeleton_specs
from .mindspore.bucket_form import BucketRankFile, BucketSource, describe_source, open_rank_source, rank_source
from .mindspore.reader import MindSporeFile, StoredTensor
from .naming import local_layer_numbers, naming_facts
from .plan import RankMeta
from .pt2ckpt_reshard import LAYOUT_FILE, LAYOUT_FORMAT
from .reshard import MINDSPORE, ModelFacts, ParallelLayout
from .topology import Topology

if TYPE_CHECKING:
    from .ckpt2pt import Options

log = logging.getLogger(__name__)

META_JSON = "meta.json"


def read_rank_meta(path: Path, need_layouts: bool, tp: int, pp: int, num_chunks: int) -> RankMeta:
    """A rank's pt_meta decoded. A record of the documented tool (no skeletons, layouts or bucket
    sizes) is completed by rules from the param_map JSON files beside it (rebuild_rules)."""
    meta = load_pt(path, check_all_data=True)
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


@dataclass(frozen=True)
class MsFileFacts:
    """What planning needs of one MindSpore file: every tensor's name, shape and dtype (the header),
    and the values of its one-element tensors (step_num, learning rates, scheduler state). Offers the
    part of `MindSporeFile`'s interface planning uses, without the file."""

    path: Path
    tensors: tuple[StoredTensor, ...]
    values: tuple[tuple[str, float | int], ...]  # (name, value) of every one-element tensor
    # MindSpeed's bucket form: the files of the rank's dp group the tensors are read from, and what
    # they hold (for messages); None / "" for a file of named tensors
    bucket: BucketSource | None = None
    contents: str = ""

    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def info(self, name: str) -> StoredTensor:
        return {t.name: t for t in self.tensors}[name]

    def __contains__(self, name) -> bool:
        return any(t.name == name for t in self.tensors)

    def scalar(self, name: str) -> float | int | None:
        """The value of a scalar the converter stores (None when the file has none of that name)."""
        if name not in self:
            return None
        shape = self.info(name).shape
        if math.prod(shape) != 1:
            raise ConvertInputError(f"{self.path}: {name} has shape {list(shape)}", expected="one value",
                                    fix="re-copy the file (damaged?) or check --ms-path")
        return dict(self.values)[name]


def read_ms_facts(ms: MindSporeFile | BucketRankFile, bucket: BucketSource | None = None) -> MsFileFacts:
    """The header of an open MindSpore file and the values of its one-element tensors (a few bytes)."""
    tensors = tuple(ms.info(name) for name in ms.names())
    values = tuple((t.name, ms.read(t.name).reshape(()).item()) for t in tensors if math.prod(t.shape) == 1)
    return MsFileFacts(ms.path, tensors, values, bucket, ms.describe_contents() if bucket is not None else "")


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


def read_source(options: "Options", ms_rank: int, rank: RankMeta) -> tuple[Path, BucketSource | None]:
    """The file of rank_<ms_rank> and, when it is MindSpeed's DistributedOptimizer bucket form, its
    group's inputs (docs/bucket-form.md). That form saves only the dense grad buffers' parameters, so
    it is refused for a MoE run (`rank`: a record of the run)."""
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


def recorded_ep_size(options: "Options") -> int:
    """The expert parallel size pt_meta records (1 when its records carry no `_epEEE`), checked
    against --ep-size: it decides which records and output folders there are."""
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
    return recorded


def check_dp_holds_ep(options: "Options", ep_size: int) -> None:
    """The MindSpore files' ep rank e is in the folder of dp rank e: the dp sizes must hold the ep size."""
    for flag, size in (("--dp-size", options.dp_size), ("--ms-dp-size", options.ms_dp_size)):
        if size % ep_size:
            raise ConvertInputError(f"{flag} {size} with expert parallel size {ep_size}",
                                    expected=f"a multiple of {ep_size} (the expert-parallel group is carved out of "
                                             "the data-parallel one)", found=str(size),
                                    fix=f"pass {flag} {ep_size * max(1, size // ep_size)} or another multiple of "
                                        f"{ep_size}")


def resolve_topology(options: "Options", metas: dict[tuple[int, int, int], RankMeta], ep_size: int = 1) -> Topology:
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


# ---------------------------------------------------------------------------------------------
# MindSpore files the way there re-sharded (pt_meta/layout.json)


@dataclass(frozen=True)
class WrittenLayout:
    """What `pt_meta/layout.json` says: the way there re-sharded the Megatron run at `source` (the
    layout pt_meta's records are at) into MindSpore files at `target` (its stage list: the layer
    count of every (chunk, stage), chunk-major), numbered for the MindSpore run's dp and cp."""

    path: Path
    source: ParallelLayout
    target: ParallelLayout
    model: ModelFacts
    dp_size: int
    cp_size: int


def read_written_layout(param_map_path: Path) -> WrittenLayout | None:
    """pt_meta/layout.json decoded; None when there is none (the files are at the records' layout)."""
    path = param_map_path / LAYOUT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if record.get("format") != LAYOUT_FORMAT:
            raise ValueError(f"format {record.get('format')!r}")
        source, target = (ParallelLayout(**{**record[side], "stage_list": tuple(record[side]["stage_list"])})
                          for side in ("source", "target"))
        target = ParallelLayout(MINDSPORE, target.tp, target.pp, target.vpp, target.ep,
                                tuple(int(n) for n in record["target_stage_list"]))
        return WrittenLayout(path, source, target, ModelFacts(**record["model"]), int(record["dp_size"]),
                             int(record["cp_size"]))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConvertInputError(f"{path}: not a re-shard layout record ({err})",
                                expected=f"the {LAYOUT_FILE} convert_pt2ckpt.py writes with --ms-* flags",
                                fix="re-copy pt_meta/ from the convert_pt2ckpt.py output") from None


def written_topology(written: WrittenLayout, options: "Options", records: Topology) -> Topology:
    """The MindSpore files' rank numbering at the layout the way there wrote them, checked against the
    records (the same run) and --ms-dp-size / --ms-cp-size (the numbering it used)."""
    source = written.source
    if (source.tp, source.pp, source.vpp, source.ep) != (records.tp_size, records.pp_size, records.vpp_size,
                                                         records.ep_size):
        raise ConvertInputError(f"{written.path}: re-sharded from tp {source.tp} pp {source.pp} vpp {source.vpp} "
                                f"ep {source.ep}", expected=f"the layout of the records beside it (tp "
                                f"{records.tp_size} pp {records.pp_size} vpp {records.vpp_size} ep {records.ep_size})",
                                fix="pass the pt_meta folder of the convert_pt2ckpt.py run that wrote --ms-path")
    if (options.ms_dp_size, options.ms_cp_size) != (written.dp_size, written.cp_size):
        raise ConvertInputError(f"--ms-dp-size {options.ms_dp_size} --ms-cp-size {options.ms_cp_size}: the rank_N "
                                f"folders are numbered for dp {written.dp_size} cp {written.cp_size} ({written.path})",
                                expected=f"dp {written.dp_size} cp {written.cp_size}",
                                found=f"dp {options.ms_dp_size} cp {options.ms_cp_size}",
                                fix=f"pass --ms-dp-size {written.dp_size} --ms-cp-size {written.cp_size}")
    target = written.target
    per_stage = tuple(sum(target.stage_list[v * target.pp + p] for v in range(target.vpp)) for p in range(target.pp))
    return Topology(tp_size=target.tp, pp_size=target.pp, dp_size=written.dp_size, cp_size=written.cp_size,
                    vpp_size=target.vpp, num_layers=records.num_layers, stage_list=per_stage, ep_size=target.ep,
                    moe=records.moe)


# ---------------------------------------------------------------------------------------------
# All of it


Rank = tuple[int, int, int]  # (tp, pp, ep)


@dataclass(frozen=True)
class BackFacts:
    """Everything the way back's planning reads, read once: the pt_meta record of every (tp, pp, ep)
    folder of the Megatron run (`metas`, at `topology`'s layout) and the header and scalars of every
    MindSpore rank file (`files`, keyed by the MindSpore (tp, pp, ep) rank). The files are at the
    records' layout, unless the way there re-sharded them (`written`: then at its target layout)."""

    topology: Topology
    metas: dict[Rank, RankMeta]
    files: dict[Rank, MsFileFacts]
    written: WrittenLayout | None = None

    def ranks(self) -> list[Rank]:
        return list(self.metas)


def read_facts(options: "Options", written: WrittenLayout | None = None) -> BackFacts:
    """pt_meta records, then the layout (checked against the flags), then the MindSpore files (at the
    records' layout, or at `written`'s)."""
    if not options.param_map_path.is_dir():
        raise ConvertInputError(f"--param-map-path {options.param_map_path}: no such folder",
                                fix="pass the pt_meta folder convert_pt2ckpt.py wrote")
    ep_size = recorded_ep_size(options)
    check_dp_holds_ep(options, ep_size if written is None else written.target.ep)
    ranks = [(tp, pp, ep) for pp in range(options.pp_size) for tp in range(options.tp_size) for ep in range(ep_size)]
    metas = {(tp, pp, ep): read_rank_meta(pt_meta_file(options.param_map_path, tp, pp, ep, ep_size),
                                          not options.convert_param_only, tp, pp, options.vpp_size)
             for tp, pp, ep in ranks}
    topo = resolve_topology(options, metas, ep_size)
    files = read_ms_files(options, topo if written is None else written_topology(written, options, topo),
                          metas[(0, 0, 0)])
    return BackFacts(topo, metas, files, written)


def read_ms_files(options: "Options", topo: Topology, record: RankMeta) -> dict[Rank, MsFileFacts]:
    """The header and scalars of the file of every (tp, pp, ep) rank of `topo` (ep rank e's experts are
    in the file of dp rank e, whose ep rank is e mod ep_size; cp 0)."""
    files = {}
    for pp in range(topo.pp_size):
        for tp in range(topo.tp_size):
            for ep in range(topo.ep_size):
                path, bucket = read_source(options, topo.ms_rank(tp, pp, dp=ep), record)
                log.info("rank tp %d pp %d%s: reading %s", tp, pp, f" ep {ep}" if topo.ep_size > 1 else "",
                         describe_source(path, bucket))
                with open_rank_source(path, options.fmt, bucket) as ms:
                    if bucket is not None:
                        log.debug("%s", ms.layout.describe())
                    files[(tp, pp, ep)] = read_ms_facts(ms, bucket)
    return files
