"""Plans and layouts as plain data: no checkpoint files needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_ms_convert.naming import NamingFacts, mindspore_name
from megatron_ms_convert.pt2ckpt_plan import optimizer_scalars
from megatron_ms_convert.topology import Topology
from megatron_ms_convert.errors import ConvertInputError
from param_map_utils import (BucketCounts, BufferLayout, ParamSpan, check_layouts, infer_layouts,
                             layout_differences, list_param_map_files, read_rank_layouts)

BF16 = ("torch.bfloat16", "torch.float32")


def topo(**kw):
    base = dict(tp_size=1, pp_size=1, dp_size=1, cp_size=1, vpp_size=1, num_layers=4, stage_list=(4,))
    base.update(kw)
    return Topology(**base)


@pytest.mark.parametrize("source, state, want", [
    ("module.language_model.encoder.layers.1.self_attention.query_key_value.weight", "param",
     "language_model.encoder.layers.7.attention.qkv_proj.weight"),
    ("module.language_model.encoder.layers.0.mlp.dense_h_to_4h.bias", "exp_avg",
     "exp_avg.language_model.encoder.layers.6.mlp.mapping.bias"),
    ("module.language_model.encoder.layers.0.mlp.dense_4h_to_h.weight", "exp_avg_sq",
     "exp_avg_sq.language_model.encoder.layers.6.mlp.projection.weight"),
    ("module.word_embeddings.weight", "param", "word_embeddings.weight"),
    ("module.decoder.layers.1.self_attention.linear_proj.weight", "param",
     "decoder.layers.7.attention.linear_proj.weight"),
    ("decoder.layers.0.self_attention.dense.weight", "param", "decoder.layers.6.attention.out_proj.weight"),
    ("module.language_model.encoder.final_norm.weight", "param", "language_model.encoder.final_norm.weight"),
])
def test_documented_names(source, state, want):
    facts = NamingFacts(family="mcore" if "decoder" in source else "legacy", style="documented")
    assert mindspore_name(source, facts, lambda i: i + 6, state) == want


def test_global_layers_without_vpp_follow_the_stage_list():
    t = topo(pp_size=3, num_layers=7, stage_list=(3, 2, 2))
    assert [t.global_layer(p, 0, i) for p in range(3) for i in range(t.layers_in_chunk(p))] == list(range(7))


def test_global_layers_with_vpp_are_dealt_round_robin():
    # pp 4, vpp 2, 16 layers: chunk v of stage p holds v*8 + p*2 + i
    t = topo(pp_size=4, vpp_size=2, num_layers=16, stage_list=(4, 4, 4, 4))
    seen = sorted(t.global_layer(p, v, i) for p in range(4) for v in range(2) for i in range(2))
    assert seen == list(range(16))
    assert [t.global_layer(1, 1, i) for i in range(2)] == [10, 11]
    assert [t.global_layer(3, 0, i) for i in range(2)] == [6, 7]


def test_rank_numbers_follow_tp_cp_ep_dp_pp():
    t = topo(tp_size=2, pp_size=2, dp_size=2, cp_size=2)
    assert t.ms_rank(1, 1, dp=1, cp=1) == 15
    assert t.ms_rank(1, 0, dp=0, cp=1) == 3
    assert t.target_ranks(0, 1, all_dp_cp=True) == [8, 10, 12, 14]
    assert t.target_ranks(0, 1, all_dp_cp=False) == [8]


def test_scalars_have_the_documented_types():
    groups = [{"lr": 0.5, "step": 7, "betas": (0.9, 0.95), "weight_decay": 0.1, "bias_correction": True},
              {"lr": 0.25, "step": 7, "weight_decay": 0.0}]
    sched = {"max_lr": 1e-3, "lr_decay_style": "cosine", "num_steps": 9, "wd_incr_style": "linear", "min_lr": 0.0}
    got = {t.name: (t.shape, t.dtype, t.source.value) for t in optimizer_scalars(12, groups, sched, Path("m.pt"))}
    assert got["step_num"] == ((), "int64", 12) and got["epoch_num"] == ((), "int64", 0)
    assert got["learning_rate_group_1"] == ((), "float32", 0.25)
    assert got["state_step"] == ((1,), "float32", 7.0)
    assert got["bias_correction_group_0"] == ((), "float32", 1.0)
    assert "betas_group_0" not in got
    assert got["lr_decay_style"] == ((), "int64", 3) and got["wd_incr_style"] == ((), "int64", 1)
    assert got["max_lr"] == ((), "float64", 1e-3) and got["num_steps"] == ((), "int64", 9)


def test_unknown_scheduler_style_is_an_error():
    with pytest.raises(ConvertInputError, match="lr_decay_style"):
        optimizer_scalars(1, [], {"lr_decay_style": "polynomial"}, Path("m.pt"))


# --- layouts -----------------------------------------------------------------------------------

PARAMS = [("a.weight", (2, 3), "torch.bfloat16"), ("a.bias", (3,), "torch.bfloat16"),
          ("b.weight", (5,), "torch.bfloat16")]
# reverse order b.weight(5) | a.bias(3) a.weight(6), dp 4: bucket 0 = 5 -> padded 8, bucket 1 = 9 -> 12
COUNTS = [BucketCounts(0, BF16, (8, 12), (5, 9))]


def test_infer_layout_packs_reversed_with_padded_bucket_starts():
    [layout] = infer_layouts([PARAMS], COUNTS, grad_in_fp32=True, wrapped=True)
    spans = [(p.name, p.start, p.end, p.bucket) for p in layout.params]
    assert spans == [("module.b.weight", 0, 5, 0), ("module.a.bias", 8, 11, 1), ("module.a.weight", 11, 17, 1)]


def test_infer_layout_refuses_a_frozen_parameter():
    frozen = PARAMS + [("c.weight", (4,), "torch.bfloat16")]  # not in the buffers
    with pytest.raises(ConvertInputError, match=r"bucket 0: parameter b.weight overflows it.*found 9 \(\+4 elements\)"):
        infer_layouts([frozen], COUNTS, grad_in_fp32=True, wrapped=True)


def test_infer_layout_splits_buffers_by_dtype_in_first_appearance_order():
    params = [("x", (2,), "torch.bfloat16"), ("n", (3,), "torch.float32"), ("y", (2,), "torch.bfloat16")]
    counts = [BucketCounts(0, BF16, (4,), (4,)), BucketCounts(1, ("torch.float32", "torch.float32"), (4,), (3,))]
    layouts = infer_layouts([params], counts, grad_in_fp32=True, wrapped=False)
    assert [[p.name for p in lay.params] for lay in layouts] == [["y", "x"], ["n"]]
    assert [lay.buffer_index for lay in layouts] == [0, 1]


def spans(*items):
    return tuple(ParamSpan(n, "torch.bfloat16", s, a, b, k) for n, s, a, b, k in items)


TENSORS = [{"a.weight": ((2, 3), "torch.bfloat16"), "a.bias": ((3,), "torch.bfloat16"),
            "b.weight": ((5,), "torch.bfloat16")}]
GOOD = spans(("b.weight", (5,), 0, 5, 0), ("a.bias", (3,), 8, 11, 1), ("a.weight", (2, 3), 11, 17, 1))


def test_a_good_map_passes():
    check_layouts([BufferLayout(0, 0, GOOD, "map.json")], COUNTS, TENSORS, "d.pt")


@pytest.mark.parametrize("bad, message", [
    (spans(("b.weight", (5,), 0, 5, 0), ("a.bias", (3,), 5, 8, 0), ("a.weight", (2, 3), 11, 17, 1)),
     r"map.json: a.bias spans \[5, 8\).*inside bucket 0 = \[0, 5\)"),
    (spans(("b.weight", (5,), 0, 5, 0), ("a.bias", (3,), 8, 11, 1), ("a.weight", (2, 3), 10, 16, 1)),
     r"overlap"),
    (spans(("b.weight", (5,), 0, 5, 0), ("a.bias", (3,), 8, 11, 1), ("a.weight", (2, 3), 11, 17, 2)),
     r"bucket 2.*a bucket in 0..1"),
    (spans(("b.weight", (5,), 0, 5, 0), ("a.weight", (2, 3), 11, 17, 1)),
     r"bucket 1 holds 6 elements.*9 \(per_bucket_numel_unpadded in d.pt\)"),
    (spans(("b.weight", (5,), 0, 5, 0), ("a.bias", (3,), 8, 11, 1), ("z.weight", (2, 3), 11, 17, 1)),
     r"z.weight is not in model chunk 0"),
    (spans(("b.weight", (5,), 0, 5, 0), ("a.bias", (3,), 8, 11, 1), ("a.weight", (3, 2), 11, 17, 1)),
     r"a.weight is \[3, 2\].*\[2, 3\] torch.bfloat16 as in model_optim_rng.pt"),
])
def test_stale_maps_are_refused_naming_the_file(bad, message):
    with pytest.raises(ConvertInputError, match=message) as err:
        check_layouts([BufferLayout(0, 0, bad, "map.json")], COUNTS, TENSORS, "d.pt")
    assert "--param-map-path" in str(err.value)


def test_layout_differences_name_the_parameter():
    other = spans(("b.weight", (5,), 0, 5, 0), ("a.bias", (3,), 8, 11, 1), ("a.weight", (2, 3), 11, 17, 0))
    diff = layout_differences([BufferLayout(0, 0, GOOD, "m.json")], [BufferLayout(0, 0, other, "inferred")])
    assert len(diff) == 1 and "a.weight" in diff[0]


def write_map(folder: Path, name: str, layout_spans) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(json.dumps({s.name: [s.dtype, list(s.shape), s.start, s.end, s.bucket]
                                           for s in layout_spans}))


def test_map_files_missing_a_chunk_or_with_a_stale_extra_chunk(tmp_path):
    write_map(tmp_path, "param_map_buffer0_dp0tp0pp0vpp0.json", GOOD)
    files = list_param_map_files(tmp_path)
    with pytest.raises(ConvertInputError, match=r"chunks \[0\].*expected chunks \[0, 1\]"):
        read_rank_layouts(files, 0, 0, 2, tmp_path)
    write_map(tmp_path, "param_map_buffer0_dp0tp0pp0vpp1.json", GOOD)
    assert len(read_rank_layouts(list_param_map_files(tmp_path), 0, 0, 2, tmp_path)) == 2
    with pytest.raises(ConvertInputError, match=r"chunks \[0, 1\]"):
        read_rank_layouts(list_param_map_files(tmp_path), 0, 0, 1, tmp_path)


def test_map_copies_of_dp_ranks_must_agree(tmp_path):
    write_map(tmp_path, "param_map_buffer0_dp0tp0pp0vpp0.json", GOOD)
    write_map(tmp_path, "param_map_buffer0_dp1tp0pp0vpp0.json", GOOD[:2])
    with pytest.raises(ConvertInputError, match="dp1tp0pp0vpp0.json: differs"):
        read_rank_layouts(list_param_map_files(tmp_path), 0, 0, 1, tmp_path)


# ---------------------------------------------------------------------------------------------
# MoE (expert parallelism)


def test_moe_files_go_to_every_dp_rank_of_their_ep_rank():
    # tp 2, pp 2, target dp 4, ep 2: R = pp*8 + dp*2 + tp; ep rank = dp mod 2
    t = topo(tp_size=2, pp_size=2, dp_size=4, ep_size=2, moe=True)
    assert t.target_ranks(1, 1, all_dp_cp=False, ep=0) == [9, 13]   # dp 0 and 2
    assert t.target_ranks(0, 0, all_dp_cp=False, ep=1) == [2, 6]    # dp 1 and 3
    assert t.target_ranks(0, 0, all_dp_cp=True, ep=1) == [2, 6]     # cp 1: nothing more
    with_cp = topo(dp_size=2, cp_size=2, moe=True)                  # ep 1: every dp, and the cp ranks
    assert with_cp.target_ranks(0, 0, all_dp_cp=False) == [0, 2]
    assert with_cp.target_ranks(0, 0, all_dp_cp=True) == [0, 1, 2, 3]


@pytest.mark.parametrize("name, pp, ep, want", [
    ("mp_rank_03_001", 1, 2, (3, 0, 1)), ("mp_rank_00_002_001", 4, 2, (0, 2, 1)), ("mp_rank_01_002", 4, 1, (1, 2, 0)),
    ("mp_rank_01", 1, 1, (1, 0, 0)), ("mp_rank_x", 1, 2, None)])
def test_folder_names_with_expert_ranks_both_ways(name, pp, ep, want):
    from megatron_ms_convert.topology import folder_name, parse_folder_ranks
    assert parse_folder_ranks(name, pp, ep) == want
    if want is not None:
        assert folder_name(want[0], want[1], pp, want[2], ep) == name


@pytest.mark.parametrize("name, pp, ep", [("mp_rank_00_000_001", 1, 2), ("mp_rank_00_001", 2, 2),
                                          ("mp_rank_00_001", 1, 1)])
def test_folder_names_of_other_sizes_name_the_flags(name, pp, ep):
    from megatron_ms_convert.topology import parse_folder_ranks
    with pytest.raises(ConvertInputError, match=r"--pp-size \(and --ep-size\)"):
        parse_folder_ranks(name, pp, ep)


def test_local_experts_are_stacked_under_expert_0_in_index_order():
    from megatron_ms_convert.plan import BucketSlice, PlannedTensor, Stacked
    from megatron_ms_convert.pt2ckpt_plan import stack_local_experts

    def slice_(i):
        return BucketSlice(0, BF16, "param", 0, 10 * i, 10 * i + 6, optimizer=1)
    name = "language_model.encoder.layers.2.mlp.experts.local_experts.{}.mapping.weight"
    tensors = [PlannedTensor("router", (4, 3), "float32", slice_(9))]
    tensors += [PlannedTensor(name.format(i), (2, 3), "float32", slice_(i)) for i in (1, 0, 2)]
    router, stacked = stack_local_experts(tensors, 3, Path("m.pt"))
    assert router == tensors[0]
    assert stacked == PlannedTensor(name.format(0), (3, 2, 3), "float32", Stacked((slice_(0), slice_(1), slice_(2))))
    with pytest.raises(ConvertInputError, match="--ep-size"):
        stack_local_experts(tensors, 4, Path("m.pt"))
