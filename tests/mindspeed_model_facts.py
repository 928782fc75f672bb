"""The parameters MindSpeed-Core-MS's MindSpore GPTModel has, per pipeline stage and virtual chunk.

Stated from the model's own code at commit 697e48e (mindspeed_ms/, its legacy model: the only GPT model
it has), each fact with the file and line it comes from; written without looking at the converter's
name table, so a test comparing the two can fail. MindSpore names a parameter by the attribute path of
the cells holding it (`Cell.__setattr__` prefixes child parameters with the attribute name), and the
wrappers the training code puts around a chunk add nothing: `nn.CellList(auto_prefix=False)`
(training/training.py:284, :328) and `DistributedDataParallel` (core/distributed/
distributed_data_parallel.py:252, auto_prefix=False).

Left out on purpose: `language_model.encoder.set_hidden_states` (legacy/model/transformer.py:1419),
a pipeline buffer with requires_grad=False that the loader skips by name
(core/dist_checkpointing/checkpointing.py:363), so a checkpoint need not hold it.
"""

from __future__ import annotations

from dataclasses import dataclass

# legacy/model/gpt_model.py:153        self.language_model = get_language_model(...)
LM = "language_model"
# legacy/model/language_model.py:418   self.embedding = Embedding(...)             (pre_process)
# legacy/model/language_model.py:164   self.word_embeddings = VocabParallelEmbedding(...)
# core/tensor_parallel/layers.py:1204  VocabParallelEmbedding: Parameter(..., name="weight")
WORD_EMBEDDINGS = f"{LM}.embedding.word_embeddings.weight"
# legacy/model/language_model.py:171-178  position_embedding_type == 'learned_absolute' ->
#   self.position_embeddings = nn.Embedding(max_sequence_length, ...); mindspore.nn.Embedding keeps
#   its table as Parameter(..., name='embedding_table'); max_sequence_length is config.seq_length
#   (language_model.py:407, :420)
POSITION_EMBEDDINGS = f"{LM}.embedding.position_embeddings.embedding_table"
# legacy/model/language_model.py:446-447  self.encoder = ParallelTransformer(...)
# legacy/model/transformer.py:1389-1395  layers_dict[str(i + offset)] = ParallelTransformerLayer(...);
#   self.layers = nn.SequentialCell(layers_dict): layers are named by their GLOBAL number
LAYER = f"{LM}.encoder.layers.{{i}}"
# legacy/model/transformer.py:890   self.input_norm = get_norm(config)
# legacy/model/transformer.py:903   self.attention = ParallelAttention(...)
# legacy/model/transformer.py:449   self.qkv_proj = self._init_qkv_proj(...)     (ColumnParallelLinear)
# legacy/model/transformer.py:520   self.out_proj = self._init_out_proj(...)     (RowParallelLinear)
# legacy/model/transformer.py:918   self.post_attention_norm = get_norm(config)
# legacy/model/transformer.py:942   self.mlp = ParallelMLP(mlp_config)
# legacy/model/mlp.py:105           self.mapping = ColumnParallelLinear(...)
# legacy/model/mlp.py:127           self.projection = RowParallelLinear(...)
# core/tensor_parallel/layers.py:605-631 (ColumnParallelLinear), :943-967 (RowParallelLinear):
#   Parameter(..., name="weight"), Parameter(..., name="bias") when the layer has a bias
LAYER_LINEARS = ("attention.qkv_proj", "attention.out_proj", "mlp.mapping", "mlp.projection")
LAYER_NORMS = ("input_norm", "post_attention_norm")
# legacy/model/transformer.py:1408-1410  post_process and post_norm -> self.final_norm = get_norm(config)
FINAL_NORM = f"{LM}.encoder.final_norm"
# legacy/model/norm.py:46, :48  LayerNorm: self.gamma, self.beta
# legacy/model/norm.py:82       RMSNorm: self.weight
NORM_PARAMS = {"LayerNorm": ("gamma", "beta"), "RMSNorm": ("weight",)}
# legacy/model/language_model.py:461-474  post_process and (untie_embeddings_and_output_weights or
#   pipeline_parallel) -> self.output_layer = ColumnParallelLinear(..., bias=False), zero-initialised
#   when tied ('zeros', :466) and filled from the first stage (legacy/model/module.py:144-167)
OUTPUT_LAYER = f"{LM}.output_layer.weight"
# core/optimizer/distrib_optimizer.py:534  the optimizer loads "", "exp_avg.", "exp_avg_sq." + name
MOMENT_PREFIXES = ("exp_avg.", "exp_avg_sq.")

