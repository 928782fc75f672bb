"""The object trees of the two Megatron files of one (tp, pp) rank, ready for `write_torch_file`.

What lives here: the skeleton of a model_optim_rng.pt (its structure with every model tensor replaced
by a `TensorSpec`), its encoding as plain data for pt_meta, the updates the way back applies to it
(iteration, consumed samples, learning rate, ...), and the builders that turn a skeleton, or a set of
grad-buffer layouts, into trees whose tensors are `LazyTensor`s. A bucket of distrib_optim.pt is
read only when its LazyTensor is written, one parameter at a time, and never assembled in memory.
Nothing here reads or writes files.

distrib_optim.pt is built as `DistributedOptimizer.save_parameter_state` of Megatron-LM core_r0.6.0
writes it:

    {'per_bucket_numel':          [{(param_dtype, grad_dtype): [padded size per bucket]} per grad buffer],
     'per_bucket_numel_unpadded': [{(param_dtype, grad_dtype): [unpadded size per bucket]} ...],
     gbuf_idx: {(param_dtype, grad_dtype): {'param': [fp32 bucket], 'exp_avg': [...], 'exp_avg_sq': [...]}}}

with the grad buffers of every virtual-pipeline chunk chained in chunk order. Megatron pads the end of
each bucket to a multiple of the data-parallel size (DP x CP) and starts the next bucket there, so for
a target data-parallel size the padded size of a bucket is its unpadded size rounded up, and a
parameter keeps its offset inside its bucket. Megatron fills padding with whatever `torch.empty` held;
here it is zeros.
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from .checkpoint import flatten_state_dict
from .layout import BucketCounts, BufferLayout, ParamSpan
from .torch_writer import LazyTensor, Pieces, Zeros

FP32_BYTES = 4
OPTIMIZER_STATES = ("param", "exp_avg", "exp_avg_sq")  # the keys save_parameter_state writes, in order

# The order in which Megatron's save_checkpoint fills model_optim_rng.pt; the model entry
# ('model' or 'model0', 'model1', ...) goes after 'iteration'.
STATE_KEYS_BEFORE_MODEL = ("args", "checkpoint_version", "iteration")
STATE_KEYS_AFTER_MODEL = ("optimizer", "opt_param_scheduler", "rng_state", "num_floating_point_operations_so_far")

# How a TensorSpec is spelled in pt_meta: a plain dict, so the file loads with weights_only and no
# class of this package in the allow-list.
_SPEC_MARK = "__tensor_spec__"


@dataclass(frozen=True)
class TensorSpec:
    """A model tensor's place in a skeleton: the shape and dtype the rebuilt tensor must have."""

    shape: tuple[int, ...]
    dtype: torch.dtype


# ---------------------------------------------------------------------------------------------
# Skeletons


def is_model_tensor(name: str, value: Any) -> bool:
    """A parameter of a model state dict. `_extra_state` (Transformer Engine's FP8 metadata, a uint8
    tensor in some versions) is no parameter: it is kept as it was."""
    return isinstance(value, torch.Tensor) and not name.endswith("_extra_state")


def model_skeleton(chunk_sd: dict, prefix: str = "") -> dict:
    """The structure of one model chunk's state dict, every parameter replaced by its TensorSpec and
    everything else (None, BytesIO or tensor `_extra_state`) copied, in the saved order and nesting."""
    out = type(chunk_sd)()
    for key, value in chunk_sd.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out[key] = model_skeleton(value, name + ".")
        elif is_model_tensor(name, value):
            out[key] = TensorSpec(tuple(value.shape), value.dtype)
        elif isinstance(value, torch.Tensor):
            out[key] = value.clone()  # small; a clone does not pin the mmap'd source file
        else:
            out[key] = copy.deepcopy(value)
    return out


def skeleton_specs(skeleton: dict) -> list[tuple[str, TensorSpec]]:
    """(dotted state-dict key, TensorSpec) of every parameter of a chunk skeleton, in saved order."""
    return [(name, value) for name, value in flatten_state_dict(skeleton) if isinstance(value, TensorSpec)]


def encode_skeleton(skeleton: Any) -> Any:
    """A skeleton as plain dicts, lists, tuples and dtypes (for pt_meta)."""
    if isinstance(skeleton, TensorSpec):
        return {_SPEC_MARK: True, "shape": list(skeleton.shape), "dtype": skeleton.dtype}
    if isinstance(skeleton, dict):
        return type(skeleton)((k, encode_skeleton(v)) for k, v in skeleton.items())
    return skeleton


def decode_skeleton(encoded: Any) -> Any:
    """The inverse of encode_skeleton."""
    if isinstance(encoded, dict):
        if encoded.get(_SPEC_MARK) is True:
            return TensorSpec(tuple(encoded["shape"]), encoded["dtype"])
        return type(encoded)((k, decode_skeleton(v)) for k, v in encoded.items())
    return encoded


