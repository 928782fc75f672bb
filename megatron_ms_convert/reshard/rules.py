"""How each GPT parameter is split over tensor-parallel ranks: the rules table, kept as data, and the
index arithmetic of each rule.

Every rule describes a rank's local tensor as boxes ("pieces") of the parameter's *global* tensor:
the tensor a tp 1 run holds. The facts (file:line in Megatron core_r0.6.0 and MindSpeed-Core-MS) are
in RESHARDING.md §1; in short:

- COL: dim 0 contiguous (column-parallel linear weight and bias).
- COL_QKV: dim 0 contiguous in whole query groups. Both model families lay the fused projection out
  group-major (each group: its query heads, one key, one value head), so a rank's rows are whole
  groups and the global tensor is the plain concatenation of the ranks' blocks, never reordered into
  [q; k; v]. The rule differs from COL only in what must divide: the query groups.
- COL_GLU: SwiGLU's fc1 (weight AND bias). Each rank splits its own output in two halves, so rank r
  holds [gate_r; up_r] and the global tensor is [gate_all; up_all]. Concatenating the ranks' blocks
  would give the same shape and the wrong permutation.
- ROW: dim 1 contiguous (row-parallel linear weight); the row-parallel bias is added after the
  all-reduce and is REP.
- VOCAB: dim 0 over the padded vocabulary (word embeddings, the output layer, the tied head copy).
- REP: every tp rank holds the whole tensor (norms, row-parallel biases, the learned position table,
  the MoE router).

`SPLIT_RULES` is keyed by the MindSpore name templates of `naming.NAME_RULES` (one spelling for both
Megatron model families), with `weight`/`bias` spelled out: a name is classified by translating it
with the existing name table, then looking its template up here.

    >>> split_rule("language_model.encoder.layers.3.mlp.mapping.bias", "RMSNorm", swiglu=True)
    'col-glu'
    >>> [p.global_ranges for p in rank_pieces("col-glu", (8, 3), tp=2, rank=1)]
    [((2, 4), (0, 3)), ((6, 8), (0, 3))]
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConvertInputError
from ..naming import NORM_PARAMS

COL = "col"
COL_QKV = "col-qkv"
COL_GLU = "col-glu"
ROW = "row"
VOCAB = "vocab"
REP = "rep"
RULES = (COL, COL_QKV, COL_GLU, ROW, VOCAB, REP)

# The MLP's first linear layer is COL, or COL_GLU when the run uses SwiGLU (gated_linear_unit):
# which one is a fact of the model, not of the name.
FC1 = "fc1"

_LAYER = "language_model.encoder.layers.<i>."
_EXPERT = _LAYER + "mlp.experts.local_experts.<e>."

# MindSpore name template -> rule. `<i>` a layer, `<e>` an expert, `<norm>` a norm's parameter.
SPLIT_RULES: dict[str, str] = {
    "language_model.embedding.word_embeddings.weight": VOCAB,
    "language_model.embedding.position_embeddings.embedding_table": REP,
    _LAYER + "input_norm.<norm>": REP,
    _LAYER + "attention.qkv_proj.weight": COL_QKV,
    _LAYER + "attention.qkv_proj.bias": COL_QKV,
    _LAYER + "attention.out_proj.weight": ROW,
    _LAYER + "attention.out_proj.bias": REP,
    _LAYER + "post_attention_norm.<norm>": REP,
    _LAYER + "mlp.mapping.weight": FC1,
    _LAYER + "mlp.mapping.bias": FC1,
    _LAYER + "mlp.projection.weight": ROW,
    _LAYER + "mlp.projection.bias": REP,
    _LAYER + "mlp.router.gating.weight": REP,  # replicated over tp and ep alike
    _EXPERT + "mapping.weight": FC1,
    _EXPERT + "mapping.bias": FC1,
    _EXPERT + "projection.weight": ROW,
    _EXPERT + "projection.bias": REP,
    "language_model.encoder.final_norm.<norm>": REP,
    "language_model.output_layer.weight": VOCAB,
}


def template_of(ms_name: str, normalization: str) -> str:
    """The SPLIT_RULES template of a MindSpore parameter name (layer and expert numbers and the norm's
    parameter spelling replaced by placeholders).

    >>> template_of("language_model.encoder.layers.12.input_norm.gamma", "LayerNorm")
    'language_model.encoder.layers.<i>.input_norm.<norm>'
    """
    parts = ms_name.split(".")
    for i in range(1, len(parts)):
        if parts[i].isdigit() and parts[i - 1] in ("layers", "local_experts"):
            parts[i] = "<i>" if parts[i - 1] == "layers" else "<e>"
    template = ".".join(parts)
    if template in SPLIT_RULES:
        return template
    as_norm = ".".join(parts[:-1] + ["<norm>"])
    if as_norm in SPLIT_RULES and parts[-1] in NORM_PARAMS.get(normalization, {}).values():
        return as_norm
    return template


def split_rule(ms_name: str, normalization: str, swiglu: bool) -> str:
    """The tensor-parallel rule of a MindSpore parameter name; an unknown name is an error, since
    guessing a split (the usual default is dim 0) silently corrupts a row-parallel or GLU tensor."""
    rule = SPLIT_RULES.get(template_of(ms_name, normalization))
    if rule is None:
        raise ConvertInputError(f"parameter {ms_name}: no tensor-parallel rule for it",
                                expected="a parameter of the re-sharding rules table (docs/resharding.md)",
                                found=ms_name, fix="re-sharding supports GPT parameters only; convert at the "
                                                   "training run's own layout")
    if rule == FC1:
        return COL_GLU if swiglu else COL
    return rule


# ---------------------------------------------------------------------------------------------
# Index arithmetic

Box = tuple[tuple[int, int], ...]  # [start, end) per dim


@dataclass(frozen=True)
class Piece:
    """A box of the global tensor that a rank holds, and where its first element sits in the rank's
    local tensor (the box keeps its shape there)."""

    global_ranges: Box
    local_start: tuple[int, ...]


def split_dim(rule: str) -> int | None:
    """The dimension the rule splits, None for REP."""
    return None if rule == REP else 1 if rule == ROW else 0


def local_shape(rule: str, global_shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """A rank's tensor shape at tensor-parallel size `tp`."""
    dim = split_dim(rule)
    if dim is None:
        return tuple(global_shape)
    if global_shape[dim] % (2 * tp if rule == COL_GLU else tp):
        raise ValueError(f"{rule} dim {dim} of {global_shape} does not split over tp {tp}")
    shape = list(global_shape)
    shape[dim] //= tp
    return tuple(shape)


