"""Who holds what: Megatron's rank folders and MindSpore's rank numbers, in both directions.

A Megatron checkpoint has one `mp_rank_TT[_PPP]` folder per (tensor, pipeline) rank; MindSpore has
one `rank_R` folder per global rank, numbered in the initialisation order tp-cp-ep-dp-pp. Layer
numbers are local to a pipeline stage (and virtual chunk) in Megatron and global in MindSpore.

    >>> topo = Topology(tp_size=2, pp_size=2, dp_size=2, cp_size=1, vpp_size=1, num_layers=4, stage_list=(2, 2))
    >>> topo.ms_rank(tp=1, pp=1), topo.source_ranks(5)
    (5, (1, 1, 0, 0))
    >>> folder_name(1, 1, pp_size=2), parse_folder_name("mp_rank_01_001", pp_size=2)
    ('mp_rank_01_001', (1, 1))
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import ConvertInputError

MODEL_FILE = "model_optim_rng.pt"
DISTRIB_FILE = "distrib_optim.pt"

_RANK_FOLDER = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


@dataclass(frozen=True)
class Topology:
    """The parallel layout of the source run and of the MindSpore target ranks."""

    tp_size: int
    pp_size: int
    dp_size: int
    cp_size: int
    vpp_size: int
    num_layers: int
    stage_list: tuple[int, ...]

    def layers_in_chunk(self, pp: int) -> int:
        if self.vpp_size > 1:
            return self.num_layers // (self.pp_size * self.vpp_size)
        return self.stage_list[pp]

    def global_layer(self, pp: int, chunk: int, local: int) -> int:
        """Local layer `local` of chunk `chunk` on stage `pp` -> its layer number in the whole model.
        With virtual pipelines Megatron deals layers round-robin: chunk v of stage p holds layers
        v*(L/V) + p*(L/(P*V)) + i."""
        if self.vpp_size > 1:
            per_chunk = self.num_layers // (self.pp_size * self.vpp_size)
            return chunk * (self.num_layers // self.vpp_size) + pp * per_chunk + local
        return sum(self.stage_list[:pp]) + local

    def local_layer(self, global_layer: int) -> tuple[int, int, int]:
        """The inverse of global_layer: (pp, chunk, local) of a global layer number."""
        if self.vpp_size > 1:
            per_chunk = self.num_layers // (self.pp_size * self.vpp_size)
            chunk, rest = divmod(global_layer, self.num_layers // self.vpp_size)
            pp, local = divmod(rest, per_chunk)
            return pp, chunk, local
        start = 0
        for pp, count in enumerate(self.stage_list):
            if global_layer < start + count:
                return pp, 0, global_layer - start
            start += count
        raise ValueError(f"layer {global_layer} is beyond num_layers {self.num_layers}")

    def layer_map(self, pp: int, chunk: int) -> Callable[[int], int]:
        return lambda local: self.global_layer(pp, chunk, local)

    def ms_rank(self, tp: int, pp: int, dp: int = 0, cp: int = 0) -> int:
        """MindSpore rank number for initialisation order tp-cp-ep-dp-pp."""
        return ((pp * self.dp_size + dp) * self.cp_size + cp) * self.tp_size + tp

    def source_ranks(self, rank: int) -> tuple[int, int, int, int]:
        """The inverse of ms_rank: (tp, pp, dp, cp) of a MindSpore rank number."""
        rest, tp = divmod(rank, self.tp_size)
        rest, cp = divmod(rest, self.cp_size)
        pp, dp = divmod(rest, self.dp_size)
        return tp, pp, dp, cp

    def target_ranks(self, tp: int, pp: int, all_dp_cp: bool) -> list[int]:
        if not all_dp_cp:
            return [self.ms_rank(tp, pp)]
        return [self.ms_rank(tp, pp, dp, cp) for dp in range(self.dp_size) for cp in range(self.cp_size)]


@dataclass(frozen=True, order=True)
class RankFolder:
    """One `mp_rank_TT[_PPP]` folder: the model files of one (tensor, pipeline) rank."""

    pp: int
    tp: int
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def distrib_file(self) -> Path:
        return self.path / DISTRIB_FILE


def folder_name(tp: int, pp: int, pp_size: int) -> str:
    """Megatron's folder name of a (tp, pp) rank: the pipeline part only when pp_size > 1."""
    return f"mp_rank_{tp:02d}" if pp_size == 1 else f"mp_rank_{tp:02d}_{pp:03d}"


def parse_folder_name(name: str, pp_size: int) -> tuple[int, int] | None:
    """(tp, pp) of an `mp_rank_*` folder name, None when the name is not one; expert-parallel names
    are refused because their optimizer state is a ChainedOptimizer list this tool does not convert."""
    match = _RANK_FOLDER.match(name)
    if not match:
        return None
    tp, second, third = match.group(1), match.group(2), match.group(3)
    if third is not None or (second is not None and pp_size == 1):
        raise ConvertInputError(
            f"folder {name}: looks like an expert-parallel (MoE) rank or a pipeline rank",
            expected="mp_rank_TT for --pp-size 1" if pp_size == 1 else "mp_rank_TT_PPP",
            found=name,
            fix="set --pp-size to the training run's pipeline size (expert parallelism is not supported)",
        )
    if second is None and pp_size > 1:
        raise ConvertInputError(f"folder {name}: has no pipeline rank",
                                expected=f"mp_rank_TT_PPP folders for --pp-size {pp_size}", found=name,
                                fix="set --pp-size 1 or check --megatron-path")
    return int(tp), int(second or 0)
