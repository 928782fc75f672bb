"""The model a re-shard moves: its dimensions, the parameters it has (as global tensors), and the
layouts it cannot be split into.

Parameters are listed once, as the global tensor a tp 1, pp 1, ep 1 run holds, under their MindSpore
name with the global layer number (experts: the global expert index where the name has its local one;
at ep 1 the two agree). The tied head copy is its own entry: it exists only at pp > 1.

    >>> model = ModelFacts(num_layers=1, hidden=8, heads=2, query_groups=2, ffn=16, padded_vocab=32)
    >>> [(p.name.split('.')[-2:], p.shape, p.rule) for p in global_params(model)][3]
    (['qkv_proj', 'weight'], (24, 8), 'col-qkv')
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConvertInputError
from ..naming import NORM_PARAMS, NamingFacts
from .placement import MEGATRON, MINDSPORE, ParallelLayout
from .rules import split_rule

EMBEDDING = "embedding"  # chunk 0 of the first stage
LAYER = "layer"
HEAD = "head"  # last chunk of the last stage
HEAD_COPY = "head-copy"  # tied embeddings at pp > 1: the last stage's copy of the word embeddings

_LAYER = "language_model.encoder.layers.{i}."
WORD_EMBEDDINGS = "language_model.embedding.word_embeddings.weight"
OUTPUT_LAYER = "language_model.output_layer.weight"


@dataclass(frozen=True)
class ModelFacts:
    """What the split depends on, from the training run's args (names as Megatron's)."""

    num_layers: int
    hidden: int  # hidden_size
    heads: int  # num_attention_heads
    query_groups: int  # num_query_groups (= heads without GQA)
    ffn: int  # ffn_hidden_size (each SwiGLU half)
    padded_vocab: int  # padded_vocab_size, kept as is: padded logits enter the softmax
    kv_channels: int = 0  # 0 = hidden // heads
    family: str = "legacy"
    normalization: str = "LayerNorm"
    te_norms: bool = False
    tied: bool = True
    max_position: int = 0  # rows of the learned position table; 0 = no table (rope)
    swiglu: bool = False
    linear_bias: bool = True  # add_bias_linear
    qkv_bias: bool = True  # add_bias_linear or add_qkv_bias
    num_experts: int = 0
    moe_grouped_gemm: bool = False
    fp8: bool = False
    standalone_embedding_stage: bool = False

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden // self.heads

    def naming(self) -> NamingFacts:
        return NamingFacts(family=self.family, normalization=self.normalization, tied=self.tied,
                           te_norms=self.te_norms)


@dataclass(frozen=True)
class GlobalParam:
    """One parameter as a global tensor. `name`: its MindSpore name, global layer number, global expert
    index; `where`: EMBEDDING, LAYER, HEAD or HEAD_COPY."""

    name: str
    shape: tuple[int, ...]
    rule: str
    where: str
    layer: int | None = None
    expert: int | None = None


def global_params(model: ModelFacts) -> tuple[GlobalParam, ...]:
    """Every parameter of the model in the order the model defines them (the head copy last)."""
    h = model.hidden
    out = [GlobalParam(WORD_EMBEDDINGS, (model.padded_vocab, h), "", EMBEDDING)]
    if model.max_position:
        out.append(GlobalParam("language_model.embedding.position_embeddings.embedding_table",
                               (model.max_position, h), "", EMBEDDING))
    for i in range(model.num_layers):
        out.extend(_layer_params(model, i))
    out.extend(GlobalParam(f"language_model.encoder.final_norm.{p}", (h,), "", HEAD) for p in _norm_params(model))
    out.append(GlobalParam(OUTPUT_LAYER, (model.padded_vocab, h), "", HEAD_COPY if model.tied else HEAD))
    return tuple(GlobalParam(p.name, p.shape, split_rule(p.name, model.normalization, model.swiglu), p.where,
                             p.layer, p.expert) for p in out)


def _norm_params(model: ModelFacts) -> list[str]:
    return list(NORM_PARAMS[model.normalization].values())


def _layer_params(model: ModelFacts, i: int) -> list[GlobalParam]:
    h, layer = model.hidden, _LAYER.format(i=i)
    qkv_rows = (model.heads + 2 * model.query_groups) * model.head_dim
    params = [(f"input_norm.{p}", (h,)) for p in _norm_params(model)]
    params.append(("attention.qkv_proj.weight", (qkv_rows, h)))
    if model.qkv_bias:
        params.append(("attention.qkv_proj.bias", (qkv_rows,)))
    params.append(("attention.out_proj.weight", (h, model.heads * model.head_dim)))
    if model.linear_bias:
        params.append(("attention.out_proj.bias", (h,)))
    params.extend((f"post_attention_norm.{p}", (h,)) for p in _norm_params(model))
    out = [GlobalParam(layer + name, shape, "", LAYER, i) for name, shape in params]
    if model.num_experts:
        out.append(GlobalParam(layer + "mlp.router.gating.weight", (model.num_experts, h), "", LAYER, i))
        for e in range(model.num_experts):
            out.extend(GlobalParam(p.name, p.shape, "", LAYER, i, e)
                       for p in _mlp_params(model, layer + f"mlp.experts.local_experts.{e}."))
    else:
        out.extend(GlobalParam(p.name, p.shape, "", LAYER, i) for p in _mlp_params(model, layer + "mlp."))
    return out


def _mlp_params(model: ModelFacts, prefix: str) -> list[GlobalParam]:
    h, rows = model.hidden, model.ffn * (2 if model.swiglu else 1)
    params = [("mapping.weight", (rows, h))]
    if model.linear_bias:
        params.append(("mapping.bias", (rows,)))
    params.append(("projection.weight", (h, model.ffn)))
    if model.linear_bias:
        params.append(("projection.bias", (h,)))
    return [GlobalParam(prefix + name, shape, "", LAYER) for name, shape in params]


# ---------------------------------------------------------------------------------------------
# What cannot be re-sharded, or not into this layout


def check_model(model: ModelFacts) -> None:
    """Refuse models the re-shard does not handle at any layout."""
    if model.moe_grouped_gemm:
        _refuse("--moe-grouped-gemm in the training args", "SequentialMLP experts",
                "GroupedMLP (expert-interleaved weight1/weight2)",
                "re-sharding handles SequentialMLP experts only; convert at the training layout")
    if model.num_experts and model.family == "legacy":
        _refuse("--num-experts with a legacy model", "megatron-core MoE", "legacy SwitchMLP",
                "retrain with --use-mcore-models, or convert at the training layout")
    if model.fp8:
        _refuse("--fp8-format in the training args", "no fp8 state",
                "fp8 _extra_state (per-rank amax history has no re-shard)", "convert at the training layout")
    if model.standalone_embedding_stage:
        _refuse("--standalone-embedding-stage in the training args", "layers on every stage",
                "a first stage holding only the embedding", "convert at the training layout")
    if model.normalization not in NORM_PARAMS:
        _refuse(f"normalization {model.normalization}", f"one of {list(NORM_PARAMS)}", model.normalization,
                "re-sharding knows the parameters of these norms only")


def check_fits(model: ModelFacts, layout: ParallelLayout) -> None:
    """Refuse a layout whose tensor or expert parallel size does not split the model."""
    tp, flag = layout.tp, layout.flag("tp")
    valid = _divisors(math.gcd(model.heads, model.query_groups, model.ffn, model.padded_vocab))
    splits = (("attention heads", model.heads), ("query groups", model.query_groups),
              ("ffn_hidden_size", model.ffn), ("padded vocab rows", model.padded_vocab))
    for what, count in splits:
        if count % tp:
            _refuse(f"{flag} {tp}: {count} {what} do not split over it", f"a size from {valid}",
                    f"{count} % {tp} = {count % tp}", f"pass {flag} from {valid}")
    if layout.side == MINDSPORE and model.head_dim * model.heads != model.hidden:
        _refuse(f"{flag} {tp}: kv_channels {model.head_dim} x {model.heads} heads != hidden {model.hidden}",
                "kv_channels x heads == hidden (MindSpeed-Core-MS sizes its qkv from the hidden size)",
                f"{model.head_dim * model.heads}", "this model does not load into MindSpeed-Core-MS")
    if (layout.side == MEGATRON and model.family == "legacy" and model.query_groups // tp > 1
            and model.heads != model.query_groups):
        _refuse(f"{flag} {tp}: {model.query_groups // tp} query groups per rank in a legacy model",
                "at most one query group per rank (legacy GQA with more crashes in r0.6.0's forward)",
                f"{model.query_groups} groups over tp {tp}",
                f"pass {flag} {model.query_groups} or use an mcore model")
    if layout.ep > 1 and not model.num_experts:
        _refuse(f"{layout.flag('ep')} {layout.ep} for a model without experts", "1", str(layout.ep),
                f"drop {layout.flag('ep')}")
    if model.num_experts and model.num_experts % layout.ep:
        valid_ep = _divisors(model.num_experts)
        _refuse(f"{layout.flag('ep')} {layout.ep}: {model.num_experts} experts do not split over it",
                f"a size from {valid_ep}", f"{model.num_experts} % {layout.ep} = {model.num_experts % layout.ep}",
                f"pass {layout.flag('ep')} from {valid_ep}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _refuse(what: str, expected: str, found: str, fix: str) -> None:
    raise ConvertInputError(what, expected=expected, found=found, fix=fix)


def megatron_vocab_divisor(padded_vocab: int, tp: int, vocab_size: int = 0, divisor: int = 0,
                           source_tp: int = 1) -> int:
    """The `make_vocab_size_divisible_by` a Megatron run at tensor-parallel size `tp` must be launched
    with to rebuild exactly `padded_vocab` rows from `vocab_size` (Megatron pads to a multiple of
    divisor·tp). The source's divisor·source_tp/tp when that works (the same multiple), else the
    smallest that does; without the true vocab size, one that makes the padded size its own multiple.

    >>> megatron_vocab_divisor(50304, tp=4, vocab_size=50257, divisor=128, source_tp=1)
    32
    """
    if padded_vocab % tp:
        raise ValueError(f"padded vocab {padded_vocab} over tp {tp}")
    if not vocab_size:
        return padded_vocab // tp

    def rebuilds(d: int) -> bool:
        multiple = d * tp
        return -(-vocab_size // multiple) * multiple == padded_vocab

    same = divisor * source_tp // tp if divisor and (divisor * source_tp) % tp == 0 else 0
    if same and rebuilds(same):
        return same
    return next(d for d in _divisors(padded_vocab // tp) if rebuilds(d))
