"""The way back's target structure (megatron_ms_convert/reshard/megatron_target.py) against Megatron's
own code: for each layout below, a real megatron-core 0.6.0 run on CPU (tests/real_megatron.py,
patched to record its param_map) builds the model, its DDP buffers and its optimizer; what it built
is compared with what the module computes from the model's dimensions and the layout alone.

- buffers: every parameter's (name, dtype, shape, start, end, bucket) in every dense and expert grad
  buffer, from the param_map the patched DDP writes; bucket sizes (padded, unpadded) from the
  patch's sidecars and from the distributed optimizer's own per_bucket_numel(_unpadded);
- param_groups: each rank's groups from its optimizer's state_dict(), predicted from the groups of
  ONE rank (tp 0, pp 0) used as per-kind templates: the other stages' order must come out of the
  rule, not out of a copy;
- model skeleton: model_optim_rng.pt's keys, shapes and dtypes, per chunk, in order;
- a target Megatron asserts on (the shared-embedding bucket at dp 2 after an odd element count):
  refused by the module, and Megatron's own run really fails on it.

The harness is mcore-only (local layer spec, LayerNorm, learned positions, biases, no SwiGLU); the
legacy family and SwiGLU / GQA / RMSNorm shapes are covered only by the unit tests at the end.
"""

from __future__ import annotations

import re

import pytest

pytest.importorskip("megatron.core", reason="pip install -r requirements.txt (megatron-core==0.6.0)")

import torch  # noqa: E402

from megatron_ms_convert.errors import ConvertInputError  # noqa: E402
from megatron_ms_convert.megatron.layout import (list_expert_param_map_files, list_param_map_files,  # noqa: E402
                                                 read_rank_layouts)
from megatron_ms_convert.megatron.writer import TensorSpec, skeleton_specs  # noqa: E402
from megatron_ms_convert.reshard import MEGATRON, ModelFacts, ParallelLayout, RankCoord  # noqa: E402
from megatron_ms_convert.reshard.megatron_target import (BufferSettings, buffer_settings_of,  # noqa: E402
                                                         check_megatron_target, check_rules_reproduce,
                                                         chunk_skeleton, model_facts_of, param_group_keys,
                                                         rank_buffers, rank_parameters, target_args,
                                                         target_param_groups, target_rank_meta)
from megatron_ms_convert.reshard.param_groups import group_order, group_templates  # noqa: E402
from megatron_ms_convert.ckpt2pt_facts import pt_meta_file, read_rank_meta  # noqa: E402
from megatron_ms_convert.megatron.checkpoint import optimizer_param_groups  # noqa: E402
from megatron_ms_convert.pt2ckpt import main as pt2ckpt_main  # noqa: E402
from tests.helpers import in_process  # noqa: E402
from tests.real_megatron import MegatronSpec, WorkerFailed, run_megatron, save_real_checkpoint  # noqa: E402

SPECS = {
    # tied at pp 2: the shared-embedding bucket on both stages, small buckets on stage 0 only
    "tp2_pp2_tied": MegatronSpec(tp=2, pp=2, ffn=66, bucket_size=1500),
    # dp 2 padding, overlap off: one bucket per buffer, the shared embedding still alone
    "pp2_dp2_tied_no_overlap": MegatronSpec(pp=2, dp=2, overlap_grad_reduce=False),
    # interleaved: chunk 0 of stage 0 bucketed, every other chunk one bucket; the tied copy in the
    # last chunk of the last stage
    "pp4_vpp2_tied": MegatronSpec(pp=4, vpp=2, num_layers=8, num_microbatches=4, bucket_size=1000),
    "tp4_untied": MegatronSpec(tp=4, untie_embeddings=True, bucket_size=700),
    # MoE ep 2: expert buffers apart; hidden 34 and ffn 65 leave dense buckets padded to dp 4 and
    # expert buckets padded to dp / ep = 2
    "moe_ep2_dp4": MegatronSpec(dp=4, ep=2, micro_batch=1, num_experts=4, hidden=34, heads=2, ffn=65,
                                bucket_size=1500),
}


