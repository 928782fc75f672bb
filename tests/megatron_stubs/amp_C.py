"""Pure-torch stand-ins for apex's amp_C kernels used by megatron.core.optimizer.

Signatures follow apex: op(chunk_size, noop_flag, tensor_lists, *args)."""

import torch


def multi_tensor_scale(chunk_size, noop_flag, tensor_lists, scale):
    """dst = src * scale in fp32 arithmetic; the flag is set when a source holds inf/nan."""
    sources, destinations = tensor_lists
    for src, dst in zip(sources, destinations):
        if not torch.isfinite(src).all():
            noop_flag.fill_(1)
        dst.copy_(src.float() * scale)


def multi_tensor_l2norm(chunk_size, noop_flag, tensor_lists, per_tensor):
    """(global L2 norm as a 1-element fp32 tensor, per-tensor norms or an empty tensor)."""
    (tensors,) = tensor_lists
    norms = torch.stack([t.float().norm(2) for t in tensors]) if tensors else torch.zeros(0)
    total = norms.pow(2).sum().sqrt().reshape(1)
    return total, (norms if per_tensor else torch.zeros(0))
