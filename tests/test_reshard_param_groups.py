"""Each rank's optimizer param_groups when re-sharding (megatron_ms_convert/reshard/param_groups.py,
used by both directions), against Megatron's own `_get_param_groups` (megatron-core 0.6.0,
megatron/core/optimizer/__init__.py) run in a subprocess on parameters given as plain data (name,
shape, `allreduce=False` for experts at ep > 1, the embedding/output mark for --decoupled-lr):

- the rule: every parameter's key and each rank's group order are Megatron's;
- the templates: one rank's groups rebuild every other rank's, in that rank's own order (a later stage
  starts with a norm: its groups are the other way round; a copy would swap weight decay);
- the way there: the MindSpore target ranks' groups (from the re-shard planner's tensors, MindSpore
  names, experts stacked) are those MindSpeed-Core-MS builds at that layout (Megatron's grouping with
  the experts not expert-parallel, at every ep; see `megatron_groups`), from templates of the groups
  the source layout's Megatron run recorded, and a --decoupled-lr source is refused.

The hyper-parameters a group carries besides its key are the test's own (`hyper`), given to both sides."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("megatron.core", reason="pip install -r requirements.txt (megatron-core==0.6.0)")

from megatron_ms_convert.errors import ConvertInputError  # noqa: E402
from megatron_ms_convert.pt2ckpt import main as convert_main  # noqa: E402
from megatron_ms_convert.pt2ckpt_reshard import target_groups  # noqa: E402
from megatron_ms_convert.reshard import MEGATRON, MINDSPORE, ModelFacts, ParallelLayout, plan_reshard  # noqa: E402
from megatron_ms_convert.reshard.megatron_target import rank_parameters  # noqa: E402
from megatron_ms_convert.reshard.param_groups import (group_key, group_order, group_templates,  # noqa: E402
                                                      no_weight_decay, rank_param_groups, split_by_optimizer)
from tests.helpers import error_lines, in_process  # noqa: E402
from tests.megatron_fixture import FixtureSpec, _megatron_enums_module, load_megatron_file, write_fixture  # noqa: E402

STUBS = Path(__file__).resolve().parent / "megatron_stubs"

# Megatron's _get_param_groups on plain chunks: stdin a JSON list of {"chunks": [[[name, shape,
# expert_parallel, embedding_or_output], ...], ...], "decoupled": bool}; stdout per case its groups,
# each with the indices (in model order) of its parameters instead of the parameters
ORACLE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import cuda_on_cpu  # noqa: F401  (the stand-ins first: Megatron's imports need them)
import torch
from megatron.core.optimizer import _get_param_groups


class Chunk:
    def __init__(self, params):
        self.params = params

    def named_parameters(self):
        return iter(self.params)


out = []
for case in json.load(sys.stdin):
    index, chunks = {}, []
    for chunk in case["chunks"]:
        params = []
        for name, shape, expert, marked in chunk:
            param = torch.nn.Parameter(torch.empty(shape))
            if expert:
                param.allreduce = False  # what Megatron's expert layers set at ep > 1
            if marked:
                param.is_embedding_or_output_parameter = True
            index[id(param)] = len(index)
            params.append((name, param))
        chunks.append(Chunk(params))
    groups = _get_param_groups(chunks, None, None, 1.0, case["decoupled"])
    out.append([dict({k: v for k, v in g.items() if k != "params"}, params=[index[id(p)] for p in g["params"]])
                for g in groups])
print(json.dumps(out))
"""

H, V, E = 4, 16, 4


def _legacy_layer(prefix: str) -> list:
    return [(prefix + name, shape, False, False) for name, shape in [
        ("input_norm.weight", (H,)), ("input_norm.bias", (H,)),
        ("self_attention.query_key_value.weight", (3 * H, H)), ("self_attention.query_key_value.bias", (3 * H,)),
        ("self_attention.dense.weight", (H, H)), ("self_attention.dense.bias", (H,)),
        ("post_attention_norm.weight", (H,)), ("post_attention_norm.bias", (H,)),
        ("mlp.dense_h_to_4h.weight", (4 * H, H)), ("mlp.dense_h_to_4h.bias", (4 * H,)),
        ("mlp.dense_4h_to_h.weight", (H, 4 * H)), ("mlp.dense_4h_to_h.bias", (H,))]]