def model_of(spec: MegatronSpec) -> ModelFacts:
    return ModelFacts(num_layers=spec.num_layers, hidden=spec.hidden, heads=spec.heads, query_groups=spec.heads,
                      ffn=spec.ffn, padded_vocab=spec.padded_vocab, family="mcore", tied=not spec.untie_embeddings,
                      max_position=spec.seq, num_experts=spec.num_experts or 0, kv_channels=spec.hidden // spec.heads)


def layout_of(spec: MegatronSpec) -> ParallelLayout:
    return ParallelLayout(MEGATRON, tp=spec.tp, pp=spec.pp, vpp=spec.vpp, ep=spec.ep)


def settings_of(spec: MegatronSpec) -> BufferSettings:
    return BufferSettings(dp=spec.dp, ep=spec.ep, overlap_grad_reduce=spec.overlap_grad_reduce,
                          bucket_size=spec.bucket_size)


@pytest.fixture(scope="module", params=sorted(SPECS))
def native(request, tmp_path_factory):
    """A real run at the layout: one step, saved with its param_map."""
    spec = SPECS[request.param]
    saved = save_real_checkpoint(tmp_path_factory.mktemp(request.param) / "save", spec, steps=1, param_map=True)
    return request.param, spec, saved


def _folders(spec: MegatronSpec):
    for pp in range(spec.pp):
        for ep in range(spec.ep):
            for tp in range(spec.tp):
                name = (f"mp_rank_{tp:02d}" + (f"_{pp:03d}" if spec.pp > 1 else "")
                        + (f"_{ep:03d}" if spec.ep > 1 else ""))
                yield RankCoord(pp=pp, ep=ep, tp=tp), name


def _spans(layouts):
    return [(lay.chunk, [(p.name, p.dtype, p.shape, p.start, p.end, p.bucket) for p in lay.params]) for lay in layouts]


def test_buffers_and_buckets_are_megatrons(native):
    _, spec, saved = native
    model, target, settings = model_of(spec), layout_of(spec), settings_of(spec)
    check_megatron_target(model, target, settings)
    map_dir = saved.path.parent / "param_map"
    dense_files, expert_files = list_param_map_files(map_dir), list_expert_param_map_files(map_dir)
    for rank, _ in _folders(spec):
        mine = rank_buffers(model, target, rank, settings)
        theirs = read_rank_layouts(dense_files, rank.tp, rank.pp, spec.vpp, map_dir)
        assert _spans(mine.dense_layouts) == _spans(theirs), rank
        recorded = [tuple((b.end - b.start, b.numel_unpadded) for b in lay.sidecar.buckets) for lay in theirs]
        assert [tuple(zip(c.padded, c.unpadded)) for c in mine.dense_counts] == recorded, rank
        if spec.ep > 1:
            theirs = read_rank_layouts(expert_files[rank.ep], rank.tp, rank.pp, spec.vpp, map_dir)
            assert mine.expert_layouts and _spans(mine.expert_layouts) == _spans(theirs), rank
            recorded = [tuple((b.end - b.start, b.numel_unpadded) for b in lay.sidecar.buckets) for lay in theirs]
            assert [tuple(zip(c.padded, c.unpadded)) for c in mine.expert_counts] == recorded, rank
        else:
            assert not mine.expert_layouts


def test_bucket_sizes_are_the_distributed_optimizers(native):
    """The optimizer's own record (get_parameter_state_dp_zero), not the patch's."""
    _, spec, saved = native
    model, target, settings = model_of(spec), layout_of(spec), settings_of(spec)
    for rank, _ in _folders(spec):
        mine = rank_buffers(model, target, rank, settings)
        parts = [(mine.dense_counts, (rank.tp, rank.pp))]
        if spec.ep > 1:
            parts.append((mine.expert_counts, (rank.tp, rank.pp, rank.ep)))
        for counts, key in parts:
            if key not in saved.state["ranks"]:
                continue  # the dense optimizer of ep rank > 0 is led by ep rank 0's process
            meta = saved.state["ranks"][key]
            unpadded = [list(per_dtype.values())[0] for per_dtype in meta["per_bucket_numel_unpadded"]]
            padded = [list(per_dtype.values())[0] for per_dtype in meta["per_bucket_numel"]]
            assert [list(c.unpadded) for c in counts] == unpadded, key
            assert [list(c.padded) for c in counts] == padded, key


def test_param_groups_are_each_ranks_own_from_one_ranks_templates(native):
    name, spec, saved = native
    model, target = model_of(spec), layout_of(spec)
    ranks = saved.state["ranks"]
    first = ranks[(0, 0)]["param_groups"]
    templates = group_templates(first if spec.ep == 1 else [g for part in first for g in part], "rank 0")
    if spec.ep > 1:  # the expert optimizer's groups are in the (tp, pp, ep) entries
        templates.update(group_templates(ranks[(0, 0, 0)]["param_groups"][1], "rank 0 experts"))
    orders = set()
    for rank, _ in _folders(spec):
        dense, expert = target_param_groups(rank_parameters(model, target, rank), templates)
        if spec.ep > 1:
            assert ranks[(rank.tp, rank.pp, rank.ep)]["param_groups"] == [dense, expert], rank
        elif (rank.tp, rank.pp) in ranks:
            assert ranks[(rank.tp, rank.pp)]["param_groups"] == dense and not expert, rank
            orders.add(tuple(g["wd_mult"] for g in dense))
    if name.startswith(("tp2_pp2", "pp2_dp2")):
        assert len(orders) == 2  # the stages' group orders really differ: a copy would fail above
    if spec.ep > 1:  # expert groups derived from the dense ones, as for a source run at ep 1
        dense_only = {key: group for key, group in templates.items() if not key[2]}
        for rank, _ in _folders(spec):
            assert (ranks[(rank.tp, rank.pp, rank.ep)]["param_groups"]
                    == list(target_param_groups(rank_parameters(model, target, rank), dense_only))), rank


def test_model_skeleton_is_model_optim_rngs(native):
    _, spec, saved = native
    model, target = model_of(spec), layout_of(spec)
    for rank, folder in _folders(spec):
        state = torch.load(saved.path / folder / "model_optim_rng.pt", weights_only=False, map_location="cpu")
        chunks = rank_parameters(model, target, rank)
        for v, params in enumerate(chunks):
            saved_sd = state["model"] if spec.vpp == 1 else state[f"model{v}"]
            got = [(k, tuple(t.shape), t.dtype) for k, t in saved_sd.items() if not k.endswith("_extra_state")]
            want = [(k, s.shape, s.dtype)
                    for k, s in skeleton_specs(chunk_skeleton(params, "mcore", "torch.bfloat16"))]
            assert got == want, (rank, v)


def test_target_rank_meta_is_what_pt_meta_records_at_the_runs_own_layout(native, tmp_path):
    """The bridge to the way back's writer: at the recorded layout, target_rank_meta (from rank 0's
    record and every rank's groups) equals each folder's pt_meta record as convert_pt2ckpt.py read it
    off the real files (layouts inferred from distrib_optim.pt's bucket sizes)."""
    _, spec, saved = native
    forward = in_process(pt2ckpt_main, "--megatron-path", saved.path, "--ms-path", tmp_path / "ms", "--tp-size",
                         spec.tp, "--pp-size", spec.pp, "--vpp-size", spec.vpp, "--dp-size", spec.dp)
    assert forward.returncode == 0, forward.stdout
    records = {rank: read_rank_meta(pt_meta_file(tmp_path / "ms" / "pt_meta", rank.tp, rank.pp, rank.ep, spec.ep),
                                    True, rank.tp, rank.pp, spec.vpp) for rank, _ in _folders(spec)}
    first = records[RankCoord()]
    args = first.meta["args"]
    model = model_facts_of(args)
    assert model == model_of(spec)
    groups = [g for rec in records.values() for g in optimizer_param_groups(rec.meta["optimizer"])]
    settings = buffer_settings_of(args, spec.dp, 1, spec.ep, bucket_size=spec.bucket_size)
    for rank, rec in records.items():
        mine = target_rank_meta(first, groups, model, layout_of(spec), rank, settings)
        assert [[(k, s) for k, s in skeleton_specs(sk) if not k.endswith("_extra_state")] for sk in rec.skeletons] \
            == [skeleton_specs(sk) for sk in mine.skeletons], rank
        for got, want in zip(mine.distrib_parts(), rec.distrib_parts(), strict=True):
            assert (got is None) == (want is None), rank
            if want is not None:
                assert _spans(got.layouts) == _spans(want.layouts) and got.counts == want.counts, (rank, want.kind)
        assert optimizer_param_groups(mine.meta["optimizer"]) == optimizer_param_groups(rec.meta["optimizer"]), rank
        fields = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
                  "num_layers_per_virtual_pipeline_stage", "expert_model_parallel_size", "data_parallel_size",
                  "world_size", "make_vocab_size_divisible_by", "padded_vocab_size")
        assert {f: getattr(mine.meta["args"], f) for f in fields} == {f: getattr(rec.meta["args"], f) for f in fields}
        check_rules_reproduce(rec, mine, str(rec.path))
    if spec.overlap_grad_reduce:  # the guard notices a bucket size other than the run's
        unbucketed = target_rank_meta(first, groups, model, layout_of(spec), RankCoord(),
                                      buffer_settings_of(args, spec.dp, 1, spec.ep, bucket_size=None))
        with pytest.raises(ConvertInputError, match="grad buffers differ"):
            check_rules_reproduce(first, unbucketed, str(first.path))


