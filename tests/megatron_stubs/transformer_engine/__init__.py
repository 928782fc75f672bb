"""transformer_engine stand-in for megatron.core 0.6.0 on CPU.

megatron.core.transformer.transformer_block imports Megatron's TE wrappers at module level, and even
with the local layer spec its final layer norm is TENorm, i.e. te.pytorch.LayerNorm. This package
provides that LayerNorm in plain torch and empty base classes for the other wrappers (never
instantiated with the local spec). Its version (0.0.0, from the dist-info beside it) keeps Megatron
from passing a CUDA device to it."""

from . import pytorch  # noqa: F401
