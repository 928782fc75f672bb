"""What Megatron core_r0.6.0 itself builds at a target layout: the way back's structure.

Writing Megatron files at a layout other than the recorded one needs, per target (tp, pp, ep) folder,
exactly what a Megatron run launched at that layout builds, because its loader checks it:

- each model chunk's parameters in `named_parameters()` order, with local layer numbers and the
  target's shapes (`chunk_parameters`);
- the grad buffers and buckets DistributedDataParallel makes of them (`rank_buffers`): one buffer per
  (param dtype, grad dtype) in order of first appearance, dense and expert-parallel parameters apart
  (experts are expert-parallel only at ep > 1), packed in REVERSE order; a bucket closes once it holds
  `bucket_size` elements, and around every `shared_embedding` parameter (the tied embedding and its
  last-stage copy at pp > 1); bucketing is off (one bucket) without overlap_grad_reduce, on pipeline
  stages > 0 and for chunks > 0; every bucket is padded to a multiple of the data-parallel size
  (dense: dp x cp, expert: dp / ep). Megatron asserts that the elements before a shared-embedding
  bucket end on such a multiple; targets that break it are refused here, not at the user's launch.
  (distributed_data_parallel.py:56-146, param_and_grad_buffer.py:244-333, training.py get_model.)
- the optimizer's param_groups in the rank's OWN order: groups keyed (wd_mult, lr_mult,
  is_expert_parallel, is_decoupled_lr) in order of first appearance over the rank's chunks, no weight
  decay for biases and 1-D parameters (optimizer/__init__.py:56-109). A stage starting with a norm
  has its groups the other way round from one starting with a matrix, so each target rank's groups
  are rebuilt from per-kind templates, never copied from another stage (`target_param_groups`, by
  `param_groups.rank_param_groups`, which the way there uses too);
- the args a run at the target must carry (`target_args`), and the flags it must be launched with.

Only megatron.core's local layer spec and the legacy model are described; Transformer Engine's fused
norms are refused (their parameter order inside the fused module is not verified here).

    >>> from .model import ModelFacts
    >>> from .placement import MEGATRON, ParallelLayout, RankCoord
    >>> model = ModelFacts(num_layers=2, hidden=4, heads=2, query_groups=2, ffn=8, padded_vocab=8,
    ...                    family="mcore", tied=False)
    >>> target = ParallelLayout(MEGATRON, tp=2, pp=2)
    >>> [(p.name, p.shape) for p in chunk_parameters(model, target, RankCoord(pp=1, tp=0), 0)][-2:]
    [('decoder.final_layernorm.bias', (4,)), ('output_layer.weight', (4, 4))]
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import ConvertInputError
from ..megatron.checkpoint import optimizer_param_groups
from ..megatron.layout import BucketCounts, BufferLayout, infer_layouts, layout_differences
from ..megatron.rebuild_rules import nesting_path
from ..megatron.writer import TensorSpec, skeleton_specs, torch_dtype
from ..naming import NamingFacts, megatron_state_dict_key, naming_facts
from ..plan import RankMeta
from .model import ModelFacts, check_fits, check_model, megatron_vocab_divisor
from .param_groups import (GroupKey, group_key, group_templates, no_weight_decay, rank_param_groups,
                           split_by_optimizer)
from .placement import MEGATRON, TARGET, ParallelLayout, RankCoord, layer_placement

# Megatron r0.6.0's default bucket_size when overlap_grad_reduce is on (distributed_data_parallel.py:51)
DEFAULT_BUCKET_SIZE = 40_000_000

_NORM_PARAMS = {"LayerNorm": ("weight", "bias"), "RMSNorm": ("weight",)}
_LEGACY = {"layer": "language_model.encoder.layers.{i}.", "word": "language_model.embedding.word_embeddings.weight",
           "position": "language_model.embedding.position_embeddings.weight",
           "final_norm": "language_model.encoder.final_norm.", "head": "language_model.output_layer.weight",
           "head_copy": "word_embeddings.weight"}
_MCORE = {"layer": "decoder.layers.{i}.", "word": "embedding.word_embeddings.weight",
          "position": "embedding.position_embeddings.weight", "final_norm": "decoder.final_layernorm.",
          "head": "output_layer.weight", "head_copy": "output_layer.weight"}


@dataclass(frozen=True)
class TargetParam:
    """One parameter of a target model chunk. `name`: as `named_parameters()` gives it without the
    `module.` wrappers (local layer and expert numbers); `global_name`: the same with global layer and
    expert numbers (the name the MindSpore side's tensor translates to)."""

    name: str
    global_name: str
    shape: tuple[int, ...]
    expert_parallel: bool = False  # in the expert buffers and the expert optimizer (ep > 1 only)
    shared_embedding: bool = False  # tied embeddings at pp > 1: a bucket of its own
    embedding_or_output: bool = False  # subject to --decoupled-lr

    @property
    def no_weight_decay(self) -> bool:
        return no_weight_decay(self.name, self.shape)  # the module-level rule of param_groups

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class BufferSettings:
    """How the target run builds its grad buffers (from its args)."""

    dp: int
    cp: int = 1
    ep: int = 1
    param_dtype: str = "torch.bfloat16"
    grad_in_fp32: bool = True  # accumulate_allreduce_grads_in_fp32
    overlap_grad_reduce: bool = False
    bucket_size: int | None = DEFAULT_BUCKET_SIZE
    wrapped: bool = True  # fp16/bf16 runs wrap the model in Float16Module (`module.` in DDP names)


@dataclass(frozen=True)
class RankBuffers:
    """One target folder's grad buffers as the distrib_optim.pt writer consumes them."""

    dense_counts: tuple[BucketCounts, ...]
    dense_layouts: tuple[BufferLayout, ...]
    expert_counts: tuple[BucketCounts, ...] = ()
    expert_layouts: tuple[BufferLayout, ...] = ()


# ---------------------------------------------------------------------------------------------
# Refusals


def check_megatron_target(model: ModelFacts, target: ParallelLayout, settings: BufferSettings, *,
                          fp16: bool = False) -> None:
    """Refuse, before anything is written, a target Megatron r0.6.0 would not build or would assert on.
    (The shared-embedding bucket assertion needs the buffers and is checked by `rank_buffers`.)"""
    if target.side != MEGATRON:
        raise ValueError(f"a Megatron target, not {target}")
    check_model(model)
    check_fits(model, target)
    layer_placement(target, model.num_layers, TARGET)
    if model.family == "mcore" and model.te_norms:
        raise ConvertInputError("transformer_impl transformer_engine in the training args: writing at another "
                                "layout", expected="the local layer spec (--transformer-impl local) or a legacy "
                                "model", found="Transformer Engine's fused norms",
                                fix="convert back at the recorded layout, or train with the local spec")
    if target.ep > 1:
        if settings.dp % target.ep:
            raise ConvertInputError(f"--ep-size {target.ep} with --dp-size {settings.dp}",
                                    expected="a dp size divisible by the ep size (Megatron's parallel_state "
                                             "raises otherwise)",
                                    found=f"{settings.dp} % {target.ep} = {settings.dp % target.ep}",
                                    fix=f"pass a --dp-size that is a multiple of {target.ep}")
        if settings.cp > 1:
            raise ConvertInputError(f"--ep-size {target.ep} with --cp-size {settings.cp}",
                                    expected="context parallelism 1 with expert parallelism",
                                    found=f"cp {settings.cp}", fix="pass --cp-size 1 or --ep-size 1")
        if fp16:
            raise ConvertInputError(f"--ep-size {target.ep} with an fp16 run",
                                    expected="bf16 or fp32 (Megatron r0.6.0 refuses expert parallelism with "
                                             "fp16)", found="fp16", fix="pass --ep-size 1")


# ---------------------------------------------------------------------------------------------
# Parameters


def chunk_parameters(model: ModelFacts, target: ParallelLayout, rank: RankCoord, chunk: int) -> tuple[TargetParam, ...]:
    """The parameters of model chunk `chunk` of target folder `rank`, in named_parameters() order."""
    names = _LEGACY if model.family == "legacy" else _MCORE
    placement = layer_placement(target, model.num_layers, TARGET)
    first = (rank.pp, chunk) == placement.first
    last = (rank.pp, chunk) == placement.last
    tied_split = model.tied and target.pp > 1
    h, tp = model.hidden, target.tp
    # mcore's LanguageModule marks these for --decoupled-lr; the legacy model marks nothing
    mcore = model.family == "mcore"
    out: list[TargetParam] = []
    if first:
        out.append(_param(names["word"], (model.padded_vocab // tp, h), shared_embedding=tied_split,
                          embedding_or_output=mcore))
        if model.max_position:
            out.append(_param(names["position"], (model.max_position, h)))
    for local in range(placement.counts[chunk][rank.pp]):
        layer = placement.global_layer(rank.pp, chunk, local)
        out.extend(_layer_params(model, target, rank, local, layer, names["layer"]))
    if last:
        out.extend(_param(names["final_norm"] + p, (h,)) for p in _NORM_PARAMS[model.normalization])
        if not model.tied:
            out.append(_param(names["head"], (model.padded_vocab // tp, h), embedding_or_output=mcore))
        elif tied_split:
            out.append(_param(names["head_copy"], (model.padded_vocab // tp, h), shared_embedding=True,
                              embedding_or_output=mcore))
    return tuple(out)


def _param(name: str, shape: tuple[int, ...], global_name: str = "", **flags) -> TargetParam:
    return TargetParam(name, global_name or name, tuple(shape), **flags)


def _layer_params(model: ModelFacts, target: ParallelLayout, rank: RankCoord, local: int, layer: int,
                  prefix: str) -> list[TargetParam]:
    """One transformer layer's parameters in module order. mcore's Attention builds linear_proj before
    SelfAttention adds linear_qkv (attention.py:95,362); the legacy ParallelAttention builds
    query_key_value first (transformer.py:515,595)."""
    h, tp, hn = model.hidden, target.tp, model.head_dim
    qkv_rows = (model.heads + 2 * model.query_groups) * hn // tp
    norms = _NORM_PARAMS[model.normalization]
    mcore = model.family == "mcore"
    qkv = [(("self_attention.linear_qkv." if mcore else "self_attention.query_key_value.") + "weight", (qkv_rows, h))]
    if model.qkv_bias:
        qkv.append((qkv[0][0][:-len("weight")] + "bias", (qkv_rows,)))
    proj = [(("self_attention.linear_proj." if mcore else "self_attention.dense.") + "weight",
             (h, model.heads * hn // tp))]
    if model.linear_bias:
        proj.append((proj[0][0][:-len("weight")] + "bias", (h,)))
    entries = [(("input_layernorm." if mcore else "input_norm.") + p, (h,)) for p in norms]
    entries += proj + qkv if mcore else qkv + proj
    entries += [(("pre_mlp_layernorm." if mcore else "post_attention_norm.") + p, (h,)) for p in norms]
    out = [_param(prefix.format(i=local) + name, shape, prefix.format(i=layer) + name) for name, shape in entries]
    if not model.num_experts:
        out += [_param(prefix.format(i=local) + "mlp." + name, shape, prefix.format(i=layer) + "mlp." + name)
                for name, shape in _mlp_entries(model, tp, mcore)]
        return out
    out.append(_param(prefix.format(i=local) + "mlp.router.weight", (model.num_experts, h),
                      prefix.format(i=layer) + "mlp.router.weight"))
    per_rank = model.num_experts // target.ep
    for k in range(per_rank):
        expert = rank.ep * per_rank + k
        for name, shape in _mlp_entries(model, tp, mcore):
            out.append(_param(prefix.format(i=local) + f"mlp.experts.local_experts.{k}.{name}", shape,
                              prefix.format(i=layer) + f"mlp.experts.local_experts.{expert}.{name}",
                              expert_parallel=target.ep > 1))
    return out


def _mlp_entries(model: ModelFacts, tp: int, mcore: bool) -> list[tuple[str, tuple[int, ...]]]:
    h, ffn = model.hidden, model.ffn // tp
    fc1, fc2 = ("linear_fc1.", "linear_fc2.") if mcore else ("dense_h_to_4h.", "dense_4h_to_h.")
    rows = ffn * (2 if model.swiglu else 1)
    out = [(fc1 + "weight", (rows, h))]
    if model.linear_bias:
        out.append((fc1 + "bias", (rows,)))
    out.append((fc2 + "weight", (h, ffn)))
    if model.linear_bias:
        out.append((fc2 + "bias", (h,)))
    return out


def rank_parameters(model: ModelFacts, target: ParallelLayout, rank: RankCoord) -> tuple[tuple[TargetParam, ...], ...]:
    """Every model chunk's parameters of one target folder."""
    return tuple(chunk_parameters(model, target, rank, chunk) for chunk in range(target.vpp))


# ---------------------------------------------------------------------------------------------
# Grad buffers and buckets


def state_key(param: TargetParam, family: str) -> str:
    """The model_optim_rng.pt key of a parameter (legacy saves its tied head copy under another name)."""
    return megatron_state_dict_key(param.name, NamingFacts(family=family))


def bucket_counts(params: Sequence[TargetParam], *, dp_size: int, bucket_size: int | None, where: str,
                  dtype_key: tuple[str, str], gbuf_idx: int) -> BucketCounts:
    """One grad buffer's buckets (padded, unpadded sizes) as ParamAndGradBuffer.__init__ lays them out
    over `params` (given in named_parameters order), with the distributed optimizer."""
    def pad(index: int) -> int:
        return -(-index // dp_size) * dp_size

    padded: list[int] = []
    unpadded: list[int] = []
    bucket_start = start = 0
    members = 0

    def close(end: int) -> int:
        unpadded.append(end - bucket_start)
        end = pad(end)
        padded.append(end - bucket_start)
        return end

    for param in reversed(params):
        end = start + param.numel
        if param.shared_embedding and members:
            if start % dp_size:
                raise ConvertInputError(
                    f"{where}: the {start} elements before the shared embedding bucket do not split over "
                    f"data-parallel size {dp_size}",
                    expected=f"a multiple of {dp_size} (Megatron r0.6.0 asserts data_start_index % dp == 0 "
                             "in ParamAndGradBuffer; such a run cannot start)",
                    found=f"{start} % {dp_size} = {start % dp_size}",
                    fix="choose another --dp-size (or --cp-size), or another target layout")
            bucket_start = start = close(start)
            end = start + param.numel
            members = 0
        members += 1
        if (bucket_size is not None and end - bucket_start >= bucket_size) or param.shared_embedding:
            end = close(end)
            bucket_start, members = end, 0
        start = end
    if members:
        close(start)
    return BucketCounts(gbuf_idx, dtype_key, tuple(padded), tuple(unpadded))


def effective_bucket_size(settings: BufferSettings, stage: int, chunk: int) -> int | None:
    """DDP turns bucketing off without overlap_grad_reduce, on pipeline stages > 0, and get_model
    disables it for chunks > 0."""
    if not settings.overlap_grad_reduce or stage > 0 or chunk > 0:
        return None
    return settings.bucket_size


def rank_buffers(model: ModelFacts, target: ParallelLayout, rank: RankCoord, settings: BufferSettings,
                 chunks: Sequence[Sequence[TargetParam]] | None = None) -> RankBuffers:
    """The grad buffers (BucketCounts and BufferLayouts) of one target folder, dense and expert apart,
    numbered per optimizer as distrib_optim.pt chains them (chunk-major)."""
    chunks = chunks if chunks is not None else rank_parameters(model, target, rank)
    parts = {}
    for expert in (False, True):
        dp_size = settings.dp // settings.ep if expert else settings.dp * settings.cp
        counts, members = [], []
        for chunk, params in enumerate(chunks):
            mine = [p for p in params if p.expert_parallel == expert]
            if not mine:
                continue
            dtype_key = (settings.param_dtype, "torch.float32" if settings.grad_in_fp32 else settings.param_dtype)
            where = f"target {rank} chunk {chunk} {'expert' if expert else 'dense'} buffer"
            counts.append(bucket_counts(mine, dp_size=dp_size, where=where, dtype_key=dtype_key, gbuf_idx=len(counts),
                                        bucket_size=effective_bucket_size(settings, rank.pp, chunk)))
            members.append([(state_key(p, model.family), p.shape, settings.param_dtype) for p in mine])
        layouts = infer_layouts(members, counts, grad_in_fp32=settings.grad_in_fp32, wrapped=settings.wrapped,
                                source=f"target {rank}") if counts else []
        # infer_layouts numbers chunks by position in `members`; give each layout its real chunk
        real_chunks = [c for c, params in enumerate(chunks) if any(p.expert_parallel == expert for p in params)]
        layouts = [BufferLayout(real_chunks[i], lay.buffer_index, lay.params, lay.source)
                   for i, lay in enumerate(layouts)]
        parts[expert] = (tuple(counts), tuple(layouts))
    return RankBuffers(parts[False][0], parts[False][1], parts[True][0], parts[True][1])


# ---------------------------------------------------------------------------------------------
# Model state-dict skeleton


def chunk_skeleton(params: Sequence[TargetParam], family: str, param_dtype: str) -> dict:
    """The chunk's model state dict as Megatron saves it (legacy nests, mcore is flat), tensors as
    TensorSpec, in module order. `_extra_state` entries are not described."""
    skeleton: dict = {}
    for param in params:
        node = skeleton
        *parents, leaf = nesting_path(state_key(param, family), family)
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = TensorSpec(param.shape, torch_dtype(param_dtype))
    return skeleton


# ---------------------------------------------------------------------------------------------
# Optimizer param_groups


def param_group_keys(chunks: Sequence[Sequence[TargetParam]], decoupled_lr: bool = False) -> list[GroupKey]:
    """The group key of each of the rank's parameters, chunk after chunk in named_parameters() order."""
    return [group_key(no_weight_decay=param.no_weight_decay, expert_parallel=param.expert_parallel,
                      decoupled_lr=decoupled_lr and param.embedding_or_output)
            for params in chunks for param in params]


def target_param_groups(chunks: Sequence[Sequence[TargetParam]], templates: dict[GroupKey, dict], *,
                        decoupled_lr: bool = False, where: str = "") -> tuple[list[dict], list[dict]]:
    """(dense groups, expert groups) of one target rank, in its own order (`param_groups.rank_param_groups`):
    the dense optimizer's and, at ep > 1, the expert optimizer's."""
    return split_by_optimizer(rank_param_groups(param_group_keys(chunks, decoupled_lr), templates, where))


# ---------------------------------------------------------------------------------------------
# Args


@dataclass(frozen=True)
class TargetArgs:
    args: argparse.Namespace
    launch_flags: tuple[str, ...]  # what the resumed run must be launched with


def target_args(args: Any, model: ModelFacts, target: ParallelLayout, settings: BufferSettings) -> TargetArgs:
    """The saved args of a run at the target layout: the parallel sizes, the world size, and the
    make_vocab_size_divisible_by that rebuilds the same padded vocabulary at the target tp."""
    new = argparse.Namespace(**vars(copy.deepcopy(args)))
    divisor = megatron_vocab_divisor(model.padded_vocab, target.tp, vocab_size=getattr(args, "vocab_size", 0) or 0,
                                     divisor=getattr(args, "make_vocab_size_divisible_by", 0) or 0,
                                     source_tp=getattr(args, "tensor_model_parallel_size", 1) or 1)
    per_chunk = model.num_layers // (target.pp * target.vpp)
    updates = dict(
        tensor_model_parallel_size=target.tp, pipeline_model_parallel_size=target.pp,
        transformer_pipeline_model_parallel_size=target.pp,
        virtual_pipeline_model_parallel_size=target.vpp if target.vpp > 1 else None,
        num_layers_per_virtual_pipeline_stage=per_chunk if target.vpp > 1 else None,
        expert_model_parallel_size=target.ep, data_parallel_size=settings.dp, context_parallel_size=settings.cp,
        world_size=target.tp * target.pp * settings.dp * settings.cp,
        make_vocab_size_divisible_by=divisor, padded_vocab_size=model.padded_vocab)
    flags = [f"--tensor-model-parallel-size {target.tp}", f"--pipeline-model-parallel-size {target.pp}",
             f"--make-vocab-size-divisible-by {divisor}"]
    if target.vpp > 1:
        flags.append(f"--num-layers-per-virtual-pipeline-stage {per_chunk}")
    if target.ep > 1:
        flags.append(f"--expert-model-parallel-size {target.ep}")
    if model.num_experts and target.tp > 1 and not getattr(args, "sequence_parallel", False):
        updates["sequence_parallel"] = True  # arguments.py asserts it for MoE with tp > 1
        flags.append("--sequence-parallel")
    for key, value in updates.items():
        setattr(new, key, value)
    return TargetArgs(new, tuple(flags))


# ---------------------------------------------------------------------------------------------
# In the way back's terms


def model_facts_of(args: Any, keys: Sequence[str] = ()) -> ModelFacts:
    """The ModelFacts of a run from its saved args (r0.6.0's defaults where they lack a field)."""
    naming = naming_facts(args, keys=keys)

    def arg(name: str, default: Any = None) -> Any:
        value = getattr(args, name, default)
        return default if value is None else value

    heads = args.num_attention_heads
    groups = arg("num_query_groups", heads) if arg("group_query_attention", False) else heads
    learned = arg("position_embedding_type", "learned_absolute") == "learned_absolute"
    linear_bias = bool(arg("add_bias_linear", True))
    return ModelFacts(
        num_layers=args.num_layers, hidden=args.hidden_size, heads=heads, query_groups=groups,
        ffn=args.ffn_hidden_size, padded_vocab=args.padded_vocab_size, kv_channels=arg("kv_channels", 0),
        family=naming.family, normalization=naming.normalization, te_norms=naming.te_norms, tied=naming.tied,
        max_position=args.max_position_embeddings if learned else 0, swiglu=bool(arg("swiglu", False)),
        linear_bias=linear_bias, qkv_bias=linear_bias or bool(arg("add_qkv_bias", False)),
        num_experts=arg("num_experts", 0), moe_grouped_gemm=bool(arg("moe_grouped_gemm", False)),
        fp8=bool(arg("fp8", None)), standalone_embedding_stage=bool(arg("standalone_embedding_stage", False)))


def buffer_settings_of(args: Any, dp: int, cp: int, ep: int,
                       bucket_size: int | None = DEFAULT_BUCKET_SIZE) -> BufferSettings:
    """How a run with these args at (dp, cp, ep) builds its grad buffers. `bucket_size`: r0.6.0's
    fixed 40M unless the fork that trained set another (Megatron's args do not record it)."""
    half = getattr(args, "bf16", False) or getattr(args, "fp16", False)
    dtype = "torch.bfloat16" if getattr(args, "bf16", False) else "torch.float16" if half else "torch.float32"
    return BufferSettings(dp=dp, cp=cp, ep=ep, param_dtype=dtype,
                          grad_in_fp32=bool(getattr(args, "accumulate_allreduce_grads_in_fp32", False)),
                          overlap_grad_reduce=bool(getattr(args, "overlap_grad_reduce", False)),
                          bucket_size=bucket_size, wrapped=bool(half))


def target_rank_meta(source: RankMeta, recorded_groups: Sequence[dict], model: ModelFacts, target: ParallelLayout,
                     rank: RankCoord, settings: BufferSettings) -> RankMeta:
    """What a pt_meta record of target folder `rank` would hold had Megatron run at the target layout:
    skeletons, buffers, the rank's own param_groups (from the templates of every recorded rank's groups,
    `recorded_groups`), and the target's args; the rest (iteration, scheduler, rng state: rng cannot be
    re-sharded) from `source`, a record of the same run."""
    chunks = rank_parameters(model, target, rank)
    buffers = rank_buffers(model, target, rank, settings, chunks)
    dense_groups, expert_groups = target_param_groups(
        chunks, group_templates(recorded_groups, str(source.path)),
        decoupled_lr=getattr(source.meta["args"], "decoupled_lr", None) is not None, where=str(source.path))
    meta = copy.deepcopy(source.meta)
    meta["args"] = target_args(source.meta["args"], model, target, settings).args
    parts = source.meta.get("optimizer")
    parts = copy.deepcopy(parts if isinstance(parts, list) else [parts])
    dense_part = next((p for p in parts if isinstance(p, dict)), {"optimizer": {}})
    expert_part = copy.deepcopy(parts[1] if len(parts) > 1 and isinstance(parts[1], dict) else dense_part)
    dense_part.setdefault("optimizer", {})["param_groups"] = dense_groups
    if target.ep > 1:
        expert_part.setdefault("optimizer", {})["param_groups"] = expert_groups
        meta["optimizer"] = [dense_part, expert_part]
    else:
        meta["optimizer"] = dense_part
    per_rank = model.num_experts // target.ep if model.num_experts else 0
    meta.update(distrib_form="list" if target.ep > 1 else "dict", ep_rank=rank.ep, ep_size=target.ep,
                num_local_experts=per_rank)
    # the source folder's raw records do not describe the target: the decoded fields below do
    for key in ("folder_name", "layouts", "expert_layouts", "state_keys", "param_name_list", "model_skeletons",
                "per_bucket_numel", "per_bucket_numel_unpadded", "expert_per_bucket_numel",
                "expert_per_bucket_numel_unpadded"):
        meta[key] = None
    skeletons = [chunk_skeleton(params, model.family, settings.param_dtype) for params in chunks]
    return RankMeta(source.path, meta, skeletons, list(buffers.dense_layouts), list(buffers.dense_counts),
                    list(buffers.expert_layouts) or None, list(buffers.expert_counts) or None)


def check_rules_reproduce(recorded: RankMeta, computed: RankMeta, where: str) -> None:
    """Refuse to write at a new layout when the rules, applied at the RECORDED layout, do not rebuild
    what the record holds (a fork with another bucket size or parameter order, or model facts read
    wrongly from the args): the same rules would then be wrong at the target too."""
    def fail(what: str, expected: str, found: str) -> None:
        raise ConvertInputError(f"{where}: {what}", expected=expected, found=found,
                                fix="the training run did not build its buffers as Megatron r0.6.0 does (a fork? "
                                    "another bucket size?); convert back at the recorded layout")

    want = [[(k, s) for k, s in skeleton_specs(sk) if not k.endswith("_extra_state")] for sk in recorded.skeletons]
    got = [skeleton_specs(sk) for sk in computed.skeletons]
    if want != got:
        diff = next((w, g) for w, g in zip(sum(want, []) + [None], sum(got, []) + [None]) if w != g)
        fail("the model's parameters differ from the rules' at the recorded layout", str(diff[1]), str(diff[0]))
    for mine, theirs in zip(computed.distrib_parts(), recorded.distrib_parts()):
        if theirs is None or mine is None or theirs.layouts is None:
            continue
        diffs = layout_differences(theirs.layouts, mine.layouts)
        if diffs or [(c.padded, c.unpadded) for c in theirs.counts] != [(c.padded, c.unpadded) for c in mine.counts]:
            fail(f"the {theirs.kind} grad buffers differ from the rules' at the recorded layout",
                 str([(c.padded, c.unpadded) for c in mine.counts]), diffs[0] if diffs else
                 str([(c.padded, c.unpadded) for c in theirs.counts]))
    if optimizer_param_groups(recorded.meta.get("optimizer")) != optimizer_param_groups(computed.meta["optimizer"]):
        fail("the optimizer's param_groups differ from the rules' at the recorded layout",
             str(optimizer_param_groups(computed.meta["optimizer"]))[:200],
             str(optimizer_param_groups(recorded.meta.get("optimizer")))[:200])