def test_a_target_megatron_asserts_on_is_refused_and_megatron_really_fails(tmp_path):
    """pp 2, dp 2, tied, one bucket: stage 0's 9121 elements before the shared embedding are odd
    (ffn 65), so ParamAndGradBuffer's `data_start_index % dp == 0` assertion fires."""
    spec = MegatronSpec(pp=2, dp=2, ffn=65, overlap_grad_reduce=False)
    with pytest.raises(ConvertInputError, match="shared embedding bucket"):
        rank_buffers(model_of(spec), layout_of(spec), RankCoord(pp=0), settings_of(spec))
    with pytest.raises(WorkerFailed, match=re.escape("assert data_start_index % self.data_parallel_world_size == 0")):
        run_megatron(spec, [("train", 1)], timeout=120)


# ---------------------------------------------------------------------------------------------
# Without Megatron: what the harness cannot build


def test_legacy_order_puts_qkv_before_dense_and_the_head_copy_last():
    model = ModelFacts(num_layers=2, hidden=8, heads=2, query_groups=2, ffn=16, padded_vocab=32, family="legacy",
                       max_position=4)
    [chunk] = rank_parameters(model, ParallelLayout(MEGATRON, tp=2, pp=2), RankCoord(pp=1))
    names = [p.name for p in chunk]
    assert names[2:4] == ["language_model.encoder.layers.0.self_attention.query_key_value.weight",
                          "language_model.encoder.layers.0.self_attention.query_key_value.bias"]
    assert names[-1] == "word_embeddings.weight" and chunk[-1].shared_embedding
    assert chunk[0].global_name == "language_model.encoder.layers.1.input_norm.weight"
    sk = chunk_skeleton(chunk, "legacy", "torch.bfloat16")
    assert sk["word_embeddings_for_head"]["weight"] == TensorSpec((16, 8), torch.bfloat16)


