"""te.pytorch: a real LayerNorm / RMSNorm; the other classes only exist so Megatron can subclass them."""

import torch


class _Norm(torch.nn.Module):
    def __init__(self, hidden_size, eps=1e-5, sequence_parallel=False, zero_centered_gamma=False,
                 params_dtype=torch.float32, bias=True):
        super().__init__()
        self.eps = eps
        self.zero_centered_gamma = zero_centered_gamma
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, dtype=params_dtype))
        torch.nn.init.zeros_(self.weight) if zero_centered_gamma else torch.nn.init.ones_(self.weight)
        self.weight.sequence_parallel = sequence_parallel
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=params_dtype))
            self.bias.sequence_parallel = sequence_parallel

    def _gamma(self):
        return self.weight + 1 if self.zero_centered_gamma else self.weight


class LayerNorm(_Norm):
    def forward(self, x):
        return torch.nn.functional.layer_norm(x, self.weight.shape, self._gamma(), self.bias, self.eps)


class RMSNorm(_Norm):
    def __init__(self, hidden_size, **kwargs):
        super().__init__(hidden_size, bias=False, **kwargs)

    def forward(self, x):
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self._gamma().float()).to(x.dtype)


class _Unavailable(torch.nn.Module):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("transformer_engine is not available on CPU; use the local layer spec")


class Linear(_Unavailable):
    pass


class LayerNormLinear(_Unavailable):
    pass


class DotProductAttention(_Unavailable):
    pass