# MoE (legacy/model/moe/, MoEConfig):
# legacy/model/transformer.py:935-937  moe_config.num_experts > 1 -> self.mlp = MoELayer(moe_config)
#   (instead of ParallelMLP, :942); the layer's norms stay input_norm / post_attention_norm
# legacy/model/moe/moe_layer.py:116   num_local_experts = num_experts // ep_world_size; :113-114 refuses
#   num_experts not divisible by the expert-parallel size
# legacy/model/moe/moe_layer.py:117   local_expert_indices = [rank_id * num_local_experts + i ...]
#   (rank_id = get_expert_model_parallel_rank(), :106): local expert i of ep rank e is global expert e*n + i
# legacy/model/moe/moe_layer.py:123   self.router = TopKRouter(config=config)
# legacy/model/moe/router.py:98-101   self.gating = mint.nn.Linear(hidden_size, num_experts, bias=False):
#   one [num_experts, hidden] weight, no bias
ROUTER = "mlp.router.gating.weight"
# legacy/model/moe/moe_layer.py:125-128  moe_grouped_gemm -> GroupedMLP, else SequentialMLP
# legacy/model/moe/experts.py:104-107  self.local_experts = nn.SequentialCell(); appends
#   ParallelMLP(config, is_expert=True) per local expert: cells named local_experts.0, .1, ...
# legacy/model/mlp.py:105, :127        ParallelMLP's self.mapping / self.projection (as for dense layers)
EXPERT_LINEARS = ("mapping", "projection")
LOCAL_EXPERT = "mlp.experts.local_experts.{k}"
# legacy/model/moe/moe_layer.py:130-137  only moe_token_dispatcher_type == "alltoall" (no parameters)
# core/dist_checkpointing/checkpointing.py:174-186  save: for every name with "local_experts.0", the
#   num_experts // ep local experts' arrays are np.stack'ed on a new axis 0 under that name (parameters
#   and optimizer moments alike); :205-210 load splits param[k] back into local_experts.<k>
STACKED_EXPERT = "local_experts.0"
# core/parallel_state.py:104-113  with order tp-cp-ep-dp-pp the ep group is carved out of dp (dp // ep
#   ranks of dp-without-ep above it): a rank's ep rank is its dp rank mod ep; :329-331 dp must be
#   divisible by ep; :334-336 ep > 1 with cp > 1 is refused


@dataclass(frozen=True)
class MindSpeedStage:
    """One model chunk of the MindSpore run: which pipeline stage / virtual chunk, and the config."""

    num_layers: int
    pp: int = 1
    pp_rank: int = 0
    vpp: int = 1
    chunk: int = 0
    normalization: str = "LayerNorm"
    learned_position_embeddings: bool = True
    untied: bool = False
    linear_bias: bool = True  # qkv_has_bias / out_proj_has_bias / mlp_has_bias (Megatron: add_bias_linear)
    num_layer_list: tuple[int, ...] | None = None  # parallel_config.num_layer_list (uneven stages)
    num_local_experts: int = 0  # MoE: num_experts // expert-parallel size (0: dense MLP)

    @property
    def pre_process(self) -> bool:
        # training/training.py:295, :302  pre_process = is_pipeline_first_stage(), which with vpp also
        # needs virtual rank 0 (core/parallel_state.py:710-716)
        return self.pp_rank == 0 and self.chunk == 0

    @property
    def post_process(self) -> bool:
        # training/training.py:296, :303  post_process = is_pipeline_last_stage(), which with vpp also
        # needs the last virtual rank (core/parallel_state.py:719-724)
        return self.pp_rank == self.pp - 1 and self.chunk == self.vpp - 1

    def layers(self) -> range:
        """Global layer numbers of this chunk (legacy/model/transformer.py:1080-1155 _get_num_layers)."""
        if self.pp == 1:
            return range(self.num_layers)  # :1152-1154, offset 0
        if self.num_layer_list is not None:  # :1069-1072 _get_custom_num_layers without vpp
            offset = sum(self.num_layer_list[:self.pp_rank])
            return range(offset, offset + self.num_layer_list[self.pp_rank])
        # :1127-1151 divide_layers over vpp first, then over pp (even splits: what Megatron's args allow)
        per_chunk = self.num_layers // self.vpp
        per_stage = per_chunk // self.pp
        offset = self.chunk * per_chunk + self.pp_rank * per_stage
        return range(offset, offset + per_stage)


