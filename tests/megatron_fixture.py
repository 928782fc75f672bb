#!/usr/bin/env python3
"""Write Megatron-LM core_r0.6.0 distributed-optimizer checkpoints for tests and benchmarks.

This is the converter tests' independent source of truth. It lays files out the way
Megatron-LM core_r0.6.0 (commit cac60ce4) does, for many parallel layouts, by emulating
Megatron's own rules (re-derived from its source, not taken from any converter code):

* model construction (legacy ``megatron.legacy.model.GPTModel`` or mcore ``GPTModel`` with the
  local layer spec): which parameters live on which pipeline stage / virtual chunk, their
  ``named_parameters()`` order, shapes under tensor parallelism, and the state-dict layout that
  ``state_dict_for_save_checkpoint`` produces;
* ``DistributedDataParallel``: one ``ParamAndGradBuffer`` per distinct (param_dtype, grad_dtype),
  parameters in reverse ``named_parameters()`` order, ``requires_grad=False`` skipped, buckets
  closed at ``bucket_size`` (None when overlap_grad_reduce is off, on pipeline ranks > 0 and on
  virtual chunks > 0), ``shared_embedding`` parameters in a bucket of their own, every bucket end
  padded to a multiple of the data-parallel size (DP x CP);
* ``DistributedOptimizer.save_parameter_state``: ``distrib_optim.pt`` with per_bucket_numel,
  per_bucket_numel_unpadded and one whole (gathered) fp32 tensor per bucket and state, grad
  buffers of all chunks chained into ``gbuf_idx``;
* ``save_checkpoint``: ``model_optim_rng.pt`` with args, checkpoint_version, iteration,
  ``model``/``model0..``, optimizer, opt_param_scheduler, rng_state,
  num_floating_point_operations_so_far; the model tensors are views into the chunk's param buffer
  (as with the distributed optimizer), so they share one storage per buffer;
* the documented param_map patch: ``param_map/param_map_buffer{B}_dp{d}tp{t}pp{p}vpp{v}.json``.

Values: element j of a parameter holds ``v = code + j`` with a distinct ``code`` per
(tp, pp, chunk, parameter); fp32 master = v, exp_avg = -v, exp_avg_sq = v + 0.5, model copy =
v cast to the training dtype. Padding holds ``PADDING_SENTINEL`` (NaN) so that a converter reading
padding fails. The writer also records what it wrote in ``expected.json`` / ``expected.pt``
(same format as tests/data/megatron_sample, plus extra fields).

Usage::

    from tests.megatron_fixture import FixtureSpec, write_fixture
    fx = write_fixture(tmp_path, FixtureSpec(tp=2, pp=2, dp=2))
    fx.megatron_path, fx.param_map_dir

    python tests/megatron_fixture.py --out /tmp/fx --tp 2 --pp 2 --dp 2
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import math
import random
import re
import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

__all__ = [
    "FixtureSpec",
    "WrittenFixture",
    "write_fixture",
    "plan_fixture",
    "load_megatron_file",
    "ModelType",
    "PADDING_SENTINEL",
    "SAFE_GLOBALS",
]

PADDING_SENTINEL = float("nan")
"""What padding elements of distrib_optim.pt bucket tensors hold (garbage_padding=True)."""

TRAIN_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OPTIM_STATES = ("param", "exp_avg", "exp_avg_sq")
RECORD_STATES = OPTIM_STATES + ("model_bf16",)
_DEFAULT_CODE_STRIDE = 1 << 21  # what the Megatron-written sample uses: code = chunk * 2**21 + 1


class ModelType(enum.Enum):
    """Stand-in for ``megatron.core.enums.ModelType`` (pickled by name into args.model_type)."""

    encoder_or_decoder = 1
    encoder_and_decoder = 2
    retro_encoder = 3
    retro_decoder = 4


ModelType.__module__ = "megatron.core.enums"

SAFE_GLOBALS = [
    argparse.Namespace,
    np._core.multiarray._reconstruct,
    np.ndarray,
    np.dtype,
    np.dtypes.UInt32DType,
    ModelType,
]
"""The allow-list ``torch.load(weights_only=True)`` needs for model_optim_rng.pt."""


def load_megatron_file(path: Path | str, **kwargs: Any) -> Any:
    """``torch.load(weights_only=True)`` of a model_optim_rng.pt / distrib_optim.pt."""
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        return torch.load(path, weights_only=True, map_location="cpu", **kwargs)


@contextmanager
def _megatron_enums_module() -> Iterator[None]:
    """Make ``megatron.core.enums.ModelType`` resolve to our stand-in while pickling."""
    names = ("megatron", "megatron.core", "megatron.core.enums")
    saved = {n: sys.modules.get(n) for n in names}
    try:
        for n in names:
            sys.modules[n] = types.ModuleType(n)
        sys.modules["megatron"].core = sys.modules["megatron.core"]
        sys.modules["megatron.core"].enums = sys.modules["megatron.core.enums"]
        sys.modules["megatron.core.enums"].ModelType = ModelType
        yield
    finally:
        for n, mod in saved.items():
            if mod is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = mod


# --------------------------------------------------------------------------------------------
# Spec


@dataclass(frozen=True)
class FixtureSpec:
    """One Megatron training layout. Validation mirrors what core_r0.6.0 accepts."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    vpp: int = 1
    num_layers: int = 2
    hidden: int = 16
    ffn: int = 40
    heads: int = 2
    vocab: int = 50
    make_vocab_size_divisible_by: int = 1
    seq_length: int = 8
    model: str = "legacy"  # "legacy" | "mcore" (local layer spec)
    dtype: str = "bf16"  # "bf16" | "fp16" | "fp32"
    overlap_grad_reduce: bool = False
    bucket_size: int | None = 40_000_000
    untie_embeddings: bool = False
    stage_list: tuple[int, ...] | None = None  # uneven layers per pipeline stage (forks); vpp == 1
    mixed_dtype: bool = False  # norm weights/biases stay fp32 in a bf16/fp16 model (forks)
    frozen: tuple[str, ...] = ()  # substrings of (model-relative) param names with requires_grad=False
    release: bool = False
    iteration: int = 10
    param_map: str = "documented"  # "documented" | "with_sidecar" | "none"
    garbage_padding: bool = True
    normalization: str = "LayerNorm"  # args.normalization: "LayerNorm" | "RMSNorm"
    position_embedding: str = "learned_absolute"  # args.position_embedding_type: "learned_absolute" | "rope"
    max_position_embeddings: int | None = None  # rows of the learned position table (default: seq_length)
    mcore_spec: str = "local"  # mcore layer spec: "local" | "te" (Transformer Engine: norms fused into linears)
    # what a trained run holds: every tp-replicated parameter (norms, row-parallel biases, position table)
    # with tp rank 0's values on every tp rank, and the tied head copy with its tp rank's embedding values
    # (default: distinct values everywhere, so a converter reading the wrong copy is caught)
    synced_copies: bool = False
    query_groups: int | None = None  # grouped-query attention: args.num_query_groups (None: a group per head)
    swiglu: bool = False  # gated MLP: fc1 has 2 x ffn rows, each tp rank's block [gate_r; up_r]

    def __post_init__(self) -> None:
        if self.stage_list is not None and not isinstance(self.stage_list, tuple):
            object.__setattr__(self, "stage_list", tuple(self.stage_list))
        if isinstance(self.frozen, str) or not isinstance(self.frozen, tuple):
            object.__setattr__(self, "frozen", (self.frozen,) if isinstance(self.frozen, str) else tuple(self.frozen))
        errors = []
        for name in ("tp", "pp", "dp", "cp", "vpp", "num_layers", "hidden", "ffn", "heads", "vocab",
                     "make_vocab_size_divisible_by", "seq_length"):
            if int(getattr(self, name)) < 1:
                errors.append(f"{name} must be >= 1")
        if self.model not in ("legacy", "mcore"):
            errors.append(f"model must be 'legacy' or 'mcore', not {self.model!r}")
        if self.dtype not in TRAIN_DTYPES:
            errors.append(f"dtype must be one of {sorted(TRAIN_DTYPES)}, not {self.dtype!r}")
        if self.param_map not in ("documented", "with_sidecar", "none"):
            errors.append(f"param_map must be documented/with_sidecar/none, not {self.param_map!r}")
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            errors.append(f"normalization must be LayerNorm or RMSNorm, not {self.normalization!r}")
        if self.position_embedding not in ("learned_absolute", "rope"):
            errors.append(f"position_embedding must be learned_absolute or rope, not {self.position_embedding!r}")
        if self.mcore_spec not in ("local", "te"):
            errors.append(f"mcore_spec must be local or te, not {self.mcore_spec!r}")
        if self.model == "mcore" and self.mcore_spec == "local" and self.normalization != "LayerNorm":
            # megatron/core/fusions/fused_layer_norm.py: FusedLayerNorm asserts normalization == "LayerNorm"
            errors.append("mcore with the local spec needs normalization LayerNorm (use mcore_spec='te')")
        if self.max_position_embeddings is not None and self.max_position_embeddings < 1:
            errors.append("max_position_embeddings must be >= 1")
        if self.bucket_size is not None and self.bucket_size < 1:
            errors.append("bucket_size must be None or >= 1")
        if self.hidden % self.heads:
            errors.append("hidden must be divisible by heads")
        if self.heads % self.tp:
            errors.append("heads must be divisible by tp")
        if self.query_groups is not None and (self.query_groups < 1 or self.heads % self.query_groups
                                              or self.query_groups % self.tp):
            # transformer_config / arguments.py: heads per group whole, groups split over tp
            errors.append("query_groups must divide heads and be divisible by tp")
        if self.ffn % self.tp:
            errors.append("ffn must be divisible by tp")
        if self.hidden % self.tp:
            errors.append("hidden must be divisible by tp")
        if self.cp > 1 and self.model != "mcore":
            # pretrain_gpt.model_provider: "Context parallelism is only supported with Megatron Core!"
            errors.append("cp > 1 needs model='mcore' (legacy GPTModel asserts context_parallel_size == 1)")
        if self.vpp > 1:
            # arguments.py validate_args: interleaved schedule needs pipeline size > 2
            if self.pp <= 2:
                errors.append("vpp > 1 needs pp > 2 (Megatron core_r0.6.0: 'pipeline-model-parallel size "
                              "should be greater than 2 with interleaved schedule')")
            if self.num_layers % (self.pp * self.vpp):
                errors.append("num_layers must be divisible by pp * vpp")
            if self.stage_list is not None:
                errors.append("stage_list needs vpp == 1")
        if self.stage_list is not None:
            if len(self.stage_list) != self.pp or sum(self.stage_list) != self.num_layers \
                    or min(self.stage_list) < 1:
                errors.append("stage_list needs pp entries >= 1 summing to num_layers")
        elif self.num_layers % self.pp:
            errors.append("num_layers must be divisible by pp (or give stage_list)")
        if self.mixed_dtype and self.dtype == "fp32":
            errors.append("mixed_dtype needs dtype bf16 or fp16")
        if self.iteration < 0:
            errors.append("iteration must be >= 0")
        if errors:
            raise ValueError("invalid FixtureSpec: " + "; ".join(errors))

    # derived values --------------------------------------------------------------------------
    @property
    def padded_vocab(self) -> int:
        """tokenizer._vocab_size_with_padding: multiple of make_vocab_size_divisible_by * tp."""
        multiple = self.make_vocab_size_divisible_by * self.tp
        return -(-self.vocab // multiple) * multiple

    @property
    def position_rows(self) -> int:
        """Rows of the learned position-embedding table: args.max_position_embeddings."""
        return self.max_position_embeddings or self.seq_length

    @property
    def norm_params(self) -> tuple[str, ...]:
        """LayerNorm has weight and bias, RMSNorm only weight (legacy rms_norm.py, TE RMSNorm)."""
        return ("weight", "bias") if self.normalization == "LayerNorm" else ("weight",)

    @property
    def qkv_rows(self) -> int:
        """Rows of the fused qkv projection at tp 1: every head's query, and a key and a value per group."""
        groups = self.query_groups or self.heads
        return (self.heads + 2 * groups) * (self.hidden // self.heads)

    @property
    def fc1_rows(self) -> int:
        return self.ffn * (2 if self.swiglu else 1)

    @property
    def dp_cp(self) -> int:
        """Size of the data-parallel group the buffers are sharded over (with context parallel)."""
        return self.dp * self.cp

    @property
    def train_dtype(self) -> torch.dtype:
        return TRAIN_DTYPES[self.dtype]

    @property
    def accumulate_grads_in_fp32(self) -> bool:
        """bf16 forces accumulate_allreduce_grads_in_fp32 (arguments.py); default False otherwise."""
        return self.dtype == "bf16"

    @property
    def ddp_prefix(self) -> str:
        """DDP names carry Float16Module's 'module.' only when fp16/bf16 wraps the model."""
        return "" if self.dtype == "fp32" else "module."

    def layers_in_stage(self, pp_rank: int) -> int:
        if self.stage_list is not None:
            return self.stage_list[pp_rank]
        return self.num_layers // self.pp

    def layers_in_chunk(self, pp_rank: int) -> int:
        return self.layers_in_stage(pp_rank) // self.vpp

    def layer_offset(self, pp_rank: int, chunk: int) -> int:
        """Global index of local layer 0 (legacy ParallelTransformer / mcore _get_layer_offset)."""
        if self.stage_list is not None:
            return sum(self.stage_list[:pp_rank])
        per_chunk = self.num_layers // (self.pp * self.vpp)
        return chunk * (self.num_layers // self.vpp) + pp_rank * per_chunk


@dataclass(frozen=True)
class WrittenFixture:
    root: Path  # the --save folder
    megatron_path: Path  # root/iter_XXXXXXX or root/release
    param_map_dir: Path  # root/param_map
    spec: FixtureSpec

    def convert_flags(self) -> list[str]:
        """The flags to give convert_pt2ckpt for this fixture (without --ms-path)."""
        s = self.spec
        flags = ["--megatron-path", str(self.megatron_path)]
        if s.param_map != "none":
            flags += ["--param-map-path", str(self.param_map_dir)]
        flags += ["--tp-size", str(s.tp), "--pp-size", str(s.pp), "--dp-size", str(s.dp),
                  "--cp-size", str(s.cp), "--vpp-size", str(s.vpp), "--num-layers", str(s.num_layers)]
        if s.stage_list is not None:
            flags += ["--stage-list", *map(str, s.stage_list)]
        return flags


# --------------------------------------------------------------------------------------------
# Plan: parameters, state-dict layout and buckets, without tensors


@dataclass(frozen=True)
class ParamPlan:
    local_name: str  # model-relative named_parameters() name (DDP name minus 'module.')
    ddp_name: str  # DDP's name: what the param_map uses
    sd_path: tuple[str, ...]  # path inside the saved model dict
    shape: tuple[int, ...]
    local_layer: int | None
    is_norm: bool
    shared_embedding: bool
    requires_grad: bool
    param_dtype: torch.dtype
    code: int  # value of element 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def state_dict_key(self) -> str:
        return ".".join(self.sd_path)


@dataclass(frozen=True)
class BucketPlan:
    start: int  # whole-buffer coordinates
    end: int  # padded end
    numel_unpadded: int

    @property
    def numel(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class BufferEntry:
    param: ParamPlan
    start: int  # whole-buffer coordinates
    end: int
    bucket: int


@dataclass(frozen=True)
class BufferPlan:
    index: int  # B: buffer index inside the chunk
    gbuf_idx: int  # index across all chunks of the rank (DistributedOptimizer.buffers)
    param_dtype: torch.dtype
    grad_dtype: torch.dtype
    bucket_size: int | None  # effective
    entries: tuple[BufferEntry, ...]  # buffer order (reverse named_parameters)
    buckets: tuple[BucketPlan, ...]

    @property
    def numel(self) -> int:
        return self.buckets[-1].end if self.buckets else 0

    @property
    def dtype_key(self) -> tuple[torch.dtype, torch.dtype]:
        return (self.param_dtype, self.grad_dtype)


@dataclass(frozen=True)
class ChunkPlan:
    tp: int
    pp: int
    chunk: int
    pre_process: bool
    post_process: bool
    n_layers: int
    layer_offset: int
    params: tuple[ParamPlan, ...]  # named_parameters() order
    sd_entries: tuple[tuple[tuple[str, ...], ParamPlan | None], ...]  # state-dict order; None = _extra_state
    buffers: tuple[BufferPlan, ...]


@dataclass(frozen=True)
class RankPlan:
    tp: int
    pp: int
    chunks: tuple[ChunkPlan, ...]
    pp_size: int

    @property
    def buffers(self) -> list[BufferPlan]:
        return [b for c in self.chunks for b in c.buffers]

    @property
    def folder(self) -> str:
        """checkpointing.get_checkpoint_name: mp_rank_TT, or mp_rank_TT_PPP when pp > 1."""
        return f"mp_rank_{self.tp:02d}" if self.pp_size == 1 else f"mp_rank_{self.tp:02d}_{self.pp:03d}"


@dataclass(frozen=True)
class FixturePlan:
    spec: FixtureSpec
    ranks: tuple[RankPlan, ...]  # tp-major, then pp
    code_stride: int
    values_exact_fp32: bool


class _ParamListBuilder:
    """Collects named_parameters() entries and state-dict entries for one model chunk."""

    def __init__(self, spec: FixtureSpec):
        self.spec = spec
        self.params: list[dict] = []  # named_parameters order
        self.sd: list[tuple[tuple[str, ...], int | None]] = []  # state-dict order; int = index into params

    def param(self, local_name: str, sd_path: tuple[str, ...], shape: tuple[int, ...], *,
              layer: int | None = None, norm: bool = False, shared: bool = False,
              sd_now: bool = True) -> int:
        self.params.append(dict(local_name=local_name, sd_path=sd_path, shape=tuple(shape),
                                layer=layer, norm=norm, shared=shared))
        idx = len(self.params) - 1
        if sd_now:
            self.sd.append((sd_path, idx))
        return idx

    def extra_state(self, sd_path: tuple[str, ...]) -> None:
        self.sd.append((sd_path, None))


def _legacy_chunk(spec: FixtureSpec, pre: bool, post: bool, n_layers: int) -> _ParamListBuilder:
    """megatron.legacy.model.GPTModel: named_parameters() order and the nested saved dict.

    GPTModel.state_dict_for_save_checkpoint -> {'language_model': TransformerLanguageModel
    .state_dict_for_save_checkpoint (embedding / encoder / output_layer), 'word_embeddings_for_head'
    on the last stage when tied and not pre_process}. Column/RowParallelLinear add '_extra_state'
    (get_extra_state returns None); VocabParallelEmbedding, norms and nn.Embedding do not.
    """
    b = _ParamListBuilder(spec)
    h, tp = spec.hidden, spec.tp
    tied = not spec.untie_embeddings
    lm = "language_model"
    if pre:
        # initialize_word_embeddings: first stage (virtual chunk 0), pre and not post, pp > 1
        shared = tied and spec.pp > 1 and not post
        b.param(f"{lm}.embedding.word_embeddings.weight", (lm, "embedding", "word_embeddings", "weight"),
                (spec.padded_vocab // tp, h), shared=shared)
        if spec.position_embedding == "learned_absolute":
            b.param(f"{lm}.embedding.position_embeddings.weight",
                    (lm, "embedding", "position_embeddings", "weight"), (spec.position_rows, h))
    enc = f"{lm}.encoder"
    for i in range(n_layers):
        def p(suffix: str, shape: tuple[int, ...], norm: bool = False) -> None:
            key = f"layers.{i}.{suffix}"
            b.param(f"{enc}.{key}", (lm, "encoder", key), shape, layer=i, norm=norm)

        def x(module: str) -> None:
            b.extra_state((lm, "encoder", f"layers.{i}.{module}._extra_state"))

        for w in spec.norm_params:
            p(f"input_norm.{w}", (h,), True)
        p("self_attention.query_key_value.weight", (spec.qkv_rows // tp, h))
        p("self_attention.query_key_value.bias", (spec.qkv_rows // tp,))
        x("self_attention.query_key_value")
        p("self_attention.dense.weight", (h, h // tp))
        p("self_attention.dense.bias", (h,))
        x("self_attention.dense")
        for w in spec.norm_params:
            p(f"post_attention_norm.{w}", (h,), True)
        p("mlp.dense_h_to_4h.weight", (spec.fc1_rows // tp, h))
        p("mlp.dense_h_to_4h.bias", (spec.fc1_rows // tp,))
        x("mlp.dense_h_to_4h")
        p("mlp.dense_4h_to_h.weight", (h, spec.ffn // tp))
        p("mlp.dense_4h_to_h.bias", (h,))
        x("mlp.dense_4h_to_h")
    if post:
        for w in spec.norm_params:
            b.param(f"{enc}.final_norm.{w}", (lm, "encoder", f"final_norm.{w}"), (h,), norm=True)
        if spec.untie_embeddings:
            b.param(f"{lm}.output_layer.weight", (lm, "output_layer", "weight"), (spec.padded_vocab // tp, h))
            b.extra_state((lm, "output_layer", "_extra_state"))
        elif not pre:
            # MegatronModule.initialize_word_embeddings: last stage, not pre_process
            b.param("word_embeddings.weight", ("word_embeddings_for_head", "weight"),
                    (spec.padded_vocab // tp, h), shared=True)
    return b


def _mcore_chunk(spec: FixtureSpec, pre: bool, post: bool, n_layers: int) -> _ParamListBuilder:
    """megatron.core.models.gpt.GPTModel (gpt_layer_specs.py): flat state dict.

    Local spec (get_gpt_layer_local_spec): module registration order embedding, decoder (layers:
    input_layernorm, self_attention (core_attention, linear_proj, linear_qkv, q/k_layernorm=IdentityOp),
    pre_cross_attn_layernorm, cross_attention, pre_mlp_layernorm, mlp (linear_fc1, linear_fc2)),
    final_layernorm, output_layer. Note linear_proj comes BEFORE linear_qkv in named_parameters().
    Transformer Engine spec (get_gpt_layer_with_transformer_engine_spec): input_layernorm and
    pre_mlp_layernorm are IdentityOp; the norms live in TELayerNormColumnParallelLinear (TE's
    LayerNormLinear) as linear_qkv.layer_norm_weight/_bias and linear_fc1.layer_norm_weight/_bias,
    registered before the linear's weight/bias; final_layernorm is TENorm (weight, bias for LayerNorm).
    """
    b = _ParamListBuilder(spec)
    h, tp = spec.hidden, spec.tp
    tied = not spec.untie_embeddings
    te = spec.mcore_spec == "te"
    if pre:
        shared = tied and spec.pp > 1 and not post
        b.param("embedding.word_embeddings.weight", ("embedding.word_embeddings.weight",),
                (spec.padded_vocab // tp, h), shared=shared)
        if spec.position_embedding == "learned_absolute":
            b.param("embedding.position_embeddings.weight", ("embedding.position_embeddings.weight",),
                    (spec.position_rows, h))
    for i in range(n_layers):
        def p(suffix: str, shape: tuple[int, ...], norm: bool = False) -> None:
            key = f"decoder.layers.{i}.{suffix}"
            b.param(key, (key,), shape, layer=i, norm=norm)

        def x(module: str) -> None:
            b.extra_state((f"decoder.layers.{i}.{module}._extra_state",))

        def norm(module: str) -> None:
            for w in spec.norm_params:
                p(f"{module}.layer_norm_{w}" if te else f"{module}.{w}", (h,), True)

        if not te:
            norm("input_layernorm")
        p("self_attention.linear_proj.weight", (h, h // tp))
        p("self_attention.linear_proj.bias", (h,))
        x("self_attention.linear_proj")
        if te:
            norm("self_attention.linear_qkv")
        p("self_attention.linear_qkv.weight", (spec.qkv_rows // tp, h))
        p("self_attention.linear_qkv.bias", (spec.qkv_rows // tp,))
        x("self_attention.linear_qkv")
        if te:
            norm("mlp.linear_fc1")
        else:
            norm("pre_mlp_layernorm")
        p("mlp.linear_fc1.weight", (spec.fc1_rows // tp, h))
        p("mlp.linear_fc1.bias", (spec.fc1_rows // tp,))
        x("mlp.linear_fc1")
        p("mlp.linear_fc2.weight", (h, spec.ffn // tp))
        p("mlp.linear_fc2.bias", (h,))
        x("mlp.linear_fc2")
    if post:
        for w in spec.norm_params:
            b.param(f"decoder.final_layernorm.{w}", (f"decoder.final_layernorm.{w}",), (h,), norm=True)
        # ColumnParallelLinear(skip_weight_param_allocation = pre_process and tied): weight None
        if spec.untie_embeddings or not pre:
            b.param("output_layer.weight", ("output_layer.weight",), (spec.padded_vocab // tp, h),
                    shared=tied and not pre)
        b.extra_state(("output_layer._extra_state",))
    return b


def _layout_buffer(params: list[ParamPlan], bucket_size: int | None, dp_cp: int
                   ) -> tuple[list[BufferEntry], list[BucketPlan]]:
    """ParamAndGradBuffer.__init__ (use_distributed_optimizer=True), first pass."""

    def pad(index: int) -> int:
        return -(-index // dp_cp) * dp_cp

    entries: list[BufferEntry] = []
    buckets: list[BucketPlan] = []
    bucket_start = 0
    in_bucket = 0

    def close(end: int) -> int:
        nonlocal bucket_start, in_bucket
        padded = pad(end)
        buckets.append(BucketPlan(bucket_start, padded, end - bucket_start))
        bucket_start, in_bucket = padded, 0
        return padded

    start = 0
    end = 0
    for p in reversed(params):
        end = start + p.numel
        if p.shared_embedding and in_bucket:
            if start % dp_cp:
                raise ValueError(
                    f"Megatron core_r0.6.0 cannot build this layout: the parameters before the shared "
                    f"embedding {p.ddp_name} end at {start}, not a multiple of dp*cp={dp_cp} "
                    f"(assert in ParamAndGradBuffer.__init__); change sizes or dp/cp")
            close(start)
        entries.append(BufferEntry(p, start, end, len(buckets)))
        in_bucket += 1
        if (bucket_size is not None and end - bucket_start >= bucket_size) or p.shared_embedding:
            end = close(end)
        start = end
    if in_bucket:
        close(end)
    return entries, buckets


def _chunk_skeleton(spec: FixtureSpec, pp_rank: int, chunk: int) -> tuple[bool, bool, _ParamListBuilder]:
    # training.get_model: pre/post from is_pipeline_first/last_stage(), which with vpp also
    # require virtual rank 0 / vpp-1.
    pre = pp_rank == 0 and chunk == 0
    post = pp_rank == spec.pp - 1 and chunk == spec.vpp - 1
    n_layers = spec.layers_in_chunk(pp_rank)
    build = _legacy_chunk if spec.model == "legacy" else _mcore_chunk
    return pre, post, build(spec, pre, post, n_layers)


def plan_fixture(spec: FixtureSpec) -> FixturePlan:
    """Everything about the files except the tensors: parameters, codes, buffers, buckets."""
    stride, exact = _code_stride(spec)
    ranks = tuple(RankPlan(tp_rank, pp_rank, _rank_chunks(spec, tp_rank, pp_rank, stride), pp_size=spec.pp)
                  for tp_rank in range(spec.tp) for pp_rank in range(spec.pp))
    return FixturePlan(spec, ranks, stride, exact)


def _code_stride(spec: FixtureSpec) -> tuple[int, bool]:
    """The distance between the value codes of consecutive chunks (larger than any chunk's element
    count), and whether every value v and v + 0.5 is exact in fp32 (v < 2**23)."""
    n_chunks = spec.tp * spec.pp * spec.vpp
    max_numel = max(sum(math.prod(p["shape"]) for p in _chunk_skeleton(spec, pp_rank, chunk)[2].params)
                    for pp_rank in range(spec.pp) for chunk in range(spec.vpp))
    # Keep v and v + 0.5 exact in fp32 where possible; the sample's stride otherwise.
    if max_numel < _DEFAULT_CODE_STRIDE and n_chunks * _DEFAULT_CODE_STRIDE <= (1 << 23):
        stride = _DEFAULT_CODE_STRIDE
    else:
        stride = 1 << max_numel.bit_length()
    return stride, n_chunks * stride <= (1 << 23)


def _rank_chunks(spec: FixtureSpec, tp_rank: int, pp_rank: int, stride: int) -> tuple[ChunkPlan, ...]:
    """The model chunks of one (tp, pp) rank; grad buffers are numbered on across its chunks."""
    chunks, gbuf_idx = [], 0
    for chunk in range(spec.vpp):
        pre, post, b = _chunk_skeleton(spec, pp_rank, chunk)
        plans = _param_plans(spec, b, code=((tp_rank * spec.pp + pp_rank) * spec.vpp + chunk) * stride + 1)
        if spec.synced_copies:
            plans = _synced_codes(spec, plans, tp_rank, stride)
        buffers = _chunk_buffers(spec, plans, _chunk_bucket_size(spec, pp_rank, chunk), gbuf_idx)
        gbuf_idx += len(buffers)
        sd_entries = tuple((path, None if i is None else plans[i]) for path, i in b.sd)
        chunks.append(ChunkPlan(tp_rank, pp_rank, chunk, pre, post, spec.layers_in_chunk(pp_rank),
                                spec.layer_offset(pp_rank, chunk), plans, sd_entries, buffers))
    return tuple(chunks)


def _param_plans(spec: FixtureSpec, b: _ParamListBuilder, code: int) -> tuple[ParamPlan, ...]:
    """The chunk's parameters in named_parameters() order, each with the code its values start at."""
    plans = []
    for d in b.params:
        name = d["local_name"]
        pdtype = torch.float32 if (spec.mixed_dtype and d["norm"]) else spec.train_dtype
        plans.append(ParamPlan(local_name=name, ddp_name=spec.ddp_prefix + name, sd_path=d["sd_path"],
                               shape=d["shape"], local_layer=d["layer"], is_norm=d["norm"],
                               shared_embedding=d["shared"], requires_grad=not any(f in name for f in spec.frozen),
                               param_dtype=pdtype, code=code))
        code += math.prod(d["shape"])
    return tuple(plans)


# the parameters split over tp (Megatron's ColumnParallel / RowParallel weights, column-parallel biases and
# the vocab-parallel tables); every other parameter is a copy on each tp rank
_TP_SPLIT_SUFFIXES = ("word_embeddings.weight", "output_layer.weight", "query_key_value.weight",
                      "query_key_value.bias", "self_attention.dense.weight", "dense_h_to_4h.weight",
                      "dense_h_to_4h.bias", "dense_4h_to_h.weight", "linear_qkv.weight", "linear_qkv.bias",
                      "linear_proj.weight", "linear_fc1.weight", "linear_fc1.bias", "linear_fc2.weight")


def _synced_codes(spec: FixtureSpec, plans: tuple[ParamPlan, ...], tp_rank: int,
                  stride: int) -> tuple[ParamPlan, ...]:
    """synced_copies: a replicated parameter takes the code of the same parameter on tp rank 0 (local
    shapes are equal on every tp rank, so it is at the same offset there), the tied head copy the code of
    its tp rank's word embeddings (the first parameter of stage 0's chunk 0)."""
    out = []
    for p in plans:
        code = p.code
        if p.shared_embedding and not p.local_name.endswith("embedding.word_embeddings.weight"):
            code = tp_rank * spec.pp * spec.vpp * stride + 1
        elif not p.local_name.endswith(_TP_SPLIT_SUFFIXES):
            code = p.code - tp_rank * spec.pp * spec.vpp * stride
        out.append(dataclasses.replace(p, code=code))
    return tuple(out)


def _chunk_bucket_size(spec: FixtureSpec, pp_rank: int, chunk: int) -> int | None:
    """DDP makes buckets only on chunk 0 of pipeline rank 0, and only with overlap_grad_reduce."""
    if not spec.overlap_grad_reduce or pp_rank > 0 or chunk > 0:
        return None
    return spec.bucket_size


def _chunk_buffers(spec: FixtureSpec, plans: Sequence[ParamPlan], bucket_size: int | None,
                   first_gbuf: int) -> tuple[BufferPlan, ...]:
    """DDP.allocate_buffers_for_parameters: one buffer per (param dtype, grad dtype), in
    named_parameters order of first appearance; frozen parameters have none."""
    groups: dict[tuple[torch.dtype, torch.dtype], list[ParamPlan]] = {}
    for p in plans:
        if p.requires_grad:
            grad = torch.float32 if spec.accumulate_grads_in_fp32 else p.param_dtype
            groups.setdefault((p.param_dtype, grad), []).append(p)
    buffers = []
    for bi, ((pdt, gdt), members) in enumerate(groups.items()):
        entries, buckets = _layout_buffer(members, bucket_size, spec.dp_cp)
        buffers.append(BufferPlan(bi, first_gbuf + bi, pdt, gdt, bucket_size, tuple(entries), tuple(buckets)))
    return tuple(buffers)


# --------------------------------------------------------------------------------------------
# Non-tensor contents of model_optim_rng.pt

# Every field of the args Namespace Megatron-LM core_r0.6.0 saved for the sample
# (tests/data/megatron_sample), in its order; layout-dependent fields are overwritten per fixture.
_ARGS_DEFAULTS: dict[str, Any] = {
    'num_layers': 4,
    'encoder_num_layers': 4,
    'decoder_num_layers': None,
    'hidden_size': 40,
    'ffn_hidden_size': 130,
    'num_attention_heads': 4,
    'kv_channels': 10,
    'group_query_attention': False,
    'num_query_groups': 1,
    'max_position_embeddings': 8,
    'position_embedding_type': 'learned_absolute',
    'use_rotary_position_embeddings': False,
    'rotary_percent': 1.0,
    'rotary_interleaved': False,
    'rotary_seq_len_interpolation_factor': None,
    'add_position_embedding': True,
    'make_vocab_size_divisible_by': 1,
    'normalization': 'LayerNorm',
    'norm_epsilon': 1e-05,
    'apply_layernorm_1p': False,
    'apply_residual_connection_post_layernorm': False,
    'openai_gelu': False,
    'squared_relu': False,
    'swiglu': False,
    'onnx_safe': None,
    'bert_binary_head': True,
    'untie_embeddings_and_output_weights': False,
    'attention_dropout': 0.0,
    'hidden_dropout': 0.0,
    'weight_decay': 0.1,
    'start_weight_decay': 0.1,
    'end_weight_decay': 0.1,
    'weight_decay_incr_style': 'constant',
    'clip_grad': 1.0,
    'adam_beta1': 0.9,
    'adam_beta2': 0.95,
    'adam_eps': 1e-08,
    'sgd_momentum': 0.9,
    'micro_batch_size': 1,
    'global_batch_size': 4,
    'rampup_batch_size': None,
    'recompute_granularity': None,
    'check_for_nan_in_loss_and_grad': True,
    'distribute_saved_activations': False,
    'recompute_method': None,
    'recompute_num_layers': None,
    'clone_scatter_output_in_embedding': True,
    'profile': False,
    'profile_step_start': 10,
    'profile_step_end': 12,
    'profile_ranks': [0],
    'tp_comm_overlap': False,
    'tp_comm_overlap_cfg': None,
    'tp_comm_overlap_ag': True,
    'tp_comm_overlap_rs': True,
    'tp_comm_bulk_dgrad': True,
    'tp_comm_bulk_wgrad': True,
    'use_cpu_initialization': True,
    'empty_unused_memory_level': 0,
    'train_iters': 20,
    'train_samples': None,
    'log_interval': 100,
    'exit_interval': None,
    'exit_duration_in_mins': None,
    'exit_signal_handler': False,
    'tensorboard_dir': None,
    'masked_softmax_fusion': False,
    'bias_gelu_fusion': False,
    'bias_swiglu_fusion': True,
    'bias_dropout_fusion': False,
    'apply_rope_fusion': True,
    'use_flash_attn': False,
    'add_bias_linear': True,
    'add_qkv_bias': False,
    'optimizer': 'adam',
    'dataloader_type': 'single',
    'async_tensor_model_parallel_allreduce': True,
    'no_persist_layer_norm': False,
    'sequence_parallel': False,
    'gradient_accumulation_fusion': False,
    'use_mcore_models': False,
    'manual_gc': False,
    'manual_gc_interval': 0,
    'manual_gc_eval': True,
    'tp_comm_split_ag': True,
    'tp_comm_split_rs': True,
    'seed': 1234,
    'data_parallel_random_init': False,
    'init_method_std': 0.02,
    'init_method_xavier_uniform': False,
    'lr': 0.001,
    'lr_decay_style': 'cosine',
    'lr_decay_iters': 20,
    'lr_decay_samples': None,
    'lr_warmup_fraction': None,
    'lr_warmup_iters': 2,
    'lr_warmup_samples': 0,
    'lr_warmup_init': 0.0,
    'min_lr': 0.0001,
    'override_opt_param_scheduler': False,
    'use_checkpoint_opt_param_scheduler': False,
    'decoupled_lr': None,
    'decoupled_min_lr': None,
    'save': '/tmp/sample-real',
    'save_interval': 10,
    'no_save_optim': None,
    'no_save_rng': None,
    'load': None,
    'no_load_optim': None,
    'no_load_rng': None,
    'finetune': False,
    'pretrained_checkpoint': None,
    'ckpt_step': None,
    'perform_initialization': True,
    'use_checkpoint_args': False,
    'exit_on_missing_checkpoint': False,
    'use_dist_ckpt': False,
    'auto_detect_ckpt_format': False,
    'dist_ckpt_format': 'torch_dist',
    'ckpt_fully_parallel_save': False,
    'fp16': False,
    'bf16': True,
    'loss_scale': None,
    'initial_loss_scale': 4294967296,
    'min_loss_scale': 1.0,
    'loss_scale_window': 1000,
    'hysteresis': 2,
    'fp32_residual_connection': False,
    'apply_query_key_layer_scaling': False,
    'attention_softmax_in_fp32': True,
    'accumulate_allreduce_grads_in_fp32': True,
    'fp16_lm_cross_entropy': False,
    'tensor_model_parallel_size': 2,
    'pipeline_model_parallel_size': 2,
    'pipeline_model_parallel_split_rank': None,
    'num_layers_per_virtual_pipeline_stage': None,
    'overlap_p2p_comm': False,
    'distributed_backend': 'gloo',
    'distributed_timeout_minutes': 10,
    'overlap_grad_reduce': True,
    'delay_grad_reduce': True,
    'overlap_param_gather': False,
    'delay_param_gather': False,
    'scatter_gather_tensors_in_pipeline': True,
    'use_ring_exchange_p2p': False,
    'local_rank': 0,
    'lazy_mpu_init': None,
    'standalone_embedding_stage': False,
    'use_distributed_optimizer': True,
    'context_parallel_size': 1,
    'nccl_communicator_config_path': None,
    'eval_iters': 100,
    'eval_interval': 1000,
    'test_mode': False,
    'skip_train': False,
    'data_path': None,
    'split': '969, 30, 1',
    'train_data_path': None,
    'valid_data_path': None,
    'test_data_path': None,
    'data_cache_path': None,
    'mmap_bin_files': True,
    'mock_data': False,
    'vocab_size': 97,
    'vocab_file': None,
    'merge_file': None,
    'vocab_extra_ids': 0,
    'seq_length': 8,
    'encoder_seq_length': 8,
    'decoder_seq_length': None,
    'retriever_seq_length': 256,
    'sample_rate': 1.0,
    'mask_prob': 0.15,
    'short_seq_prob': 0.1,
    'num_workers': 2,
    'tokenizer_type': 'NullTokenizer',
    'tokenizer_model': None,
    'reset_position_ids': False,
    'reset_attention_mask': False,
    'eod_mask_loss': False,
    'create_attention_mask_in_dataloader': True,
    'adlr_autoresume': False,
    'adlr_autoresume_interval': 1000,
    'ict_head_size': None,
    'biencoder_projection_dim': 0,
    'biencoder_shared_query_context_model': False,
    'ict_load': None,
    'bert_load': None,
    'titles_data_path': None,
    'query_in_block_prob': 0.1,
    'use_one_sent_docs': False,
    'evidence_data_path': None,
    'retriever_report_topk_accuracies': [],
    'retriever_score_scaling': False,
    'block_data_path': None,
    'embedding_path': None,
    'indexer_batch_size': 128,
    'indexer_log_interval': 1000,
    'num_classes': 1000,
    'img_h': 224,
    'img_w': 224,
    'num_channels': 3,
    'patch_dim': 16,
    'classes_fraction': 1.0,
    'data_per_class_fraction': 1.0,
    'data_sharding': True,
    'head_lr_mult': 1.0,
    'vision_pretraining': False,
    'vision_pretraining_type': 'classify',
    'vision_backbone_type': 'vit',
    'swin_backbone_type': 'tiny',
    'mask_type': 'random',
    'mask_factor': 1.0,
    'iter_per_epoch': 1250,
    'dino_local_img_size': 96,
    'dino_local_crops_number': 10,
    'dino_head_hidden_size': 2048,
    'dino_bottleneck_size': 256,
    'dino_freeze_last_layer': 1,
    'dino_norm_last_layer': False,
    'dino_warmup_teacher_temp': 0.04,
    'dino_teacher_temp': 0.07,
    'dino_warmup_teacher_temp_epochs': 30,
    'qk_layernorm': False,
    'expert_model_parallel_size': 1,
    'num_experts': None,
    'moe_router_load_balancing_type': 'aux_loss',
    'moe_router_topk': 2,
    'moe_grouped_gemm': False,
    'moe_aux_loss_coeff': 0.0,
    'moe_z_loss_coeff': None,
    'moe_input_jitter_eps': None,
    'moe_token_dropping': False,
    'moe_token_dispatcher_type': 'allgather',
    'moe_per_layer_logging': False,
    'log_params_norm': False,
    'log_num_zeros_in_grad': False,
    'log_throughput': False,
    'log_progress': False,
    'timing_log_level': 0,
    'barrier_with_L1_time': True,
    'timing_log_option': 'minmax',
    'tensorboard_log_interval': 1,
    'tensorboard_queue_size': 1000,
    'log_timers_to_tensorboard': False,
    'log_batch_size_to_tensorboard': False,
    'log_learning_rate_to_tensorboard': True,
    'log_loss_scale_to_tensorboard': True,
    'log_validation_ppl_to_tensorboard': False,
    'log_memory_to_tensorboard': False,
    'log_world_size_to_tensorboard': False,
    'wandb_project': '',
    'wandb_exp_name': '',
    'wandb_save_dir': '',
    'enable_one_logger': False,
    'one_logger_project': 'e2e-tracking',
    'one_logger_entity': 'hwinf_dcm',
    'one_logger_run_name': None,
    'inference_batch_times_seqlen_threshold': 512,
    'max_tokens_to_oom': 12000,
    'output_bert_embeddings': False,
    'bert_embedder_type': 'megatron',
    'fp8': None,
    'fp8_margin': 0,
    'fp8_interval': 1,
    'fp8_amax_history_len': 1,
    'fp8_amax_compute_algo': 'most_recent',
    'fp8_wgrad': True,
    'transformer_impl': 'local',
    'retro_project_dir': None,
    'retro_add_retriever': False,
    'retro_cyclic_train_iters': None,
    'retro_encoder_layers': 2,
    'retro_encoder_hidden_dropout': 0.1,
    'retro_encoder_attention_dropout': 0.1,
    'retro_num_neighbors': 2,
    'retro_num_retrieved_chunks': 2,
    'retro_attention_gate': 1,
    'retro_verify_neighbor_count': True,
    'spec': None,
    'yaml_cfg': None,
    'rank': 0,
    'world_size': 8,
    'transformer_pipeline_model_parallel_size': 2,
    'data_parallel_size': 2,
    'virtual_pipeline_model_parallel_size': None,
    'params_dtype': torch.bfloat16,
    'consumed_train_samples': 0,
    'consumed_valid_samples': 0,
    'variable_seq_lengths': False,
    'padded_vocab_size': 98,
    'model_type': None,  # ModelType.encoder_or_decoder, set per fixture
    'iteration': 10,
    'num_floating_point_operations_so_far': 0,
    'curr_iteration': 0,
}


def _global_batch_size(spec: FixtureSpec) -> int:
    return 2 * spec.dp  # micro_batch_size 1, two micro-batches per DP rank (the sample: 4 with dp 2)


def _make_args(spec: FixtureSpec, root: Path, tp_rank: int, pp_rank: int) -> argparse.Namespace:
    a = dict(_ARGS_DEFAULTS)
    gbs = _global_batch_size(spec)
    a.update(
        num_layers=spec.num_layers,
        encoder_num_layers=spec.num_layers,
        hidden_size=spec.hidden,
        ffn_hidden_size=spec.ffn,
        num_attention_heads=spec.heads,
        group_query_attention=spec.query_groups is not None,
        num_query_groups=spec.query_groups or 1,
        swiglu=spec.swiglu,
        kv_channels=spec.hidden // spec.heads,
        max_position_embeddings=spec.position_rows,
        position_embedding_type=spec.position_embedding,
        use_rotary_position_embeddings=spec.position_embedding == "rope",
        add_position_embedding=spec.position_embedding == "learned_absolute",
        normalization=spec.normalization,
        transformer_impl="transformer_engine" if spec.model == "mcore" and spec.mcore_spec == "te" else "local",
        make_vocab_size_divisible_by=spec.make_vocab_size_divisible_by,
        untie_embeddings_and_output_weights=spec.untie_embeddings,
        global_batch_size=gbs,
        check_for_nan_in_loss_and_grad=spec.dtype != "fp16",  # fp16 w/o loss_scale turns it off
        use_mcore_models=spec.model == "mcore",
        save=str(root),
        fp16=spec.dtype == "fp16",
        bf16=spec.dtype == "bf16",
        accumulate_allreduce_grads_in_fp32=spec.accumulate_grads_in_fp32,
        tensor_model_parallel_size=spec.tp,
        pipeline_model_parallel_size=spec.pp,
        num_layers_per_virtual_pipeline_stage=(spec.num_layers // (spec.pp * spec.vpp)) if spec.vpp > 1 else None,
        overlap_grad_reduce=spec.overlap_grad_reduce,
        context_parallel_size=spec.cp,
        vocab_size=spec.vocab,
        seq_length=spec.seq_length,
        encoder_seq_length=spec.seq_length,
        # written by the process with dp = cp = 0 of this (tp, pp); order tp-cp-ep-dp-pp
        rank=tp_rank + spec.tp * spec.cp * spec.dp * pp_rank,
        world_size=spec.tp * spec.pp * spec.dp * spec.cp,
        transformer_pipeline_model_parallel_size=spec.pp,
        data_parallel_size=spec.dp,
        virtual_pipeline_model_parallel_size=spec.vpp if spec.vpp > 1 else None,
        params_dtype=spec.train_dtype,
        padded_vocab_size=spec.padded_vocab,
        model_type=ModelType.encoder_or_decoder,
        iteration=spec.iteration,
    )
    return argparse.Namespace(**a)


def _scheduler_state(spec: FixtureSpec) -> tuple[dict, float]:
    """OptimizerParamScheduler.state_dict() after `iteration` steps, and the current lr."""
    gbs = _global_batch_size(spec)
    max_lr, min_lr = 0.001, 0.0001
    warmup, decay = 2 * gbs, 20 * gbs
    steps = spec.iteration * gbs
    if steps <= warmup:
        lr = max_lr * steps / warmup
    elif steps > decay:
        lr = min_lr
    else:
        ratio = (steps - warmup) / (decay - warmup)
        lr = min_lr + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (max_lr - min_lr)
    state = {'max_lr': max_lr, 'lr_warmup_steps': warmup, 'num_steps': steps, 'lr_decay_style': 'cosine',
             'lr_decay_steps': decay, 'min_lr': min_lr, 'start_wd': 0.1, 'end_wd': 0.1,
             'wd_incr_style': 'constant', 'wd_incr_steps': decay}
    return state, lr


def _optimizer_state(spec: FixtureSpec, rank: RankPlan, lr: float) -> dict:
    """DistributedOptimizer.state_dict(): param_groups of apex FusedAdam without 'params'.

    Groups come from optimizer._get_param_groups: keyed (wd_mult, lr_mult, is_expert_parallel,
    is_decoupled_lr) in order of first appearance over the chunks' named_parameters()
    (requires_grad only); no weight decay for biases and 1-D params.
    """
    keys: list[float] = []
    for c in rank.chunks:
        for p in c.params:
            if not p.requires_grad:
                continue
            wd_mult = 0.0 if (p.local_name.endswith(".bias") or len(p.shape) == 1) else 1.0
            if wd_mult not in keys:
                keys.append(wd_mult)
    groups = []
    for wd_mult in keys:
        groups.append({'wd_mult': wd_mult, 'lr_mult': 1.0, 'is_expert_parallel': False,
                       'is_decoupled_lr': False, 'max_lr': 0.001, 'min_lr': 0.0001, 'lr': lr,
                       'bias_correction': True, 'betas': (0.9, 0.95), 'eps': 1e-08,
                       'weight_decay': 0.1 * wd_mult, 'step': spec.iteration})
    state: dict[str, Any] = {'optimizer': {'param_groups': groups}}
    if spec.dtype == "fp16":
        # DynamicGradScaler.state_dict (loss_scale unset, initial_loss_scale 2**32, hysteresis 2)
        state['grad_scaler'] = {'scale': torch.tensor([4294967296.0], dtype=torch.float32),
                                'growth_tracker': spec.iteration, 'hysteresis_tracker': 2}
    return state


def _rng_state(spec: FixtureSpec, tp_rank: int, pp_rank: int) -> list[dict]:
    """checkpointing.get_rng_state after initialize._set_random_seed(1234) (no data_parallel_random_init)."""
    seed = 1234 + 100 * pp_rank

    def gen(s: int) -> torch.Tensor:
        return torch.Generator().manual_seed(s).get_state()

    return [{
        'random_rng_state': random.Random(seed).getstate(),
        'np_rng_state': np.random.RandomState(seed).get_state(),
        'torch_rng_state': gen(seed),
        'cuda_rng_state': gen(seed),
        # tensor_parallel.model_parallel_cuda_manual_seed
        'rng_tracker_states': {
            'data-parallel-rng': gen(seed),
            'model-parallel-rng': gen(seed + 2718 + tp_rank),
            'expert-parallel-rng': gen(seed + 1024 + tp_rank),
        },
    }]


# --------------------------------------------------------------------------------------------
# Tensors


def _fill_values(out: torch.Tensor, code: int) -> None:
    """out[j] = float32(code + j), rounded to nearest from the exact integer."""
    n = out.numel()
    if code + n <= (1 << 24):  # every integer exact in fp32: arange directly into out
        torch.arange(code, code + n, dtype=torch.float32, out=out)
    else:
        step = 1 << 22
        for a in range(0, n, step):
            b = min(n, a + step)
            out[a:b] = torch.arange(code + a, code + b, dtype=torch.float64)


def _values(code: int, numel: int) -> torch.Tensor:
    out = torch.empty(numel, dtype=torch.float32)
    _fill_values(out, code)
    return out


_DIGEST_BLOCK = 1 << 22


def _digest(t: torch.Tensor) -> dict:
    """float64 sum, sum of squares, first and last 4 values (as in the sample's expected.json)."""
    flat = t.detach().reshape(-1)
    if flat.numel() <= _DIGEST_BLOCK:
        x = flat.to(torch.float64)
        total, sumsq = x.sum().item(), (x * x).sum().item()
    else:  # big tensors: blockwise, to bound memory
        total = sumsq = 0.0
        for a in range(0, flat.numel(), _DIGEST_BLOCK):
            x = flat[a:a + _DIGEST_BLOCK].to(torch.float64)
            total += x.sum().item()
            sumsq += torch.dot(x, x).item()
    return {"sum": total, "sumsq": sumsq,
            "first": flat[:4].to(torch.float64).tolist(), "last": flat[-4:].to(torch.float64).tolist()}


def _negated_digest(d: dict) -> dict:
    """The digest of -t from the digest of t (negation is exact, so this equals _digest(-t))."""
    return {"sum": -d["sum"] if d["sum"] else d["sum"], "sumsq": d["sumsq"],
            "first": [-v for v in d["first"]], "last": [-v for v in d["last"]]}


_LAYER_RE = re.compile(r"(^|\.)layers\.(\d+)\.")


def _global_layer_name(name: str, offset: int) -> str:
    return _LAYER_RE.sub(lambda m: f"{m.group(1)}layers.{int(m.group(2)) + offset}.", name, count=1)


def _set_path(d: dict, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        d = d.setdefault(k, {})
    d[path[-1]] = value


@dataclass
class _RankTensors:
    model_dicts: list[dict]
    optim: dict
    # (chunk, ddp_name) -> state -> tensor (the written ones, not copies)
    by_param: dict[tuple[int, str], dict[str, torch.Tensor]]


def _materialize_rank(spec: FixtureSpec, rank: RankPlan) -> _RankTensors:
    fill = PADDING_SENTINEL if spec.garbage_padding else 0.0
    optim: dict[Any, Any] = {"per_bucket_numel": [], "per_bucket_numel_unpadded": []}
    by_param: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    model_dicts = []
    for c in rank.chunks:
        model_tensor: dict[str, torch.Tensor] = {}
        for buf in c.buffers:
            optim["per_bucket_numel"].append({buf.dtype_key: [b.numel for b in buf.buckets]})
            optim["per_bucket_numel_unpadded"].append({buf.dtype_key: [b.numel_unpadded for b in buf.buckets]})
            # ParamAndGradBuffer.param_data: torch.zeros, params remapped to views of it
            param_data = torch.zeros(buf.numel, dtype=buf.param_dtype)
            states: dict[str, list[torch.Tensor]] = {k: [] for k in OPTIM_STATES}
            for bi, bucket in enumerate(buf.buckets):
                master = torch.empty(bucket.numel, dtype=torch.float32)
                master[bucket.numel_unpadded:] = fill
                members = [e for e in buf.entries if e.bucket == bi]
                for e in members:  # back to back from the bucket start (ParamAndGradBuffer)
                    _fill_values(master[e.start - bucket.start:e.end - bucket.start], e.param.code)
                exp_avg = -master
                exp_avg_sq = master + 0.5
                exp_avg[bucket.numel_unpadded:] = fill
                exp_avg_sq[bucket.numel_unpadded:] = fill
                used = slice(bucket.start, bucket.start + bucket.numel_unpadded)
                param_data[used] = master[:bucket.numel_unpadded].to(buf.param_dtype)
                for k, t in zip(OPTIM_STATES, (master, exp_avg, exp_avg_sq)):
                    states[k].append(t)
                for e in members:
                    sl = slice(e.start - bucket.start, e.end - bucket.start)
                    view = param_data[e.start:e.end].view(e.param.shape)
                    model_tensor[e.param.ddp_name] = view
                    by_param[(c.chunk, e.param.ddp_name)] = {
                        "param": master[sl].view(e.param.shape),
                        "exp_avg": exp_avg[sl].view(e.param.shape),
                        "exp_avg_sq": exp_avg_sq[sl].view(e.param.shape),
                        "model_bf16": view,
                    }
            optim[buf.gbuf_idx] = {buf.dtype_key: states}
        for p in c.params:
            if not p.requires_grad:  # not in any buffer: a tensor of its own
                t = _values(p.code, p.numel).to(p.param_dtype).view(p.shape)
                model_tensor[p.ddp_name] = t
                by_param[(c.chunk, p.ddp_name)] = {"model_bf16": t}
        sd: dict[str, Any] = {}
        for path, p in c.sd_entries:
            _set_path(sd, path, None if p is None else model_tensor[p.ddp_name])
        model_dicts.append(sd)
    return _RankTensors(model_dicts, optim, by_param)


def _param_map_json(buf: BufferPlan) -> dict:
    return {e.param.ddp_name: [str(e.param.param_dtype), list(e.param.shape), e.start, e.end, e.bucket]
            for e in buf.entries}


def _sidecar(spec: FixtureSpec, rank: RankPlan, chunk: int, buf: BufferPlan, dp_rank: int) -> dict:
    return {"format": "convert_pt2ckpt.param_map_meta", "version": 1,
            "param_dtype": str(buf.param_dtype), "grad_dtype": str(buf.grad_dtype),
            "data_parallel_size": spec.dp_cp, "bucket_size": buf.bucket_size, "numel": buf.numel,
            "buckets": [{"start": b.start, "end": b.end, "numel_unpadded": b.numel_unpadded}
                        for b in buf.buckets],
            "model_chunk": chunk, "buffer_index": buf.index, "tp_rank": rank.tp, "pp_rank": rank.pp,
            "dp_rank": dp_rank}


def _meta(spec: FixtureSpec, plan: FixturePlan) -> dict:
    return {
        # the fields of the Megatron-written sample's meta, in its order
        "tp": spec.tp, "pp": spec.pp, "dp": spec.dp, "vpp": spec.vpp, "num_layers": spec.num_layers,
        "hidden": spec.hidden, "ffn": spec.ffn, "heads": spec.heads, "vocab": spec.vocab,
        "padded_vocab": spec.padded_vocab, "model": spec.model, "values": "index",
        "bucket_size": spec.bucket_size, "overlap_grad_reduce": spec.overlap_grad_reduce,
        "bucket_all_chunks": False, "iteration": spec.iteration,
        # extras
        "cp": spec.cp, "dtype": spec.dtype,
        "stage_list": list(spec.stage_list) if spec.stage_list is not None
        else [spec.layers_in_stage(p) for p in range(spec.pp)],
        "release": spec.release, "untie_embeddings": spec.untie_embeddings,
        "make_vocab_size_divisible_by": spec.make_vocab_size_divisible_by, "seq_length": spec.seq_length,
        "mixed_dtype": spec.mixed_dtype, "frozen": list(spec.frozen), "param_map": spec.param_map,
        "garbage_padding": spec.garbage_padding,
        "normalization": spec.normalization, "position_embedding": spec.position_embedding,
        "max_position_embeddings": spec.position_rows, "mcore_spec": spec.mcore_spec,
        "query_groups": spec.query_groups, "swiglu": spec.swiglu,
        "padding_sentinel": "nan" if spec.garbage_padding else 0.0,
        "code_stride": plan.code_stride, "values_exact_fp32": plan.values_exact_fp32,
        "megatron_dir": "release" if spec.release else f"iter_{spec.iteration:07d}",
    }


def _record_entry(spec: FixtureSpec, c: ChunkPlan, p: ParamPlan, tensors: dict[str, torch.Tensor],
                  where: dict[str, BufferEntry | BufferPlan] | None) -> dict:
    key = f"tp{c.tp}/pp{c.pp}/chunk{c.chunk}/{p.ddp_name}"
    entry: dict[str, Any] = {
        "key": key, "tp": c.tp, "pp": c.pp, "vpp_chunk": c.chunk, "name": p.ddp_name,
        "name_global_layer": _global_layer_name(p.ddp_name, c.layer_offset),
        "global_layer": None if p.local_layer is None else p.local_layer + c.layer_offset,
        "local_layer_offset": c.layer_offset, "shape": list(p.shape),
    }
    for s in RECORD_STATES:
        if s == "exp_avg" and "param" in tensors:
            entry[s] = _negated_digest(entry["param"])
        else:
            entry[s] = _digest(tensors[s]) if s in tensors else None
    buf = where["buffer"] if where else None
    ent = where["entry"] if where else None
    entry.update({
        "state_dict_key": p.state_dict_key, "requires_grad": p.requires_grad,
        "buffer": buf.index if buf else None, "gbuf_idx": buf.gbuf_idx if buf else None,
        "param_dtype": str(p.param_dtype), "grad_dtype": str(buf.grad_dtype) if buf else None,
        "bucket": ent.bucket if ent else None,
        "buffer_start": ent.start if ent else None, "buffer_end": ent.end if ent else None,
        "shared_embedding": p.shared_embedding,
    })
    return entry


def write_fixture(root: Path | str, spec: FixtureSpec, *, record: bool = True,
                  record_tensors: bool | None = None) -> WrittenFixture:
    """Write the checkpoint tree for `spec` under `root` (the --save folder) and return its paths.

    record: write expected.json. record_tensors: also write expected.pt (default: same as record).
    Ranks are generated and written one (tp, pp) folder at a time.
    """
    root = Path(root)
    if record_tensors is None:
        record_tensors = record
    plan = plan_fixture(spec)
    megatron_path = root / ("release" if spec.release else f"iter_{spec.iteration:07d}")
    param_map_dir = root / "param_map"
    root.mkdir(parents=True, exist_ok=True)
    (root / "latest_checkpointed_iteration.txt").write_text("release" if spec.release else str(spec.iteration))
    if spec.param_map != "none":
        param_map_dir.mkdir(exist_ok=True)
    sched, lr = _scheduler_state(spec)
    entries: list[dict] = []
    expected: dict[str, torch.Tensor] = {}
    for rank in plan.ranks:  # one (tp, pp) folder in memory at a time
        entries += _write_rank(spec, rank, root, megatron_path, param_map_dir, sched, lr,
                               record, expected if record_tensors else None)
    if record:
        entries.sort(key=lambda e: e["key"])
        (root / "expected.json").write_text(json.dumps({"meta": _meta(spec, plan), "params": entries}, indent=1))
        if record_tensors:
            ordered = {f"{e['key']}::{s}": expected[f"{e['key']}::{s}"]
                       for e in entries for s in RECORD_STATES if f"{e['key']}::{s}" in expected}
            torch.save(ordered, root / "expected.pt")
    return WrittenFixture(root, megatron_path, param_map_dir, spec)


def _write_rank(spec: FixtureSpec, rank: RankPlan, root: Path, megatron_path: Path, param_map_dir: Path,
                sched: dict, lr: float, record: bool, expected: dict[str, torch.Tensor] | None) -> list[dict]:
    """Write one mp_rank folder and its param_map files; return its record entries."""
    tensors = _materialize_rank(spec, rank)
    folder = megatron_path / rank.folder
    folder.mkdir(parents=True, exist_ok=True)
    # checkpointing.save_checkpoint: distrib_optim.pt first, then model_optim_rng.pt
    torch.save(tensors.optim, folder / "distrib_optim.pt")
    state: dict[str, Any] = {"args": _make_args(spec, root, rank.tp, rank.pp), "checkpoint_version": 3.0,
                             "iteration": spec.iteration}
    if len(rank.chunks) == 1:
        state["model"] = tensors.model_dicts[0]
    else:
        for i, sd in enumerate(tensors.model_dicts):
            state[f"model{i}"] = sd
    state["optimizer"] = _optimizer_state(spec, rank, lr)
    state["opt_param_scheduler"] = dict(sched)
    state["rng_state"] = _rng_state(spec, rank.tp, rank.pp)
    state["num_floating_point_operations_so_far"] = 0
    with _megatron_enums_module():
        torch.save(state, folder / "model_optim_rng.pt")
    if spec.param_map != "none":
        for c in rank.chunks:
            for buf in c.buffers:
                text = json.dumps(_param_map_json(buf))
                for d in range(spec.dp_cp):
                    stem = f"param_map_buffer{buf.index}_dp{d}tp{rank.tp}pp{rank.pp}vpp{c.chunk}"
                    (param_map_dir / f"{stem}.json").write_text(text)
                    if spec.param_map == "with_sidecar":
                        (param_map_dir / f"{stem}.meta.json").write_text(
                            json.dumps(_sidecar(spec, rank, c.chunk, buf, d), indent=1))
    entries = []
    if record:
        for c in rank.chunks:
            where = {e.param.ddp_name: {"buffer": b, "entry": e} for b in c.buffers for e in b.entries}
            for p in c.params:
                t = tensors.by_param[(c.chunk, p.ddp_name)]
                e = _record_entry(spec, c, p, t, where.get(p.ddp_name))
                entries.append(e)
                if expected is not None:
                    for s in RECORD_STATES:
                        if s in t:
                            expected[f"{e['key']}::{s}"] = t[s].clone()
    return entries


# --------------------------------------------------------------------------------------------
# CLI


def _parse(argv: list[str] | None) -> tuple[Path, FixtureSpec, bool]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="the --save folder to write")
    for name in ("tp", "pp", "dp", "cp", "vpp"):
        ap.add_argument(f"--{name}", type=int, default=1)
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--ffn", type=int, default=40)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=50)
    ap.add_argument("--make-vocab-size-divisible-by", type=int, default=1)
    ap.add_argument("--seq-length", type=int, default=8)
    ap.add_argument("--model", choices=("legacy", "mcore"), default="legacy")
    ap.add_argument("--dtype", choices=tuple(TRAIN_DTYPES), default="bf16")
    ap.add_argument("--overlap-grad-reduce", action="store_true")
    ap.add_argument("--bucket-size", type=int, default=40_000_000)
    ap.add_argument("--untie", action="store_true", help="untie embeddings and output weights")
    ap.add_argument("--stage-list", type=int, nargs="+", default=None)
    ap.add_argument("--mixed-dtype", action="store_true")
    ap.add_argument("--frozen", nargs="+", default=[])
    ap.add_argument("--release", action="store_true")
    ap.add_argument("--iteration", type=int, default=10)
    ap.add_argument("--param-map", choices=("documented", "with_sidecar", "none"), default="documented")
    ap.add_argument("--no-garbage-padding", action="store_true", help="padding holds 0 instead of NaN")
    ap.add_argument("--no-record", action="store_true", help="skip expected.pt (big benchmark fixtures)")
    ap.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"), default="LayerNorm")
    ap.add_argument("--position-embedding", choices=("learned_absolute", "rope"), default="learned_absolute")
    ap.add_argument("--max-position-embeddings", type=int, default=None)
    ap.add_argument("--mcore-spec", choices=("local", "te"), default="local")
    ap.add_argument("--query-groups", type=int, default=None, help="grouped-query attention")
    ap.add_argument("--swiglu", action="store_true")
    a = ap.parse_args(argv)
    spec = FixtureSpec(
        tp=a.tp, pp=a.pp, dp=a.dp, cp=a.cp, vpp=a.vpp, num_layers=a.num_layers, hidden=a.hidden, ffn=a.ffn,
        heads=a.heads, vocab=a.vocab, make_vocab_size_divisible_by=a.make_vocab_size_divisible_by,
        seq_length=a.seq_length, model=a.model, dtype=a.dtype, overlap_grad_reduce=a.overlap_grad_reduce,
        bucket_size=a.bucket_size, untie_embeddings=a.untie,
        stage_list=tuple(a.stage_list) if a.stage_list else None, mixed_dtype=a.mixed_dtype,
        frozen=tuple(a.frozen), release=a.release, iteration=a.iteration, param_map=a.param_map,
        garbage_padding=not a.no_garbage_padding, normalization=a.normalization,
        position_embedding=a.position_embedding, max_position_embeddings=a.max_position_embeddings,
        mcore_spec=a.mcore_spec, query_groups=a.query_groups, swiglu=a.swiglu)
    return a.out, spec, not a.no_record


def main(argv: list[str] | None = None) -> int:
    try:
        out, spec, record_tensors = _parse(argv)
        fx = write_fixture(out, spec, record=True, record_tensors=record_tensors)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"--megatron-path {fx.megatron_path}")
    print(f"--param-map-path {fx.param_map_dir if spec.param_map != 'none' else '(none written)'}")
    print("convert flags: " + " ".join(fx.convert_flags()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