def model_keys(num_chunks: int) -> list[str]:
    """Megatron's keys of the model state dicts: 'model' alone, or 'model0', 'model1', ... with vpp."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def run_dtype(args: argparse.Namespace) -> torch.dtype:
    """The dtype of the model copy of the weights: bf16 or fp16 when the run trained in it, else fp32."""
    if getattr(args, "bf16", False):
        return torch.bfloat16
    if getattr(args, "fp16", False):
        return torch.float16
    return torch.float32


# ---------------------------------------------------------------------------------------------
# model_optim_rng.pt


@dataclass(frozen=True)
class TrainingUpdates:
    """The fields of model_optim_rng.pt that change when training went on after the conversion
    (None: keep the saved value).

    iteration: `iteration` and `args.iteration`; consumed_train_samples / consumed_valid_samples:
    the `args` fields of those names; lr: `lr` of every optimizer param group; optimizer_step:
    `step` of every optimizer param group that has one (apex FusedAdam keeps it there);
    scheduler_num_steps: `opt_param_scheduler['num_steps']` (Megatron counts samples there);
    num_floating_point_operations_so_far: the top-level entry of that name."""

    iteration: int | None = None
    consumed_train_samples: int | None = None
    consumed_valid_samples: int | None = None
    lr: float | None = None
    optimizer_step: int | None = None
    scheduler_num_steps: int | None = None
    num_floating_point_operations_so_far: int | float | None = None


def apply_training_updates(state: dict, updates: TrainingUpdates) -> dict:
    """A copy of the non-model entries of `state` (args, optimizer, scheduler, ...) with `updates`
    applied; model entries are shared, not copied. Raises KeyError naming a field that is absent."""
    out = dict(state)
    if updates.iteration is not None:
        out["iteration"] = updates.iteration
    if any(v is not None for v in (updates.iteration, updates.consumed_train_samples,
                                   updates.consumed_valid_samples)):
        args = copy.copy(out["args"])
        for field, value in (("iteration", updates.iteration),
                             ("consumed_train_samples", updates.consumed_train_samples),
                             ("consumed_valid_samples", updates.consumed_valid_samples)):
            if value is not None:
                setattr(args, field, value)
        out["args"] = args
    if updates.lr is not None or updates.optimizer_step is not None:
        optimizer = copy.deepcopy(out["optimizer"])
        for group in optimizer["optimizer"]["param_groups"]:
            if updates.lr is not None:
                group["lr"] = updates.lr
            if updates.optimizer_step is not None and "step" in group:
                group["step"] = updates.optimizer_step
        out["optimizer"] = optimizer
    if updates.scheduler_num_steps is not None:
        out["opt_param_scheduler"] = dict(out["opt_param_scheduler"], num_steps=updates.scheduler_num_steps)
    if updates.num_floating_point_operations_so_far is not None:
        out["num_floating_point_operations_so_far"] = updates.num_floating_point_operations_so_far
    return out


def model_optim_rng_tree(entries: dict, skeletons: Sequence[dict],
                         model_value: Callable[[int, str], torch.Tensor],
                         state_keys: Sequence[str] | None = None) -> dict:
    """The tree of model_optim_rng.pt: `entries` (args, checkpoint_version, iteration, optimizer,
    opt_param_scheduler, rng_state, num_floating_point_operations_so_far, as saved or updated) and
    one model state dict per chunk rebuilt from its skeleton.

    `model_value(chunk, dotted_key)` gives a parameter's values (the fp32 master weights); they are
    cast to the skeleton's dtype when the file is written, as Megatron copies master weights into the
    model. `state_keys` is the saved top-level key order; by default Megatron's order, leaving out
    entries that are None (a documented pt_meta stores None for what the checkpoint did not have)."""
    models = dict(zip(model_keys(len(skeletons)), (
        lazy_model_state(chunk, skeleton, model_value) for chunk, skeleton in enumerate(skeletons))))
    if state_keys is None:
        state_keys = [k for k in STATE_KEYS_BEFORE_MODEL if entries.get(k) is not None] + list(models) \
            + [k for k in STATE_KEYS_AFTER_MODEL if entries.get(k) is not None]
    missing = [k for k in state_keys if k not in models and k not in entries]
    if missing or set(models) - set(state_keys):
        raise ValueError(f"model_optim_rng.pt keys {list(state_keys)}: no value for {missing}, "
                         f"or model entries {list(models)} not among them")
    return {key: models[key] if key in models else entries[key] for key in state_keys}


def lazy_model_state(chunk: int, skeleton: dict, model_value: Callable[[int, str], torch.Tensor],
                     prefix: str = "") -> dict:
    """A chunk's state dict in the skeleton's nesting, each TensorSpec turned into a LazyTensor."""
    out = type(skeleton)()
    for key, value in skeleton.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out[key] = lazy_model_state(chunk, value, model_value, name + ".")
        elif isinstance(value, TensorSpec):
            out[key] = LazyTensor(value.shape, value.dtype, _model_tensor_producer(chunk, name, value, model_value))
        else:
            out[key] = value
    return out


def _model_tensor_producer(chunk: int, name: str, spec: TensorSpec, model_value):
    def produce() -> torch.Tensor:
        values = model_value(chunk, name)
        if values.numel() != math.prod(spec.shape):
            raise ValueError(f"model chunk {chunk} {name}: {values.numel()} values for shape {list(spec.shape)}")
        return values.reshape(spec.shape).to(spec.dtype)
    return produce


# ---------------------------------------------------------------------------------------------
# distrib_optim.pt


def padded_bucket_size(unpadded: int, dp_cp: int) -> int:
    """A bucket's size at data-parallel size dp_cp (DP x CP): Megatron pads each bucket's end, and
    every bucket starts where the previous padded one ended, so the size rounds up to a multiple.

    >>> padded_bucket_size(2665, 2), padded_bucket_size(2665, 5), padded_bucket_size(8, 4)
    (2666, 2665, 8)
    """
    return -(-unpadded // dp_cp) * dp_cp


def target_counts(counts: Sequence[BucketCounts], dp_cp: int) -> list[BucketCounts]:
    """The bucket sizes of every grad buffer at the target data-parallel size."""
    return [BucketCounts(c.gbuf_idx, c.dtype_key, tuple(padded_bucket_size(n, dp_cp) for n in c.unpadded),
                         c.unpadded) for c in counts]


def torch_dtype(name: str) -> torch.dtype:
    """'torch.bfloat16' -> torch.bfloat16 (param_map files and BucketCounts spell dtypes as text)."""
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return dtype


def distrib_optim_tree(layouts: Sequence[BufferLayout], counts: Sequence[BucketCounts], dp_cp: int,
                       state_value: Callable[[int, str, str], torch.Tensor],
                       states: Sequence[str] = OPTIMIZER_STATES) -> dict:
    """The tree of distrib_optim.pt for a target data-parallel size dp_cp (DP x CP).

    `layouts[i]` and `counts[i]` describe grad buffer i (chunks chained in order); spans are in the
    source's whole-buffer coordinates, `counts` hold the source's bucket sizes. `state_value(chunk,
    ddp_name, state)` gives a parameter's fp32 values of 'param', 'exp_avg' or 'exp_avg_sq'; it is
    called while the bucket holding it is assembled, one bucket in memory at a time."""
    if len(layouts) != len(counts):
        raise ValueError(f"{len(layouts)} layouts for {len(counts)} grad buffers")
    targets = target_counts(counts, dp_cp)
    tree: dict[Any, Any] = {
        "per_bucket_numel": [{_dtype_key(t): list(t.padded)} for t in targets],
        "per_bucket_numel_unpadded": [{_dtype_key(t): list(t.unpadded)} for t in targets],
    }
    for gbuf, (layout, source, target) in enumerate(zip(layouts, counts, targets)):
        members = bucket_members(layout, source)
        tree[gbuf] = {_dtype_key(target): {
            state: [LazyTensor((size,), torch.float32,
                               _bucket_producer(layout.chunk, size, members[bucket], state, state_value))
                    for bucket, size in enumerate(target.padded)]
            for state in states}}
    return tree


def _dtype_key(counts: BucketCounts) -> tuple[torch.dtype, torch.dtype]:
    return torch_dtype(counts.dtype_key[0]), torch_dtype(counts.dtype_key[1])


def bucket_members(layout: BufferLayout, counts: BucketCounts) -> list[list[tuple[ParamSpan, int]]]:
    """Per bucket, its parameters with their offset inside the bucket (which no padding changes)."""
    members: list[list[tuple[ParamSpan, int]]] = [[] for _ in counts.padded]
    for span in layout.params:
        offset = span.start - counts.bucket_start(span.bucket)
        if offset < 0 or offset + span.numel > counts.unpadded[span.bucket]:
            raise ValueError(f"{layout.source}: {span.name} [{span.start}, {span.end}) is outside bucket "
                             f"{span.bucket} of {counts.unpadded[span.bucket]} elements")
        members[span.bucket].append((span, offset))
    return members


def _bucket_producer(chunk: int, size: int, members: Sequence[tuple[ParamSpan, int]], state: str, state_value):
    def produce() -> Pieces:
        return Pieces(bucket_pieces(chunk, size, members, state, state_value))
    return produce


def bucket_pieces(chunk: int, size: int, members: Sequence[tuple[ParamSpan, int]], state: str,
                  state_value) -> Iterator[torch.Tensor | Zeros]:
    """A bucket's fp32 values in order, as the parameters' own tensors with zero runs between them:
    the bucket is written piece by piece and never assembled (assembling it copied every value once)."""
    filled = 0
    for span, offset in sorted(members, key=lambda member: member[1]):
        if offset < filled:
            raise ValueError(f"model chunk {chunk} {span.name}: starts at {offset} inside the previous "
                             f"parameter, which ends at {filled}")
        values = state_value(chunk, span.name, state)
        if values.numel() != span.numel or values.dtype != torch.float32:
            raise ValueError(f"model chunk {chunk} {span.name} {state}: {values.numel()} {values.dtype} "
                             f"values, expected {span.numel} torch.float32")
        if offset > filled:
            yield Zeros((offset - filled) * FP32_BYTES)
        yield values
        del values  # the next parameter is read only after this one is written
        filled = offset + span.numel
    if size > filled:
        yield Zeros((size - filled) * FP32_BYTES)
