"""The records of both directions: the facts planning reads (`RankInfo` of a Megatron folder,
`RankMeta` of a pt_meta record) and the plans it makes (`RankPlan` with its `PlannedTensor`s forward,
`BackPlan` with its `StatePart`s back): for every output tensor of every target rank, its name,
shape and where its values come from.

Plans are frozen dataclasses built from metadata only (no tensor data), so they can be printed
(`describe()`, --dry-run), compared and unit-tested without a disk; the workers execute them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from .megatron.layout import BucketCounts, BufferLayout
from .mindspore.format import ITEMSIZE
from .megatron.pt_meta import is_moe_record
from .naming import is_expert_key
from .topology import DISTRIB_FILE, MODEL_FILE, RankFolder

from .reshard.placement import RankCoord
from .reshard.planner import TargetTensor

if TYPE_CHECKING:  # the records name the type; reading the form is the facts step's business
    from .mindspore.bucket_form import BucketSource


@dataclass(frozen=True)
class BucketSlice:
    """Elements [start, end) of bucket `bucket` of optimizer state `state` in grad buffer `gbuf_idx`
    of optimizer `optimizer` (an index into RankPlan.distrib_sources(): 0 = the dense optimizer,
    1 = the experts' in a MoE run)."""

    gbuf_idx: int
    dtype_key: tuple[str, str]
    state: str
    bucket: int
    start: int
    end: int
    optimizer: int = 0


@dataclass(frozen=True)
class ModelTensor:
    """A tensor of model_optim_rng.pt (`chunk_key` is 'model' or 'modelN'), cast to fp32."""

    chunk_key: str
    key: str


@dataclass(frozen=True)
class Scalar:
    value: Union[int, float]


@dataclass(frozen=True)
class Stacked:
    """Several same-shaped sources stacked on a new axis 0: a rank's local experts, as MindSpeed-Core-MS
    saves them under the name of local expert 0."""

    parts: tuple[Union[BucketSlice, ModelTensor], ...]


@dataclass(frozen=True)
class Gathered:
    """A re-sharded tensor: target tensor `tensor` of the re-sharding plan (its shape and the source
    segments that fill it, boxes of source tensors named by (source rank, chunk, key)), and where each
    of those source tensors is for this optimizer state: `spans` maps (source rank, chunk, key) to its
    bucket slice, whose `optimizer` indexes the plan's `distrib_parts` (several source folders' files).
    Replicas of a replicated parameter are mapped too, for the equality check."""

    tensor: TargetTensor
    spans: tuple[tuple[tuple[RankCoord, int, str], BucketSlice], ...]

    def span(self, rank: RankCoord, chunk: int, key: str) -> BucketSlice:
        return dict(self.spans)[(rank, chunk, key)]


Source = Union[BucketSlice, ModelTensor, Scalar, Stacked, Gathered]


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    source: Source


@dataclass(frozen=True)
class RankInfo:
    """What planning needs from one rank folder: metadata only, no tensor data."""

    folder: RankFolder
    iteration: int
    args: Any
    chunk_keys: tuple[str, ...]
    # per chunk: (state key, shape, dtype string) of every tensor, in saved order
    chunk_tensors: tuple[tuple[tuple[str, tuple[int, ...], str], ...], ...]
    param_groups: tuple[dict, ...]
    scheduler: dict
    counts: tuple[BucketCounts, ...] = ()
    states: tuple[str, ...] = ()
    # MoE runs: the experts' optimizer (element 1 of distrib_optim.pt's list); `counts` is then the
    # dense optimizer's, which only ep rank 0's folder holds
    expert_counts: tuple[BucketCounts, ...] = ()
    dense_distrib_file: Path | None = None

    def dense_tensors(self) -> list[tuple[tuple[str, tuple[int, ...], str], ...]]:
        """Per chunk, the tensors of the dense grad buffers: all of them unless the experts have their
        own optimizer (expert parallelism > 1; without it Megatron keeps experts in the dense buffers)."""
        if not self.expert_counts:
            return list(self.chunk_tensors)
        return [tuple(t for t in tensors if not is_expert_key(t[0])) for tensors in self.chunk_tensors]

    def expert_tensors(self) -> list[tuple[tuple[str, tuple[int, ...], str], ...]]:
        """Per chunk, the tensors of the expert-parallel grad buffers."""
        return [tuple(t for t in tensors if is_expert_key(t[0])) for tensors in self.chunk_tensors]

    def tensors_by_key(self, chunk: int) -> dict[str, tuple[tuple[int, ...], str]]:
        return {key: (shape, dtype) for key, shape, dtype in self.chunk_tensors[chunk]}


@dataclass(frozen=True)
class RankPlan:
    """Everything one worker does for one source folder."""

    folder: RankFolder
    fmt: str
    outputs: tuple[Path, ...]  # outputs[0] is written, the others are copies of it
    meta_file: Path
    tensors: tuple[PlannedTensor, ...]
    reads_distrib: bool
    param_name_list: tuple[tuple[str, ...], ...] | None = None
    layouts: tuple[BufferLayout, ...] = field(default=(), compare=False)
    # MoE: (distrib_optim.pt, list element) per optimizer; empty = the folder's own file, not a list
    distrib_parts: tuple[tuple[Path, int], ...] = ()
    expert_layouts: tuple[BufferLayout, ...] = field(default=(), compare=False)
    moe: tuple[tuple[str, int], ...] = ()  # (('ep_rank', e), ('ep_size', n), ('num_local_experts', k)) for pt_meta
    # identifies the source files and the plan, so a re-run can tell its own finished work apart
    fingerprint: str = field(default="", compare=False)
    manifest_file: Path | None = None

    def distrib_sources(self) -> tuple[tuple[Path, int | None], ...]:
        """Where each optimizer's buckets are: (file, element of its list or None for a plain dict)."""
        return self.distrib_parts or ((self.folder.distrib_file, None),)

    @property
    def output_files(self) -> tuple[Path, ...]:
        """Every file this plan writes, besides its manifest."""
        return (*self.outputs, self.meta_file)

    def ends(self) -> tuple[Path, Path]:
        """(what it reads, what it writes), as the log names them."""
        return self.folder.path, self.outputs[0]

    def source_files(self) -> list[Path]:
        """The files the plan reads, whose identity its fingerprint records (the layouts' too: a
        changed param_map file makes another conversion)."""
        sources = [self.folder.model_file] + ([path for path, _ in self.distrib_sources()] if self.reads_distrib
                                              else [])
        return sources + [Path(layout.source) for layout in (*self.layouts, *self.expert_layouts)
                          if Path(layout.source).is_file()]

    @property
    def total_bytes(self) -> int:
        return sum(math.prod(t.shape) * _itemsize(t.dtype) for t in self.tensors)

    def describe(self) -> str:
        """The plan as text, one tensor a line (printed with --debug)."""
        lines = [f"plan for {self.folder.path} -> {', '.join(map(str, self.outputs))}"]
        for t in self.tensors:
            lines.append(f"  {t.name} {list(t.shape)} {t.dtype} <- {_source_text(t.source)}")
        return "\n".join(lines)


def _itemsize(dtype: str) -> int:
    return ITEMSIZE[dtype]


def _source_text(source: Source) -> str:
    if isinstance(source, Gathered):
        lines = [f"gather {source.tensor.rule} from {len(source.tensor.segments)} segments:"]
        for seg in source.tensor.segments:
            s = source.span(seg.source, seg.chunk, seg.key)
            lines.append(f"      {seg.describe()} @ optimizer file {s.optimizer}[{s.gbuf_idx}][{s.state}]"
                         f"[{s.bucket}][{s.start}:{s.end}]")
        return "\n".join(lines)
    if isinstance(source, Stacked):
        return "stack(" + ", ".join(_source_text(p) for p in source.parts) + ")"
    if isinstance(source, BucketSlice):
        return (f"distrib_optim{'[expert]' if source.optimizer else ''}[{source.gbuf_idx}][{source.dtype_key}]"
                f"[{source.state}][{source.bucket}][{source.start}:{source.end}]")
    if isinstance(source, ModelTensor):
        return f"model_optim_rng[{source.chunk_key}][{source.key}]"
    return repr(source.value)


@dataclass(frozen=True)
class TargetFolder:
    """One target rank of a re-shard, as the runner and the manifests name it: (tp, pp, ep) of the
    MindSpore layout and the folder of its first output."""

    tp: int
    pp: int
    ep: int
    path: Path

    @property
    def name(self) -> str:
        return f"target_tp{self.tp:02d}_pp{self.pp:03d}_ep{self.ep:03d}"


@dataclass(frozen=True)
class TargetRankPlan:
    """Everything one worker does for one target rank of a re-shard: gather its tensors from several
    source folders' distrib_optim.pt (`distrib_parts`: (file, list element or None)), write one
    MindSpore file and its copies."""

    folder: TargetFolder
    fmt: str
    outputs: tuple[Path, ...]  # outputs[0] is written, the others are copies of it
    tensors: tuple[PlannedTensor, ...]
    distrib_parts: tuple[tuple[Path, int | None], ...]
    sources: tuple[Path, ...]  # the source folders read
    replica_policy: str | None = None
    fingerprint: str = field(default="", compare=False)
    manifest_file: Path | None = None
    # the tied head copies a target pp of 1 drops: (what, the copy's slice, the embedding's slice), for
    # a warning when they differ (the embedding is what is kept)
    tied_checks: tuple[tuple[str, BucketSlice, BucketSlice], ...] = ()

    @property
    def output_files(self) -> tuple[Path, ...]:
        return self.outputs

    def ends(self) -> tuple[str, Path]:
        """(what it reads, what it writes), as the log names them: the source iteration folder and
        which target rank (several target ranks read the same folders)."""
        return (f"{self.sources[0].parent} (target tp{self.folder.tp} pp{self.folder.pp} ep{self.folder.ep})",
                self.outputs[0])

    def source_files(self) -> list[Path]:
        return sorted({path for path, _ in self.distrib_parts})

    @property
    def total_bytes(self) -> int:
        return sum(math.prod(t.shape) * _itemsize(t.dtype) for t in self.tensors)

    def describe(self) -> str:
        """Every output tensor with its source segments (what --dry-run prints)."""
        lines = [f"plan for target tp{self.folder.tp} pp{self.folder.pp} ep{self.folder.ep} -> "
                 f"{', '.join(map(str, self.outputs))}",
                 f"  reads {', '.join(str(p) for p in self.sources)}"]
        lines += [f"  optimizer file {i}: {path}" + ("" if element is None else f"[{element}]")
                  for i, (path, element) in enumerate(self.distrib_parts)]
        for t in self.tensors:
            lines.append(f"  {t.name} {list(t.shape)} {t.dtype} <- {_source_text(t.source)}")
        return "\n".join(lines)


@dataclass(frozen=True)
class BackTarget:
    """One tensor the way back writes: a model parameter of model_optim_rng.pt, or one bucket of an
    optimizer state of distrib_optim.pt, with where its values come from as text."""

    file: str
    key: str
    shape: tuple[int, ...]
    dtype: str
    source: str


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
    # every output tensor, for describe(): what the worker derives from pt_meta again (not part of the
    # fingerprint, which predates it)
    targets: tuple[BackTarget, ...] = field(default=(), compare=False, repr=False)
    # re-sharding (another layout than the MindSpore files'): the folder's structure as Megatron builds it
    # at the target layout (instead of pt_meta_file's record), and (chunk, state-dict key, state) ->
    # the reshard.TargetTensor assembling it from the tensors named in its segments, read from the
    # files of `source_paths` ((source RankCoord, file) pairs)
    rank_meta: Any = field(default=None, compare=False, repr=False)
    reshard: tuple = ()
    source_paths: tuple = ()
    replica_policy: str | None = None  # --replica-policy: replicated copies that differ across source tp ranks

    def padded_for(self, part: StatePart) -> int:
        """The data-parallel size a part's buckets are padded for: DP x CP for the dense optimizer, the
        expert-data-parallel size (DP x CP / EP) for the experts'."""
        return self.dp_cp // self.ep_size if part.kind == "expert" else self.dp_cp

    @property
    def outputs(self) -> tuple[Path, ...]:
        return (self.out_dir / MODEL_FILE,) + ((self.out_dir / DISTRIB_FILE,) if self.write_distrib else ())

    @property
    def output_files(self) -> tuple[Path, ...]:
        return self.outputs

    def ends(self) -> tuple[Path | str, Path]:
        """(what it reads, what it writes), as the log names them: at another layout, every MindSpore
        file the folder is assembled from."""
        files = sorted({path for _, path in self.source_paths})
        if len(files) < 2:
            return (files[0] if files else self.source_file), self.out_dir
        return f"{files[0].parent.parent} ({', '.join(f'{p.parent.name}/{p.name}' for p in files)})", self.out_dir

    def source_files(self) -> list[Path]:
        """The files the plan reads, whose identity its fingerprint records."""
        return [self.source_file, self.pt_meta_file, *(self.bucket.inputs if self.bucket else ()),
                *(path for _, path in self.source_paths if path != self.source_file)]

    def describe(self) -> str:
        lines = [f"plan for {self.source_file} -> {self.out_dir} (iteration {self.iteration}, dp x cp {self.dp_cp})"]
        lines += [f"  set args.{k} = {v!r}" for k, v in self.args_updates]
        lines += [f"  set param_groups[{i}][{k!r}] = {v!r}" for i, k, v in self.group_updates]
        lines += [f"  set opt_param_scheduler[{k!r}] = {v!r}" for k, v in self.scheduler_updates]
        if self.targets:
            lines += [f"  {t.file} {t.key} {list(t.shape)} {t.dtype} <- {t.source}" for t in self.targets]
        else:
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