def _moe_layer(prefix: str, local_experts: int, expert_parallel: bool) -> list:
    out = [(prefix + name, shape, False, False) for name, shape in [
        ("input_layernorm.weight", (H,)), ("self_attention.linear_proj.weight", (H, H)),
        ("self_attention.linear_qkv.weight", (3 * H, H)), ("pre_mlp_layernorm.weight", (H,)),
        ("mlp.router.weight", (E, H))]]
    for k in range(local_experts):
        out += [(prefix + f"mlp.experts.local_experts.{k}.{name}", shape, expert_parallel, False) for name, shape in [
            ("linear_fc1.weight", (2 * H, H)), ("linear_fc1.bias", (2 * H,)), ("linear_fc2.weight", (H, 2 * H))]]
    return out


# one rank each: (chunks, --decoupled-lr)
RANKS = {
    "legacy stage 0 of 2": ([[("language_model.embedding.word_embeddings.weight", (V, H), False, False),
                              ("language_model.embedding.position_embeddings.weight", (8, H), False, False),
                              *_legacy_layer("language_model.encoder.layers.0.")]], False),
    "legacy stage 1 of 2": ([[*_legacy_layer("language_model.encoder.layers.0."),
                              ("language_model.encoder.final_norm.weight", (H,), False, False),
                              ("language_model.encoder.final_norm.bias", (H,), False, False),
                              ("word_embeddings.weight", (V, H), False, False)]], False),
    "legacy pp 1": ([[("language_model.embedding.word_embeddings.weight", (V, H), False, False),
                      *_legacy_layer("language_model.encoder.layers.0."),
                      *_legacy_layer("language_model.encoder.layers.1."),
                      ("language_model.encoder.final_norm.weight", (H,), False, False)]], False),
    "legacy vpp 2, stage 1": ([_legacy_layer("language_model.encoder.layers.0."),
                               _legacy_layer("language_model.encoder.layers.0.")], False),
    # mcore MoE at ep 2, --decoupled-lr: the embedding and the untied head are decoupled
    "moe ep 2 decoupled, pp 1": ([[("embedding.word_embeddings.weight", (V, H), False, True),
                                   *_moe_layer("decoder.layers.0.", 2, True),
                                   ("decoder.final_layernorm.weight", (H,), False, False),
                                   ("output_layer.weight", (V, H), False, True)]], True),
    "moe ep 2 decoupled, stage 1 of 2": ([[*_moe_layer("decoder.layers.0.", 2, True),
                                           ("decoder.final_layernorm.weight", (H,), False, False),
                                           ("output_layer.weight", (V, H), False, True)]], True),
    # the same model's stage at ep 1: its experts are in the dense groups
    "moe ep 1 decoupled, stage 1 of 2": ([[*_moe_layer("decoder.layers.0.", 4, False),
                                           ("decoder.final_layernorm.weight", (H,), False, False),
                                           ("output_layer.weight", (V, H), False, True)]], True),
}

# the way there: (model, source layout, MindSpore target layout)
_LEGACY = ModelFacts(num_layers=4, hidden=16, heads=4, query_groups=4, ffn=40, padded_vocab=56, max_position=8)
_MCORE = ModelFacts(num_layers=8, hidden=16, heads=4, query_groups=4, ffn=40, padded_vocab=56, family="mcore",
                    normalization="RMSNorm", tied=False, linear_bias=False, qkv_bias=False, swiglu=True)
_MOE = ModelFacts(num_layers=2, hidden=16, heads=4, query_groups=4, ffn=40, padded_vocab=56, family="mcore",
                  tied=False, max_position=8, num_experts=4)
FORWARD = {
    "legacy tp2 pp2 -> pp 1": (_LEGACY, dict(tp=2, pp=2), dict(tp=2, pp=1)),
    "legacy tp2 pp2 -> tp 1 pp 4": (_LEGACY, dict(tp=2, pp=2), dict(tp=1, pp=4)),
    "legacy tp1 pp1 -> pp 2": (_LEGACY, dict(tp=1, pp=1), dict(tp=1, pp=2)),
    "mcore pp4 vpp2 -> tp 2 pp 4 vpp 2": (_MCORE, dict(pp=4, vpp=2), dict(tp=2, pp=4, vpp=2)),
    "mcore pp4 vpp2 -> pp 1": (_MCORE, dict(pp=4, vpp=2), dict(pp=1)),
    "moe ep2 -> pp 2 ep 2": (_MOE, dict(ep=2), dict(pp=2, ep=2)),
    "moe ep2 -> ep 1": (_MOE, dict(ep=2), dict(ep=1)),
    "moe ep1 -> pp 2 ep 2": (_MOE, dict(ep=1), dict(pp=2, ep=2)),
}


