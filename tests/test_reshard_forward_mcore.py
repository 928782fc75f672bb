"""Re-sharding on the way there, end to end, for an mcore model: Transformer Engine spec, RMSNorm,
rope, untied output layer, grouped-query attention (4 query groups for 8 heads) and SwiGLU (fc1 weight
and bias in [gate_r; up_r] halves per tp rank). The Megatron-format checkpoints come from the fixture
generator (index-valued: every element unique, with a record of every value); they are converted with
--ms-tp-size / --ms-pp-size, the outputs read with the real `mindspore.load_checkpoint` under the
names MindSpeed-Core-MS's model loads (FORMATS.md §8, tests/mindspeed_model_facts.py), and checked
two ways by this test's own rules (RESHARDING.md §1, written out here, not the converter's):

* global state identity: every parameter's global fp32 master / exp_avg / exp_avg_sq assembled from
  the outputs equals the one assembled from the fixture's record, bit for bit;
* decoding: every output element names its source element (its value is unique), and its global
  coordinate computed from the target side equals the one computed from the source side; over all
  outputs this is a bijection onto the source's elements (replicated tensors: tp rank 0's copy, as
  --replica-policy first says), with exp_avg = -param and exp_avg_sq = param + 0.5 at every position
  (the three states moved together).

The fixture's replicated copies differ by construction, hence --replica-policy first."""

from __future__ import annotations

import numpy as np
import pytest

from tests.expected_outputs import load_record, ms_name
from tests.megatron_fixture import FixtureSpec, load_megatron_file, write_fixture
from tests.mindspeed_model_facts import check_rank_names
from tests.test_reshard_forward import (STATES, _case_id, convert_resharded, load_outputs, mindspeed_stages,
                                        output_globals, source_globals, target_stage_lists)

# tp 1, 2 and 4 all hold whole query groups (4), whole fc1 halves (ffn 40) and whole padded vocab rows (56)
_MODEL = dict(model="mcore", mcore_spec="te", normalization="RMSNorm", position_embedding="rope",
              untie_embeddings=True, hidden=32, heads=8, query_groups=4, swiglu=True, ffn=40, vocab=50,
              seq_length=8, dp=1, num_layers=4)
SOURCES = {
    "tp2pp2": FixtureSpec(tp=2, pp=2, make_vocab_size_divisible_by=4, **_MODEL),
    "tp1pp1": FixtureSpec(tp=1, pp=1, make_vocab_size_divisible_by=8, **_MODEL),
}
CASES = [
    ("tp2pp2", dict(tp=1)),  # tp 2 -> 1
    ("tp1pp1", dict(tp=2)),  # tp 1 -> 2
    ("tp2pp2", dict(tp=4)),  # tp 2 -> 4: one query group per rank
    ("tp2pp2", dict(pp=1)),  # pp 2 -> 1
    ("tp1pp1", dict(pp=2)),  # pp 1 -> 2
    ("tp2pp2", dict(tp=1, pp=4)),  # tp 2 . pp 2 -> tp 1 . pp 4
]

# ---------------------------------------------------------------------------------------------
# The test's own split rules, by MindSpore name


ROWS, GLU, COLS, REPLICATED = "rows", "glu", "cols", "replicated"


def tp_rule(name: str) -> str:
    """Vocab rows, qkv rows (whole query groups, group-major: plain concatenation) on dim 0; SwiGLU
    fc1 as two halves; row-parallel weights on dim 1; the rest (norms, row-parallel biases) replicated."""
    if name.endswith(("word_embeddings.weight", "output_layer.weight", "qkv_proj.weight", "qkv_proj.bias")):
        return ROWS
    if name.endswith(("mlp.mapping.weight", "mlp.mapping.bias")):
        return GLU
    if name.endswith(("out_proj.weight", "projection.weight")):
        return COLS
    return REPLICATED


def merge(shards: dict[int, np.ndarray], name: str, check_replicas: bool) -> np.ndarray:
    """A parameter's global tensor from its tp shards: rank r of an fc1 holds [gate_r; up_r], so the
    global one is [gate_0; gate_1; ...; up_0; up_1; ...]."""
    ordered = [shards[r] for r in sorted(shards)]
    rule = tp_rule(name)
    if rule == REPLICATED:
        if check_replicas:
            assert all(o.tobytes() == ordered[0].tobytes() for o in ordered[1:]), f"{name}: copies differ"
        return ordered[0]
    if rule == GLU:
        halves = [np.split(shard, 2, axis=0) for shard in ordered]
        return np.concatenate([h[0] for h in halves] + [h[1] for h in halves], axis=0)
    return np.concatenate(ordered, axis=0 if rule == ROWS else 1)


def global_coordinate(name: str, shard_shape: tuple[int, ...], rank: int, tp: int, index: int) -> tuple[int, ...]:
    """Where element `index` (flat) of tp rank `rank`'s shard sits in the global tensor."""
    local = np.unravel_index(index, shard_shape)
    row, rest = int(local[0]), tuple(int(i) for i in local[1:])
    rule = tp_rule(name)
    if rule == ROWS:
        return (rank * shard_shape[0] + row, *rest)
    if rule == GLU:
        half = shard_shape[0] // 2
        gate = row < half
        return ((0 if gate else half * tp) + rank * half + (row if gate else row - half), *rest)
    if rule == COLS:
        return (row, rank * shard_shape[1] + rest[0])
    return (row, *rest)


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard_mcore_sources")
    return {name: write_fixture(root / name, spec) for name, spec in SOURCES.items()}


