"""Planning the forward direction: from the facts of one Megatron rank folder (`RankInfo`), its
bucket layouts and the topology, the `PlannedTensor`s of its MindSpore file (names, shapes, dtypes
and the bucket slice or model tensor each comes from). Pure functions of metadata: no file is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .errors import ConvertInputError
from .megatron.layout import BufferLayout
from .naming import NamingFacts, local_expert_index, local_layer_numbers, mindspore_name, stacked_expert_name
from .scalars import EPOCH_NUM, STEP_NUM, encode_scheduler, group_scalar, is_number, scheduler_dtype
from .plan import BucketSlice, ModelTensor, PlannedTensor, RankInfo, Scalar, Stacked
from .topology import Topology


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
    """step_num, epoch_num, the optimizer's param-group numbers and the LR scheduler's state, as the
    `scalars` table stores them."""
    out = [PlannedTensor(STEP_NUM, (), "int64", Scalar(int(iteration))),
           PlannedTensor(EPOCH_NUM, (), "int64", Scalar(0))]
    group_entries: dict[str, PlannedTensor] = {}  # every group's step lands on the one state_step
    for i, group in enumerate(param_groups):
        for key, value in group.items():
            if key != "params" and is_number(value):
                name, shape = group_scalar(i, key)
                group_entries[name] = PlannedTensor(name, shape, "float32", Scalar(float(value)))
    out.extend(group_entries.values())
    for key, value in scheduler.items():
        dtype = scheduler_dtype(key, value)
        if dtype is not None:
            out.append(PlannedTensor(key, (), dtype, Scalar(encode_scheduler(key, value, model_file))))
    return out


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
