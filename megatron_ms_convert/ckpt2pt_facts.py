"""Reading the facts of the way back, at the edge, once: each rank's pt_meta record decoded into a
`RankMeta` (the model skeletons, grad-buffer layouts and bucket sizes the Megatron files are rebuilt
from) and each MindSpore file's header and scalar values as `MsFileFacts`. Planning (in `ckpt2pt`)
is a function of these; the worker (`ckpt2pt_execute`) re-reads its rank's pt_meta itself.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import ConvertInputError
from .megatron.checkpoint import load_pt
from .megatron.layout import list_param_map_files, read_rank_layouts, state_key_for
from .megatron.pt_meta import counts_from_meta, layouts_from_meta, skeletons_from_meta
from .megatron.rebuild_rules import rule_counts, rule_skeletons
from .mindspore.bucket_form import BucketRankFile, BucketSource
from .mindspore.reader import MindSporeFile, StoredTensor
from .naming import naming_facts
from .plan import RankMeta

log = logging.getLogger(__name__)


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