def test_fixture_is_gqa_swiglu_mcore(sources):
    """The source is the model the issue names: qkv rows for 8 query heads and 4 key/value groups,
    fc1 rows for gate and up, RMSNorm without bias, no position table, an output layer of its own."""
    record = load_record(sources["tp2pp2"].root)
    shapes = {ms_name(e["name_global_layer"], record.meta): tuple(e["shape"]) for e in record.params if e["tp"] == 0}
    kv = 32 // 8
    assert shapes["language_model.encoder.layers.0.attention.qkv_proj.weight"] == ((8 + 2 * 4) * kv // 2, 32)
    assert shapes["language_model.encoder.layers.0.mlp.mapping.bias"] == (2 * 40 // 2,)
    assert shapes["language_model.encoder.layers.3.input_norm.weight"] == (32,)
    assert "language_model.output_layer.weight" in shapes
    assert not any("position_embeddings" in n or n.endswith(".bias") and "norm" in n for n in shapes)
    args = load_megatron_file(sources["tp2pp2"].megatron_path / "mp_rank_00_000" / "model_optim_rng.pt")["args"]
    assert (args.group_query_attention, args.num_query_groups, args.swiglu) == (True, 4, True)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_global_state_identity_and_bijection(case, sources, tmp_path):
    source_name, target = case
    fx = sources[source_name]
    spec = fx.spec
    out = tmp_path / "ms"
    convert_resharded(fx, out, target)
    record = load_record(fx.root)
    tp = target.get("tp", spec.tp)
    files = load_outputs(out, spec, target)

    want, head_copy = source_globals(record, merge=merge)
    got = output_globals(files, tp, merge=merge)
    assert not head_copy  # untied: no copy of the embedding anywhere
    assert sorted(got) == sorted(want)
    for name in want:
        for state in STATES:
            assert got[name][state].dtype == np.float32
            assert got[name][state].shape == want[name][state].shape, (name, state)
            assert got[name][state].tobytes() == want[name][state].tobytes(), (name, state)

    check_decodes_to_a_bijection(record, spec, files, tp)

    for (_, p), tensors in files.items():
        scalars = {n for n, a in tensors.items() if a.ndim == 0 or not n.split(".", 1)[-1].startswith("language_")}
        check_rank_names(set(tensors), mindspeed_stages(spec, target, p), scalars)
    pp, _, _ = target_stage_lists(spec, target)
    assert len(files) == tp * pp


def check_decodes_to_a_bijection(record, spec: FixtureSpec, files: dict, tp: int) -> None:
    """Every output element's value names one source element (parameter, tp rank, flat index); it must
    be of the same parameter, at the same global coordinate, and of tp rank 0 for a replicated one;
    together the outputs hit every such source element exactly once."""
    origin = {}  # value -> (MindSpore name, source tp rank, shard shape, flat index)
    expected = set()
    for entry in record.params:
        name = ms_name(entry["name_global_layer"], record.meta)
        values = record.tensors[f"{entry['key']}::param"].float().numpy().ravel()
        for index, value in enumerate(values.tolist()):
            origin[value] = (name, entry["tp"], tuple(entry["shape"]), index)
        if tp_rule(name) != REPLICATED or entry["tp"] == 0:
            expected.update((name, entry["tp"], index) for index in range(values.size))
    assert len(origin) == sum(int(np.prod(e["shape"])) for e in record.params)  # index-valued: all unique

    hit = []
    for (t, _), tensors in files.items():
        for name, param in tensors.items():
            if param.ndim == 0 or not name.startswith("language_model."):
                continue
            np.testing.assert_array_equal(tensors[f"exp_avg.{name}"], -param)
            np.testing.assert_array_equal(tensors[f"exp_avg_sq.{name}"], param + np.float32(0.5))
            replicated = tp_rule(name) == REPLICATED
            for index, value in enumerate(param.ravel().tolist()):
                src_name, src_tp, src_shape, src_index = origin[value]
                assert src_name == name, (name, index, src_name)
                where = global_coordinate(name, param.shape, t, tp, index)
                assert where == global_coordinate(name, src_shape, src_tp, spec.tp, src_index), (name, t, index)
                if replicated:
                    assert src_tp == 0, (name, t, index)
                if not replicated or t == 0:
                    hit.append((name, src_tp, src_index))
    assert len(hit) == len(set(hit)) == len(expected) and set(hit) == expected


def test_swapped_fc1_halves_are_caught(sources):
    """The decoding is not blind to the SwiGLU permutation: a tp 1 fc1 laid out as the plain
    concatenation of the tp 2 shards ([gate_0; up_0; gate_1; up_1]) puts elements at other global
    coordinates than the record says."""
    record = load_record(sources["tp2pp2"].root)
    name = "language_model.encoder.layers.0.mlp.mapping.bias"
    shards = {e["tp"]: record.tensors[f"{e['key']}::param"].float().numpy() for e in record.params
              if ms_name(e["name_global_layer"], record.meta) == name}
    right, wrong = merge(shards, name, False), np.concatenate([shards[0], shards[1]])
    assert right.tobytes() != wrong.tobytes()
    half = shards[0].size // 2
    up_0 = global_coordinate(name, shards[0].shape, 0, 2, half)  # rank 0's first up row
    assert right[up_0] == shards[0][half] and wrong[up_0] != shards[0][half]