def test_swiglu_gqa_shapes_at_the_target_tp():
    model = ModelFacts(num_layers=1, hidden=16, heads=4, query_groups=2, ffn=12, padded_vocab=32, family="mcore",
                       normalization="RMSNorm", swiglu=True, linear_bias=False, qkv_bias=False, tied=False)
    [chunk] = rank_parameters(model, ParallelLayout(MEGATRON, tp=2), RankCoord())
    shapes = {p.name.split("layers.0.")[-1]: p.shape for p in chunk}
    assert shapes["self_attention.linear_qkv.weight"] == ((4 + 2 * 2) * 4 // 2, 16)
    assert shapes["mlp.linear_fc1.weight"] == (12, 16) and shapes["mlp.linear_fc2.weight"] == (16, 6)
    assert "input_layernorm.bias" not in shapes


def test_target_args_keep_the_padded_vocab_and_name_the_launch_flags():
    import argparse
    args = argparse.Namespace(tensor_model_parallel_size=1, make_vocab_size_divisible_by=128, vocab_size=50257,
                              sequence_parallel=False)
    model = ModelFacts(num_layers=8, hidden=8, heads=8, query_groups=8, ffn=16, padded_vocab=50304, family="mcore",
                       num_experts=4)
    out = target_args(args, model, ParallelLayout(MEGATRON, tp=4, pp=4, vpp=2, ep=2), BufferSettings(dp=2, ep=2))
    assert out.args.make_vocab_size_divisible_by == 32 and out.args.padded_vocab_size == 50304
    assert (out.args.world_size, out.args.num_layers_per_virtual_pipeline_stage) == (32, 1)
    assert out.args.sequence_parallel and "--sequence-parallel" in out.launch_flags
    assert args.tensor_model_parallel_size == 1  # the source's args are not touched


@pytest.mark.parametrize("dp, cp, fp16, match", [(3, 1, False, "divisible by the ep size"),
                                                 (2, 2, False, "context parallelism"), (2, 1, True, "fp16")])
def test_expert_parallel_targets_megatron_refuses(dp, cp, fp16, match):
    model = ModelFacts(num_layers=2, hidden=8, heads=2, query_groups=2, ffn=16, padded_vocab=32, family="mcore",
                       num_experts=4)
    with pytest.raises(ConvertInputError, match=match):
        check_megatron_target(model, ParallelLayout(MEGATRON, ep=2), BufferSettings(dp=dp, cp=cp, ep=2), fp16=fp16)


@pytest.mark.parametrize("family, want", [
    ("mcore", [(1.0, 1.0, False, True), (1.0, 1.0, False, False), (0.0, 1.0, False, False)]),
    ("legacy", [(1.0, 1.0, False, False), (0.0, 1.0, False, False)])])  # legacy marks no embedding
def test_decoupled_lr_groups_follow_the_embedding_marks(family, want):
    model = ModelFacts(num_layers=1, hidden=8, heads=2, query_groups=2, ffn=16, padded_vocab=32, family=family,
                       tied=False, max_position=4)
    chunks = rank_parameters(model, ParallelLayout(MEGATRON), RankCoord())
    assert group_order(param_group_keys(chunks, decoupled_lr=True)) == want
