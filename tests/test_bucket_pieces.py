"""A distrib_optim.pt bucket written in pieces: the parameters' own tensors in bucket order with zero
runs for the gaps and the padding, the same bytes as the bucket assembled in memory."""

from __future__ import annotations

import pytest
import torch

from megatron_ms_convert.megatron.layout import ParamSpan
from megatron_ms_convert.megatron.torch_writer import LazyTensor, Pieces, materialize
from megatron_ms_convert.megatron.writer import _bucket_producer


def span(name: str, start: int, numel: int) -> ParamSpan:
    return ParamSpan(name, "torch.bfloat16", (numel,), start, start + numel, 0)


def values_of(chunk: int, name: str, state: str) -> torch.Tensor:
    return torch.arange(len(name) * 100.0, len(name) * 100.0 + int(name.split("_")[1]))


def test_bucket_pieces_equal_the_assembled_bucket():
    # members out of order, a gap between two of them, padding at the end
    members = [(span("b_3", 0, 3), 5), (span("a_4", 0, 4), 0), (span("cc_2", 0, 2), 8)]
    produce = _bucket_producer(0, 12, members, "param", values_of)
    assert isinstance(produce(), Pieces)
    want = torch.zeros(12)
    for member, offset in members:
        want[offset:offset + member.numel] = values_of(0, member.name, "param")
    got = materialize(LazyTensor((12,), torch.float32, produce))
    assert got.view(torch.int32).tolist() == want.view(torch.int32).tolist()


@pytest.mark.parametrize("members, message", [
    ([(span("a_4", 0, 4), 0), (span("b_3", 0, 3), 2)], "inside the previous parameter"),
    ([(span("a_5", 0, 4), 0)], "5 torch.float32 values, expected 4"),
], ids=["overlap", "wrong_size"])
def test_a_bad_bucket_is_refused(members, message):
    with pytest.raises(ValueError, match=message):
        materialize(LazyTensor((12,), torch.float32, _bucket_producer(0, 12, members, "param", values_of)))
