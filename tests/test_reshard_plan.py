"""The re-sharding planner, checked against an independent reference: index-valued global tensors
(every element unique) are sharded at the source layout by the rules of RESHARDING.md written out
again here, the plan's segments build every target shard from those source shards, and the result
must equal the reference sharding at the target layout, element for element. No checkpoint files."""

from __future__ import annotations

import math

import numpy as np
import pytest

from megatron_ms_convert.errors import ConvertInputError
from megatron_ms_convert.naming import NAME_RULES, megatron_name, mindspore_name, renumber_layers, stacked_expert_name
from megatron_ms_convert.reshard import MEGATRON, MINDSPORE, ModelFacts, ParallelLayout, RankCoord, \
    megatron_vocab_divisor, plan_reshard
from megatron_ms_convert.reshard.model import HEAD_COPY, global_params
from megatron_ms_convert.reshard.placement import SOURCE, layer_placement, mindspeed_default_counts
from megatron_ms_convert.reshard.planner import SideView, side_tensors, strided
from megatron_ms_convert.reshard.rules import SPLIT_RULES, split_rule
from megatron_ms_convert.topology import Topology

LEGACY = ModelFacts(num_layers=8, hidden=8, heads=4, query_groups=4, ffn=16, padded_vocab=32, family="legacy",
                    normalization="LayerNorm", tied=True, max_position=16)
MCORE = ModelFacts(num_layers=8, hidden=16, heads=8, query_groups=4, kv_channels=2, ffn=32, padded_vocab=64,
                   family="mcore", normalization="RMSNorm", tied=False, swiglu=True)
MOE = ModelFacts(num_layers=8, hidden=16, heads=8, query_groups=4, kv_channels=2, ffn=8, padded_vocab=64,
                 family="mcore", normalization="RMSNorm", tied=True, swiglu=True, num_experts=4)
# mcore with Transformer Engine's spec: norms fused into linear_qkv / linear_fc1 (LayerNorm: weight and bias)
MCORE_TE = ModelFacts(num_layers=8, hidden=16, heads=8, query_groups=8, ffn=32, padded_vocab=64, family="mcore",
                      normalization="LayerNorm", te_norms=True, tied=True, max_position=16)
MODELS = {"legacy": LEGACY, "mcore": MCORE, "moe": MOE, "mcore-te": MCORE_TE}


def mg(**kw):
    return ParallelLayout(MEGATRON, **kw)


def ms(**kw):
    return ParallelLayout(MINDSPORE, **kw)


# ---------------------------------------------------------------------------------------------
# The reference: RESHARDING.md's rules, written independently of the planner


def ref_rule(name: str, swiglu: bool) -> str:
    if name.endswith(("word_embeddings.weight", "output_layer.weight", "qkv_proj.weight", "qkv_proj.bias")):
        return "dim0"
    if name.endswith(("out_proj.weight", "projection.weight")):
        return "dim1"
    if ".mapping." in name:
        return "glu" if swiglu else "dim0"
    return "replicated"


def ref_shard(glob: np.ndarray, rule: str, tp: int, rank: int) -> np.ndarray:
    if rule == "replicated":
        return glob.copy()
    if rule == "dim1":
        return np.split(glob, tp, axis=1)[rank]
    if rule == "glu":  # each rank: [its gate rows; its up rows]
        gate, up = np.split(glob, 2, axis=0)
        return np.concatenate([np.split(gate, tp, axis=0)[rank], np.split(up, tp, axis=0)[rank]])
    return np.split(glob, tp, axis=0)[rank]


