"""The plan: for every output tensor of every target rank, its name, shape and where its values come from.

Plans are frozen dataclasses built from metadata only (no tensor data), so they can be printed,
compared and unit-tested without a disk; the runner executes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

from .errors import ConvertInputError
from .megatron.layout import BucketCounts, BufferLayout
from .mindspore.format import ITEMSIZE
from .naming import (NamingFacts, is_expert_key, local_expert_index, local_layer_numbers, mindspore_name,
                     stacked_expert_name)
from .topology import RankFolder, Topology

LR_DECAY_STYLES = ["constant", "WSD", "linear", "cosine", "inverse-square-root"]
WD_INCR_STYLES = ["constant", "linear", "cosine"]
SCHEDULER_FLOAT64 = {"max_lr", "min_lr", "start_wd", "end_wd"}
SCHEDULER_INT64 = {"lr_warmup_steps", "num_steps", "lr_decay_steps", "wd_incr_steps"}


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


Source = Union[BucketSlice, ModelTensor, Scalar, Stacked]


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


# Floating-point model tensors are written as fp32 (what MindSpore's optimizer state holds); integer
# and flag tensors keep their values, so a step counter or a mask does not turn into floats.
_OUTPUT_DTYPES = {"torch.int32": "int32", "torch.int64": "int64", "torch.int16": "int32", "torch.int8": "int32",
                  "torch.uint8": "uint8", "torch.bool": "bool"}


def output_dtype(source_dtype: str) -> str:
    """The MindSpore-side dtype (numpy name) of a model tensor of torch dtype `source_dtype`.

    >>> output_dtype("torch.bfloat16"), output_dtype("torch.int64"), output_dtype("torch.bool")
    ('float32', 'int64', 'bool')
    """
    return _OUTPUT_DTYPES.get(source_dtype, "float32")


def _source_text(source: Source) -> str:
    if isinstance(source, Stacked):
        return "stack(" + ", ".join(_source_text(p) for p in source.parts) + ")"
    if isinstance(source, BucketSlice):
        return (f"distrib_optim{'[expert]' if source.optimizer else ''}[{source.gbuf_idx}][{source.dtype_key}]"
                f"[{source.state}][{source.bucket}][{source.start}:{source.end}]")
    if isinstance(source, ModelTensor):
        return f"model_optim_rng[{source.chunk_key}][{source.key}]"
    return repr(source.value)


# ---------------------------------------------------------------------------------------------
# Names


def check_layer_counts(info: RankInfo, topo: Topology) -> None:
    """Each chunk must hold exactly the layers the numbering assumes, or global names would be wrong."""
    expected = topo.layers_in_chunk(info.folder.pp)
    for chunk, tensors in enumerate(info.chunk_tensors):
        found = local_layer_numbers([key for key, _, _ in tensors])
        if found != set(range(expected)):
            flag = "--vpp-size/--num-layers" if topo.vpp_size > 1 else "--stage-list/--num-layers"
            raise ConvertInputError(
                f"{info.folder.model_file}: model chunk {chunk} holds layers {_ranges(found)}",
                expected=f"{expected} layers (0..{expected - 1}) from {flag} "
                         f"(num_layers {topo.num_layers}, pp {topo.pp_size}, vpp {topo.vpp_size}"
                         + (f", stage_list {list(topo.stage_list)})" if topo.vpp_size == 1 else ")"),
                found=f"{len(found)} layers",
                fix=f"set {flag} to the training run's values")


def _ranges(numbers: set[int]) -> str:
    if not numbers:
        return "none"
    return f"{min(numbers)}..{max(numbers)}" if numbers == set(range(min(numbers), max(numbers) + 1)) \
        else str(sorted(numbers))


# ---------------------------------------------------------------------------------------------
# Extra scalars


def optimizer_scalars(iteration: int, param_groups: Sequence[dict], scheduler: dict,
                      model_file: Path) -> list[PlannedTensor]:
    """step_num, epoch_num, the optimizer's param-group numbers and the LR scheduler's state."""
    out = [PlannedTensor("step_num", (), "int64", Scalar(int(iteration))),
           PlannedTensor("epoch_num", (), "int64", Scalar(0))]
    group_entries: dict[str, PlannedTensor] = {}
    for i, group in enumerate(param_groups):
        for key, value in group.items():
            if key == "params" or not _is_number(value):
                continue
            if key == "step":
                # one step counter for all groups, as MindSpore's optimizer keeps it
                group_entries["state_step"] = PlannedTensor("state_step", (1,), "float32", Scalar(float(value)))
                continue
            name = f"learning_rate_group_{i}" if key == "lr" else f"{key}_group_{i}"
            group_entries[name] = PlannedTensor(name, (), "float32", Scalar(float(value)))
    out.extend(group_entries.values())
    for key, value in scheduler.items():
        if key in ("lr_decay_style", "wd_incr_style"):
            styles = LR_DECAY_STYLES if key == "lr_decay_style" else WD_INCR_STYLES
            if value not in styles:
                raise ConvertInputError(f"{model_file}: opt_param_scheduler {key} is {value!r}",
                                        expected=f"one of {styles}", found=repr(value),
                                        fix="this style has no MindSpore equivalent; convert with a supported one")
            out.append(PlannedTensor(key, (), "int64", Scalar(styles.index(value))))
        elif key in SCHEDULER_FLOAT64 and _is_number(value):
            out.append(PlannedTensor(key, (), "float64", Scalar(float(value))))
        elif key in SCHEDULER_INT64 and _is_number(value):
            out.append(PlannedTensor(key, (), "int64", Scalar(int(value))))
        elif _is_number(value):
            out.append(PlannedTensor(key, (), "float32", Scalar(float(value))))
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float))  # bool included: MindSpore keeps flags as 0.0/1.0


# ---------------------------------------------------------------------------------------------
# Plans


def plan_optimizer_tensors(info: RankInfo, layouts: Sequence[BufferLayout], topo: Topology,
                           states: Sequence[str], facts: NamingFacts,
                           expert_layouts: Sequence[BufferLayout] = ()) -> list[PlannedTensor]:
    """fp32 master weights and Adam moments of every parameter, sliced out of their buckets (the dense
    optimizer's, then the experts' in a MoE run)."""
    missing = [s for s in states if s not in info.states]
    if missing:
        raise ConvertInputError(f"{info.folder.distrib_file}: no optimizer state {missing}",
                                expected=f"--dist-opt-content from {list(info.states)}", found=str(missing),
                                fix="pass --dist-opt-content with states the file holds")
    out = []
    for optimizer, (these, counts) in enumerate(((layouts, info.counts), (expert_layouts, info.expert_counts))):
        for gbuf, layout in enumerate(these):
            count = counts[gbuf]
            layer_map = topo.layer_map(info.folder.pp, layout.chunk)
            for span in layout.params:
                base = count.bucket_start(span.bucket)
                for state in states:
                    source = BucketSlice(gbuf, count.dtype_key, state, span.bucket, span.start - base,
                                         span.end - base, optimizer)
                    name = mindspore_name(span.name, facts, layer_map, state, where=str(info.folder.model_file))
                    out.append(PlannedTensor(name, span.shape, "float32", source))
    return out


def stack_local_experts(tensors: Sequence[PlannedTensor], num_local: int, where: Path) -> list[PlannedTensor]:
    """MindSpeed-Core-MS's checkpoint form of a rank's experts: the tensors of local experts 0..n-1 of
    one parameter (or moment) become one tensor of shape (n, *shape) under the name of local expert 0,
    at the place of the first of them. Every local expert must be there, with one shape."""
    groups: dict[str, list[PlannedTensor]] = {}
    out: list[PlannedTensor | str] = []
    for t in tensors:
        index = local_expert_index(t.name)
        if index is None:
            out.append(t)
            continue
        stacked = stacked_expert_name(t.name)
        if stacked not in groups:
            groups[stacked] = []
            out.append(stacked)
        groups[stacked].append(t)
    result = []
    for item in out:
        if isinstance(item, PlannedTensor):
            result.append(item)
            continue
        members = sorted(groups[item], key=lambda t: local_expert_index(t.name))
        indices = [local_expert_index(t.name) for t in members]
        shapes = {t.shape for t in members}
        if indices != list(range(num_local)) or len(shapes) != 1:
            raise ConvertInputError(f"{where}: local experts {indices} of {item} (shapes {sorted(shapes)})",
                                    expected=f"local experts 0..{num_local - 1} (num_experts / ep size) of one shape",
                                    found=f"{len(indices)} experts",
                                    fix="set --ep-size to the training run's expert_model_parallel_size")
        first = members[0]
        result.append(PlannedTensor(item, (num_local, *first.shape), first.dtype,
                                    Stacked(tuple(t.source for t in members))))
    return result


def plan_model_tensors(info: RankInfo, topo: Topology,
                       facts: NamingFacts) -> tuple[list[PlannedTensor], tuple[tuple[str, ...], ...]]:
    """--convert-param-only: every tensor of model_optim_rng.pt (floating point ones as fp32, integer
    ones keeping their values), plus the per-chunk list of source names (reversed, as the documented
    tool records them for the way back)."""
    out, name_lists = [], []
    for chunk, (chunk_key, tensors) in enumerate(zip(info.chunk_keys, info.chunk_tensors)):
        layer_map = topo.layer_map(info.folder.pp, chunk)
        for key, shape, dtype in tensors:
            name = mindspore_name(key, facts, layer_map, where=str(info.folder.model_file))
            out.append(PlannedTensor(name, shape, output_dtype(dtype), ModelTensor(chunk_key, key)))
        name_lists.append(tuple(f"{chunk_key}.{key}" for key, _, _ in reversed(tensors)))
    return out, tuple(name_lists)


def check_unique_names(tensors: Sequence[PlannedTensor], where: Path) -> None:
    seen: set[str] = set()
    for t in tensors:
        if t.name in seen:
            raise ConvertInputError(f"{where}: two tensors would both be named {t.name}",
                                    expected="unique MindSpore names", found="a duplicate",
                                    fix="check --num-layers/--stage-list/--vpp-size")
        seen.add(t.name)