def param_names(stage: MindSpeedStage) -> set[str]:
    """The trainable parameters of one chunk of MindSpeed-Core-MS's GPTModel."""
    norms = NORM_PARAMS[stage.normalization]
    linear = ("weight", "bias") if stage.linear_bias else ("weight",)
    names = set()
    if stage.pre_process:
        names.add(WORD_EMBEDDINGS)
        if stage.learned_position_embeddings:
            names.add(POSITION_EMBEDDINGS)
    for i in stage.layers():
        layer = LAYER.format(i=i)
        names |= {f"{layer}.{norm}.{p}" for norm in LAYER_NORMS for p in norms}
        if stage.num_local_experts:
            names |= {f"{layer}.{lin}.{p}" for lin in LAYER_LINEARS if not lin.startswith("mlp.") for p in linear}
            names.add(f"{layer}.{ROUTER}")
            names |= {f"{layer}.{LOCAL_EXPERT.format(k=k)}.{lin}.{p}" for k in range(stage.num_local_experts)
                      for lin in EXPERT_LINEARS for p in linear}
        else:
            names |= {f"{layer}.{lin}.{p}" for lin in LAYER_LINEARS for p in linear}
    if stage.post_process:
        names |= {f"{FINAL_NORM}.{p}" for p in norms}
        if stage.untied or stage.pp > 1:
            names.add(OUTPUT_LAYER)
    return names


def rank_names(stages: list[MindSpeedStage], states=("param", "exp_avg", "exp_avg_sq")) -> set[str]:
    """Every tensor name a resumable checkpoint of one MindSpore rank holds for its chunks' parameters
    (the parameter itself for "param", else its moment), scalars aside."""
    params = set().union(*(param_names(s) for s in stages))
    out = set()
    for state in states:
        out |= params if state == "param" else {f"{state}.{name}" for name in params}
    return out


def stages_of(meta: dict, pp_rank: int) -> list[MindSpeedStage]:
    """The MindSpore chunks of pipeline stage `pp_rank` for a run described by a checkpoint record's meta
    (tests/megatron_fixture.py's, or the Megatron-written samples': legacy, LayerNorm, learned
    position embeddings, tied)."""
    stage_list = meta.get("stage_list")
    uneven = stage_list is not None and len(set(stage_list)) > 1
    return [MindSpeedStage(num_layers=meta["num_layers"], pp=meta["pp"], pp_rank=pp_rank, vpp=meta["vpp"],
                           chunk=chunk, normalization=meta.get("normalization", "LayerNorm"),
                           learned_position_embeddings=meta.get("position_embedding", "learned_absolute")
                           == "learned_absolute",
                           untied=meta.get("untie_embeddings", False),
                           num_layer_list=tuple(stage_list) if uneven else None)
            for chunk in range(meta["vpp"])]


def checkpoint_names(names: set[str]) -> set[str]:
    """The names a MindSpeed-Core-MS checkpoint holds for these model names: local experts stacked under
    local expert 0's name (checkpointing.py:174-186)."""
    return {n for n in names if ".local_experts." not in n or f".{STACKED_EXPERT}." in n}


def ep_rank_of_dp(dp_rank: int, ep: int) -> int:
    """parallel_state.py:104-113 (order tp-cp-ep-dp-pp)."""
    return dp_rank % ep


def check_rank_names(loaded: set[str], stages: list[MindSpeedStage], scalars: set[str],
                     states=("param", "exp_avg", "exp_avg_sq")) -> None:
    """A MindSpore rank file holds exactly its model's parameters (and their moments) plus the scalars."""
    want = rank_names(stages, states)
    missing, extra = want - loaded, loaded - want - scalars
    assert not missing and not extra, (f"missing {sorted(missing)[:8]}", f"extra {sorted(extra)[:8]}")