def forward_targets(name: str):
    """(the planner's MindSpore target ranks, the same layout's parameters on the Megatron side)."""
    model, source, target = FORWARD[name]
    plan = plan_reshard(model, ParallelLayout(MEGATRON, **source), ParallelLayout(MINDSPORE, **target))
    megatron = ParallelLayout(MEGATRON, **target)
    return [(t, rank_parameters(model, megatron, t.rank)) for t in plan.ranks]


def source_ranks(name: str):
    """The source layout's ranks with their parameters, as the Megatron run that recorded the groups
    had them (experts expert-parallel at ep > 1)."""
    model, source, _ = FORWARD[name]
    layout = ParallelLayout(MEGATRON, **source)
    return [(rank, rank_parameters(model, layout, rank)) for rank in layout.ranks()]


def _plain(chunks, expert_parallel: bool = True) -> list:
    return [[(p.name, p.shape, p.expert_parallel and expert_parallel, p.embedding_or_output) for p in chunk]
            for chunk in chunks]


@pytest.fixture(scope="module")
def megatron_groups() -> dict:
    """Megatron's groups of every rank above: RANKS by name; the way there's by (case, target rank, "mindspeed")
    the groups MindSpeed-Core-MS (697e48e) builds for that rank: its `set_weight_decay`
    (mindspeed_ms/training/utils.py:29-67) keys parameters by (wd_mult, lr_mult) only, experts among
    them at every ep, in order of first appearance, and `pretrain` hands those groups to its one
    optimizer (mindspeed_ms/training/training.py:1046-1053; no expert optimizer,
    mindspeed_ms/core/optimizer/__init__.py:49-77). That is Megatron's own grouping with no parameter
    expert-parallel (allreduce=True: its expert layers' state at ep 1, megatron/core/tensor_parallel/
    layers.py:639,684,706; optimizer/__init__.py:62), so the oracle runs with the expert flag cleared."""
    cases = dict(RANKS)
    for name in FORWARD:
        for target, params in forward_targets(name):
            cases[(name, target.rank, "mindspeed")] = (_plain(params, expert_parallel=False), False)
        for rank, params in source_ranks(name):
            cases[(name, rank, "source")] = (_plain(params), False)
    names = list(cases)
    stdin = json.dumps([{"chunks": cases[n][0], "decoupled": cases[n][1]} for n in names])
    proc = subprocess.run([sys.executable, "-c", ORACLE, str(STUBS)], input=stdin, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(zip(names, json.loads(proc.stdout.splitlines()[-1])))


def hyper(group: dict) -> dict:
    """The test's hyper-parameters of a group, by its kind only (as a run's scheduler sets them)."""
    return dict(group, lr=0.002 if group["is_decoupled_lr"] else 0.001, weight_decay=0.1 * group["wd_mult"],
                betas=[0.9, 0.95], step=7)


def recorded(groups: list[dict]) -> list[dict]:
    """Groups as a checkpoint saves them: hyper-parameters, no parameters."""
    return [hyper({k: v for k, v in g.items() if k != "params"}) for g in groups]


def keys_of(chunks, decoupled: bool) -> list:
    return [group_key(no_weight_decay=no_weight_decay(name, shape), expert_parallel=expert,
                      decoupled_lr=decoupled and marked) for chunk in chunks for name, shape, expert, marked in chunk]


def megatron_key(group: dict) -> tuple:
    return (group["wd_mult"], group["lr_mult"], group["is_expert_parallel"], group["is_decoupled_lr"])


@pytest.mark.parametrize("name", RANKS)
def test_every_parameters_key_and_the_group_order_are_megatrons(name, megatron_groups):
    chunks, decoupled = RANKS[name]
    keys = keys_of(chunks, decoupled)
    theirs = megatron_groups[name]
    assert group_order(keys) == [megatron_key(g) for g in theirs]
    for group in theirs:
        assert {keys[i] for i in group["params"]} == {megatron_key(group)}, name


def test_one_ranks_groups_rebuild_every_ranks_in_its_own_order(megatron_groups):
    templates = group_templates(recorded(megatron_groups["legacy stage 0 of 2"]), "stage 0")
    for name in ("legacy stage 0 of 2", "legacy stage 1 of 2", "legacy pp 1", "legacy vpp 2, stage 1"):
        chunks, decoupled = RANKS[name]
        assert rank_param_groups(keys_of(chunks, decoupled), templates) == recorded(megatron_groups[name]), name
    # the stages' orders really differ: stage 0's groups copied to stage 1 would swap weight decay
    stage0, stage1 = (recorded(megatron_groups[f"legacy stage {p} of 2"]) for p in (0, 1))
    assert [g["weight_decay"] for g in stage0] == [0.1, 0.0] and [g["weight_decay"] for g in stage1] == [0.0, 0.1]


def test_expert_groups_at_a_new_ep_take_their_kinds_hyper_parameters(megatron_groups):
    """A source at ep 1 recorded no expert-parallel group: at ep 2 the experts' groups are the dense
    groups of the same kind, marked expert-parallel; the dense optimizer's groups come first."""
    templates = group_templates(recorded(megatron_groups["moe ep 1 decoupled, stage 1 of 2"]), "ep 1")
    assert not any(key[2] for key in templates)
    for name in ("moe ep 2 decoupled, pp 1", "moe ep 2 decoupled, stage 1 of 2"):
        chunks, decoupled = RANKS[name]
        dense, expert = split_by_optimizer(rank_param_groups(keys_of(chunks, decoupled), templates))
        want = recorded(megatron_groups[name])
        assert dense == [g for g in want if not g["is_expert_parallel"]], name
        assert expert == [g for g in want if g["is_expert_parallel"]] and expert, name


def test_groups_of_one_kind_that_differ_or_a_missing_kind_are_refused(megatron_groups):
    groups = recorded(megatron_groups["legacy stage 0 of 2"])
    with pytest.raises(ConvertInputError, match="two recorded param_groups of kind .* differ"):
        group_templates([*groups, dict(groups[0], lr=0.5)], "rank 1")
    chunks, decoupled = RANKS["moe ep 2 decoupled, pp 1"]
    with pytest.raises(ConvertInputError, match="no recorded param_group of kind .*'is_decoupled_lr': True"):
        rank_param_groups(keys_of(chunks, decoupled), group_templates(groups, "rank 0"), "rank 0")


@pytest.mark.parametrize("name", FORWARD)
def test_the_way_theres_target_ranks_have_mindspeeds_groups_at_that_layout(name, megatron_groups):
    """The MindSpore target ranks' groups, from the planner's tensors (MindSpore names, experts
    stacked), numbered as MindSpeed-Core-MS numbers its groups at the target layout: two kinds, the
    experts inside them at every ep (a source at ep 2 recorded expert groups; they are not written)."""
    source = [g for rank, _ in source_ranks(name) for g in recorded(megatron_groups[(name, rank, "source")])]
    assert any(g["is_expert_parallel"] for g in source) == (FORWARD[name][1].get("ep", 1) > 1), name
    templates = group_templates(source, name)
    first = SimpleNamespace(folder=SimpleNamespace(model_file=Path(name)), param_groups=())
    orders = set()
    for target, _ in forward_targets(name):
        got = target_groups(target.tensors, templates, first.param_groups, first.folder.model_file)
        assert got == recorded(megatron_groups[(name, target.rank, "mindspeed")]), (name, target.rank)
        assert len(got) == 2 and not any(g["is_expert_parallel"] for g in got), (name, target.rank)
        orders.add(tuple(g["weight_decay"] for g in got))
    if FORWARD[name][2].get("pp", 1) > 1:
        assert len(orders) > 1  # stages whose groups a copy of stage 0's would get wrong


def test_a_decoupled_lr_source_is_refused_on_the_way_there(tmp_path):
    """MindSpeed numbers a decoupled group among the others; without it group i would take another
    kind's learning rate and weight decay: refused in one line, nothing written."""
    spec = FixtureSpec(tp=2, pp=1, num_layers=2, hidden=16, heads=4, ffn=40, vocab=50, make_vocab_size_divisible_by=4,
                       seq_length=8, dp=1)
    fx = write_fixture(tmp_path / "src", spec)
    for model_file in fx.megatron_path.glob("mp_rank_*/model_optim_rng.pt"):
        state = load_megatron_file(model_file)
        groups = state["optimizer"]["optimizer"]["param_groups"]
        groups.insert(0, dict(groups[0], is_decoupled_lr=True, lr=0.002))
        with _megatron_enums_module():
            torch.save(state, model_file)
    out = tmp_path / "ms"
    proc = in_process(convert_main, *fx.convert_flags(), "--ms-path", out, "--ms-tp-size", "1")
    assert proc.returncode == 2, proc.stdout[-2000:]
    [line] = error_lines(proc)
    assert "param groups with is_decoupled_lr" in line and "--ms-" in line, line
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file() and "lock" not in p.name]
    # the same files at their own layout convert: the groups are copied as they are
    shutil.rmtree(out, ignore_errors=True)
    assert in_process(convert_main, *fx.convert_flags(), "--ms-path", out).returncode == 0
