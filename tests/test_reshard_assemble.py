"""reshard.assemble: every target tensor assembled with `assemble_tensor` from index-valued source
shards (sharded by the independent reference of test_reshard_plan) equals the reference sharding at
the target layout; the replica handling of --replica-policy. No checkpoint files."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from megatron_ms_convert.errors import ConvertInputError
from megatron_ms_convert.reshard import RankCoord, plan_reshard
from megatron_ms_convert.reshard.assemble import assemble_tensor, replica_policy_check
from tests.test_reshard_plan import MODELS, global_values, mg, ms, ref_files

PAIRS = [
    ("legacy", mg(tp=2, pp=2), ms(tp=1, pp=4)),
    ("legacy", mg(tp=1, pp=1), ms(tp=4, pp=2)),
    ("mcore", mg(tp=2, pp=4, vpp=2), ms(tp=4, pp=1)),
    ("mcore", mg(tp=4), ms(tp=2, pp=3, stage_list=(2, 4, 2))),
    ("moe", mg(tp=2, ep=2), ms(tp=1, ep=4)),
    ("moe", mg(tp=1, ep=4, pp=2), ms(tp=2, ep=1)),
]


def _reader(files):
    def read_flat(seg):
        return torch.from_numpy(files[seg.source][(seg.chunk, seg.key)]).reshape(-1)
    return read_flat


@pytest.mark.parametrize("model_name,source,target", PAIRS,
                         ids=[f"{m}-{s.tp}.{s.pp}.{s.vpp}.{s.ep}-{t.tp}.{t.pp}.{t.vpp}.{t.ep}" for m, s, t in PAIRS])
def test_every_target_tensor_equals_the_reference(model_name, source, target):
    model = MODELS[model_name]
    values = global_values(model)
    src = ref_files(model, source, values)
    want = ref_files(model, target, values, head_copy_from_embedding=source.pp == 1)
    plan = plan_reshard(model, source, target)
    count = 0
    for rank in plan.ranks:
        for t in rank.tensors:
            got = assemble_tensor(t, _reader(src))
            assert got.dtype == torch.int64
            np.testing.assert_array_equal(got.numpy(), want[rank.rank][(t.chunk, t.key)],
                                          err_msg=f"{rank.rank} {t.key}")
            count += 1
    assert count == sum(len(v) for v in want.values())


def _one_replicated(tp=2):
    model = MODELS["legacy"]
    plan = plan_reshard(model, mg(tp=tp), ms(tp=1))
    target = plan.tensor(RankCoord(), "language_model.encoder.layers.0.input_norm.gamma")
    assert target.segments[0].replicas
    return target


def test_fills_out_in_place_and_casts():
    target = _one_replicated()
    out = torch.full(target.shape, -1.0, dtype=torch.float64)
    got = assemble_tensor(target, lambda seg: torch.arange(8, dtype=torch.float32), out=out)
    assert got is out and out.tolist() == list(range(8))


def test_replicas_equal_pass_and_are_read():
    target = _one_replicated(tp=4)
    asked = []

    def read(seg):
        asked.append(seg.source.tp)
        return torch.arange(8, dtype=torch.float32)
    assemble_tensor(target, read, replica_check=replica_policy_check(None))
    assert sorted(asked) == [0, 1, 2, 3]
    asked.clear()
    assemble_tensor(target, read)  # no check: the replicas are not read
    assert asked == [0]


@pytest.mark.parametrize("policy,expected", [("first", [0.0] * 8), ("mean", [0.5] * 8)])
def test_differing_replicas(policy, expected):
    target = _one_replicated()

    def read(seg):
        return torch.full((8,), float(seg.source.tp))
    with pytest.raises(ConvertInputError, match=r"differ.*8 of 8 elements differ, by up to 1.*--replica-policy"):
        assemble_tensor(target, read, replica_check=replica_policy_check(None))
    assert assemble_tensor(target, read, replica_check=replica_policy_check(policy)).tolist() == expected


def test_a_nan_must_be_the_same_nan_and_negative_zero_differs():
    target = _one_replicated()
    nan = torch.tensor([float("nan")] * 8)
    assemble_tensor(target, lambda seg: nan, replica_check=replica_policy_check(None))
    signed = {0: torch.zeros(8), 1: -torch.zeros(8)}
    with pytest.raises(ConvertInputError):
        assemble_tensor(target, lambda seg: signed[seg.source.tp], replica_check=replica_policy_check(None))


def test_a_wrongly_sized_source_or_missing_segment_is_an_error():
    target = _one_replicated()
    with pytest.raises(ValueError, match="expected 8 elements"):
        assemble_tensor(target, lambda seg: torch.zeros(9))
    with pytest.raises(ValueError, match="cover 0 of 8"):
        assemble_tensor(dataclasses.replace(target, segments=()), lambda seg: torch.zeros(8))
