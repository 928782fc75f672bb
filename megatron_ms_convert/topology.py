"""Who holds what: Megatron's rank folders and MindSpore's rank numbers, in both directions.

A Megatron checkpoint has one `mp_rank_TT[_PPP][_EEE]` folder per (tensor, pipeline, expert) rank
(the pipeline part when pp > 1, the expert part when expert parallelism is > 1); MindSpore has one
`rank_R` folder per global rank, numbered in the initialisation order tp-cp-ep-dp-pp, where the
expert-parallel rank is carved out of the data-parallel one (ep rank = dp rank mod ep size). Layer
numbers are local to a pipeline stage (and virtual chunk) in Megatron and global in MindSpore.

    >>> topo = Topology(tp_size=2, pp_size=2, dp_size=2, cp_size=1, vpp_size=1, num_layers=4, stage_list=(2, 2))
    >>> topo.ms_rank(tp=1, pp=1), topo.source_ranks(5)
    (5, (1, 1, 0, 0))
    >>> folder_name(1, 1, pp_size=2), parse_folder_name("mp_rank_01_001", pp_size=2)
    ('mp_rank_01_001', (1, 1))
    >>> folder_name(0, 1, pp_size=2, ep=1, ep_size=2), parse_folder_ranks("mp_rank_00_001", pp_size=1, ep_size=2)
    ('mp_rank_00_001_001', (0, 0, 1))
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
    ep_size: int = 1
    moe: bool = False  # expert parameters in the checkpoint: every dp rank needs its own file

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

    def target_ranks(self, tp: int, pp: int, all_dp_cp: bool, ep: int = 0) -> list[int]:
        """The MindSpore ranks that load the file of source rank (tp, pp, ep). Dense runs: dp = cp = 0,
        or every dp/cp rank with all_dp_cp. MoE runs: every dp rank whose ep rank (dp mod ep_size) is
        `ep`, since each loads its own file and a missing one stops it (cp 0, or every cp with all_dp_cp)."""
        cps = range(self.cp_size) if all_dp_cp else [0]
        if self.moe:
            return [self.ms_rank(tp, pp, dp, cp) for dp in self.dp_ranks_of_ep(ep) for cp in cps]
        if not all_dp_cp:
            return [self.ms_rank(tp, pp)]
        return [self.ms_rank(tp, pp, dp, cp) for dp in range(self.dp_size) for cp in cps]

    def dp_ranks_of_ep(self, ep: int) -> list[int]:
        """The target dp ranks whose expert-parallel rank is `ep` (ep rank = dp rank mod ep_size)."""
        return [dp for dp in range(self.dp_size) if dp % self.ep_size == ep]


@dataclass(frozen=True, order=True)
class RankFolder:
    """One `mp_rank_TT[_PPP][_EEE]` folder: the model files of one (tensor, pipeline, expert) rank."""

    pp: int
    tp: int
    path: Path
    ep: int = 0

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def distrib_file(self) -> Path:
        return self.path / DISTRIB_FILE


def folder_name(tp: int, pp: int, pp_size: int, ep: int = 0, ep_size: int = 1) -> str:
    """Megatron's folder name of a (tp, pp, ep) rank: the pipeline part only when pp_size > 1, the
    expert part only when ep_size > 1."""
    name = f"mp_rank_{tp:02d}"
    if pp_size > 1:
        name += f"_{pp:03d}"
    if ep_size > 1:
        name += f"_{ep:03d}"
    return name


def parse_folder_name(name: str, pp_size: int) -> tuple[int, int] | None:
    """(tp, pp) of an `mp_rank_*` folder name of a run without expert parallelism, None when the name
    is not one."""
    ranks = parse_folder_ranks(name, pp_size, ep_size=1)
    return None if ranks is None else ranks[:2]


def parse_folder_ranks(name: str, pp_size: int, ep_size: int) -> tuple[int, int, int] | None:
    """(tp, pp, ep) of an `mp_rank_*` folder name, None when the name is not one. A 3-digit part is the
    pipeline rank when pp_size > 1 and then the expert rank when ep_size > 1; which parts exist depends
    on the sizes alone, so a name with other parts belongs to a run of other sizes."""
    match = _RANK_FOLDER.match(name)
    if not match:
        return None
    parts = [int(p) for p in match.groups()[1:] if p is not None]
    want = int(pp_size > 1) + int(ep_size > 1)
    if len(parts) != want:
        expected = "mp_rank_TT" + ("_PPP" if pp_size > 1 else "") + ("_EEE" if ep_size > 1 else "")
        raise ConvertInputError(
            f"folder {name}: has {len(parts)} rank parts after the tensor rank",
            expected=f"{expected} for --pp-size {pp_size} and expert parallel size {ep_size}", found=name,
            fix="set --pp-size (and --ep-size) to the training run's pipeline (and expert) parallel sizes")
    pp = parts.pop(0) if pp_size > 1 else 0
    ep = parts.pop(0) if ep_size > 1 else 0
    return int(match.group(1)), pp, ep