def rank_pieces(rule: str, global_shape: tuple[int, ...], tp: int, rank: int) -> tuple[Piece, ...]:
    """The boxes of the global tensor that tp rank `rank` holds, in its local order."""
    full = tuple((0, n) for n in global_shape)
    zero = (0,) * len(global_shape)
    dim = split_dim(rule)
    if dim is None:
        return (Piece(full, zero),)
    size = local_shape(rule, global_shape, tp)[dim]
    if rule == COL_GLU:
        half, total = size // 2, global_shape[0] // 2
        gate = ((rank * half, (rank + 1) * half),) + full[1:]
        up = ((total + rank * half, total + (rank + 1) * half),) + full[1:]
        return Piece(gate, zero), Piece(up, (half,) + zero[1:])
    ranges = list(full)
    ranges[dim] = (rank * size, (rank + 1) * size)
    return (Piece(tuple(ranges), zero),)


def intersect(a: Box, b: Box) -> Box | None:
    """The common box of two boxes, None when they do not meet."""
    out = tuple((max(lo1, lo2), min(hi1, hi2)) for (lo1, hi1), (lo2, hi2) in zip(a, b))
    return None if any(lo >= hi for lo, hi in out) else out


def to_local(box: Box, piece: Piece) -> Box:
    """A box of the global tensor inside `piece`, in the rank's local coordinates."""
    starts = zip(piece.global_ranges, piece.local_start)
    return tuple((lo - g0 + s, hi - g0 + s) for (lo, hi), ((g0, _), s) in zip(box, starts))