def ref_counts(layout: ParallelLayout, num_layers: int) -> list[list[int]]:
    """[chunk][stage] layer counts: an explicit list, Megatron's equal split, or MindSpeed's rule
    (layers over chunks, then over stages; remainders one each from the second-to-last part back)."""
    if layout.stage_list:
        flat = list(layout.stage_list)
        return [flat[v * layout.pp:(v + 1) * layout.pp] for v in range(layout.vpp)]
    if layout.side == MEGATRON:
        return [[num_layers // (layout.pp * layout.vpp)] * layout.pp for _ in range(layout.vpp)]

    def divide(n, parts):
        out = [n // parts] * parts
        for i in range(n % parts):
            out[parts - 2 - i] += 1
        return out
    return [divide(c, layout.pp) for c in divide(num_layers, layout.vpp)]


def ref_home(layout: ParallelLayout, num_layers: int, layer: int) -> tuple[int, int, int]:
    counts = ref_counts(layout, num_layers)
    start = 0
    for chunk in range(layout.vpp):
        for stage in range(layout.pp):
            if layer < start + counts[chunk][stage]:
                return stage, chunk, layer - start
            start += counts[chunk][stage]
    raise AssertionError(layer)


def ref_key(model: ModelFacts, side: str, ms_name: str, local_layer: int | None, local_expert: int | None) -> str:
    if local_expert is not None:
        parts = ms_name.split(".")
        parts[parts.index("local_experts") + 1] = str(local_expert)
        ms_name = ".".join(parts)
    if side == MINDSPORE:
        return stacked_expert_name(ms_name)
    _, name = megatron_name(ms_name, model.naming())
    return name if local_layer is None else renumber_layers(name, lambda _: local_layer)


def global_values(model: ModelFacts) -> dict[str, np.ndarray]:
    """Every parameter (the tied head copy too) as an index-valued tensor: values unique model-wide."""
    out, start = {}, 0
    for p in global_params(model):
        numel = math.prod(p.shape)
        out[_ident(p)] = np.arange(start, start + numel, dtype=np.int64).reshape(p.shape)
        start += numel
    return out


def _ident(p) -> str:
    return p.name + (f"#expert{p.expert}" if p.expert is not None else "") + ("#copy" if p.where == HEAD_COPY else "")


def ref_files(model: ModelFacts, layout: ParallelLayout, values: dict[str, np.ndarray],
              head_copy_from_embedding: bool = False) -> dict[RankCoord, dict[tuple[int, str], np.ndarray]]:
    """Every rank's tensors at a layout: rank -> (chunk, key) -> array."""
    files: dict[RankCoord, dict[tuple[int, str], np.ndarray]] = {}
    num_local = model.num_experts // layout.ep if model.num_experts else 0
    for p in global_params(model):
        if p.where == HEAD_COPY and layout.pp == 1:
            continue
        glob = values["language_model.embedding.word_embeddings.weight"] if (
            p.where == HEAD_COPY and head_copy_from_embedding) else values[_ident(p)]
        if p.layer is not None:
            stage, chunk, local = ref_home(layout, model.num_layers, p.layer)
        elif p.name.startswith("language_model.embedding"):
            stage, chunk, local = 0, 0, None
        else:
            stage, chunk, local = layout.pp - 1, layout.vpp - 1, None
        if p.expert is None:
            eps, local_expert = range(layout.ep), None
        else:
            eps, local_expert = [p.expert // num_local], p.expert % num_local
        rule = ref_rule(p.name, model.swiglu)
        for ep in eps:
            for tp in range(layout.tp):
                shard = ref_shard(glob, rule, layout.tp, tp)
                mine = files.setdefault(RankCoord(stage, ep, tp), {})
                key = ref_key(model, layout.side, p.name, local, local_expert)
                if layout.side == MINDSPORE and local_expert is not None:
                    stacked = mine.setdefault((chunk, key), np.full((num_local, *shard.shape), -1, np.int64))
                    stacked[local_expert] = shard
                else:
                    mine[(chunk, key)] = shard
    return files


def execute(plan, files) -> tuple[dict, set]:
    """Build every target tensor from the source arrays by the plan's segments, reading the source
    through each segment's strided runs as a streaming executor would. Returns the target files and
    the (source rank, key, flat index) of every element read."""
    out, read = {}, set()
    for target in plan.ranks:
        mine = out.setdefault(target.rank, {})
        for t in target.tensors:
            array = np.full(t.shape, -1, np.int64)
            written = np.zeros(t.shape, np.int64)
            for seg in t.segments:
                source = files[seg.source][(seg.chunk, seg.key)]
                assert source.shape == seg.source_shape
                runs = seg.source_runs()
                flat = source.reshape(-1)
                pieces = [flat[runs.offset + i * runs.stride:runs.offset + i * runs.stride + runs.length]
                          for i in range(runs.count)]
                block_shape = tuple(hi - lo for lo, hi in seg.target_box)
                box = tuple(slice(lo, hi) for lo, hi in seg.target_box)
                array[box] = np.concatenate(pieces).reshape(block_shape)
                written[box] += 1
                # the same elements in the same row-major order (a stacking axis of length 1 on one side only)
                np.testing.assert_array_equal(array[box].reshape(-1),
                                              source[tuple(slice(lo, hi) for lo, hi in seg.source_box)].reshape(-1))
                for i in range(runs.count):
                    start = runs.offset + i * runs.stride
                    read.update((seg.source, seg.chunk, seg.key, j) for j in range(start, start + runs.length))
                for replica in seg.replicas:
                    np.testing.assert_array_equal(files[replica][(seg.chunk, seg.key)], source)
            assert (written == 1).all(), f"{target.rank} {t.key}: elements written {sorted(set(written.ravel()))}"
            mine[(t.chunk, t.key)] = array
    return out, read


def canonical_source_elements(model, layout, files, dropped) -> set:
    """Every source element once: replicated tensors from tp rank 0, dense ones from ep rank 0."""
    out = set()
    dropped_keys = {(d.rank, d.chunk, d.key) for d in dropped}
    for rank, tensors in files.items():
        for (chunk, key), array in tensors.items():
            if (rank, chunk, key) in dropped_keys:
                continue
            dense = "local_experts" not in key
            if dense and rank.ep != 0:
                continue
            if rank.tp != 0 and _is_replicated(model, layout, key):
                continue
            out.update((rank, chunk, key, j) for j in range(array.size))
    return out


def _is_replicated(model, layout, key: str) -> bool:
    ms_name = key if layout.side == MINDSPORE else mindspore_name(key, model.naming())
    return ref_rule(ms_name, model.swiglu) == "replicated"


# ---------------------------------------------------------------------------------------------
# Property tests: every layout pair, every model


LAYOUTS = {
    "tp2->1": (mg(tp=2), ms(tp=1)),
    "tp1->2": (mg(tp=1), ms(tp=2)),
    "tp2->4": (mg(tp=2), ms(tp=4)),
    "pp2->1": (mg(pp=2), ms(pp=1)),
    "pp1->2": (mg(pp=1), ms(pp=2)),
    "pp4vpp2->pp1": (mg(pp=4, vpp=2), ms(pp=1)),
    "pp4->2": (mg(pp=4), ms(pp=2)),
    "pp1->uneven 2,4,2": (mg(pp=1), ms(pp=3, stage_list=(2, 4, 2))),
    "pp2->default uneven pp3": (mg(pp=2), ms(pp=3)),
    "fork stage list 2,3,3->pp2": (mg(pp=3, stage_list=(2, 3, 3)), ms(pp=2)),
    "tp2pp2->tp1pp4": (mg(tp=2, pp=2), ms(tp=1, pp=4)),
    "back: ms pp2vpp2->pp1": (ms(pp=2, vpp=2), mg(pp=1)),
    "back: ms uneven 3,3,2 tp2->pp2 tp1": (ms(pp=3, tp=2, stage_list=(3, 3, 2)), mg(pp=2)),
    "back: ms tp1pp4->tp2pp2": (ms(tp=1, pp=4), mg(tp=2, pp=2)),
    "megatron pp2->pp4vpp2": (mg(pp=2), mg(pp=4, vpp=2)),
    "ms pp2 vpp2 list 3,1,2,2->ms pp1": (ms(pp=2, vpp=2, stage_list=(3, 1, 2, 2)), ms(pp=1)),
}
MOE_LAYOUTS = {
    "ep2->1": (mg(ep=2), ms(ep=1)),
    "ep1->2": (mg(ep=1), ms(ep=2)),
    "ep2tp2->ep4tp1": (mg(ep=2, tp=2), ms(ep=4, tp=1)),
    "back: ms ep2 pp2->ep1 tp2": (ms(ep=2, pp=2), mg(ep=1, tp=2)),
}
CASES = ([(m, name) for m in ("legacy", "mcore", "moe") for name in LAYOUTS] + [("moe", n) for n in MOE_LAYOUTS]
         + [("mcore-te", n) for n in ("tp2->1", "tp2pp2->tp1pp4", "back: ms tp1pp4->tp2pp2")])


@pytest.mark.parametrize("model_name, layouts", CASES)
def test_segments_rebuild_the_reference_sharding(model_name, layouts):
    model = MODELS[model_name]
    source, target = {**LAYOUTS, **MOE_LAYOUTS}[layouts]
    values = global_values(model)
    source_files = ref_files(model, source, values)
    plan = plan_reshard(model, source, target)

    got, read = execute(plan, source_files)

    # a new tied head copy (source pp 1) is the embedding's; an existing one keeps its own values
    want = ref_files(model, target, values, head_copy_from_embedding=source.pp == 1)
    assert got.keys() == want.keys()
    for rank in want:
        assert set(got[rank]) == set(want[rank]), (rank, set(got[rank]) ^ set(want[rank]))
        for key, array in want[rank].items():
            np.testing.assert_array_equal(got[rank][key], array, err_msg=f"{rank} {key}")
    # the segments read every source element (replicas once), and only those
    assert read == canonical_source_elements(model, source, source_files, plan.dropped)
    # the plan's own inventory of the source is what the source holds
    assert {(t.rank, t.key, t.chunk, t.shape) for ts in plan.source_tensors().values() for t in ts} == {
        (rank, key, chunk, array.shape) for rank, tensors in source_files.items()
        for (chunk, key), array in tensors.items()}


def test_every_target_element_is_one_global_element():
    """Index values: over all target ranks of tp2pp2 -> tp1pp4, the values of the non-replicated tensors
    are each global element exactly once (a bijection), and param / moments share the map by construction
    (one segment list per parameter tensor)."""
    model = MCORE
    values = global_values(model)
    plan = plan_reshard(model, mg(tp=2, pp=2), ms(tp=1, pp=4))
    got, _ = execute(plan, ref_files(model, mg(tp=2, pp=2), values))
    seen = np.concatenate([array.ravel() for tensors in got.values() for array in tensors.values()])
    assert np.array_equal(np.sort(seen), np.arange(sum(v.size for v in values.values())))


def test_tied_copy_is_dropped_at_pp1_and_named_in_the_plan():
    plan = plan_reshard(LEGACY, mg(tp=2, pp=2), ms(tp=1, pp=1))
    assert [(str(d.rank), d.key) for d in plan.dropped] == [("tp0 pp1 ep0", "word_embeddings.weight"),
                                                            ("tp1 pp1 ep0", "word_embeddings.weight")]
    assert "dropped: tp0 pp1 ep0 chunk0 word_embeddings.weight" in plan.describe()


def test_tied_copy_is_created_from_the_first_stage_embedding():
    plan = plan_reshard(LEGACY, ms(tp=1, pp=1), mg(tp=1, pp=2))
    copy = plan.tensor(RankCoord(pp=1), "word_embeddings.weight")
    embedding = "language_model.embedding.word_embeddings.weight"
    assert [(s.source, s.key) for s in copy.segments] == [(RankCoord(), embedding)]


def test_glu_merge_is_not_concatenation():
    """Merging tp2's fc1 must give [gate0; gate1; up0; up1], not the same-shaped [gate0; up0; gate1; up1]."""
    plan = plan_reshard(MCORE, mg(tp=2), ms(tp=1))
    fc1 = plan.tensor(RankCoord(), "language_model.encoder.layers.0.mlp.mapping.bias")
    assert [(s.source.tp, s.source_box, s.target_box) for s in fc1.segments] == [
        (0, ((0, 16),), ((0, 16),)), (1, ((0, 16),), ((16, 32),)), (0, ((16, 32),), ((32, 48),)),
        (1, ((16, 32),), ((48, 64),))]


def test_row_parallel_segments_are_strided_row_blocks():
    plan = plan_reshard(MCORE, mg(tp=2), ms(tp=1))
    proj = plan.tensor(RankCoord(), "language_model.encoder.layers.0.mlp.projection.weight")
    second = proj.segments[1]
    assert second.source_box == ((0, 16), (0, 16)) and second.target_box == ((0, 16), (16, 32))
    runs = second.source_runs()
    assert (runs.offset, runs.length, runs.count, runs.stride) == (0, 256, 1, 256)  # a whole source shard
    split = plan_reshard(MCORE, ms(tp=1), mg(tp=2)).tensor(
        RankCoord(tp=1), "decoder.layers.0.mlp.linear_fc2.weight").segments[0]
    runs = split.source_runs()
    assert (runs.offset, runs.length, runs.count, runs.stride) == (16, 16, 16, 32)  # one run per row


def test_strided_boxes():
    assert strided(((1, 2), (0, 4), (2, 3)), (3, 4, 5)) == strided(((1, 2), (0, 4), (2, 3)), (3, 4, 5))
    s = strided(((1, 2), (0, 4), (2, 3)), (3, 4, 5))
    assert (s.offset, s.length, s.count, s.stride) == (22, 1, 4, 5)
    s = strided(((0, 3), (0, 4)), (3, 4))
    assert (s.offset, s.length, s.count) == (0, 12, 1)
    with pytest.raises(ValueError):
        strided(((0, 2), (0, 2), (1, 2)), (3, 3, 3))


def test_describe_lists_every_target_tensor_and_its_sources():
    plan = plan_reshard(MOE, mg(ep=2, tp=2), ms(ep=1, tp=1))
    text = plan.describe()
    assert text.startswith("re-shard megatron tp2 pp1 vpp1 ep2 -> mindspore tp1 pp1 vpp1 ep1")
    assert "one index map for param, exp_avg, exp_avg_sq" in text
    stacked = plan.tensor(RankCoord(), "language_model.encoder.layers.3.mlp.experts.local_experts.0.mapping.weight")
    assert stacked.shape == (4, 16, 16) and len(stacked.params) == 4
    assert ("tp1 pp0 ep1 chunk0 decoder.layers.3.mlp.experts.local_experts.1.linear_fc1.weight [4:8, 0:16] "
            "-> [3:4, 12:16, 0:16]") in text
    assert ("tp0 pp0 ep0 chunk0 decoder.layers.0.input_layernorm.weight [0:16] -> [0:16] "
            "(replicas: tp1 pp0 ep0)") in text
    for t in (t for r in plan.ranks for t in r.tensors):
        assert t.describe().splitlines()[0] in text


# ---------------------------------------------------------------------------------------------
# The rules table and the placements


def test_rules_table_covers_exactly_the_name_table():
    templates = set()
    for rule in NAME_RULES:
        for wb in ("weight", "bias"):
            templates.add(rule.mindspore.replace("<wb>", wb))
    # bias of the router and output layer do not exist; the name table spells them with fixed suffixes
    assert set(SPLIT_RULES) == {t for t in templates if "<wb>" not in t}


@pytest.mark.parametrize("name, swiglu, want", [
    ("language_model.encoder.layers.2.attention.qkv_proj.bias", False, "col-qkv"),
    ("language_model.encoder.layers.2.attention.out_proj.bias", False, "rep"),
    ("language_model.encoder.layers.2.mlp.mapping.weight", False, "col"),
    ("language_model.encoder.layers.2.mlp.experts.local_experts.3.mapping.weight", True, "col-glu"),
    ("language_model.encoder.layers.2.mlp.experts.local_experts.3.projection.weight", True, "row"),
    ("language_model.encoder.layers.2.post_attention_norm.beta", False, "rep"),
    ("language_model.embedding.position_embeddings.embedding_table", False, "rep"),
    ("language_model.output_layer.weight", False, "vocab"),
])
def test_split_rule_of_names(name, swiglu, want):
    assert split_rule(name, "LayerNorm", swiglu) == want


def test_inventory_of_a_legacy_model_at_pp2():
    model = ModelFacts(num_layers=2, hidden=8, heads=4, query_groups=4, ffn=16, padded_vocab=32, max_position=16)
    layout = mg(pp=2)
    view = SideView(model, layout, layer_placement(layout, 2, SOURCE))
    tensors = side_tensors(view, global_params(model))
    layer = "language_model.encoder.layers.0."
    body = [layer + n for n in ("input_norm.weight", "input_norm.bias", "self_attention.query_key_value.weight",
                                "self_attention.query_key_value.bias", "self_attention.dense.weight",
                                "self_attention.dense.bias", "post_attention_norm.weight", "post_attention_norm.bias",
                                "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.weight",
                                "mlp.dense_4h_to_h.bias")]
    assert [t.key for t in tensors[RankCoord(pp=0)]] == [
        "language_model.embedding.word_embeddings.weight", "language_model.embedding.position_embeddings.weight",
        *body]
    assert [t.key for t in tensors[RankCoord(pp=1)]] == [
        *body, "language_model.encoder.final_norm.weight", "language_model.encoder.final_norm.bias",
        "word_embeddings.weight"]
    shapes = {t.key: t.shape for t in tensors[RankCoord(pp=1)]}
    assert shapes[layer + "self_attention.query_key_value.weight"] == (24, 8)
    assert shapes[layer + "mlp.dense_4h_to_h.weight"] == (8, 16)


@pytest.mark.parametrize("pp, vpp, stage_list", [(4, 2, ()), (2, 1, ()), (3, 1, (2, 3, 3)), (4, 1, ())])
def test_megatron_numbering_matches_the_topology(pp, vpp, stage_list):
    """The converter's existing Megatron numbering (topology.Topology) and the placement agree."""
    layers = layer_placement(mg(pp=pp, vpp=vpp, stage_list=stage_list), 8, SOURCE)
    topo = Topology(tp_size=1, pp_size=pp, dp_size=1, cp_size=1, vpp_size=vpp, num_layers=8,
                    stage_list=stage_list or (8 // pp,) * pp)
    for layer in range(8):
        stage, chunk, local = layers.place(layer)
        assert topo.local_layer(layer) == (stage, chunk, local)
        assert topo.global_layer(stage, chunk, local) == layer


def test_mindspeed_default_stage_lists():
    # the examples RESHARDING.md §2 read off divide_layers
    assert mindspeed_default_counts(10, 4, 1) == ((2, 3, 3, 2),)
    assert mindspeed_default_counts(11, 4, 1) == ((3, 3, 3, 2),)
    assert mindspeed_default_counts(10, 2, 2) == ((3, 2), (3, 2))


def test_vocab_divisor_keeps_the_padded_rows():
    assert megatron_vocab_divisor(50304, 2, vocab_size=50257, divisor=128, source_tp=1) == 64
    assert megatron_vocab_divisor(50432, 1, vocab_size=50257, divisor=128, source_tp=2) == 256
    # 128·tp3 would give 50304 -> 50688 rows; the smallest divisor that rebuilds 50304 at tp 3
    found = megatron_vocab_divisor(50304, 3, vocab_size=50257, divisor=128, source_tp=1)
    assert -(-50257 // (found * 3)) * found * 3 == 50304


# ---------------------------------------------------------------------------------------------
# Refusals: one line, naming the flag, what was found and the fix


def refusal(model, source, target) -> str:
    with pytest.raises(ConvertInputError) as err:
        plan_reshard(model, source, target)
    text = str(err.value)
    assert "\n" not in text and " -> " in text
    return text


def test_refuses_heads_not_divisible():
    text = refusal(LEGACY, mg(), ms(tp=3))
    assert text.startswith("--ms-tp-size 3: 4 attention heads") and "[1, 2, 4]" in text


def test_refuses_query_groups_not_divisible():
    text = refusal(MCORE, mg(), ms(tp=8))
    assert text.startswith("--ms-tp-size 8: 4 query groups") and "[1, 2, 4]" in text


def test_refuses_ffn_not_divisible():
    model = ModelFacts(num_layers=2, hidden=8, heads=8, query_groups=8, kv_channels=1, ffn=12, padded_vocab=64)
    assert refusal(model, mg(), ms(tp=8)).startswith("--ms-tp-size 8: 12 ffn_hidden_size")


def test_refuses_padded_vocab_not_divisible():
    model = ModelFacts(num_layers=2, hidden=8, heads=8, query_groups=8, kv_channels=1, ffn=16, padded_vocab=36)
    text = refusal(model, mg(), mg(tp=8))
    assert text.startswith("--tp-size 8: 36 padded vocab rows") and "[1, 2, 4]" in text


def test_refuses_megatron_target_layers_not_dividing():
    assert refusal(LEGACY, ms(), mg(pp=3)).startswith("--pp-size 3 --vpp-size 1: 8 layers do not fit")
    assert "--pp-size from [1, 2, 4, 8]" in refusal(LEGACY, ms(), mg(pp=3))


def test_refuses_megatron_target_vpp_not_dividing():
    assert refusal(LEGACY, ms(), mg(pp=4, vpp=3)).startswith("--pp-size 4 --vpp-size 3: 8 layers do not fit")


def test_refuses_megatron_target_vpp_with_two_stages():
    assert refusal(LEGACY, ms(), mg(pp=2, vpp=2)).startswith("--vpp-size 2 with --pp-size 2")


def test_refuses_megatron_target_stage_list():
    assert refusal(LEGACY, ms(), mg(pp=2, stage_list=(3, 5))).startswith("--stage-list 3 5: a stage list")


@pytest.mark.parametrize("stage_list", [(2, 2, 2), (4, 4, 0), (4, 4)])
def test_refuses_mindspore_stage_list_not_fitting(stage_list):
    text = refusal(LEGACY, mg(), ms(pp=3, stage_list=stage_list))
    assert text.startswith("--ms-stage-list") and "3 3 2" in text


def test_refuses_experts_not_divisible():
    text = refusal(MOE, mg(), ms(ep=3))
    assert text.startswith("--ms-ep-size 3: 4 experts") and "[1, 2, 4]" in text


def test_refuses_expert_parallel_without_experts():
    assert refusal(MCORE, mg(), ms(ep=2)).startswith("--ms-ep-size 2 for a model without experts")


@pytest.mark.parametrize("change, start", [
    (dict(moe_grouped_gemm=True), "--moe-grouped-gemm"),
    (dict(family="legacy"), "--num-experts with a legacy model"),
    (dict(fp8=True), "--fp8-format"),
    (dict(standalone_embedding_stage=True), "--standalone-embedding-stage"),
])
def test_refuses_unsupported_models(change, start):
    fields = {f: getattr(MOE, f) for f in MOE.__dataclass_fields__}
    assert refusal(ModelFacts(**{**fields, **change}), mg(), ms()).startswith(start)


def test_refuses_legacy_gqa_with_several_groups_per_rank():
    model = ModelFacts(num_layers=2, hidden=16, heads=8, query_groups=4, ffn=16, padded_vocab=32)
    assert "legacy GQA" in refusal(model, ms(tp=1), mg(tp=2))


def test_refuses_unknown_parameter_names():
    with pytest.raises(ConvertInputError, match="no tensor-parallel rule"):
        split_rule("language_model.encoder.layers.0.attention.q_layernorm.weight", "RMSNorm", False)
